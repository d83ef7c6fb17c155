//! Every Whisper size lowers and verifies: checkpoints with each size's real
//! hyper-parameters and seeded random weights, written in Hugging Face format, read back.

mod common;

use wcc_frontend::hf_writer::{size_dims, write_random};
use wcc_ir::{parse_module, print_module, verify, DType};

#[test]
fn every_size_lowers_and_verifies() {
    // (size, mel bins, encoder layers, decoder layers, width, vocabulary)
    let expected = [
        ("tiny", 80, 4, 4, 384, 51865),
        ("base.en", 80, 6, 6, 512, 51864),
        ("small", 80, 12, 12, 768, 51865),
        ("medium", 80, 24, 24, 1024, 51865),
        ("large-v2", 80, 32, 32, 1280, 51865),
        ("large-v3", 128, 32, 32, 1280, 51866),
        ("large-v3-turbo", 128, 32, 4, 1280, 51866),
    ];
    for (size, mels, enc, dec, d, vocab) in expected {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(size);
        // bf16 for the biggest, to exercise that storage type too.
        let dtype = if size == "large-v3" { DType::BF16 } else { DType::F16 };
        let t0 = std::time::Instant::now();
        write_random(&dir, size, 42, dtype).unwrap();
        let written = t0.elapsed().as_secs_f64();
        let loaded = wcc_frontend::load(&dir).unwrap();
        let m = &loaded.module;
        verify(m).unwrap();
        let dims = &loaded.checkpoint.dims;
        assert_eq!(dims, &size_dims(size).unwrap());
        assert_eq!(
            (dims.n_mels, dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state, dims.n_vocab),
            (mels, enc, dec, d, vocab),
            "{size}"
        );
        let mel = m.graph("encoder").unwrap();
        assert_eq!(mel.ty(mel.inputs[0]).shape, vec![mels, 3000]);
        let logits = m.graph("decoder_step").unwrap();
        assert_eq!(logits.ty(logits.outputs[0]).shape, vec![1, vocab]);
        assert!(m.weights.iter().all(|w| w.ty.dtype == dtype));
        let hoisted = wcc_passes::run(m.clone(), &["hoist-cross-kv"]).unwrap();
        assert!(parse_module(&print_module(&hoisted)).unwrap() == hoisted);
        eprintln!(
            "{size}: {} weights, {} + {} nodes, written in {written:.1} s",
            m.weights.len(),
            m.graphs[0].nodes.len(),
            m.graphs[1].nodes.len()
        );
    }
}
