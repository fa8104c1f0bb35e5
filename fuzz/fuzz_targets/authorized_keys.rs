#![no_main]
//! Body: guestcred_api::fuzzing::authorized_keys (replayed over corpus/authorized_keys by `cargo test`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestcred_api::fuzzing::authorized_keys(data));
