//! The `.wbin` reader up to the point of running code: prelude, section table, header JSON,
//! and every check of the program against the file (kernels, launches, buffers, slots).
#![no_main]
use libfuzzer_sys::fuzz_target;
use wcc_format::WbinFile;

fuzz_target!(|data: &[u8]| {
    // The input is resealed (length and CRC-32 set to match) so that mutations reach the
    // header and the program; the checksum itself is tested in tests/wbin.rs.
    let mut bytes = data.to_vec();
    wcc_format::reseal(&mut bytes);
    if let Ok(file) = WbinFile::from_bytes(bytes, "fuzz.wbin") {
        let _ = wcc_runtime::compiled::check_program(&file);
    }
});
