//! The crypt(3) check against the system's own libcrypt, when its tools are installed
//! (`mkpasswd` from Debian's whois package, scripts/install-deps.sh; python3's crypt
//! module). Without them these tests say so and pass: the fixed table of real hashes in
//! api/src/validate/crypt.rs covers that case.
//!
//! 1. Every hash the system makes, for every scheme, is accepted as that scheme, and refused
//!    once truncated or with one character outside its alphabet.
//! 2. Every mutant of those hashes that we accept is one the system accepts too and
//!    reproduces: re-hashing any password with it as the setting gives a string of the same
//!    length with the same setting. (A hash we accept but the guest cannot reproduce would
//!    lock the user out.)

use std::io::Write;
use std::process::{Command, Stdio};

use guestcred_api::validate::crypt;

/// mkpasswd method, scheme name we answer, extra mkpasswd arguments, whether its mutants
/// are checked against the system (only the cheap ones: that check re-hashes thousands).
const METHODS: &[(&str, &str, &[&str], bool)] = &[
    ("sha512crypt", "sha512crypt", &[], false),
    ("sha512crypt", "sha512crypt", &["-R", "1000"], true),
    ("sha256crypt", "sha256crypt", &[], false),
    ("sha256crypt", "sha256crypt", &["-R", "1000"], true),
    ("yescrypt", "yescrypt", &["-R", "1"], true),
    ("yescrypt", "yescrypt", &[], false),
    ("gost-yescrypt", "gost-yescrypt", &["-R", "1"], true),
    ("scrypt", "scrypt", &["-R", "6"], true),
    ("bcrypt", "bcrypt", &["-R", "4"], true),
    ("bcrypt-a", "bcrypt ($2a$)", &["-R", "4"], true),
    ("md5crypt", "md5crypt", &[], true),
];

fn mkpasswd(method: &str, extra: &[&str], password: &str) -> Option<String> {
    let mut child = Command::new("mkpasswd")
        .args(["-m", method, "-s"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(password.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn generated() -> Option<Vec<(&'static str, String, bool)>> {
    if mkpasswd("sha512crypt", &[], "probe").is_none() {
        eprintln!("mkpasswd not installed: skipping the system-generated hashes");
        return None;
    }
    let mut out = Vec::new();
    for (method, scheme, extra, mutate) in METHODS {
        for i in 0..4 {
            let hash = mkpasswd(method, extra, &format!("pw {i} {method}"))
                .unwrap_or_else(|| panic!("mkpasswd -m {method} failed"));
            out.push((*scheme, hash, *mutate && i == 0));
        }
    }
    Some(out)
}

#[test]
fn every_hash_the_system_makes_is_accepted_as_its_scheme() {
    let Some(hashes) = generated() else { return };
    for (scheme, hash, _) in &hashes {
        let s = crypt::check(hash).unwrap_or_else(|e| panic!("{hash}: {e}"));
        assert_eq!(s.name, *scheme, "{hash}");
    }
}

#[test]
fn every_hash_the_system_makes_is_refused_truncated_or_with_a_bad_character() {
    let Some(hashes) = generated() else { return };
    for (scheme, hash, _) in &hashes {
        let e = crypt::check(&hash[..hash.len() - 1]).expect_err(hash);
        assert_eq!(e.scheme, Some(*scheme), "{hash}: {e}");
        let mut bad = hash.clone();
        bad.replace_range(hash.len() - 3..hash.len() - 2, "*");
        crypt::check(&bad).expect_err(&bad);
    }
}

/// Length of the hash part, which the system computes (everything before it is the
/// setting, which it copies).
fn hash_len(scheme: &str) -> usize {
    match scheme {
        "sha512crypt" => 86,
        "md5crypt" => 22,
        s if s.starts_with("bcrypt") => 31,
        _ => 43,
    }
}

/// Mutants of `hash`: every setting character replaced, removed or doubled, and the last
/// two hash characters replaced.
fn mutants(hash: &str, hash_len: usize) -> Vec<String> {
    const REPLACEMENTS: &[char] = &[
        '.', '/', '0', '1', '4', '9', 'A', 'O', 'Z', 'a', 'e', 'j', 'u', 'z', '$', '*', '-',
    ];
    let setting_len = hash.len() - hash_len;
    let mut positions: Vec<usize> = (0..setting_len).collect();
    positions.extend([hash.len() - 2, hash.len() - 1]);
    let mut out = Vec::new();
    for &i in &positions {
        for &c in REPLACEMENTS {
            let mut m = hash.to_string();
            m.replace_range(i..i + 1, &c.to_string());
            out.push(m);
        }
        if i < setting_len {
            let mut m = hash.to_string();
            m.remove(i);
            out.push(m);
            let mut m = hash.to_string();
            m.insert(i, hash.as_bytes()[i] as char);
            out.push(m);
        }
    }
    out
}

/// Whether re-hashing with this setting is quick: scrypt mutants may ask for up to the
/// 4 GiB of memory traffic we allow, which takes seconds each; those are left out.
fn cheap(m: &str) -> bool {
    let Some(p) = m.strip_prefix("$7$") else {
        return true;
    };
    let digit = |c: u8| {
        b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
            .iter()
            .position(|&a| a == c)
            .unwrap_or(63) as u64
    };
    let b = p.as_bytes();
    let field = |s: &[u8]| {
        s.iter()
            .enumerate()
            .map(|(i, &c)| digit(c) << (6 * i))
            .sum::<u64>()
    };
    let (n_log2, r, pp) = (digit(b[0]), field(&b[1..6]), field(&b[6..11]));
    n_log2 < 30 && (128u64 << n_log2).saturating_mul(r).saturating_mul(pp) <= 1 << 28
}

/// `crypt("x", setting)` for each line, through python3's crypt module (the system's
/// libcrypt). None when python3 or its crypt module is missing.
fn system_crypt(settings: &[String]) -> Option<Vec<String>> {
    let script = "import sys, warnings\nwarnings.simplefilter('ignore')\nimport crypt\nfor line in sys.stdin:\n    print(crypt.crypt('x', line.rstrip('\\n')) or '*none')\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut input = settings.join("\n");
    input.push('\n');
    let mut stdin = child.stdin.take()?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().ok()?;
    writer.join().ok()?.ok()?;
    if !out.status.success() {
        return None;
    }
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (lines.len() == settings.len()).then_some(lines)
}

#[test]
fn every_mutant_we_accept_is_reproduced_by_the_system() {
    let Some(hashes) = generated() else { return };
    let mut accepted: Vec<(String, usize)> = Vec::new();
    let mut refused = 0;
    // One hash per cheap method is enough to walk every setting position.
    for (scheme, hash, _) in hashes.iter().filter(|h| h.2) {
        let hl = hash_len(scheme);
        for m in mutants(hash, hl) {
            match crypt::check(&m) {
                Ok(s) if cheap(&m) => accepted.push((m, hash_len(s.name))),
                Ok(_) | Err(_) => refused += 1,
            }
        }
    }
    let settings: Vec<String> = accepted.iter().map(|(m, _)| m.clone()).collect();
    let Some(results) = system_crypt(&settings) else {
        eprintln!("python3's crypt module is not available: skipping the differential check");
        return;
    };
    let mut wrong = Vec::new();
    for ((m, hl), got) in accepted.iter().zip(&results) {
        let setting = &m[..m.len() - hl];
        if got.len() != m.len() || !got.starts_with(setting) {
            wrong.push(format!("{m} -> {got}"));
        }
    }
    eprintln!(
        "{} mutants accepted and reproduced by the system, {refused} refused",
        accepted.len()
    );
    assert!(
        wrong.is_empty(),
        "accepted but not reproduced by the system:\n{}",
        wrong.join("\n")
    );
    assert!(
        accepted.len() > 100,
        "too few mutants accepted to mean much"
    );
}
