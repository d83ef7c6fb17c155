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

#[test]
fn a_random_checkpoint_with_a_real_vocabulary_compiles_and_runs() {
    use common::*;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    wcc_ok(&["checkpoint", "random", "--size", "tiny", "--vocabulary-from", "base", "-o", p(&dir)]);
    // The same vocabulary size: base's tokenizer and generation settings as they are.
    let loaded = wcc_frontend::load(&dir).unwrap();
    let base = wcc_frontend::load(&model_dir("base")).unwrap();
    assert_eq!(loaded.generation().unwrap(), base.generation().unwrap());
    assert!(
        std::fs::read(dir.join("tokenizer.json")).unwrap()
            == std::fs::read(model_dir("base").join("tokenizer.json")).unwrap()
    );
    // Meaningless words, but a whole run: compile, transcribe (JSON with its segments).
    let wbin = tmp.path().join("tiny.wbin");
    wcc_ok(&["compile", "--model", p(&dir), "--timesteps", "1024", "-o", p(&wbin)]);
    let out = wcc_ok(&["run", p(&wbin), p(&jfk()), "--temperatures", "0", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json["segments"].is_array(), "{out}");
    // An English-only size cannot take a multilingual vocabulary: refused before writing.
    let en = tmp.path().join("en");
    let e = wcc_err(&["checkpoint", "random", "--size", "tiny.en", "--vocabulary-from", "base", "-o", p(&en)]);
    assert!(e.contains("cannot serve a model of 51864 tokens") && e.contains("English-only"), "{e}");
    assert!(!en.exists());
}

#[test]
fn large_v3_takes_a_multilingual_vocabulary_with_cantonese_added() {
    // A tiny-sized model with large-v3's vocabulary and mel bins, the vocabulary from base.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v3");
    let mut dims = size_dims("tiny").unwrap();
    (dims.n_vocab, dims.n_mels) = (size_dims("large-v3").unwrap().n_vocab, 128);
    wcc_frontend::hf_writer::write_random_dims(&dir, &dims, 5, DType::F16).unwrap();
    let base = wcc_frontend::Checkpoint::open(&common::model_dir("base")).unwrap();
    wcc_frontend::hf_writer::write_vocabulary(&base, &dims, &dir).unwrap();
    let g = wcc_frontend::load(&dir).unwrap().generation().unwrap();
    // large-v3's own ids (openai-whisper's tokenizer for 51866 tokens): the text tokens and
    // the first specials as before, `<|yue|>` at 50358, everything after it one higher, the
    // last timestamp `<|30.00|>` the last id.
    let s = &g.special;
    assert_eq!((s.eot, s.sot), (50257, 50258));
    assert_eq!((s.translate, s.transcribe, s.sot_prev, s.no_speech), (50359, 50360, Some(50362), Some(50363)));
    assert_eq!((s.no_timestamps, s.timestamp_begin), (50364, 50365));
    assert_eq!(s.timestamp_begin as usize + 1500, dims.n_vocab - 1);
    assert_eq!(g.languages.len(), 100);
    assert!(g.languages.iter().any(|(code, id)| code == "yue" && *id == 50358), "{:?}", g.languages);
    assert!(g.languages.iter().any(|(code, id)| code == "en" && *id == 50259));
    assert!(g.suppress.iter().all(|&t| (t as usize) < dims.n_vocab));
}

#[test]
fn a_random_checkpoint_written_for_ctranslate2_holds_the_same_weights_and_loads_there() {
    use common::*;
    let tmp = tempfile::tempdir().unwrap();
    let (hf, ct2) = (tmp.path().join("hf"), tmp.path().join("ct2"));
    wcc_ok(&["checkpoint", "random", "--size", "tiny", "--seed", "9", "--vocabulary-from", "base", "-o", p(&hf)]);
    wcc_ok(&["checkpoint", "convert", "--model", p(&hf), "--format", "ct2", "--template", "base", "-o", p(&ct2)]);
    // Read back by wcc's CTranslate2 reader: the same dimensions, settings and every weight
    // bit for bit (from the fused tensors where CTranslate2 fuses them).
    let (a, b) = (wcc_frontend::load(&hf).unwrap(), wcc_frontend::load(&ct2).unwrap());
    assert_eq!(a.checkpoint.dims, b.checkpoint.dims);
    assert_eq!(a.generation().unwrap(), b.generation().unwrap());
    for (logical, _) in wcc_frontend::hf_writer::tensor_list(&a.checkpoint.dims) {
        let (sa, sb) = (a.checkpoint.source(&logical).unwrap(), b.checkpoint.source(&logical).unwrap());
        let (ba, bb) =
            (a.checkpoint.bytes(&sa.tensor, sa.rows).unwrap(), b.checkpoint.bytes(&sb.tensor, sb.rows).unwrap());
        assert!(ba == bb, "{logical} differs");
    }
    // CTranslate2 itself (the reference venv) loads it and encodes a window.
    let script = "import sys, numpy as np, ctranslate2\n\
                  m = ctranslate2.models.Whisper(sys.argv[1], device='cpu', compute_type='int8')\n\
                  out = m.encode(ctranslate2.StorageView.from_array(np.zeros((1, 80, 3000), np.float32)))\n\
                  print(out.shape)";
    let out = std::process::Command::new(ref_python()).arg("-c").arg(script).arg(p(&ct2)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "[1, 1500, 384]");
    // A template of another vocabulary is refused.
    let e = wcc_err(&[
        "checkpoint",
        "convert",
        "--model",
        p(&hf),
        "--format",
        "ct2",
        "--template",
        "tiny.en",
        "-o",
        p(&tmp.path().join("x")),
    ]);
    assert!(e.contains("same vocabulary"), "{e}");
}
