//! End to end: wcc's greedy tokens equal CTranslate2's float32 greedy tokens computed from
//! wcc's own log-mel, for the CTranslate2 checkpoints and for a Hugging Face conversion.

mod common;
use common::*;

use std::path::Path;

fn transcribe_json(model: &str, audio: &Path) -> serde_json::Value {
    let out = wcc_ok(&[
        "transcribe",
        "--interpret",
        "--model",
        model,
        "--json",
        "--without-timestamps",
        "--beam-size",
        "1",
        p(audio),
    ]);
    serde_json::from_str(&out).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// CTranslate2's greedy ids for `model_dir` on wcc's features of `audio`, with `prompt`.
fn ct2_greedy(model_dir: &Path, audio: &Path, prompt: &[u32]) -> Vec<u64> {
    let dir = tempfile::tempdir().unwrap();
    let mel = dir.path().join("mel.npy");
    let loaded = wcc_frontend::load(model_dir).unwrap();
    let n_mels = loaded.checkpoint.dims.n_mels.to_string();
    wcc_ok(&["features", p(audio), "--n-mels", &n_mels, "-o", p(&mel)]);
    let prompt: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let out = reference(&["greedy", p(model_dir), p(&mel), "--prompt", &prompt.join(",")]);
    ids(&serde_json::from_str(&out).unwrap())
}

fn prompt_for(model_dir: &Path, language: Option<&str>) -> Vec<u32> {
    let loaded = wcc_frontend::load(model_dir).unwrap();
    let cfg = loaded.generation().unwrap();
    let lang = language.map(|code| cfg.languages.iter().find(|(c, _)| c == code).unwrap().1);
    wcc_runtime::decode::transcribe_prompt(&cfg, lang, false)
}

#[test]
fn tiny_en_jfk_tokens_equal_ctranslate2() {
    let v = transcribe_json("tiny.en", &jfk());
    let dir = model_dir("tiny.en");
    let want = ct2_greedy(&dir, &jfk(), &prompt_for(&dir, None));
    assert_eq!(ids(&v["tokens"]), want);
    // openai-whisper's padding convention gives the comma after "for you" (see runtime::mel).
    assert_eq!(
        v["text"],
        "And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."
    );
    eprintln!("tiny.en timings: {}", v["timings"]);
}

#[test]
fn base_jfk_detects_english_and_gives_the_exact_sentence() {
    let v = transcribe_json("base", &jfk());
    assert_eq!(v["language"], "en");
    assert_eq!(
        v["text"],
        "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
    );
    let dir = model_dir("base");
    let want = ct2_greedy(&dir, &jfk(), &prompt_for(&dir, Some("en")));
    assert_eq!(ids(&v["tokens"]), want);
    eprintln!("base timings: {}", v["timings"]);
}

#[test]
fn hugging_face_conversion_of_tiny_en_loads_back_and_transcribes_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("tiny.en-hf");
    let ct2_dir = model_dir("tiny.en");
    wcc_ok(&["checkpoint", "convert", "--model", "tiny.en", "-o", p(&hf)]);

    // 1. The converter, checked without wcc's HF reader: a numpy encoder over the
    //    safetensors file agrees with CTranslate2's encoder on the original checkpoint.
    let mel = tmp.path().join("mel.npy");
    wcc_ok(&["features", p(&jfk()), "-o", p(&mel)]);
    let (np_out, ct2_out) = (tmp.path().join("np.npy"), tmp.path().join("ct2.npy"));
    reference(&["hf-encode", p(&hf), p(&mel), "-o", p(&np_out)]);
    reference(&["encode", p(&ct2_dir), p(&mel), "-o", p(&ct2_out)]);
    let (_, a) = read_npy(&np_out);
    let (_, b) = read_npy(&ct2_out);
    let (l2, maxrel) = relative_errors(&a, &b);
    eprintln!("numpy encoder over the HF conversion vs CTranslate2: {l2:e} / {maxrel:e}");
    assert!(l2 < 1e-3 && maxrel < 1e-3);

    // 2. Loaded back through wcc's HF reader, every weight is bit-identical to the original.
    let orig = wcc_frontend::load(&ct2_dir).unwrap();
    let conv = wcc_frontend::load(&hf).unwrap();
    assert_eq!(orig.checkpoint.dims, conv.checkpoint.dims);
    assert_eq!(orig.checkpoint.generation.suppress, conv.checkpoint.generation.suppress);
    for w in &orig.module.weights {
        let c = conv.module.weight(&w.name).unwrap_or_else(|| panic!("{} missing", w.name));
        assert_eq!(c.ty, w.ty);
        let x = orig.checkpoint.read_f32(&w.source.tensor, w.source.rows).unwrap();
        let y = conv.checkpoint.read_f32(&c.source.tensor, c.source.rows).unwrap();
        assert!(x == y, "{} differs", w.name);
    }

    // 3. End to end through the HF path: same tokens as CTranslate2.
    let v = transcribe_json(p(&hf), &jfk());
    let want = ct2_greedy(&ct2_dir, &jfk(), &prompt_for(&ct2_dir, None));
    assert_eq!(ids(&v["tokens"]), want);
}
