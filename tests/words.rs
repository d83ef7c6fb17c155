//! Word timestamps (`wcc compile --word-timestamps`, `wcc run --word-timestamps`) against
//! faster-whisper's own word alignment (`WhisperModel.find_alignment` on CTranslate2's
//! `align`, then `merge_punctuations`) from the same features and the same text tokens.

mod common;
use common::*;

use std::path::Path;

/// Our words of one clip (one window) and faster-whisper's, from the same features and
/// text tokens: `(word, start, end, probability)` each.
type Words = Vec<(String, f64, f64, f64)>;

fn ours_and_theirs(model: &str, wbin: &Path, clip: &Path, tmp: &Path) -> (Words, Words) {
    let v: serde_json::Value = serde_json::from_str(&wcc_ok(&[
        "run",
        p(wbin),
        p(clip),
        "--word-timestamps",
        "--json",
        "--temperatures",
        "0",
        "--beam-size",
        "1",
        "--without-timestamps",
    ]))
    .unwrap();
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 1, "{}: one window", clip.display());
    let tok = std::fs::read(model_dir(model).join("tokenizer.json")).unwrap();
    let eot = wcc_runtime::tokenizer::WhisperTokenizer::from_bytes(&tok).unwrap().special_tokens().unwrap().eot as u64;
    let text: Vec<String> = segs[0]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .filter(|&t| t < eot)
        .map(|t| t.to_string())
        .collect();
    let ours: Words = segs[0]["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let f = |k: &str| w[k].as_f64().unwrap();
            (w["word"].as_str().unwrap().to_string(), f("start"), f("end"), f("probability"))
        })
        .collect();
    let mel = tmp.join("mel.npy");
    wcc_ok(&["features", p(clip), "-o", p(&mel)]);
    let frames = wcc_runtime::audio::load_audio(clip).unwrap().len() / 160;
    let out = reference(&[
        "words",
        p(&model_dir(model)),
        p(&mel),
        "--tokens",
        &text.join(","),
        "--num-frames",
        &frames.to_string(),
    ]);
    let theirs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let theirs = theirs
        .iter()
        .map(|w| {
            let f = |k: &str| w[k].as_f64().unwrap();
            (w["word"].as_str().unwrap().to_string(), f("start"), f("end"), f("probability"))
        })
        .collect();
    (ours, theirs)
}

/// The f32 build's attention is CTranslate2's float32 up to rounding: its boundaries are
/// faster-whisper's (a rare one a frame off); int8's differ a little more.
#[test]
fn word_timestamps_equal_faster_whispers_alignment() {
    let tmp = tempfile::tempdir().unwrap();
    let en = shared_data().join("audio/en");
    let clips = ["jfk.wav", "ljspeech_LJ001-0001.wav", "2412-153948-0000.wav", "1995-1837-0001.wav"];
    // (build, its flags, the worst boundary allowed, the share of boundaries that must be equal)
    for (build, flags, worst_allowed, equal_share) in
        [("f32", &[][..], 0.021, 0.95), ("int8", &["--int8"][..], 0.041, 0.7)]
    {
        let wbin = tmp.path().join(format!("tiny-{build}.wbin"));
        let mut args = vec!["compile", "--model", "tiny.en", "--word-timestamps", "-o", p(&wbin)];
        args.extend_from_slice(flags);
        wcc_ok(&args);
        let (mut boundaries, mut exact, mut worst) = (0, 0, 0f64);
        let mut prob_diffs = Vec::new();
        for clip in clips {
            let (ours, theirs) = ours_and_theirs("tiny.en", &wbin, &en.join(clip), tmp.path());
            let words = |w: &Words| w.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
            assert_eq!(words(&ours), words(&theirs), "{build} {clip}");
            for (o, t) in ours.iter().zip(&theirs) {
                for (a, b) in [(o.1, t.1), (o.2, t.2)] {
                    boundaries += 1;
                    exact += usize::from((a - b).abs() < 1e-6);
                    worst = worst.max((a - b).abs());
                }
                prob_diffs.push((o.3 - t.3).abs());
            }
        }
        eprintln!(
            "{build}: {exact} of {boundaries} word boundaries equal faster-whisper's; the worst is {worst:.2} s off"
        );
        assert!(worst <= worst_allowed, "{build}: a boundary {worst:.2} s off");
        assert!(exact as f64 >= equal_share * boundaries as f64, "{build}: only {exact} of {boundaries} equal");
        // Word probabilities: close on average; a word the model is unsure of may differ more.
        let mean = prob_diffs.iter().sum::<f64>() / prob_diffs.len() as f64;
        let max = prob_diffs.iter().cloned().fold(0.0, f64::max);
        eprintln!("{build}: word probabilities differ by {mean:.3} on average, {max:.3} at most");
        assert!(mean < 0.03 && max < 0.25, "{build}: probabilities differ by {mean:.3} on average, {max:.3} at most");
    }
}

/// A build without the alignment output, asked for word timestamps: one clear line.
#[test]
fn word_timestamps_need_a_build_that_has_them() {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(tmp.path());
    let e = wcc_err(&["run", p(&wbin), p(&jfk()), "--word-timestamps"]);
    assert!(e.contains("--word-timestamps"), "{e}");
}
