#![no_main]
//! Body: guestcred_api::fuzzing::shim_request (replayed over corpus/shim_request by `cargo test`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestcred_api::fuzzing::shim_request(data));
