//! The tokenizer's decode of arbitrary ids (in and out of the vocabulary).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wcc_fuzz::decode_ids(data);
});
