//! The lab's certificates: one CA, a shim server certificate (DNS SAN `guestcred-shim`)
//! and a controller client certificate (DNS SAN `guestcred-controller`), minted at `up`.
//!
//! The layout mirrors the chart's Secret volumes, so the lab runs the binaries with the
//! same flags as the cluster does:
//!
//! ```text
//! <state>/tls/ca.crt
//! <state>/tls/shim/{tls.crt,tls.key,ca.crt}         (the `…-shim-tls` Secret)
//! <state>/tls/controller/{tls.crt,tls.key,ca.crt}   (the `…-controller-tls` Secret)
//! ```
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::ClusterError;
use guestcred::tls::client::ClientTlsFiles;
use guestcred::tls::server::ServerTlsFiles;
use guestcred::tls::{DEFAULT_ALLOWED_CLIENT, DEFAULT_SHIM_SERVER_NAME};

/// Where the lab's certificate files live under `<state>/tls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabTls {
    pub dir: PathBuf,
}

/// One side's Secret-like directory: `tls.crt`, `tls.key`, `ca.crt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsDir {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsDir {
    fn new(dir: &Path) -> Self {
        TlsDir {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }

    /// The flags that give `guestcred controller` these files as its client side of the
    /// shims' mutual TLS (the controller's [`LabTls::controller`] directory).
    pub fn controller_flags(&self) -> [OsString; 6] {
        self.flags([
            "--shim-client-cert-file",
            "--shim-client-key-file",
            "--shim-ca-file",
        ])
    }

    /// The flags that give `guestcred shim` these files to serve its mutual TLS with (the
    /// shim's [`LabTls::shim`] directory: its certificate, key and the clients' CA).
    pub fn shim_flags(&self) -> [OsString; 6] {
        self.flags(["--tls-cert-file", "--tls-key-file", "--client-ca-file"])
    }

    /// Each file after its option: `[cert, key, ca]` name the options.
    fn flags(&self, [cert, key, ca]: [&str; 3]) -> [OsString; 6] {
        let file = |path: &PathBuf| OsString::from(path);
        [
            cert.into(),
            file(&self.cert),
            key.into(),
            file(&self.key),
            ca.into(),
            file(&self.ca),
        ]
    }
}

impl LabTls {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LabTls { dir: dir.into() }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The shim's server certificate, key and the CA its clients must chain to.
    pub fn shim(&self) -> TlsDir {
        TlsDir::new(&self.dir.join("shim"))
    }

    /// The controller's client certificate, key and the CA the shims chain to.
    pub fn controller(&self) -> TlsDir {
        TlsDir::new(&self.dir.join("controller"))
    }

    /// The shim's files as `guestcred shim` loads them.
    pub fn shim_server_files(&self) -> ServerTlsFiles {
        let d = self.shim();
        ServerTlsFiles {
            cert: d.cert,
            key: d.key,
            client_ca: d.ca,
        }
    }

    /// The controller's files as `guestcred controller` loads them.
    pub fn controller_client_files(&self) -> ClientTlsFiles {
        let d = self.controller();
        ClientTlsFiles {
            ca: d.ca,
            cert: Some(d.cert),
            key: Some(d.key),
            server_name: DEFAULT_SHIM_SERVER_NAME.into(),
        }
    }

    /// Mints a fresh CA and both leaf certificates, replacing whatever was there. Key
    /// files are 0600 and the directories 0700: the controller's key opens every shim.
    pub fn mint(&self) -> Result<(), ClusterError> {
        let ca = new_ca().map_err(minting)?;
        let shim = issue(
            &ca,
            DEFAULT_SHIM_SERVER_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .map_err(minting)?;
        let controller = issue(
            &ca,
            DEFAULT_ALLOWED_CLIENT,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
        .map_err(minting)?;
        let ca_pem = ca.pem();
        private_dir(&self.dir)?;
        write(&self.ca(), &ca_pem, 0o644)?;
        for (side, (cert, key)) in [(self.shim(), shim), (self.controller(), controller)] {
            if let Some(dir) = side.cert.parent() {
                private_dir(dir)?;
            }
            write(&side.key, &key, 0o600)?;
            write(&side.cert, &cert, 0o644)?;
            write(&side.ca, &ca_pem, 0o644)?;
        }
        Ok(())
    }
}

fn minting(e: rcgen::Error) -> ClusterError {
    ClusterError::Failed(format!("minting the lab certificates: {e}"))
}

fn new_ca() -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "guestcred lab CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

/// (certificate PEM, key PEM) for `dns_name`, for one role only.
fn issue(
    ca: &CertifiedIssuer<'static, KeyPair>,
    dns_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, zeroize::Zeroizing<String>), rcgen::Error> {
    let mut params = CertificateParams::new(vec![dns_name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, dns_name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), zeroize::Zeroizing::new(key.serialize_pem())))
}

fn private_dir(dir: &Path) -> Result<(), ClusterError> {
    fs::create_dir_all(dir)
        .map_err(|e| ClusterError::io(format!("create {}", dir.display()), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| ClusterError::io(format!("chmod {}", dir.display()), e))
}

/// Writes through a temporary file and a rename, so a shim reloading its files never
/// reads half of one (a re-`up` replaces them under running readers only after `down`,
/// but a hand-run `mint` may not).
fn write(path: &Path, content: &str, mode: u32) -> Result<(), ClusterError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content)
        .map_err(|e| ClusterError::io(format!("write {}", tmp.display()), e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| ClusterError::io(format!("chmod {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| ClusterError::io(format!("rename to {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestcred::tls::client::ReloadingHttpClient;
    use guestcred::tls::server::ReloadingServerConfig;

    fn minted() -> (tempfile::TempDir, LabTls) {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = LabTls::new(dir.path().join("tls"));
        tls.mint().expect("minted");
        (dir, tls)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("exists").permissions().mode() & 0o777
    }

    #[test]
    fn minted_files_load_as_the_shims_server_config_and_the_controllers_client() {
        let (_dir, tls) = minted();
        ReloadingServerConfig::new(tls.shim_server_files()).expect("shim TLS config");
        ReloadingHttpClient::new(
            tls.controller_client_files(),
            std::time::Duration::from_secs(5),
        )
        .expect("controller TLS client");
    }

    #[test]
    fn private_keys_and_their_directories_are_readable_by_the_owner_only() {
        let (_dir, tls) = minted();
        for side in [tls.shim(), tls.controller()] {
            assert_eq!(mode(&side.key), 0o600);
            assert_eq!(mode(side.key.parent().expect("dir")), 0o700);
        }
        assert_eq!(mode(&tls.dir), 0o700);
    }

    #[test]
    fn flags_pair_each_option_with_its_sides_file() {
        let tls = LabTls::new("/lab/tls");
        let pairs = |flags: [OsString; 6]| -> Vec<(String, String)> {
            let flags: Vec<String> = flags.iter().map(|f| f.to_string_lossy().into()).collect();
            flags
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect()
        };
        let own = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            pairs(tls.shim().shim_flags()),
            own(&[
                ("--tls-cert-file", "/lab/tls/shim/tls.crt"),
                ("--tls-key-file", "/lab/tls/shim/tls.key"),
                ("--client-ca-file", "/lab/tls/shim/ca.crt"),
            ])
        );
        assert_eq!(
            pairs(tls.controller().controller_flags()),
            own(&[
                ("--shim-client-cert-file", "/lab/tls/controller/tls.crt"),
                ("--shim-client-key-file", "/lab/tls/controller/tls.key"),
                ("--shim-ca-file", "/lab/tls/controller/ca.crt"),
            ])
        );
    }

    #[test]
    fn both_sides_trust_the_same_ca() {
        let (_dir, tls) = minted();
        let ca = fs::read(tls.ca()).expect("ca.crt");
        assert_eq!(fs::read(tls.shim().ca).expect("shim ca"), ca);
        assert_eq!(fs::read(tls.controller().ca).expect("controller ca"), ca);
    }

    #[test]
    fn minting_again_replaces_the_ca() {
        let (_dir, tls) = minted();
        let before = fs::read(tls.ca()).expect("ca.crt");
        tls.mint().expect("minted again");
        assert_ne!(fs::read(tls.ca()).expect("ca.crt"), before);
    }
}
