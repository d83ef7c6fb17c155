//! The IR text parser and the verifier; what parses prints and parses back to the same text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        wcc_fuzz::ir_round_trip(text);
    }
});
