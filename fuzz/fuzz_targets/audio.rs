//! The audio decoders as `wcc run` meets a file: WAV by its RIFF header, anything else by
//! symphonia's probe; then mix-down and resampling.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wcc_fuzz::decode(data, false);
});
