//! The compiled path end to end: `wcc compile` → `.wbin` → `wcc run`, against the
//! interpreter and CTranslate2 (float32, fed wcc's own features), on every clip of the
//! English dev set.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use wcc_runtime::compiled::CompiledModel;
use wcc_runtime::decode::{greedy_scored, timestamp_prompt, transcribe_prompt};
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
        // Greedy windows without timestamps: the path the sentence above was taken from.
        let plain = ["--without-timestamps", "--beam-size", "1"];
        let compiled = wcc_ok(&[&["run", p(&wbin), p(&jfk()), "--threads", "2"][..], &plain].concat());
        let interpreted = wcc_ok(&[&["transcribe", "--interpret", "--model", model, p(&jfk())][..], &plain].concat());
        assert_eq!(compiled.trim(), interpreted.trim(), "{model}");
        assert_eq!(compiled.trim(), want, "{model}");
    }
}

/// CTranslate2's float32 greedy ids of `model` for each features file and its prompt, in one
/// load of the reference model.
fn ct2_greedy(model: &str, mels: &[PathBuf], prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut args = vec!["greedy".to_string(), p(&model_dir(model)).to_string()];
    args.extend(mels.iter().map(|m| p(m).to_string()));
    for prompt in prompts {
        let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
        args.extend(["--prompt".to_string(), ids.join(",")]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = reference(&arg_refs);
    // One features file: the reference prints one list, not a list of lists.
    if mels.len() == 1 {
        vec![serde_json::from_str(&out).unwrap()]
    } else {
        serde_json::from_str(&out).unwrap()
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
        mels.push(path);
        prompts.push(transcribe_prompt(&cfg, lang, false));
        ours.push(out.tokens());
    }
    let theirs = ct2_greedy(model, &mels, &prompts);
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

/// With timestamps (the prompt without `<|notimestamps|>`): each dev clip's window decoded
/// under Whisper's timestamp rules gives CTranslate2's ids, timestamp tokens included, from
/// the same features and prompt (CTranslate2 applies its own implementation of the rules).
/// Then the transcript's segments: times increase, each within the clip, text between.
fn dev_set_timestamps_match_ctranslate2(model: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile(model, tmp.path());
    let mut m = CompiledModel::load(&wbin, 2).unwrap();
    let tok = m.tokenizer().unwrap();
    let cfg = m.header().generation.clone();
    let filters = m.mel_filters();
    let (_, frames) = m.input_shape();
    let clips = manifest_clips();
    let lang = cfg.multilingual.then(|| cfg.languages.iter().find(|(c, _)| c == "en").unwrap().1);
    let prompt = timestamp_prompt(&cfg, lang, false);
    let (mut mels, mut ours) = (vec![], vec![]);
    for (i, clip) in clips.iter().enumerate() {
        let samples = wcc_runtime::audio::load_audio(clip).unwrap();
        let mel = wcc_runtime::mel::log_mel_spectrogram_with(&samples, &filters, frames);
        m.encode(&mel).unwrap();
        let d = greedy_scored(&mut m, &cfg, &prompt).unwrap();
        assert!(d.tokens.first().is_some_and(|&t| t >= cfg.special.timestamp_begin), "{}", clip.display());
        let path = tmp.path().join(format!("mel{i}.npy"));
        wcc_runtime::npy::write_f32(&path, &[filters.len() / 201, frames], &mel).unwrap();
        mels.push(path);
        ours.push(d.tokens);
        // The transcript with timestamps: segments in order, inside the clip.
        let opts = TranscribeOptions { language: lang.map(|_| "en".into()), timestamps: true, ..Default::default() };
        let out = transcribe(&mut m, &tok, &cfg, &samples, &opts).unwrap();
        let dur = samples.len() as f64 / 16000.0;
        let mut last = 0.0;
        for s in out.segments.iter().filter(|s| !s.skipped) {
            assert!(s.start >= last - 1e-9 && s.end >= s.start && s.end <= dur + 0.5, "{}: {s:?}", clip.display());
            last = s.end;
        }
        assert!(!out.text().is_empty(), "{}", clip.display());
    }
    let theirs = ct2_greedy(model, &mels, &vec![prompt; mels.len()]);
    let show = |t: &[u32]| -> String {
        t.iter()
            .map(|&x| {
                if x >= cfg.special.timestamp_begin {
                    format!("<{:.2}>", (x - cfg.special.timestamp_begin) as f64 * 0.02)
                } else {
                    tok.decode(&[x], cfg.special.eot).unwrap()
                }
            })
            .collect()
    };
    let differ: Vec<String> = clips
        .iter()
        .zip(&ours)
        .zip(&theirs)
        .filter(|((_, a), b)| a != b)
        .map(|((c, a), b)| format!("{}:\n  wcc  {}\n  ct2  {}", c.display(), show(a), show(b)))
        .collect();
    assert!(differ.is_empty(), "{model}: {} of {} clips differ:\n{}", differ.len(), clips.len(), differ.join("\n"));
}

#[test]
fn tiny_en_dev_set_timestamps_equal_ctranslate2() {
    dev_set_timestamps_match_ctranslate2("tiny.en");
}

#[test]
fn base_dev_set_timestamps_equal_ctranslate2() {
    dev_set_timestamps_match_ctranslate2("base");
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
    let wbin = compile_tiny_int8(tmp.path());
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

/// Long-form with timestamps: the 111 s recording in windows that each resume at the last
/// complete timestamp. Segments follow one another, cover the recording to its end, and say
/// what the no-timestamp path says (the same words to within a few, none repeated: a window
/// edge neither cuts nor doubles a word); conditioning on the previous text too.
#[test]
fn long_form_with_timestamps_resumes_at_the_last_timestamp() {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(tmp.path());
    let clip = shared_data().join("audio/longform/ljspeech_LJ001-0001_0016.wav");
    let words = |v: &serde_json::Value| -> Vec<String> {
        v["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .map(|w| w.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_lowercase())
            .collect()
    };
    let plain: serde_json::Value =
        serde_json::from_str(&wcc_ok(&["run", p(&wbin), p(&clip), "--json", "--without-timestamps"])).unwrap();
    for extra in [&["--condition-on-previous-text", "false"][..], &[][..], &["--beam-size", "5"][..]] {
        let mut args = vec!["run", p(&wbin), p(&clip), "--json", "--timestamps"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&wcc_ok(&args)).unwrap();
        let segs = v["segments"].as_array().unwrap();
        assert!(segs.len() >= 10, "{extra:?}: {} segments", segs.len());
        let mut last_end = 0.0;
        for s in segs {
            let (start, end) = (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap());
            assert!(start >= last_end - 0.02 && end >= start, "{extra:?}: {s}");
            last_end = end;
        }
        assert!(last_end > 105.0 && last_end < 112.0, "{extra:?}: ends at {last_end}");
        let (a, b) = (words(&plain), words(&v));
        let d = edit_distance(&a, &b);
        assert!(d * 100 <= 5 * a.len(), "{extra:?}: {d} of {} words differ from the plain path", a.len());
        assert!(b.windows(6).all(|w| w[..3] != w[3..]), "{extra:?}: a phrase repeats: {b:?}");
    }
}

fn edit_distance(a: &[String], b: &[String]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, y) in b.iter().enumerate() {
            cur.push((prev[j] + (x != y) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `--initial-prompt`: the first window's prompt carries `<|startofprev|>` and the prompt's
/// tokens before the task; the ids then equal CTranslate2's from the same features and the
/// same prompt (tokens encoded by the `tokenizers` library, as faster-whisper encodes them).
#[test]
fn initial_prompt_tokens_equal_ctranslate2() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "JFK's inaugural address, January 1961. Ask not!";
    for (model, language) in [("tiny.en", None), ("base", Some("en"))] {
        let wbin = compile(model, tmp.path());
        let clip = jfk();
        let mut args = vec![
            "run",
            p(&wbin),
            p(&clip),
            "--json",
            "--temperatures",
            "0",
            "--without-timestamps",
            "--beam-size",
            "1",
            "--initial-prompt",
            text,
        ];
        if let Some(l) = language {
            args.extend(["--language", l]);
        }
        let v: serde_json::Value = serde_json::from_str(&wcc_ok(&args)).unwrap();
        let ours: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let m = CompiledModel::load(&wbin, 1).unwrap();
        let (tok, cfg) = (m.tokenizer().unwrap(), m.header().generation.clone());
        let lang = language.map(|code| cfg.languages.iter().find(|(c, _)| c == code).unwrap().1);
        let mut prompt = vec![cfg.special.sot_prev.expect("the vocabulary has <|startofprev|>")];
        prompt.extend(tok.encode(&format!(" {text}")).unwrap());
        prompt.extend(transcribe_prompt(&cfg, lang, false));
        let mel = tmp.path().join("mel.npy");
        wcc_ok(&["features", p(&jfk()), "-o", p(&mel)]);
        let theirs = ct2_greedy(model, &[mel], &[prompt]);
        assert_eq!(ours, theirs[0], "{model}");
        let said = tok.decode(&ours, cfg.special.eot).unwrap().to_lowercase();
        assert!(said.contains("what you can do for your country"), "{model}: {said}");
    }
}

/// A build's prompt blocks (`decoder_prefill{8,64}`, and `beam_init5` for the beam) leave
/// the caches as one decoder step per token does: the same logits after `<|startofprev|>` and
/// 75 tokens of previous text (76 tokens: one 64-block, then 12 in two 8-blocks, the last
/// padded), the same greedy and beam tokens, against a build compiled with `--no-prefill`.
#[test]
fn prompt_blocks_leave_the_caches_one_step_per_token_leaves() {
    use wcc_runtime::decode::{beam_search, BeamDecoder, BeamOptions, Decoder};
    let tmp = tempfile::tempdir().unwrap();
    for flags in [&["--int8"][..], &[][..]] {
        let build = |name: &str, extra: &[&str]| {
            let wbin = tmp.path().join(format!("{}-{name}", flags.len()));
            let mut args = vec!["compile", "--model", "tiny.en", "-o", p(&wbin)];
            args.extend_from_slice(flags);
            args.extend_from_slice(extra);
            wcc_ok(&args);
            CompiledModel::load(&wbin, 2).unwrap()
        };
        let (mut blocks, mut steps) = (build("blocks.wbin", &[]), build("steps.wbin", &["--no-prefill"]));
        let cfg = blocks.header().generation.clone();
        let tok = blocks.tokenizer().unwrap();
        let samples = wcc_runtime::audio::load_audio(&jfk()).unwrap();
        let (_, frames) = blocks.input_shape();
        let mel = wcc_runtime::mel::log_mel_spectrogram_with(&samples, &blocks.mel_filters(), frames);
        let text = " The quick brown fox jumps over the lazy dog while the orchestra tunes its many \
                    instruments, and the conductor, a patient woman from Lisbon, waits for silence \
                    before raising her baton to begin the long evening's programme.";
        let mut previous = tok.encode(&text.repeat(2)).unwrap();
        previous.truncate(75);
        assert_eq!(previous.len(), 75);
        let mut prompt = vec![cfg.special.sot_prev.unwrap()];
        prompt.extend(&previous);
        let fed = prompt.len();
        prompt.extend(transcribe_prompt(&cfg, None, false));
        let mut logits = vec![];
        for m in [&mut blocks, &mut steps] {
            m.encode(&mel).unwrap();
            m.prefill(&prompt[..fed], 0).unwrap();
            let mut last = vec![];
            for (i, &t) in prompt.iter().enumerate().skip(fed) {
                last = m.step(t, i).unwrap().to_vec();
            }
            logits.push(last);
        }
        let scale = logits[1].iter().fold(0f32, |a, &x| a.max(x.abs()));
        let worst = logits[0].iter().zip(&logits[1]).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        eprintln!("{flags:?}: logits after the prompt differ by {worst:.2e} (largest {scale:.1})");
        assert!(worst <= 1e-4 * scale, "{flags:?}: logits differ by {worst} of {scale}");
        let a = greedy_scored(&mut blocks, &cfg, &prompt).unwrap();
        let b = greedy_scored(&mut steps, &cfg, &prompt).unwrap();
        assert_eq!(a.tokens, b.tokens, "{flags:?}: greedy");
        assert!((a.avg_logprob - b.avg_logprob).abs() < 1e-4, "{flags:?}: greedy log-probability");
        assert!(!a.tokens.is_empty());
        let opts = BeamOptions { width: 5, patience: 1.0, length_penalty: 1.0 };
        assert_eq!(blocks.beam_widths(), vec![5]);
        let a = beam_search(&mut blocks, &cfg, &prompt, opts).unwrap();
        let b = beam_search(&mut steps, &cfg, &prompt, opts).unwrap();
        assert_eq!(a.tokens, b.tokens, "{flags:?}: beam");
        assert!((a.avg_logprob - b.avg_logprob).abs() < 1e-4, "{flags:?}: beam log-probability");
    }
}
