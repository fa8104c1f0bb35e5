//! crds/ must be exactly what `guestcred crdgen` writes from the Rust types.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for (file, crd) in guestcred::api::crds() {
        let want = guestcred::api::crd_yaml(&crd).expect("crd serializes");
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(have == want, "crds/{file} is out of date: run `make crds`");
    }
}
