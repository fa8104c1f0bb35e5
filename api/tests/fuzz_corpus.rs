//! Replays every file of fuzz/corpus/<target>/ through the function that fuzz target runs
//! (guestcred_api::fuzzing), so a corpus input that crashes fails `cargo test --workspace`
//! without any timed fuzzing. Crashes found by `make fuzz` are added to the corpus.

use guestcred_api::fuzzing::{self, replay_corpus};

#[test]
fn shim_request_corpus_replays_without_a_crash() {
    replay_corpus("shim_request", fuzzing::shim_request);
}

#[test]
fn authorized_keys_corpus_replays_without_a_crash() {
    replay_corpus("authorized_keys", fuzzing::authorized_keys);
}

#[test]
fn crypt_corpus_replays_without_a_crash() {
    replay_corpus("crypt", fuzzing::crypt);
}
