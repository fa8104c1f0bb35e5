//! One log capture per test process (every crate, debug and up, into memory), panic
//! messages too, and the one secret scan: a secret must appear nowhere a user or a log
//! pipeline can read, neither as plaintext nor base64-encoded.
use base64::Engine;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// The process's captured logs and panic messages.
#[derive(Clone)]
pub struct LogCapture {
    logs: Arc<Mutex<Vec<u8>>>,
    panics: Arc<Mutex<Vec<String>>>,
}

impl LogCapture {
    /// Installs the capture on first use (the global tracing subscriber and a panic hook
    /// that records every panic, with its thread's name, then reports it as before).
    pub fn get() -> LogCapture {
        Self::with_filter("debug")
    }

    /// The capture at every level, trace included, for a test binary whose secret scan
    /// must cover everything any crate could log. The process's first call decides the
    /// level: call this before anything else starts the capture (e.g. a `World`).
    pub fn every_level() -> LogCapture {
        Self::with_filter("trace")
    }

    fn with_filter(filter: &str) -> LogCapture {
        static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
        CAPTURE
            .get_or_init(|| {
                let logs = Arc::new(Mutex::new(Vec::new()));
                let sink = logs.clone();
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(move || Sink(sink.clone()))
                    .with_ansi(false)
                    .try_init();
                let panics = Arc::new(Mutex::new(Vec::new()));
                let seen = panics.clone();
                let previous = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    let thread = std::thread::current()
                        .name()
                        .unwrap_or_default()
                        .to_string();
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{thread}: {info}"));
                    previous(info);
                }));
                LogCapture { logs, panics }
            })
            .clone()
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&self.logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Every panic so far, as `thread: message`.
    pub fn panics(&self) -> Vec<String> {
        self.panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The panics on threads whose name starts with `prefix` (e.g. the lab's own threads).
    pub fn panics_on(&self, prefix: &str) -> Vec<String> {
        self.panics()
            .into_iter()
            .filter(|p| p.starts_with(prefix))
            .collect()
    }
}

/// The tracing writer: appends to the shared buffer.
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The forms of `secret` to look for: the plaintext, and its base64 encoding at each of
/// the three alignments it can have inside longer base64 text (only the characters that
/// do not depend on the neighbouring bytes).
fn forms(secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_string()];
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    for shift in 0..3usize {
        let mut bytes = vec![0u8; shift];
        bytes.extend_from_slice(secret.as_bytes());
        let encoded = b64.encode(&bytes);
        // Skip the characters the leading filler touches; drop the last, partial one.
        let skip = if shift == 0 {
            0
        } else {
            (shift * 8).div_ceil(6)
        };
        let usable = (bytes.len() * 8) / 6;
        if usable > skip + 4 {
            forms.push(encoded[skip..usable].to_string());
        }
    }
    forms
}

/// The secrets of `secrets` that `haystack` contains, plaintext or base64-encoded.
pub fn leaks<'a>(haystack: &str, secrets: &[&'a str]) -> Vec<&'a str> {
    secrets
        .iter()
        .copied()
        .filter(|s| !s.is_empty() && forms(s).iter().any(|f| haystack.contains(f.as_str())))
        .collect()
}

/// Fails the test if any of `secrets` appears in `haystack` (what `place` names), as
/// plaintext or base64. The message names the secret's position, never the secret.
pub fn assert_not_leaked(haystack: &str, place: &str, secrets: &[&str]) {
    let leaked = leaks(haystack, secrets);
    let which: Vec<usize> = secrets
        .iter()
        .enumerate()
        .filter(|(_, s)| leaked.contains(s))
        .map(|(i, _)| i)
        .collect();
    assert!(
        which.is_empty(),
        "secret(s) number {which:?} of {} leaked into {place}",
        secrets.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plaintext_and_base64_at_every_alignment() {
        let secret = "Leak-Canary-Plain-7f3a9";
        let b64 = base64::engine::general_purpose::STANDARD;
        for prefix in ["", "x", "xy", "xyz"] {
            let text = format!("data: {}", b64.encode(format!("{prefix}{secret}tail")));
            assert_eq!(leaks(&text, &[secret]), [secret], "prefix {prefix:?}");
        }
        assert_eq!(leaks(&format!("… {secret} …"), &[secret]), [secret]);
        assert!(leaks("nothing here", &[secret]).is_empty());
    }
}
