//! Replays every file of fuzz/corpus/<target>/ through the function that fuzz target runs
//! (guestcred_api::fuzzing), so a corpus input that crashes fails `cargo test --workspace`
//! without any timed fuzzing. Crashes found by `make fuzz` are added to the corpus.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
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

#[test]
fn shim_request_corpus_replays_without_a_crash() {
    replay("shim_request", guestcred_api::fuzzing::shim_request);
}

#[test]
fn authorized_keys_corpus_replays_without_a_crash() {
    replay("authorized_keys", guestcred_api::fuzzing::authorized_keys);
}

#[test]
fn crypt_corpus_replays_without_a_crash() {
    replay("crypt", guestcred_api::fuzzing::crypt);
}
