//! `--timesteps`: a shorter static encoder input keeps the words, the shortened encoder
//! computes what Whisper's encoder computes on that input, and bad values are refused.

mod common;
use common::*;

use wcc_ir::interp::{Interpreter, Tensor};

/// Lower case, letters, digits and spaces only.
fn words(text: &str) -> String {
    let kept: String = text.chars().map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { ' ' }).collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `wcc` with `args`, greedy windows without timestamps (cut at quiet points, which is what
/// these tests look at).
fn transcript(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--without-timestamps", "--beam-size", "1"]);
    serde_json::from_str(&wcc_ok(&all)).unwrap()
}

#[test]
fn shorter_windows_keep_the_words_of_jfk() {
    for model in ["tiny.en", "base"] {
        let full = transcript(&["transcribe", "--model", model, "--json", p(&jfk())]);
        for t in ["1024", "auto"] {
            let short = transcript(&["transcribe", "--model", model, "--timesteps", t, "--json", p(&jfk())]);
            eprintln!("{model} --timesteps {t}: {}", short["text"]);
            assert_eq!(words(short["text"].as_str().unwrap()), words(full["text"].as_str().unwrap()), "{model} {t}");
            if t == "1024" {
                // 11 s of audio in 10.24 s windows: two windows, cut in the pause after "for you".
                let segs = short["segments"].as_array().unwrap();
                assert_eq!(segs.len(), 2);
                let cut = segs[0]["end"].as_f64().unwrap();
                assert!((7.4..8.2).contains(&cut), "cut at {cut} s");
            }
        }
    }
    // The interpreter and the compiled model agree at the shorter length too.
    let interpreted =
        transcript(&["transcribe", "--interpret", "--model", "tiny.en", "--timesteps", "1024", "--json", p(&jfk())]);
    let compiled = transcript(&["transcribe", "--model", "tiny.en", "--timesteps", "1024", "--json", p(&jfk())]);
    assert_eq!(interpreted["tokens"], compiled["tokens"]);
}

#[test]
fn shortened_encoder_matches_a_numpy_whisper_encoder_on_the_same_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    wcc_ok(&["checkpoint", "convert", "--model", "tiny.en", "-o", p(&hf)]);
    let n = 1216;
    let mel = tmp.path().join("mel.npy");
    wcc_ok(&["features", p(&jfk()), "--frames", &n.to_string(), "-o", p(&mel)]);
    let want = tmp.path().join("np.npy");
    reference(&["hf-encode", p(&hf), p(&mel), "-o", p(&want)]);

    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let opts = wcc_passes::PassOptions { timesteps: Some(n), ..Default::default() };
    let module = wcc_passes::run_observed(loaded.module, &["timesteps"], &opts, &mut |_, _, _| Ok(())).unwrap();
    let interp = Interpreter::new(&module, &loaded.checkpoint).unwrap();
    let (shape, x) = read_npy(&mel);
    assert_eq!(shape, vec![80, n]);
    let out = interp.run("encoder", &[Tensor::f32(shape, x)]).unwrap().remove(0);
    assert_eq!(out.shape, vec![n / 2, 384]);
    let (_, theirs) = read_npy(&want);
    let (l2, maxrel) = relative_errors(out.as_f32().unwrap(), &theirs);
    eprintln!("encoder at {n} frames vs numpy: {l2:e} / {maxrel:e}");
    assert!(l2 < 1e-3 && maxrel < 1e-3);
}

#[test]
fn timesteps_pass_snapshot_and_full_length_no_op() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let run = |n: usize| {
        let opts = wcc_passes::PassOptions { timesteps: Some(n), ..Default::default() };
        wcc_passes::run_observed(loaded.module.clone(), &["timesteps"], &opts, &mut |_, _, _| Ok(())).unwrap()
    };
    let short = run(1024);
    insta::assert_snapshot!(
        "tiny_en_encoder_after_timesteps_1024",
        wcc_ir::print_graph(short.graph("encoder").unwrap())
    );
    let full = run(3000);
    assert!(full.graphs == loaded.module.graphs, "--timesteps 3000 must not change the graphs");
}

#[test]
fn out_of_range_timesteps_are_refused() {
    for bad in ["3001", "0", "1023", "-4", "many"] {
        let arg = format!("--timesteps={bad}");
        let out = wcc(&["compile", "--model", "tiny.en", &arg, "-o", "/nonexistent/x.wbin"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{bad}: {err}");
        assert!(err.contains("out of range") || err.contains("neither a number"), "{bad}: {err}");
    }
    let e = wcc_err(&["compile", "--model", "tiny.en", "--timesteps", "auto", "-o", "/tmp/never.wbin"]);
    assert!(e.contains("auto needs the clip"), "{e}");
}
