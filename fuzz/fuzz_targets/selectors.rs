#![no_main]
//! Body: guestcred_lab::apiserver::fuzz_selectors, the API-server emulator's label and field
//! selector parser (replayed over corpus/selectors by `cargo test`, lab/tests/fuzz_corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestcred_lab::apiserver::fuzz_selectors(data));
