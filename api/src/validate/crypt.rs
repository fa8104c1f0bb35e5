//! crypt(3) hashes a guest can verify: the table of schemes we accept and a strict check
//! of each one's layout.
//!
//! A `crypted` password is written verbatim into the guest's /etc/shadow. If the guest's
//! libcrypt cannot reproduce the exact string from the right password (wrong length, a
//! character outside the scheme's alphabet, a parameter it refuses, a salt it truncates or
//! re-encodes), nobody can log in as that user any more. So a hash must match its scheme
//! exactly, down to the unused bits of the last character: libcrypt encodes a hash's last
//! few bits with zeros, and a string with other bits there is one no password produces.
//!
//! Every rule here was checked against the system's own libxcrypt (see
//! api/tests/crypt_system.rs, which asks it to re-hash every string we accept and fails if
//! the result differs from the input's setting or length).
//!
//! Refused on purpose:
//! - 13-character traditional DES (and `_` BSDi DES): it uses only the first 8 characters
//!   of a password, is cracked in hours, and distributions build libxcrypt without it
//!   (Fedora, RHEL 9 and their clones refuse it at login), so setting one can lock the
//!   user out.
//! - `$2x$` (bcrypt's compatibility mode for a 2011 sign-extension bug), SunMD5 (`$md5`),
//!   sha1crypt (`$sha1$`), NT hashes (`$3$`): obsolete, and not generally enabled.
//! - yescrypt parameters nothing generates: flavors other than the standard one (`j`), an
//!   upgrade count, a ROM, parallelism above 1 (whose validity depends on N and r).
//! - Memory-hard hashes that need more than 1 GiB to verify ([`MAX_MEMORY_BYTES`]) or
//!   more than 4 GiB of memory traffic ([`MAX_WORK_BYTES`]): a small guest fails every
//!   login with them, or takes minutes.

/// The most memory a yescrypt or scrypt hash may need to be verified (128·r·N bytes).
pub const MAX_MEMORY_BYTES: u64 = 1 << 30;
/// The most memory traffic one verification may take (scrypt's 128·r·N·p; yescrypt's
/// 128·r·N times its time factor): about 4 GiB, a few seconds. Beyond, every login would
/// hang the guest for minutes.
pub const MAX_WORK_BYTES: u64 = 1 << 32;

/// The crypt(3) alphabet ("./0-9A-Za-z"), in the order sha*crypt, md5crypt, yescrypt and
/// scrypt use for values.
const CRYPT64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// bcrypt's base64: the same characters in another order.
const BCRYPT64: &[u8; 64] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// One scheme of the table.
#[derive(Debug)]
pub struct Scheme {
    /// The prefix, e.g. `$6$`.
    pub prefix: &'static str,
    /// The name used in messages, e.g. `sha512crypt`.
    pub name: &'static str,
    /// What follows the prefix, for documentation and messages.
    pub layout: &'static str,
    check: fn(&str) -> Result<(), String>,
}

/// Every scheme we accept. The order matters only for prefixes that share a start (none do
/// once the closing `$` is included).
pub const SCHEMES: &[Scheme] = &[
    Scheme {
        prefix: "$6$",
        name: "sha512crypt",
        layout: "[rounds=N$]salt$hash: N 1000-999999999 without leading zeros, salt 0-16 of [./0-9A-Za-z], hash 86 characters",
        check: |rest| sha_crypt(rest, 86, 2),
    },
    Scheme {
        prefix: "$5$",
        name: "sha256crypt",
        layout: "[rounds=N$]salt$hash: N 1000-999999999 without leading zeros, salt 0-16 of [./0-9A-Za-z], hash 43 characters",
        check: |rest| sha_crypt(rest, 43, 4),
    },
    Scheme {
        prefix: "$y$",
        name: "yescrypt",
        layout: "params$salt$hash: params j + N + r [+ t], salt 0-86 characters of yescrypt base64 (at most 64 bytes), hash 43 characters",
        check: yescrypt,
    },
    Scheme {
        prefix: "$gy$",
        name: "gost-yescrypt",
        layout: "params$salt$hash: as yescrypt",
        check: yescrypt,
    },
    Scheme {
        prefix: "$7$",
        name: "scrypt",
        layout: "NrrrrrpppppSALT$hash: N one character (log2 N), r and p five characters each, salt 0-64 of [./0-9A-Za-z], hash 43 characters",
        check: scrypt,
    },
    Scheme {
        prefix: "$2b$",
        name: "bcrypt",
        layout: "CC$salthash: cost 04-31 as two digits, 22-character salt and 31-character hash in bcrypt's base64",
        check: bcrypt,
    },
    Scheme {
        prefix: "$2a$",
        name: "bcrypt ($2a$)",
        layout: "as $2b$",
        check: bcrypt,
    },
    Scheme {
        prefix: "$2y$",
        name: "bcrypt ($2y$)",
        layout: "as $2b$",
        check: bcrypt,
    },
    Scheme {
        prefix: "$1$",
        name: "md5crypt",
        layout: "salt$hash: salt 0-8 of [./0-9A-Za-z], hash 22 characters",
        check: md5crypt,
    },
];

/// Why a crypted password was refused: the scheme (if one was recognised) and what is
/// wrong. Never contains the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CryptError {
    pub scheme: Option<&'static str>,
    pub problem: String,
}

impl std::fmt::Display for CryptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scheme {
            Some(s) => write!(
                f,
                "crypted password is not a valid {s} hash: {}",
                self.problem
            ),
            None => f.write_str(&self.problem),
        }
    }
}

/// Check a crypt(3) string against the table; answers the scheme it belongs to.
pub fn check(value: &str) -> Result<&'static Scheme, CryptError> {
    let Some(scheme) = SCHEMES.iter().find(|s| value.starts_with(s.prefix)) else {
        return Err(CryptError {
            scheme: None,
            problem: unknown_scheme_message(value),
        });
    };
    (scheme.check)(&value[scheme.prefix.len()..]).map_err(|problem| CryptError {
        scheme: Some(scheme.name),
        problem,
    })?;
    Ok(scheme)
}

fn unknown_scheme_message(value: &str) -> String {
    let known: Vec<&str> = SCHEMES.iter().map(|s| s.prefix).collect();
    let known = known.join(" ");
    let what = if value.len() == 13 && !value.starts_with('$') {
        "traditional DES hashes are refused (8-character passwords, disabled on many guests)"
    } else if value.starts_with("$2x$") {
        "$2x$ (bcrypt's bug-compatibility mode) is refused"
    } else if value.starts_with('$') {
        "its scheme is not one the guest is known to verify"
    } else {
        "it does not start with a scheme prefix such as $6$"
    };
    format!(
        "crypted password must be a crypt(3) hash like $6$salt$hash ({what}); accepted schemes: {known}"
    )
}

fn index_in(alphabet: &[u8; 64], c: u8) -> Option<u32> {
    alphabet.iter().position(|&a| a == c).map(|i| i as u32)
}

fn crypt64(c: u8) -> Option<u32> {
    index_in(CRYPT64, c)
}

/// `hash` is `len` characters of `alphabet`, and its last character uses only its low
/// `last_bits` bits (or, for bcrypt's big-endian order, `last_mask` decides).
fn encoded(
    what: &str,
    s: &str,
    len: usize,
    alphabet: &[u8; 64],
    last_ok: impl Fn(u32) -> bool,
) -> Result<(), String> {
    if s.len() != len {
        return Err(format!(
            "the {what} must be {len} characters, it has {}",
            s.len()
        ));
    }
    let mut last = 0;
    for c in s.bytes() {
        last = index_in(alphabet, c).ok_or_else(|| {
            if alphabet == CRYPT64 {
                format!("the {what} has a character outside [./0-9A-Za-z]")
            } else {
                format!("the {what} has a character outside bcrypt's base64 [./A-Za-z0-9]")
            }
        })?;
    }
    if len > 0 && !last_ok(last) {
        return Err(format!(
            "the {what}'s last character has bits set that no hash produces (a damaged value)"
        ));
    }
    Ok(())
}

/// A crypt64 hash of `len` characters whose last character carries `last_bits` bits.
fn hash64(s: &str, len: usize, last_bits: u32) -> Result<(), String> {
    encoded("hash", s, len, CRYPT64, |v| v < (1 << last_bits))
}

fn plain_salt(salt: &str, max: usize) -> Result<(), String> {
    if salt.len() > max {
        return Err(format!(
            "the salt must be at most {max} characters, it has {} (the guest would cut it)",
            salt.len()
        ));
    }
    if !salt.bytes().all(|c| crypt64(c).is_some()) {
        return Err("the salt has a character outside [./0-9A-Za-z]".into());
    }
    Ok(())
}

/// Split `setting$hash` at the last `$`.
fn split_hash(rest: &str) -> Result<(&str, &str), String> {
    rest.rsplit_once('$').ok_or_else(|| {
        "the '$' before the hash is missing (a salt or setting alone is not a hash)".to_string()
    })
}

fn sha_crypt(rest: &str, hash_len: usize, last_bits: u32) -> Result<(), String> {
    let (setting, hash) = split_hash(rest)?;
    let salt = match setting.strip_prefix("rounds=") {
        Some(r) => {
            let (n, salt) = r
                .split_once('$')
                .ok_or("rounds=N must be followed by '$' and the salt")?;
            let digits_ok = !n.is_empty()
                && n.len() <= 9
                && n.bytes().all(|c| c.is_ascii_digit())
                && !n.starts_with('0');
            let rounds: u32 = if digits_ok { n.parse().unwrap_or(0) } else { 0 };
            if !(1000..=999_999_999).contains(&rounds) {
                return Err(
                    "rounds must be a number from 1000 to 999999999 without leading zeros".into(),
                );
            }
            salt
        }
        None => setting,
    };
    if salt.contains('$') {
        return Err("the salt contains '$' (too many fields)".into());
    }
    plain_salt(salt, 16)?;
    hash64(hash, hash_len, last_bits)
}

fn md5crypt(rest: &str) -> Result<(), String> {
    let (salt, hash) = split_hash(rest)?;
    if salt.contains('$') {
        return Err("the salt contains '$' (too many fields)".into());
    }
    plain_salt(salt, 8)?;
    hash64(hash, 22, 2)
}

fn bcrypt(rest: &str) -> Result<(), String> {
    let (cost, body) = rest
        .split_once('$')
        .ok_or("the cost must be two digits followed by '$'")?;
    let cost_ok = cost.len() == 2
        && cost.bytes().all(|c| c.is_ascii_digit())
        && (4..=31).contains(&cost.parse::<u32>().unwrap_or(0));
    if !cost_ok {
        return Err("the cost must be two digits from 04 to 31".into());
    }
    if body.len() != 53 || !body.is_ascii() {
        return Err(format!(
            "the salt and hash must be 22 + 31 = 53 characters, they have {}",
            body.len()
        ));
    }
    let (salt, hash) = body.split_at(22);
    // 16 salt bytes: the last character carries 2 bits in its top bits; 23 hash bytes: the
    // last carries 4. libcrypt re-encodes the salt, so another value there changes the
    // string it produces.
    encoded("salt", salt, 22, BCRYPT64, |v| v & 0x0f == 0)?;
    encoded("hash", hash, 31, BCRYPT64, |v| v & 0x03 == 0)
}

/// yescrypt's variable-length integer (decode64_uint32 in yescrypt-common.c): the first
/// character says how many follow. Answers the value and the rest of the string.
fn yescrypt_uint(s: &[u8], min: u32) -> Option<(u64, &[u8])> {
    let (&first, mut rest) = s.split_first()?;
    let mut c = u64::from(crypt64(first)?);
    let (mut start, mut end, mut chars, mut bits) = (0u64, 47u64, 1u32, 0u32);
    let mut value = u64::from(min);
    while c > end {
        value += (end + 1 - start) << bits;
        start = end + 1;
        end = start + (62 - end) / 2;
        chars += 1;
        bits += 6;
    }
    value += (c - start) << bits;
    while chars > 1 {
        chars -= 1;
        let (&next, r) = rest.split_first()?;
        c = u64::from(crypt64(next)?);
        bits -= 6;
        value += c << bits;
        rest = r;
    }
    (value <= u64::from(u32::MAX)).then_some((value, rest))
}

/// yescrypt's little-endian base64 decoding (decode64 in yescrypt-common.c): groups of up
/// to 4 characters, at least one whole byte per group, unused bits zero. Answers the
/// number of bytes.
fn yescrypt_decoded_len(s: &[u8]) -> Option<usize> {
    let mut bytes = 0;
    for group in s.chunks(4) {
        let mut value = 0u32;
        for (i, &c) in group.iter().enumerate() {
            value |= crypt64(c)? << (6 * i);
        }
        let bits = 6 * group.len() as u32;
        if bits < 12 {
            return None;
        }
        let whole = bits / 8;
        if whole < 3 && value >> (8 * whole) != 0 {
            return None;
        }
        bytes += whole as usize;
    }
    Some(bytes)
}

fn memory_ok(n_log2: u64, r: u64) -> bool {
    n_log2 < 40 && 128u64.saturating_mul(r).saturating_mul(1 << n_log2) <= MAX_MEMORY_BYTES
}

fn yescrypt(rest: &str) -> Result<(), String> {
    let (params, after) = rest
        .split_once('$')
        .ok_or("the parameters must be followed by '$', the salt, '$' and the hash")?;
    let (salt, hash) = split_hash(after)?;
    let p = params.as_bytes();
    // The flavor: 'j' is YESCRYPT_DEFAULTS, the only one libcrypt generates.
    let Some((&b'j', p)) = p.split_first() else {
        return Err("the flavor (first parameter character) must be 'j', the standard one".into());
    };
    let (n_log2, p) = yescrypt_uint(p, 1).ok_or("the N parameter is missing or malformed")?;
    let (r, p) = yescrypt_uint(p, 1).ok_or("the r parameter is missing or malformed")?;
    if n_log2 < 2 {
        return Err("N must be at least 4 (the guest refuses smaller)".into());
    }
    if !memory_ok(n_log2, r) {
        return Err(format!(
            "N and r need more than {} MiB to verify",
            MAX_MEMORY_BYTES >> 20
        ));
    }
    if !p.is_empty() {
        // The optional field: a bit set of p (1), t (2), g (4), ROM (8).
        let (have, p) = yescrypt_uint(p, 1).ok_or("the optional parameters are malformed")?;
        if have != 2 {
            return Err(
                "of the optional parameters only t (time) is accepted: no p, upgrade count or ROM"
                    .into(),
            );
        }
        let (t, p) = yescrypt_uint(p, 1).ok_or("the t parameter is malformed")?;
        if (128u64 << n_log2).saturating_mul(r).saturating_mul(t + 1) > MAX_WORK_BYTES {
            return Err(format!(
                "N, r and t need more than {} GiB of memory traffic to verify",
                MAX_WORK_BYTES >> 30
            ));
        }
        if !p.is_empty() {
            return Err("the parameters have characters left over".into());
        }
    }
    if salt.contains('$') {
        return Err("the salt contains '$' (too many fields)".into());
    }
    if salt.len() > 86 {
        return Err(format!(
            "the salt must be at most 86 characters, it has {}",
            salt.len()
        ));
    }
    match yescrypt_decoded_len(salt.as_bytes()) {
        Some(n) if n <= 64 => {}
        Some(_) => return Err("the salt decodes to more than 64 bytes".into()),
        None => {
            return Err("the salt is not valid yescrypt base64 (wrong character, a length of 4k+1, or unused bits set)".into());
        }
    }
    hash64(hash, 43, 4)
}

fn scrypt(rest: &str) -> Result<(), String> {
    let (setting, hash) = split_hash(rest)?;
    let b = setting.as_bytes();
    if b.len() < 11 {
        return Err("the parameters must be 11 characters (N, r, p) before the salt".into());
    }
    let digit = |c: u8| crypt64(c).ok_or("the parameters have a character outside [./0-9A-Za-z]");
    let n_log2 = u64::from(digit(b[0])?);
    let field = |s: &[u8]| -> Result<u64, String> {
        let mut v = 0u64;
        for (i, &c) in s.iter().enumerate() {
            v |= u64::from(digit(c)?) << (6 * i);
        }
        Ok(v)
    };
    let r = field(&b[1..6])?;
    let p = field(&b[6..11])?;
    if n_log2 < 2 {
        return Err("N must be at least 4 (the guest refuses smaller)".into());
    }
    if r < 1 || p < 1 || r * p >= 1 << 30 {
        return Err("r and p must be at least 1 and r·p below 2^30".into());
    }
    if !memory_ok(n_log2, r) {
        return Err(format!(
            "N and r need more than {} MiB to verify",
            MAX_MEMORY_BYTES >> 20
        ));
    }
    if (128u64 << n_log2).saturating_mul(r).saturating_mul(p) > MAX_WORK_BYTES {
        return Err(format!(
            "N, r and p need more than {} GiB of memory traffic to verify",
            MAX_WORK_BYTES >> 30
        ));
    }
    let salt = &setting[11..];
    if salt.contains('$') {
        return Err("the salt contains '$' (too many fields)".into());
    }
    plain_salt(salt, 64)?;
    hash64(hash, 43, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real hashes of "correct horse" made by Debian bookworm's libxcrypt 4.4.33
    /// (`mkpasswd -m <method>` and python3's crypt module with a given setting), one or
    /// more per scheme: the table used when no crypt tool is installed.
    pub(crate) const REAL: &[(&str, &str)] = &[
        (
            "sha512crypt",
            "$6$pHU4uiJTyLXfiuGd$VaNYbhDMLcfw3yk3KJikduK6w8v8r.u6EYuEnt5Go.d3LY1Ht8avMhPmT5U0zR5HWNjvmsRvt3d84ov8mutkc.",
        ),
        (
            "sha512crypt",
            "$6$rounds=1000$J/8XnSir5Sf0oCF0$7IMqlZuWGIk5YyTsN7oXMIUhDHB5.nPLNhvW0Xv6PiCOAVxgXPzONZ7BcJikKade/Vevr6QvkDhC9Q1LwRNVQ/",
        ),
        (
            "sha512crypt",
            "$6$$6LUofpTKYGJWmsxkYcfhDE9wD283B.yVCb5N1sauapb401RaE4WCRGITJhyCTMm1Vn0P9o4AW6q0BRXpOJZc9.",
        ),
        (
            "sha256crypt",
            "$5$h/5qfmwPXty3k8nm$sxkb53WOVlqxMOk9Yudb1fsKe8W8LZHLCgs3EsygWC4",
        ),
        (
            "sha256crypt",
            "$5$rounds=12345$0tXqdmZSzXJ1H3.B$PQ8zYUS6.ahIheITIQ3Ac6rJBqlS0lY7k3QBMpNXvK1",
        ),
        (
            "yescrypt",
            "$y$j9T$Fbn1477coDq2N47zpj15t/$McLLyV9WezlUMoN3NsNZaWcsg0Q1dHyEIQkEpVr1R2.",
        ),
        (
            "yescrypt",
            "$y$j9T$$VRWgiI/Aw3NHCcmxsqRb7HF5miOyCINwmBJDnIFabz2",
        ),
        (
            "yescrypt",
            "$y$j9T/.$abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstu.$EZzO4YpujXBfn0hBmOZEIWTgC.ZUhtG7mPHwIhiJMp3",
        ),
        (
            "gost-yescrypt",
            "$gy$j9T$ZgurXLaLKHR9sUgui0naS/$wwucYOgDFfai78xpii8nTJeWV4xhLimE2e7vqwL99lC",
        ),
        (
            "scrypt",
            "$7$CU..../....7ovd8h4JHUPfmjyyTsSr1.$kr94DpgHUFBtWMRpARcFthfQSPIVRCeCyj68lmBPvL4",
        ),
        (
            "bcrypt",
            "$2b$05$.TpYHIzjS1KrB6o1CzQwEeOWLD538A3GC8CVrQxGk0k3uxrdVK8mK",
        ),
        (
            "bcrypt ($2a$)",
            "$2a$05$Dv7WUI9l3szpzZpMzqDTHOAu9bLH3TgxHF30/tewY44G79tgV0JBu",
        ),
        (
            "bcrypt ($2y$)",
            "$2y$04$abcdefghijklmnopqrstuujydOTSfIH/d5oUHpsygqV5X9xJLQc6e",
        ),
        ("md5crypt", "$1$hbxDFvcA$J/IS2pAOIaLKist/EZfjv."),
        ("md5crypt", "$1$$IfI/mw4YSCwcQoW.D.DSu1"),
    ];

    fn refused(value: &str) -> CryptError {
        match check(value) {
            Ok(s) => panic!("accepted as {}: {value}", s.name),
            Err(e) => {
                // The message never quotes the value, nor any long piece of it.
                let msg = e.to_string();
                let tail = value.get(value.len().saturating_sub(8)..).unwrap_or("");
                assert!(tail.len() < 8 || !msg.contains(tail), "{msg}");
                e
            }
        }
    }

    #[test]
    fn every_real_hash_is_accepted_as_its_scheme() {
        for (scheme, hash) in REAL {
            let s = check(hash).unwrap_or_else(|e| panic!("{hash}: {e}"));
            assert_eq!(s.name, *scheme, "{hash}");
        }
    }

    #[test]
    fn every_real_hash_truncated_by_one_character_is_refused() {
        for (scheme, hash) in REAL {
            let e = refused(&hash[..hash.len() - 1]);
            assert_eq!(e.scheme, Some(*scheme), "{e}");
        }
    }

    #[test]
    fn every_real_hash_with_one_character_too_many_is_refused() {
        for (_, hash) in REAL {
            refused(&format!("{hash}."));
        }
    }

    #[test]
    fn a_character_outside_the_alphabet_in_the_hash_is_refused() {
        for (_, hash) in REAL {
            for bad in ['*', '!', '-', '+', ':', ' '] {
                let mut s = hash.to_string();
                s.replace_range(s.len() - 5..s.len() - 4, &bad.to_string());
                let e = refused(&s);
                assert!(e.problem.contains("outside"), "{e}");
            }
        }
    }

    #[test]
    fn a_character_outside_the_alphabet_in_the_salt_is_refused() {
        refused(
            "$6$ab*d$VaNYbhDMLcfw3yk3KJikduK6w8v8r.u6EYuEnt5Go.d3LY1Ht8avMhPmT5U0zR5HWNjvmsRvt3d84ov8mutkc.",
        );
        refused("$1$ab:d$J/IS2pAOIaLKist/EZfjv.");
        refused("$y$j9T$Fbn1477coDq2N47zpj15t!$McLLyV9WezlUMoN3NsNZaWcsg0Q1dHyEIQkEpVr1R2.");
        refused("$7$CU..../....7ovd8h4JH-PfmjyyTsSr1.$kr94DpgHUFBtWMRpARcFthfQSPIVRCeCyj68lmBPvL4");
    }

    #[test]
    fn salt_only_settings_like_6_xx_are_refused() {
        for s in [
            "$6$xx",
            "$6$",
            "$5$xx",
            "$1$xx",
            "$y$j9T$abc",
            "$7$CU..../....",
            "$2b$05$",
        ] {
            let e = refused(s);
            assert!(e.scheme.is_some(), "{e}");
        }
    }

    #[test]
    fn sha_crypt_salt_longer_than_16_is_refused() {
        let e = refused(
            "$6$abcdefghijklmnopq$VaNYbhDMLcfw3yk3KJikduK6w8v8r.u6EYuEnt5Go.d3LY1Ht8avMhPmT5U0zR5HWNjvmsRvt3d84ov8mutkc.",
        );
        assert!(e.problem.contains("at most 16"), "{e}");
    }

    #[test]
    fn md5crypt_salt_longer_than_8_is_refused() {
        refused("$1$hbxDFvcAx$J/IS2pAOIaLKist/EZfjv.");
    }

    #[test]
    fn sha_crypt_rounds_out_of_range_or_with_leading_zero_are_refused() {
        let hash = "7IMqlZuWGIk5YyTsN7oXMIUhDHB5.nPLNhvW0Xv6PiCOAVxgXPzONZ7BcJikKade/Vevr6QvkDhC9Q1LwRNVQ/";
        for rounds in ["999", "01000", "1000000000", "", "1e3", "-1000", "abc"] {
            let e = refused(&format!("$6$rounds={rounds}$salt${hash}"));
            assert!(e.problem.contains("rounds"), "{e}");
        }
        assert!(check(&format!("$6$rounds=999999999$salt${hash}")).is_ok());
        assert!(check(&format!("$6$rounds=5000$salt${hash}")).is_ok());
    }

    #[test]
    fn a_hash_whose_last_character_has_unused_bits_set_is_refused() {
        // sha512crypt's last character carries 2 bits ('.' '/' '0' '1'), sha256crypt's and
        // yescrypt's 4, md5crypt's 2.
        let e = refused(
            "$6$pHU4uiJTyLXfiuGd$VaNYbhDMLcfw3yk3KJikduK6w8v8r.u6EYuEnt5Go.d3LY1Ht8avMhPmT5U0zR5HWNjvmsRvt3d84ov8mutkc2",
        );
        assert!(e.problem.contains("last character"), "{e}");
        refused("$5$h/5qfmwPXty3k8nm$sxkb53WOVlqxMOk9Yudb1fsKe8W8LZHLCgs3EsygWCE");
        refused("$y$j9T$$VRWgiI/Aw3NHCcmxsqRb7HF5miOyCINwmBJDnIFabzE");
        refused("$1$hbxDFvcA$J/IS2pAOIaLKist/EZfjv2");
    }

    #[test]
    fn bcrypt_cost_outside_04_to_31_or_not_two_digits_is_refused() {
        let body = ".TpYHIzjS1KrB6o1CzQwEeOWLD538A3GC8CVrQxGk0k3uxrdVK8mK";
        for cost in ["03", "00", "32", "99", "4", "004", "1a", "  "] {
            let e = refused(&format!("$2b${cost}${body}"));
            assert!(e.problem.contains("cost"), "{cost}: {e}");
        }
        for cost in ["04", "10", "31"] {
            assert!(check(&format!("$2b${cost}${body}")).is_ok(), "{cost}");
        }
    }

    #[test]
    fn bcrypt_salt_or_hash_in_non_canonical_form_is_refused() {
        // The salt's 22nd character carries 2 bits: '.', 'O', 'e', 'u' only.
        let e = refused("$2b$05$.TpYHIzjS1KrB6o1CzQwEfOWLD538A3GC8CVrQxGk0k3uxrdVK8mK");
        assert!(e.problem.contains("salt"), "{e}");
        // The hash's 31st character carries 4 bits: a multiple of 4 in bcrypt's alphabet.
        let e = refused("$2b$05$.TpYHIzjS1KrB6o1CzQwEeOWLD538A3GC8CVrQxGk0k3uxrdVK8mL");
        assert!(e.problem.contains("hash"), "{e}");
    }

    #[test]
    fn bcrypt_2x_and_unknown_schemes_are_refused_naming_the_accepted_ones() {
        for s in [
            "$2x$05$.TpYHIzjS1KrB6o1CzQwEeOWLD538A3GC8CVrQxGk0k3uxrdVK8mK",
            "$3$$8cc19b6a8cfeac299c2871c86b38de28",
            "$md5$abc$$kdHOzWryR1yllNTXdT6hs/",
            "$sha1$1000$abc$IXkIn1QDHZLAzFPI7zvVMD4SHFl4",
            "$9$zzq$x",
            "6$zzq$hash",
            "plaintext",
        ] {
            let e = refused(s);
            assert_eq!(e.scheme, None);
            assert!(e.problem.contains("$6$ $5$ $y$"), "{e}");
            // tests/bad_input and docs/bad-input.md quote this start.
            assert!(e.to_string().contains("crypt(3) hash like $6$"), "{e}");
        }
    }

    #[test]
    fn traditional_des_is_refused_with_the_reason() {
        let e = refused("abzlUXK5ed5rs");
        assert!(e.problem.contains("DES"), "{e}");
        refused("_J9..abcdTZ/33djMPto");
    }

    #[test]
    fn yescrypt_other_flavors_upgrades_roms_and_parallelism_are_refused() {
        let h = "$VRWgiI/Aw3NHCcmxsqRb7HF5miOyCINwmBJDnIFabz2";
        for params in [
            "/9T", ".9T", "i9T", "j9T.", "j9T0..", "j9T1.", "j9T5.", "j9T/..",
        ] {
            let e = refused(&format!("$y${params}${h}"));
            assert_eq!(e.scheme, Some("yescrypt"), "{params}: {e}");
        }
        // t (time) alone is accepted.
        assert!(check(&format!("$y$j9T/.${h}")).is_ok());
    }

    #[test]
    fn yescrypt_with_tiny_n_or_too_much_memory_is_refused() {
        let h = "$VRWgiI/Aw3NHCcmxsqRb7HF5miOyCINwmBJDnIFabz2";
        refused(&format!("$y$j.T${h}")); // N = 2
        let e = refused(&format!("$y$jLT${h}")); // N = 2^24, r = 32: 16 GiB
        assert!(e.problem.contains("MiB"), "{e}");
        assert!(check(&format!("$y$jFT${h}")).is_ok()); // N = 2^18, r = 32: 1 GiB
    }

    #[test]
    fn yescrypt_salt_must_be_canonical_yescrypt_base64() {
        let h = "$VRWgiI/Aw3NHCcmxsqRb7HF5miOyCINwmBJDnIFabz2";
        for salt in ["a", "ab", "abc", "abcde"] {
            let e = refused(&format!("$y$j9T${salt}{h}"));
            assert!(e.problem.contains("salt"), "{salt}: {e}");
        }
        for salt in ["", "..", "...", "....", "abcd"] {
            assert!(check(&format!("$y$j9T${salt}{h}")).is_ok(), "{salt}");
        }
        // 86 characters decode to 64 bytes, 87 to more.
        assert!(check(&format!("$y$j9T${}{h}", ".".repeat(86))).is_ok());
        refused(&format!("$y$j9T${}{h}", ".".repeat(87)));
        refused(&format!("$y$j9T${}{h}", ".".repeat(88)));
    }

    #[test]
    fn scrypt_bad_parameters_are_refused() {
        let rest = "7ovd8h4JHUPfmjyyTsSr1.$kr94DpgHUFBtWMRpARcFthfQSPIVRCeCyj68lmBPvL4";
        for params in [
            "...../....",
            "CU........",
            "C.........",
            "CU..../...*",
            "zU..../....",
        ] {
            refused(&format!("$7${params}{rest}"));
        }
    }

    #[test]
    fn a_field_too_many_is_refused() {
        refused(
            "$6$salt$extra$VaNYbhDMLcfw3yk3KJikduK6w8v8r.u6EYuEnt5Go.d3LY1Ht8avMhPmT5U0zR5HWNjvmsRvt3d84ov8mutkc.",
        );
        refused("$y$j9T$salt$extra$VRWgiI/Aw3NHCcmxsqRb7HF5miOyCINwmBJDnIFabz2");
    }

    #[test]
    fn non_ascii_is_refused_without_panicking() {
        for s in ["$6$é$x", "$2b$05$é", "$7$ééééééé$x", "$y$é$$x", "$y$jé$$x"] {
            refused(s);
        }
    }
}
