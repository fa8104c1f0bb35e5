//! authorized_keys lines as sshd reads them: `[options] keytype base64 [comment]`.
//!
//! Pure (no I/O); used by the controller (a Secret's or spec's key list, and the lines the
//! guest reports back) and by the shim's input validation, so both ends accept and refuse
//! exactly the same lines.
//!
//! Why not `ssh_key::AuthorizedKeys`: its entry parser splits the options at any space
//! (also inside quotes: `command="echo a b"`), cuts a line at any `#` (also inside a
//! quoted option or a comment), and refuses `restrict` when the key has no comment. sshd
//! does none of that, so a line sshd accepts would be refused (or cut) here. We split the
//! options by sshd's rules (OpenSSH's `sshkey_advance_past_options` in authfile.c and
//! `sshauthopt_parse`/`opt_dequote` in auth-options.c, as called from
//! auth2-pubkeyfile.c) and hand only `type base64 [comment]` to
//! `ssh_key::PublicKey::from_openssh` for the key itself.
//!
//! What sshd would refuse at login (an unknown option, a missing quote, a second
//! `command=`) we refuse here: qemu-ga stores any line, so otherwise the key would be
//! "verified" by reading it back and still never let anyone in.

use ssh_key::{HashAlg, PublicKey};

/// Longest line accepted, in bytes (an RSA 16384 key is ~2.8 KiB).
pub const MAX_LINE_BYTES: usize = 8192;

/// Key types sshd reads at the start of a line. A first word that is none of these starts
/// the options (as in sshd, which tries to read a key first and options only then).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "sk-ssh-ed25519@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ssh-dss-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
];

/// Options that take no value. All but `restrict` and `cert-authority` may be negated
/// with `no-` (sshd's `opt_flag`).
const FLAG_OPTIONS: &[(&str, bool)] = &[
    ("restrict", false),
    ("cert-authority", false),
    ("port-forwarding", true),
    ("agent-forwarding", true),
    ("x11-forwarding", true),
    ("touch-required", true),
    ("verify-required", true),
    ("pty", true),
    ("user-rc", true),
];

/// Options that take a quoted value (`name="value"`); the bool says whether sshd refuses
/// a second one on the same line.
const VALUE_OPTIONS: &[(&str, bool)] = &[
    ("command", true),
    ("principals", true),
    ("from", false),
    ("expiry-time", false),
    ("environment", false),
    ("permitopen", false),
    ("permitlisten", false),
    ("tunnel", false),
];

/// One option: its name as written (sshd compares case-insensitively) and, for
/// `name="value"` options, the value with `\"` unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyOption {
    pub name: String,
    pub value: Option<String>,
}

/// Why an options string is refused. No variant carries any of the line's content; the
/// messages count options from 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// The options end inside a quoted value.
    #[error("a quoted option value has no closing quote")]
    UnterminatedQuote,
    /// An empty option (`a,,b`, a leading or trailing comma).
    #[error("option {} is empty", .index + 1)]
    Empty { index: usize },
    /// A name sshd does not know (it would refuse the whole line).
    #[error("option {} is not one sshd knows (sshd would ignore the whole line)", .index + 1)]
    Unknown { index: usize },
    /// A flag option given a value, or a value option without `="…"`.
    #[error("option {} is malformed (flags take no value; others need =\"value\")", .index + 1)]
    Malformed { index: usize },
    /// Something other than `,` after a quoted value.
    #[error("option {} has characters after its closing quote", .index + 1)]
    JunkAfterValue { index: usize },
    /// A second `command=` or `principals=`.
    #[error("option {} repeats an option sshd allows only once", .index + 1)]
    Repeated { index: usize },
    /// A value sshd refuses (`environment` without `NAME=`, a bad `expiry-time` or
    /// `tunnel`).
    #[error("option {}: {why}", .index + 1)]
    BadValue { index: usize, why: &'static str },
}

/// Where the options end, by sshd's `sshkey_advance_past_options`: at the first space or
/// tab outside double quotes; `\"` never opens or closes a quote. None when a quote is
/// left open.
pub fn options_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' if !quoted => return Some(i),
            b'\\' if b.get(i + 1) == Some(&b'"') => i += 1,
            b'"' => quoted = !quoted,
            _ => {}
        }
        i += 1;
    }
    (!quoted).then_some(b.len())
}

/// Split an options string (no unquoted whitespace) into options, by sshd's rules:
/// comma-separated; `name="value"` where the value runs to the next `"` that is not
/// preceded by a backslash, and `\"` stands for `"` (other backslashes are kept).
pub fn split_options(s: &str) -> Result<Vec<KeyOption>, OptionsError> {
    let mut out: Vec<KeyOption> = Vec::new();
    let mut rest = s;
    loop {
        let index = out.len();
        // The name: up to '=', ',' or the end.
        let name_end = rest.find([',', '=']).unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() {
            return Err(OptionsError::Empty { index });
        }
        rest = &rest[name_end..];
        let value = if let Some(after_eq) = rest.strip_prefix('=') {
            let quoted = after_eq
                .strip_prefix('"')
                .ok_or(OptionsError::Malformed { index })?;
            let (value, after) = dequote(quoted).ok_or(OptionsError::UnterminatedQuote)?;
            rest = after;
            Some(value)
        } else {
            None
        };
        let opt = KeyOption {
            name: name.to_string(),
            value,
        };
        check_option(&opt, index, &out)?;
        out.push(opt);
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None if rest.is_empty() => return Ok(out),
            None => return Err(OptionsError::JunkAfterValue { index }),
        }
        if rest.is_empty() {
            return Err(OptionsError::Empty { index: index + 1 });
        }
    }
}

/// sshd's `opt_dequote` after the opening quote: answers the value and what follows the
/// closing quote.
fn dequote(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' if chars.peek().is_some_and(|&(_, n)| n == '"') => {
                chars.next();
                value.push('"');
            }
            c => value.push(c),
        }
    }
    None
}

fn check_option(opt: &KeyOption, index: usize, before: &[KeyOption]) -> Result<(), OptionsError> {
    let lower = opt.name.to_ascii_lowercase();
    if let Some(&(name, once)) = VALUE_OPTIONS.iter().find(|(n, _)| *n == lower) {
        let Some(value) = &opt.value else {
            return Err(OptionsError::Malformed { index });
        };
        if once && before.iter().any(|o| o.name.eq_ignore_ascii_case(name)) {
            return Err(OptionsError::Repeated { index });
        }
        let bad = |why| Err(OptionsError::BadValue { index, why });
        match name {
            "environment" => {
                let ok = value.split_once('=').is_some_and(|(n, _)| {
                    !n.is_empty() && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                });
                if !ok {
                    return bad("environment must be NAME=value, NAME of letters, digits and _");
                }
            }
            "expiry-time" => {
                let t = value.strip_suffix(['Z', 'z']).unwrap_or(value);
                if ![8, 12, 14].contains(&t.len()) || !t.bytes().all(|c| c.is_ascii_digit()) {
                    return bad("expiry-time must be YYYYMMDD[HHMM[SS]][Z]");
                }
            }
            "tunnel" => {
                let ok = value.eq_ignore_ascii_case("any")
                    || (!value.is_empty()
                        && value.len() <= 10
                        && value.bytes().all(|c| c.is_ascii_digit()));
                if !ok {
                    return bad("tunnel must be a tunnel device number or \"any\"");
                }
            }
            _ => {}
        }
        return Ok(());
    }
    let (negated, base) = match lower.strip_prefix("no-") {
        Some(b) => (true, b),
        None => (false, lower.as_str()),
    };
    match FLAG_OPTIONS.iter().find(|(n, _)| *n == base) {
        Some(&(_, negatable)) if negatable || !negated => {
            if opt.value.is_some() {
                Err(OptionsError::Malformed { index })
            } else {
                Ok(())
            }
        }
        _ => Err(OptionsError::Unknown { index }),
    }
}

/// The options as one string sshd reads back as the same options: values quoted, `"`
/// escaped as `\"`. (A value never ends in a backslash, since `\"` is an escaped quote,
/// so this is exact.)
pub fn join_options(options: &[KeyOption]) -> String {
    let mut out = String::new();
    for (i, o) in options.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&o.name);
        if let Some(v) = &o.value {
            out.push_str("=\"");
            out.push_str(&v.replace('"', "\\\""));
            out.push('"');
        }
    }
    out
}

/// Why one line is refused. No variant carries any of the line's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// It contains `PRIVATE KEY`.
    PrivateKey,
    TooLong,
    /// A control character other than tab (e.g. a newline inside one entry).
    ControlCharacter,
    Options(OptionsError),
    /// Options and nothing after them.
    MissingKey,
    /// The key itself does not parse (the ssh-key crate's reason).
    NotAKey(String),
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PrivateKey => f.write_str(
                "is part of a private key: put only public keys (the .pub file) here, and treat that private key as leaked",
            ),
            Self::TooLong => write!(f, "is longer than {MAX_LINE_BYTES} bytes"),
            Self::ControlCharacter => {
                f.write_str("must be a single line without control characters")
            }
            Self::Options(e) => write!(f, "has invalid authorized_keys options ({e})"),
            Self::MissingKey => f.write_str("has options but no key after them"),
            Self::NotAKey(e) => write!(f, "is not an OpenSSH public key ({e})"),
        }
    }
}

/// One authorized_keys entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The line as given, without surrounding whitespace or line ending. qemu-ga removes
    /// keys by exact line match, so this is what is sent and compared, options included.
    pub line: String,
    /// The options before the key, in order (empty when there are none).
    pub options: Vec<KeyOption>,
    /// The key; its comment is whatever followed the base64.
    pub key: PublicKey,
    /// SHA256 fingerprint of the key alone (options and comment play no part).
    pub fingerprint: String,
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start_matches([' ', '\t']);
    t.is_empty() || t.starts_with('#')
}

/// Parse one line. `Ok(None)` for a blank or `#` comment line. A trailing `\r` (CRLF) and
/// surrounding whitespace are ignored.
pub fn parse_line(raw: &str) -> Result<Option<Entry>, LineError> {
    let line = raw.trim_matches([' ', '\t', '\r', '\n']);
    let comment = is_blank_or_comment(line);
    if line.contains("PRIVATE KEY") && !comment {
        return Err(LineError::PrivateKey);
    }
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong);
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(LineError::ControlCharacter);
    }
    if comment {
        return Ok(None);
    }
    let first_word_end = line.find([' ', '\t']).unwrap_or(line.len());
    let (options, key_part) = if KEY_TYPES.contains(&&line[..first_word_end]) {
        (Vec::new(), line)
    } else {
        let end = options_end(line).ok_or(LineError::Options(OptionsError::UnterminatedQuote))?;
        let options = split_options(&line[..end]).map_err(LineError::Options)?;
        let rest = line[end..].trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return Err(LineError::MissingKey);
        }
        (options, rest)
    };
    let key = parse_key(key_part)?;
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    Ok(Some(Entry {
        line: line.to_string(),
        options,
        key,
        fingerprint,
    }))
}

/// `type base64 [comment]` with any run of spaces or tabs between the fields (as sshd
/// allows), normalised to single spaces for `PublicKey::from_openssh`.
fn parse_key(s: &str) -> Result<PublicKey, LineError> {
    let mut parts = s.splitn(2, [' ', '\t']);
    let kind = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("").trim_start_matches([' ', '\t']);
    let mut parts = rest.splitn(2, [' ', '\t']);
    let blob = parts.next().unwrap_or("");
    let comment = parts.next().unwrap_or("").trim_matches([' ', '\t']);
    let normal = if comment.is_empty() {
        format!("{kind} {blob}")
    } else {
        format!("{kind} {blob} {comment}")
    };
    PublicKey::from_openssh(&normal).map_err(|e| LineError::NotAKey(e.to_string()))
}

/// The SHA256 fingerprint of a line's key, ignoring options and comment; None for a line
/// that is not a key.
pub fn fingerprint(line: &str) -> Option<String> {
    parse_line(line).ok().flatten().map(|e| e.fingerprint)
}

/// Why a whole list is refused: the 1-based line number and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    Line {
        line: usize,
        error: LineError,
    },
    /// The line repeats the key of an earlier entry (1-based entry number).
    Duplicate {
        line: usize,
        entry: usize,
        fingerprint: String,
    },
    /// Only blank lines and comments.
    Empty,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Line { line, error } => write!(f, "line {line} {error}"),
            Self::Duplicate {
                line,
                entry,
                fingerprint,
            } => write!(
                f,
                "line {line} repeats the key of entry {entry} ({fingerprint})"
            ),
            Self::Empty => f.write_str("no public keys given"),
        }
    }
}

impl std::error::Error for Error {}

/// Parse authorized_keys text: one entry per line (LF or CRLF), blank lines and comments
/// skipped, at least one key, no key twice (whatever its options or comment).
pub fn parse(text: &str) -> Result<Vec<Entry>, Error> {
    let mut entries: Vec<Entry> = Vec::new();
    for (n, raw) in text.split('\n').enumerate() {
        let line = n + 1;
        let Some(entry) = parse_line(raw).map_err(|error| Error::Line { line, error })? else {
            continue;
        };
        if let Some(first) = entries
            .iter()
            .position(|e| e.fingerprint == entry.fingerprint)
        {
            return Err(Error::Duplicate {
                line,
                entry: first + 1,
                fingerprint: entry.fingerprint,
            });
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(Error::Empty);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5";
    const OTHER: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFMOXvpItZkf3S2LKw1Rf1fOmXZlGFnJZqz1uIDlzjvE";

    fn entry(line: &str) -> Entry {
        parse_line(line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .unwrap_or_else(|| panic!("{line}: skipped"))
    }

    fn opt(name: &str, value: Option<&str>) -> KeyOption {
        KeyOption {
            name: name.into(),
            value: value.map(Into::into),
        }
    }

    /// Why the line `{options} {KEY}` is refused for its options.
    fn options_error(options: &str) -> OptionsError {
        let line = format!("{options} {KEY}");
        match parse_line(&line) {
            Err(LineError::Options(e)) => e,
            other => panic!("{line}: expected an options error, got {other:?}"),
        }
    }

    /// One named test per accepted line: `name: line => its options, its key's comment;`.
    macro_rules! parsed {
        ($($name:ident: $line:expr => [$($option:expr),*], $comment:expr;)*) => {
            $(
                #[test]
                fn $name() {
                    let e = entry(&$line);
                    let options: &[KeyOption] = &[$($option),*];
                    assert_eq!(e.options, options);
                    assert_eq!(e.key.comment(), $comment);
                }
            )*
        };
    }

    parsed! {
        a_plain_key_has_no_options: format!("{KEY} alice@laptop") => [], "alice@laptop";
        from_and_no_agent_forwarding_are_two_options:
            format!("from=\"10.0.0.0/8\",no-agent-forwarding {KEY}")
            => [opt("from", Some("10.0.0.0/8")), opt("no-agent-forwarding", None)], "";
        a_comma_inside_quotes_does_not_split_options:
            format!("from=\"10.0.0.0/8,192.168.0.0/16\",no-pty {KEY}")
            => [opt("from", Some("10.0.0.0/8,192.168.0.0/16")), opt("no-pty", None)], "";
        a_command_with_escaped_quotes_and_spaces_is_one_option:
            format!("command=\"echo \\\"a b\\\"\" {KEY} c") => [opt("command", Some("echo \"a b\""))], "c";
        a_backslash_not_before_a_quote_is_kept:
            format!("command=\"printf a\\\\nb\" {KEY}") => [opt("command", Some("printf a\\\\nb"))], "";
        restrict_without_a_comment_is_accepted: format!("restrict {KEY}") => [opt("restrict", None)], "";
        cert_authority_is_accepted:
            format!("cert-authority,principals=\"alice,bob\" {KEY} ca")
            => [opt("cert-authority", None), opt("principals", Some("alice,bob"))], "ca";
        an_environment_value_may_contain_spaces:
            format!("environment=\"A=b c\" {KEY}") => [opt("environment", Some("A=b c"))], "";
        a_hash_inside_a_quoted_option_does_not_start_a_comment:
            format!("command=\"echo #1\" {KEY}") => [opt("command", Some("echo #1"))], "";
        a_trailing_comment_after_the_key_is_kept_whole:
            format!("{KEY} alice@laptop # work key, \"2024\"") => [], "alice@laptop # work key, \"2024\"";
    }

    #[test]
    fn an_environment_without_a_name_is_refused() {
        for v in ["noequals", "=x", "A-B=c"] {
            let e = options_error(&format!("environment=\"{v}\""));
            assert!(
                matches!(e, OptionsError::BadValue { index: 0, .. }),
                "{v}: {e:?}"
            );
        }
    }

    #[test]
    fn option_names_are_case_insensitive_and_flags_negatable() {
        let e = entry(&format!(
            "No-X11-Forwarding,no-port-forwarding,no-user-rc,no-touch-required,pty,COMMAND=\"x\" {KEY}"
        ));
        assert_eq!(e.options.len(), 6);
    }

    #[test]
    fn restrict_and_cert_authority_cannot_be_negated() {
        for o in ["no-restrict", "no-cert-authority"] {
            let e = options_error(o);
            assert_eq!(e, OptionsError::Unknown { index: 0 });
        }
    }

    #[test]
    fn an_unknown_option_is_refused_by_position_without_its_name() {
        let e = options_error("no-pty,no-secretthing");
        assert_eq!(e, OptionsError::Unknown { index: 1 });
        let msg = Error::Line {
            line: 3,
            error: LineError::Options(e),
        }
        .to_string();
        assert!(msg.contains("line 3") && msg.contains("option 2"), "{msg}");
        assert!(!msg.contains("secretthing"), "{msg}");
    }

    /// One named test per refusal: `name: options => the error they are refused with`.
    macro_rules! refused {
        ($($name:ident: $options:expr => $error:expr;)*) => {
            $(
                #[test]
                fn $name() {
                    assert_eq!(options_error($options), $error);
                }
            )*
        };
    }

    refused! {
        a_flag_with_a_value_is_refused: "pty=\"yes\"" => OptionsError::Malformed { index: 0 };
        characters_after_a_closing_quote_are_refused:
            "command=\"a\"b" => OptionsError::JunkAfterValue { index: 0 };
        a_second_command_is_refused:
            "command=\"a\",command=\"b\"" => OptionsError::Repeated { index: 1 };
    }

    #[test]
    fn a_value_option_without_quotes_or_value_is_refused() {
        for o in ["command=ls", "command", "from="] {
            assert_eq!(
                options_error(o),
                OptionsError::Malformed { index: 0 },
                "{o}"
            );
        }
    }

    #[test]
    fn an_unterminated_quote_is_refused() {
        assert_eq!(
            options_error("command=\"echo"),
            OptionsError::UnterminatedQuote
        );
        // An escaped quote does not close the value.
        assert_eq!(
            options_error("command=\"echo\\\""),
            OptionsError::UnterminatedQuote
        );
    }

    #[test]
    fn an_empty_option_is_refused() {
        for o in ["no-pty,", ",no-pty", "no-pty,,pty"] {
            assert!(
                matches!(options_error(o), OptionsError::Empty { .. }),
                "{o}"
            );
        }
    }

    #[test]
    fn expiry_time_and_tunnel_values_are_checked() {
        entry(&format!("expiry-time=\"20300101\",tunnel=\"0\" {KEY}"));
        entry(&format!(
            "expiry-time=\"203001011200Z\",tunnel=\"any\" {KEY}"
        ));
        options_error("expiry-time=\"tomorrow\"");
        options_error("tunnel=\"tun0\"");
    }

    #[test]
    fn options_without_a_key_are_refused() {
        assert_eq!(parse_line("no-pty"), Err(LineError::MissingKey));
        assert_eq!(parse_line("no-pty   "), Err(LineError::MissingKey));
    }

    #[test]
    fn tabs_and_runs_of_spaces_separate_fields() {
        let line = format!("no-pty\t \tssh-ed25519  \t{}   alice", &KEY[12..]);
        let e = entry(&line);
        assert_eq!(e.key.comment(), "alice");
        assert_eq!(e.line, line);
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let keys = parse(&format!("# team\r\n{KEY} a\r\n\r\nrestrict {OTHER}\r\n")).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].line, format!("{KEY} a"));
        assert_eq!(keys[1].line, format!("restrict {OTHER}"));
    }

    #[test]
    fn blank_lines_and_comments_are_skipped() {
        let keys = parse(&format!("\n   \n# a\n  # indented\n\t\n{KEY}\n")).unwrap();
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn the_line_keeps_its_options_as_written() {
        let line = format!("from=\"10.0.0.0/8\",command=\"echo \\\"a b\\\"\" {KEY} c");
        assert_eq!(entry(&format!("  {line}  \r")).line, line);
    }

    #[test]
    fn fingerprints_ignore_options_and_comments() {
        let plain = fingerprint(KEY).unwrap();
        assert!(plain.starts_with("SHA256:"));
        assert_eq!(
            fingerprint(&format!("restrict,from=\"a\" {KEY} x y")),
            Some(plain)
        );
        assert_ne!(fingerprint(OTHER), fingerprint(KEY));
        assert_eq!(fingerprint("# comment"), None);
        assert_eq!(fingerprint("garbage"), None);
    }

    #[test]
    fn errors_name_the_line_number_never_its_content() {
        let err = parse(&format!("{KEY}\nssh-rsa notbase64 secretcomment")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("line 2 is not an OpenSSH public key"),
            "{msg}"
        );
        assert!(
            !msg.contains("secretcomment") && !msg.contains("notbase64"),
            "{msg}"
        );
    }

    #[test]
    fn a_private_key_is_refused_with_a_warning() {
        let err = parse("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n").unwrap_err();
        assert_eq!(
            err,
            Error::Line {
                line: 1,
                error: LineError::PrivateKey
            }
        );
        assert!(err.to_string().contains("treat that private key as leaked"));
    }

    #[test]
    fn a_comment_mentioning_a_private_key_is_just_a_comment() {
        assert_eq!(parse_line("# no PRIVATE KEY here"), Ok(None));
    }

    #[test]
    fn a_repeated_key_is_refused_whatever_its_options_or_comment() {
        let err = parse(&format!("{KEY} a\nno-pty {KEY} b")).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Duplicate {
                    line: 2,
                    entry: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("line 2 repeats the key of entry 1")
        );
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert_eq!(parse("# nothing\n\n"), Err(Error::Empty));
        assert_eq!(Error::Empty.to_string(), "no public keys given");
    }

    #[test]
    fn a_control_character_is_refused() {
        assert_eq!(
            parse_line(&format!("command=\"a\u{7}\" {KEY}")),
            Err(LineError::ControlCharacter)
        );
        assert_eq!(
            parse_line(&format!("{KEY}\n{OTHER}")),
            Err(LineError::ControlCharacter)
        );
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let long = format!("{KEY} {}", "c".repeat(MAX_LINE_BYTES));
        assert_eq!(parse_line(&long), Err(LineError::TooLong));
    }

    #[test]
    fn a_certificate_or_unknown_key_type_is_refused() {
        assert!(matches!(
            parse_line("ssh-ed25519-cert-v01@openssh.com AAAA x"),
            Err(LineError::NotAKey(_))
        ));
        assert!(matches!(
            parse_line("ssh-foo AAAA"),
            Err(LineError::Options(OptionsError::Unknown { index: 0 }))
        ));
    }

    #[test]
    fn joined_options_split_back_to_the_same_options() {
        let original = "from=\"10.0.0.0/8,::1\",command=\"echo \\\"a b\\\" \\\\x\",No-Pty,environment=\"A=b c\",restrict";
        let options = split_options(original).unwrap();
        let joined = join_options(&options);
        assert_eq!(options_end(&joined), Some(joined.len()));
        assert_eq!(split_options(&joined).unwrap(), options);
    }

    #[test]
    fn options_end_at_the_first_unquoted_space_or_tab() {
        assert_eq!(options_end("a=\"x y\",b c"), Some(9));
        assert_eq!(options_end("a=\"x\\\" y\" c"), Some(9));
        assert_eq!(options_end("a\tb"), Some(1));
        assert_eq!(options_end("a=\"x"), None);
    }
}
