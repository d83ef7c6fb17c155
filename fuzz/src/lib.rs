//! What the fuzz targets do with an input, beyond "no panic": the properties each reader
//! promises of what it accepts. A crash input found by a target is kept under
//! `fuzz/regressions/<target>/`, which `scripts/fuzz` runs before fuzzing.

use std::sync::OnceLock;

use wcc_frontend::checkpoint::Checkpoint;
use wcc_ir::interp::WeightLoader;

/// A checkpoint the reader accepted either lowers to a module the verifier accepts, or is
/// refused by the lowering with an error; every weight that module declares reads back with
/// the element count its declared type has.
pub fn lower_and_read(ck: &Checkpoint) {
    let Ok(m) = wcc_frontend::lower::lower(ck) else { return };
    if let Err(e) = wcc_ir::verify(&m) {
        panic!("the lowering of an accepted checkpoint fails verification: {e}");
    }
    for w in &m.weights {
        if let Ok(v) = ck.load_f32(w) {
            assert_eq!(v.len(), w.ty.numel(), "weight {} reads back at the wrong size", w.name);
        }
    }
}

/// Splits a safetensors target input: a little-endian u16 length, that many bytes of
/// `config.json`, then `model.safetensors`.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (&[], data);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

/// Text that parses prints to text that parses back to the same module (so a dump can be
/// edited and fed to `wcc opt`), and the verifier answers either way without a panic.
pub fn ir_round_trip(text: &str) {
    let Ok(m) = wcc_ir::parse_module(text) else { return };
    let _ = wcc_ir::verify(&m);
    let printed = wcc_ir::print_module(&m);
    let again =
        wcc_ir::parse_module(&printed).unwrap_or_else(|e| panic!("printed module does not parse: {e}\n{printed}"));
    assert_eq!(wcc_ir::print_module(&again), printed, "print . parse . print differs from print");
}

/// A panic inside symphonia is caught by the audio reader and reported as the file's error
/// (its own bugs, found here: `fuzz/regressions/audio`); libFuzzer's hook aborts on every
/// panic before it can unwind, so this hook lets those through (`audio::in_decoder`) and
/// aborts on any other.
fn contain_decoder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort_on_ours = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !wcc_runtime::audio::in_decoder() {
                abort_on_ours(info);
            }
        }));
    });
}

/// Decodes `data` as an audio file; what decodes is finite.
pub fn decode(data: &[u8], as_wav: bool) {
    contain_decoder_panics();
    let (label, ext) = if as_wav { ("fuzz.wav", Some("wav")) } else { ("fuzz", None) };
    if let Ok(x) = wcc_runtime::audio::decode_audio(data.to_vec(), label, ext, as_wav) {
        assert!(x.iter().all(|v| v.is_finite()), "decoded samples are not finite");
    }
}

/// The tokenizer the `tokenizer` target decodes with: `$WCC_FUZZ_TOKENIZER`, else tiny.en's
/// from the model cache (`scripts/fetch-models tiny.en`).
fn tokenizer() -> &'static wcc_runtime::tokenizer::WhisperTokenizer {
    static T: OnceLock<wcc_runtime::tokenizer::WhisperTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var_os("WCC_FUZZ_TOKENIZER").map(std::path::PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            std::path::Path::new(&home).join(".cache/wcc/models/tiny.en/tokenizer.json")
        });
        let json = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (set WCC_FUZZ_TOKENIZER)", path.display()));
        wcc_runtime::tokenizer::WhisperTokenizer::from_bytes(&json).expect("the tokenizer loads")
    })
}

/// Decodes the ids in `data` (three little-endian bytes each: in and far out of the
/// vocabulary): text or an error naming the id, never a panic.
pub fn decode_ids(data: &[u8]) {
    let t = tokenizer();
    let eot = t.special_tokens().expect("special tokens").eot;
    let ids: Vec<u32> = data.chunks_exact(3).map(|c| u32::from_le_bytes([c[0], c[1], c[2], 0])).collect();
    let _ = t.decode(&ids, eot);
    for &id in &ids {
        let _ = t.token(id);
    }
}
