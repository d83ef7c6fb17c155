//! The WAV path (a file named `.wav` goes to the WAV reader whatever its bytes).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wcc_fuzz::decode(data, true);
});
