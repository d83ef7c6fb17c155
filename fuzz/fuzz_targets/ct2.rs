//! The CTranslate2 checkpoint reader (`model.bin`), then the lowering of what it accepts and
//! the reading of every weight the lowered module declares.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wcc_frontend::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(ck) = Checkpoint::from_ct2_bytes(std::path::Path::new("fuzz"), data.to_vec(), None) {
        wcc_fuzz::lower_and_read(&ck);
    }
});
