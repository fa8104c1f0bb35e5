//! The guest image (kernel + base initramfs, built once into a cache) and the per-VM seed
//! archive that stands in for cloud-init.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::error::LabError;
use super::util::{output_tail, path_context};

/// Environment variable naming the image cache directory.
pub const CACHE_ENV: &str = "GUESTCRED_LAB_CACHE";

/// The cache directory: `$GUESTCRED_LAB_CACHE`, else `<repo>/.lab/cache`.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_dir().join(".lab").join("cache"),
    }
}

pub(crate) use crate::repo_dir;

/// A bootable lab guest: a Debian cloud kernel and a gzip newc initramfs with qemu-ga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub base_initrd: PathBuf,
}

impl GuestImage {
    /// Builds the image into `cache_dir/guest` unless it is already up to date (the build
    /// script keeps a stamp of its inputs). Serialised across processes by a lock file.
    pub fn ensure(cache_dir: &Path) -> Result<GuestImage, LabError> {
        let script = repo_dir().join("scripts").join("build-guest.sh");
        if !script.is_file() {
            return Err(LabError::Missing {
                what: script.display().to_string(),
                hint: "the lab needs the repository's scripts/ directory".into(),
            });
        }
        fs::create_dir_all(cache_dir)
            .map_err(|e| LabError::io(path_context("create", cache_dir), e))?;
        let lock_path = cache_dir.join("guest.lock");
        let lock = fs::File::create(&lock_path)
            .map_err(|e| LabError::io(path_context("open", &lock_path), e))?;
        lock.lock()
            .map_err(|e| LabError::io(path_context("lock", &lock_path), e))?;

        let out = Command::new("bash")
            .arg(&script)
            .arg(cache_dir)
            .output()
            .map_err(|e| LabError::io("run scripts/build-guest.sh", e))?;
        drop(lock);
        if !out.status.success() {
            let text = output_tail(&out, 30);
            if text.contains("install-deps.sh") {
                return Err(LabError::Missing {
                    what: "guest build tools".into(),
                    hint: format!("run scripts/install-deps.sh as root ({text})"),
                });
            }
            return Err(LabError::Command {
                command: format!("bash {} {}", script.display(), cache_dir.display()),
                status: out.status.to_string(),
                output: text,
            });
        }
        let guest = cache_dir.join("guest");
        let image = GuestImage {
            kernel: guest.join("vmlinuz"),
            base_initrd: guest.join("initrd.gz"),
        };
        for file in [&image.kernel, &image.base_initrd] {
            if !file.is_file() {
                return Err(LabError::Missing {
                    what: file.display().to_string(),
                    hint: "scripts/build-guest.sh did not produce it".into(),
                });
            }
        }
        tracing::debug!(kernel = %image.kernel.display(), "guest image ready");
        Ok(image)
    }
}

/// What /init reads from `/seed` at boot: cloud-init's job in a real VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seed {
    pub instance_id: String,
    pub hostname: String,
    /// user name -> authorized_keys lines.
    pub authorized_keys: BTreeMap<String, Vec<String>>,
}

impl Seed {
    /// The seed as an uncompressed newc cpio archive (it may be appended to a gzip one).
    pub fn to_cpio(&self) -> Result<Vec<u8>, LabError> {
        let mut cpio = CpioWriter::default();
        cpio.dir("seed");
        cpio.file(
            "seed/instance-id",
            format!("{}\n", self.instance_id).as_bytes(),
        );
        cpio.file("seed/hostname", format!("{}\n", self.hostname).as_bytes());
        cpio.dir("seed/authorized_keys");
        for (user, keys) in &self.authorized_keys {
            let valid_name = !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                && !user.starts_with('.');
            if !valid_name {
                return Err(LabError::Invalid(format!("seed user name {user:?}")));
            }
            if keys.iter().any(|k| k.contains('\n')) {
                return Err(LabError::Invalid(format!(
                    "a seed key for {user} contains a newline"
                )));
            }
            let mut body = keys.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            cpio.file(&format!("seed/authorized_keys/{user}"), body.as_bytes());
        }
        Ok(cpio.finish())
    }
}

/// Writes `<base initrd> + zero padding + <seed cpio>` to `dest`, unless `dest` already
/// holds exactly that (a stamp next to it records the inputs' hash). Returns whether it
/// wrote. The kernel unpacks concatenated archives; an uncompressed one must start at a
/// 4-byte aligned offset, hence the padding (zeros between archives are skipped).
pub fn write_vm_initrd(base_initrd: &Path, seed: &Seed, dest: &Path) -> Result<bool, LabError> {
    let seed_cpio = seed.to_cpio()?;
    let base =
        fs::read(base_initrd).map_err(|e| LabError::io(path_context("read", base_initrd), e))?;
    let mut hasher = Sha256::new();
    hasher.update(Sha256::digest(&base));
    hasher.update(&seed_cpio);
    let stamp = hex::encode(hasher.finalize());
    let stamp_path = dest.with_extension("stamp");
    if dest.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim() == stamp) {
        return Ok(false);
    }
    let mut bytes = base;
    while !bytes.len().is_multiple_of(4) {
        bytes.push(0);
    }
    bytes.extend_from_slice(&seed_cpio);
    let tmp = dest.with_extension("tmp");
    fs::write(&tmp, &bytes).map_err(|e| LabError::io(path_context("write", &tmp), e))?;
    fs::rename(&tmp, dest).map_err(|e| LabError::io(path_context("rename to", dest), e))?;
    fs::write(&stamp_path, stamp)
        .map_err(|e| LabError::io(path_context("write", &stamp_path), e))?;
    Ok(true)
}

/// A minimal writer for the "newc" cpio format the kernel's initramfs unpacker reads.
#[derive(Default)]
struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl CpioWriter {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8]) {
        self.entry(name, 0o100_600, 1, data);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        self.next_ino += 1;
        let name_size = name.len() + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name_size,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_with_root_key() -> Seed {
        Seed {
            instance_id: "i-1".into(),
            hostname: "vm".into(),
            authorized_keys: BTreeMap::from([(
                "root".to_string(),
                vec!["ssh-ed25519 AAAA k1".to_string()],
            )]),
        }
    }

    #[test]
    fn seed_cpio_is_newc_with_aligned_entries_and_a_trailer() {
        let cpio = seed_with_root_key().to_cpio().expect("valid seed");
        assert!(cpio.starts_with(b"070701"));
        assert_eq!(cpio.len() % 4, 0);
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("seed/authorized_keys/root\0"));
        assert!(text.contains("ssh-ed25519 AAAA k1\n"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn seed_rejects_a_user_name_with_a_slash() {
        let mut seed = seed_with_root_key();
        seed.authorized_keys.insert("../etc".into(), vec![]);
        assert!(matches!(seed.to_cpio(), Err(LabError::Invalid(_))));
    }

    #[test]
    fn vm_initrd_is_rewritten_only_when_the_seed_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.gz");
        fs::write(&base, b"abcde").expect("write base");
        let dest = dir.path().join("vm.initrd");
        let mut seed = seed_with_root_key();

        assert!(write_vm_initrd(&base, &seed, &dest).expect("first write"));
        assert!(!write_vm_initrd(&base, &seed, &dest).expect("same seed"));
        seed.authorized_keys
            .insert("alice".into(), vec!["ssh-ed25519 BBBB k2".into()]);
        assert!(write_vm_initrd(&base, &seed, &dest).expect("changed seed"));

        let bytes = fs::read(&dest).expect("read dest");
        assert_eq!(&bytes[..5], b"abcde");
        assert_eq!(&bytes[5..8], &[0, 0, 0], "padding to a 4-byte boundary");
        assert_eq!(&bytes[8..14], b"070701");
    }
}
