//! Beam search: wcc's beam of 5 (the `decoder_beam5` step of a default build and
//! `decode::beam_search`) against CTranslate2's beam search as faster-whisper runs it at
//! temperature 0 (`beam_size=5, patience=1, length_penalty=1`), float32, from the same
//! features and prompt, on every clip of the English dev set, with and without timestamps.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use wcc_runtime::compiled::CompiledModel;
use wcc_runtime::decode::{beam_search, timestamp_prompt, transcribe_prompt, BeamOptions};
use wcc_runtime::transcribe::WhisperModel;

fn manifest_clips() -> Vec<PathBuf> {
    let dir = shared_data().join("audio/en");
    let text = std::fs::read_to_string(dir.join("manifest.tsv")).unwrap();
    text.lines().skip(1).filter(|l| !l.trim().is_empty()).map(|l| dir.join(l.split('\t').next().unwrap())).collect()
}

/// CTranslate2's beam search ids and score (summed log-probability over the length) for
/// each features file and its prompt.
fn ct2_beam(model: &str, mels: &[PathBuf], prompts: &[Vec<u32>]) -> Vec<(Vec<u32>, f64)> {
    let mut args = vec!["beam".to_string(), p(&model_dir(model)).to_string()];
    args.extend(mels.iter().map(|m| p(m).to_string()));
    for prompt in prompts {
        let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
        args.extend(["--prompt".to_string(), ids.join(",")]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&reference(&arg_refs)).unwrap()
}

fn dev_set_beam_equals_ctranslate2(model: &str, dir: &Path) {
    let wbin = dir.join(format!("{model}.wbin"));
    wcc_ok(&["compile", "--model", model, "-o", p(&wbin)]);
    let mut m = CompiledModel::load(&wbin, 2).unwrap();
    use wcc_runtime::decode::BeamDecoder;
    assert_eq!(m.beam_widths(), vec![5], "a default build has the beam of 5");
    let tok = m.tokenizer().unwrap();
    let cfg = m.header().generation.clone();
    let filters = m.mel_filters();
    let (_, frames) = m.input_shape();
    let lang = cfg.multilingual.then(|| cfg.languages.iter().find(|(c, _)| c == "en").unwrap().1);
    let opts = BeamOptions { width: 5, patience: 1.0, length_penalty: 1.0 };
    let (mut mels, mut prompts, mut ours) = (vec![], vec![], vec![]);
    for (i, clip) in manifest_clips().iter().enumerate() {
        let samples = wcc_runtime::audio::load_audio(clip).unwrap();
        let mel = wcc_runtime::mel::log_mel_spectrogram_with(&samples, &filters, frames);
        let path = dir.join(format!("mel{i}.npy"));
        wcc_runtime::npy::write_f32(&path, &[filters.len() / 201, frames], &mel).unwrap();
        m.encode(&mel).unwrap();
        for prompt in [transcribe_prompt(&cfg, lang, false), timestamp_prompt(&cfg, lang, false)] {
            let d = beam_search(&mut m, &cfg, &prompt, opts).unwrap();
            mels.push(path.clone());
            prompts.push(prompt);
            ours.push((clip.clone(), d));
        }
    }
    let theirs = ct2_beam(model, &mels, &prompts);
    let mut differ = vec![];
    let mut worst = 0f64;
    for ((clip, d), (ids, score)) in ours.iter().zip(&theirs) {
        if &d.tokens != ids {
            differ.push(format!(
                "{}:\n  wcc  {:?}\n  ct2  {:?}",
                clip.display(),
                tok.decode(&d.tokens, cfg.special.eot).unwrap(),
                tok.decode(ids, cfg.special.eot).unwrap()
            ));
            continue;
        }
        // The summed log-probability: wcc's `avg_logprob` is over the length plus one (the
        // end-of-text), CTranslate2's score over the length.
        let ours_sum = d.avg_logprob as f64 * (d.tokens.len() + 1) as f64;
        let theirs_sum = score * ids.len() as f64;
        worst = worst.max((ours_sum - theirs_sum).abs());
        assert!(
            (ours_sum - theirs_sum).abs() < 2e-3 * theirs_sum.abs().max(1.0),
            "{}: {ours_sum} vs {theirs_sum}",
            clip.display()
        );
    }
    eprintln!("{model}: {} windows, worst summed log-probability difference {worst:.2e}", ours.len());
    assert!(differ.is_empty(), "{model}: {} of {} windows differ:\n{}", differ.len(), ours.len(), differ.join("\n"));
}

#[test]
fn tiny_en_beam_5_equals_ctranslate2_on_the_dev_set() {
    let tmp = tempfile::tempdir().unwrap();
    dev_set_beam_equals_ctranslate2("tiny.en", tmp.path());
}

#[test]
fn base_beam_5_equals_ctranslate2_on_the_dev_set() {
    let tmp = tempfile::tempdir().unwrap();
    dev_set_beam_equals_ctranslate2("base", tmp.path());
}

#[test]
fn a_beam_size_the_build_lacks_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = tmp.path().join("t.wbin");
    wcc_ok(&["compile", "--model", "tiny.en", "--beam-sizes", "1,3", "-o", p(&wbin)]);
    let out = wcc(&["run", p(&wbin), p(&jfk()), "--beam-size", "5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built for beam sizes [1, 3], not 5"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // The size it has runs, and gives the words of greedy decoding on this clear clip; with
    // no size asked for, a build without the default 5 decodes greedily.
    let words = |s: String| -> Vec<String> {
        s.split_whitespace()
            .map(|w| w.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_lowercase())
            .collect()
    };
    let three = words(wcc_ok(&["run", p(&wbin), p(&jfk()), "--beam-size", "3"]));
    let default = wcc_ok(&["run", p(&wbin), p(&jfk())]);
    assert_eq!(default, wcc_ok(&["run", p(&wbin), p(&jfk()), "--beam-size", "1"]));
    assert_eq!(three, words(default));
    let out = wcc(&["compile", "--model", "tiny.en", "--beam-sizes", "0", "-o", p(&tmp.path().join("x.wbin"))]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a beam size"));
}

#[test]
fn beam_tokens_do_not_depend_on_the_thread_count() {
    // The beam step's kernels split over hypotheses (attention) or not at all (the cache
    // reorder): each output is computed in one fixed order at any thread count.
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(tmp.path());
    let clip = shared_data().join("audio/longform/ljspeech_LJ001-0001_0016.wav");
    let tokens = |threads: &str| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&wcc_ok(&["run", p(&wbin), p(&clip), "--json", "--threads", threads])).unwrap();
        v["segments"].as_array().unwrap().iter().map(|s| s["tokens"].clone()).collect()
    };
    let one = tokens("1");
    assert!(one.as_array().unwrap().len() >= 10, "{one}");
    assert_eq!(one, tokens("2"));
}
