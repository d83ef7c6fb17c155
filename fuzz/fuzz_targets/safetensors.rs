//! The Hugging Face checkpoint reader: `config.json` and `model.safetensors` (the input is
//! their concatenation, see `wcc_fuzz::split`), then the lowering of what it accepts and the
//! reading of every weight the lowered module declares.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wcc_frontend::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let (config, st) = wcc_fuzz::split(data);
    if let Ok(ck) = Checkpoint::from_safetensors_bytes(std::path::Path::new("fuzz"), st.to_vec(), config, None) {
        wcc_fuzz::lower_and_read(&ck);
    }
});
