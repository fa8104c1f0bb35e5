//! The bodies of the fuzz targets in fuzz/ (cargo-fuzz), here so that `cargo test` replays
//! their corpora (api/tests/fuzz_corpus.rs) with the very code the fuzzer runs. Each
//! function takes arbitrary bytes, must never panic on its own, and asserts the
//! properties the parsers promise; a panic is a finding.

use secrecy::SecretString;

use crate::authorized_keys;
use crate::validate::{self, crypt};
use crate::wire::{GetSshKeysRequest, ProbeRequest, SetPasswordRequest, SshKeysRequest};

/// The shim's request handling up to the guest: decode one of the wire requests (the
/// first byte picks which) and run the validate:: functions the server runs on it.
pub fn shim_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(req) = serde_json::from_slice::<SetPasswordRequest>(body) {
                let _ = validate::domain(&req.domain);
                let _ = validate::user(&req.user);
                let checked = validate::password(&req.password, req.crypted);
                if req.crypted && checked.is_ok() {
                    use secrecy::ExposeSecret;
                    assert!(crypt::check(req.password.expose_secret()).is_ok());
                }
            }
        }
        1 => {
            if let Ok(req) = serde_json::from_slice::<SshKeysRequest>(body) {
                let _ = validate::domain(&req.domain);
                let _ = validate::user(&req.user);
                if let Ok(keys) = validate::public_keys(&req.keys) {
                    // What passes is exactly what the controller's parser accepts, and
                    // stays the same line.
                    for line in keys.as_slice() {
                        let entry = authorized_keys::parse_line(line)
                            .expect("a validated key line parses again")
                            .expect("a validated key line is not a comment");
                        assert_eq!(&entry.line, line);
                    }
                }
            }
        }
        2 => {
            if let Ok(req) = serde_json::from_slice::<GetSshKeysRequest>(body) {
                let _ = validate::domain(&req.domain);
                let _ = validate::user(&req.user);
            }
        }
        _ => {
            if let Ok(req) = serde_json::from_slice::<ProbeRequest>(body) {
                let _ = validate::domain(&req.domain);
            }
        }
    }
}

/// authorized_keys text: the whole-file parser, each line, and the options splitter with
/// its round trip (options re-joined then re-split are the same options).
pub fn authorized_keys(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = authorized_keys::parse(text) {
        assert!(!entries.is_empty());
    }
    for line in text.split('\n') {
        if let Ok(Some(entry)) = authorized_keys::parse_line(line) {
            // Parsing the kept line again gives the same entry; the fingerprint ignores
            // options and comment.
            let again = authorized_keys::parse_line(&entry.line)
                .expect("a kept line parses again")
                .expect("a kept line is not a comment");
            assert_eq!(again, entry);
            assert_eq!(
                authorized_keys::fingerprint(&entry.line).as_deref(),
                Some(entry.fingerprint.as_str())
            );
            if !entry.options.is_empty() {
                round_trip(&entry.options);
            }
        }
        // The splitter on its own, on the first word (whatever it is).
        let line = line.trim_start_matches([' ', '\t']);
        if let Some(end) = authorized_keys::options_end(line)
            && let Ok(options) = authorized_keys::split_options(&line[..end])
        {
            round_trip(&options);
        }
    }
}

fn round_trip(options: &[authorized_keys::KeyOption]) {
    let joined = authorized_keys::join_options(options);
    assert_eq!(
        authorized_keys::options_end(&joined),
        Some(joined.len()),
        "joined options end early: {joined:?}"
    );
    let again = authorized_keys::split_options(&joined)
        .unwrap_or_else(|e| panic!("joined options do not split: {joined:?}: {e}"));
    assert_eq!(again, options, "round trip changed the options: {joined:?}");
}

/// crypt(3) strings: the scheme check, and validate::password agreeing with it.
pub fn crypt(data: &[u8]) {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let checked = crypt::check(value);
    if let Ok(scheme) = checked {
        assert!(value.starts_with(scheme.prefix));
        assert!(value.is_ascii());
        assert!(!value.contains([':', '\n', '\0']));
    }
    let via_password = validate::password(&SecretString::from(value), true);
    if via_password.is_ok() {
        assert!(checked.is_ok());
    }
}

/// Runs `run` over every file of the committed corpus `fuzz/corpus/<target>/`, failing
/// with the file's name when one panics: how `cargo test` replays each fuzz target's seeds
/// and regressions without any timed fuzzing (api/tests/fuzz_corpus.rs for the targets
/// here, lab/tests/fuzz_corpus.rs for the emulator's selector parser).
pub fn replay_corpus(target: &str, run: fn(&[u8])) {
    let dir =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus")).join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus", dir.display());
    for path in &files {
        let data = std::fs::read(path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target} crashes on {}", path.display());
    }
    eprintln!("{target}: {} corpus files replayed", files.len());
}
