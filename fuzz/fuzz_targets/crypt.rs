#![no_main]
//! Body: guestcred_api::fuzzing::crypt (replayed over corpus/crypt by `cargo test`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestcred_api::fuzzing::crypt(data));
