//! Replays every file of fuzz/corpus/selectors/ through the body of the `selectors` fuzz
//! target (the emulator's label and field selector parser,
//! guestcred_lab::apiserver::fuzz_selectors), as api/tests/fuzz_corpus.rs does for the
//! other targets: a corpus input that crashes fails `cargo test --workspace` without any
//! timed fuzzing.

#[test]
fn selectors_corpus_replays_without_a_crash() {
    guestcred_api::fuzzing::replay_corpus("selectors", guestcred_lab::apiserver::fuzz_selectors);
}
