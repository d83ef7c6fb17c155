//! The compiled path end to end: `wcc compile` → `.wbin` → `wcc run`, against the
//! interpreter and CTranslate2 (float32, fed wcc's own features), on every clip of the
//! English dev set.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use wcc_runtime::compiled::CompiledModel;
use wcc_runtime::decode::transcribe_prompt;
use wcc_runtime::transcribe::{transcribe, TranscribeOptions, WhisperModel};

fn compile(model: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{model}.wbin"));
    wcc_ok(&["compile", "--model", model, "-o", p(&out)]);
    out
}

fn manifest_clips() -> Vec<PathBuf> {
    let dir = shared_data().join("audio/en");
    let text = std::fs::read_to_string(dir.join("manifest.tsv")).unwrap();
    text.lines().skip(1).filter(|l| !l.trim().is_empty()).map(|l| dir.join(l.split('\t').next().unwrap())).collect()
}

#[test]
fn jfk_compiled_equals_interpreter_and_exact_base_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    for (model, want) in [
        ("tiny.en", "And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."),
        ("base", "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."),
    ] {
        let wbin = compile(model, tmp.path());
        let compiled = wcc_ok(&["run", p(&wbin), p(&jfk()), "--threads", "2"]);
        let interpreted = wcc_ok(&["transcribe", "--interpret", "--model", model, p(&jfk())]);
        assert_eq!(compiled.trim(), interpreted.trim(), "{model}");
        assert_eq!(compiled.trim(), want, "{model}");
    }
}

/// Greedy ids of the compiled model on every dev clip equal CTranslate2's from the same
/// features and prompt.
fn dev_set_matches_ctranslate2(model: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile(model, tmp.path());
    let mut m = CompiledModel::load(&wbin, 2).unwrap();
    let tok = m.tokenizer().unwrap();
    let cfg = m.header().generation.clone();
    let filters = m.mel_filters();
    let (_, frames) = m.input_shape();
    let clips = manifest_clips();
    assert_eq!(clips.len(), 22);
    let (mut mels, mut prompts, mut ours) = (vec![], vec![], vec![]);
    for (i, clip) in clips.iter().enumerate() {
        let samples = wcc_runtime::audio::load_audio(clip).unwrap();
        let out = transcribe(&mut m, &tok, &cfg, &samples, &TranscribeOptions::default()).unwrap();
        assert_eq!(out.segments.len(), 1, "{}: dev clips fit one window", clip.display());
        let mel = wcc_runtime::mel::log_mel_spectrogram_with(&samples, &filters, frames);
        let path = tmp.path().join(format!("mel{i}.npy"));
        wcc_runtime::npy::write_f32(&path, &[filters.len() / 201, frames], &mel).unwrap();
        let lang = out.language.as_ref().map(|code| cfg.languages.iter().find(|(c, _)| c == code).unwrap().1);
        let prompt: Vec<String> = transcribe_prompt(&cfg, lang, false).iter().map(|t| t.to_string()).collect();
        mels.push(path);
        prompts.push(prompt.join(","));
        ours.push(out.tokens());
    }
    let mut args = vec!["greedy".to_string(), p(&model_dir(model)).to_string()];
    args.extend(mels.iter().map(|m| p(m).to_string()));
    for pr in &prompts {
        args.push("--prompt".into());
        args.push(pr.clone());
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let theirs: Vec<Vec<u32>> = serde_json::from_str(&reference(&arg_refs)).unwrap();
    let mut differ = vec![];
    for ((clip, a), b) in clips.iter().zip(&ours).zip(&theirs) {
        if a != b {
            differ.push(format!(
                "{}:\n  wcc  {}\n  ct2  {}",
                clip.display(),
                tok.decode(a, cfg.special.eot).unwrap(),
                tok.decode(b, cfg.special.eot).unwrap()
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{model}: {} of {} clips differ from CTranslate2:\n{}",
        differ.len(),
        clips.len(),
        differ.join("\n")
    );
}

#[test]
fn tiny_en_dev_set_tokens_equal_ctranslate2() {
    dev_set_matches_ctranslate2("tiny.en");
}

#[test]
fn base_dev_set_tokens_equal_ctranslate2() {
    dev_set_matches_ctranslate2("base");
}

/// The same `.wbin` gives the same tokens at 1, 2 and 4 threads and when run again: every
/// kernel computes each output element in one fixed order, whichever thread runs it.
#[test]
fn tokens_do_not_depend_on_the_thread_count_or_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = tmp.path().join("tiny8.wbin");
    wcc_ok(&["compile", "--model", "tiny.en", "--int8", "-o", p(&wbin)]);
    let clips = manifest_clips();
    let run = |threads: usize| -> (Vec<Vec<u32>>, Vec<(String, Vec<f32>)>) {
        let mut m = CompiledModel::load(&wbin, threads).unwrap();
        let tok = m.tokenizer().unwrap();
        let cfg = m.header().generation.clone();
        let tokens = clips
            .iter()
            .map(|c| {
                let samples = wcc_runtime::audio::load_audio(c).unwrap();
                transcribe(&mut m, &tok, &cfg, &samples, &TranscribeOptions::default()).unwrap().tokens()
            })
            .collect();
        // The encoder outputs of the last clip, bit for bit.
        (tokens, m.encoder_outputs())
    };
    let (want, want_enc) = run(2);
    for threads in [1, 4, 2] {
        let (got, got_enc) = run(threads);
        for ((c, a), b) in clips.iter().zip(&want).zip(&got) {
            assert_eq!(a, b, "{}: tokens at {threads} threads differ from 2 threads", c.display());
        }
        for ((name, a), (_, b)) in want_enc.iter().zip(&got_enc) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs at {threads} threads");
        }
    }
}

/// A token or position out of range is refused by the compiled step as by the interpreter
/// (the kernels clamp indices, so without the check it would be a silent wrong answer).
#[test]
fn compiled_step_refuses_a_token_or_position_out_of_range() {
    use wcc_runtime::decode::Decoder;
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile("tiny.en", tmp.path());
    let mut m = CompiledModel::load(&wbin, 1).unwrap();
    let cfg = m.header().generation.clone();
    let mel = vec![-0.5f32; 80 * 3000];
    m.encode(&mel).unwrap();
    let n_vocab = m.step(cfg.special.sot, 0).unwrap().len();
    let e = m.step(n_vocab as u32, 1).unwrap_err();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = m.step(cfg.special.sot, cfg.max_text_ctx).unwrap_err();
    assert!(e.contains("outside the text context"), "{e}");
    assert!(m.step(cfg.special.sot, cfg.max_text_ctx - 1).is_ok());
    // The interpreter says the same of the same inputs.
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let module = wcc_passes::run(loaded.module, &wcc_passes::default_pipeline()).unwrap();
    let interp = wcc_ir::interp::Interpreter::new(&module, &loaded.checkpoint).unwrap();
    let enc = module.graph("encoder").unwrap();
    let out = interp
        .run("encoder", &[wcc_ir::interp::Tensor::f32(enc.ty(enc.inputs[0]).shape.clone(), mel.clone())])
        .unwrap();
    let zeros = |ty: &wcc_ir::TensorType| wcc_ir::interp::Tensor::f32(ty.shape.clone(), vec![0.0; ty.numel()]);
    let bad_token = decoder_step_inputs(&module, &out, n_vocab as i32, 1, &zeros);
    assert!(interp.run("decoder_step", &bad_token).is_err());
    let bad_pos = decoder_step_inputs(&module, &out, cfg.special.sot as i32, cfg.max_text_ctx as i32, &zeros);
    assert!(interp.run("decoder_step", &bad_pos).is_err());
}
