//! Temperature fallback: a window whose greedy text repeats itself (tiny.en, an English-only
//! model, on Portuguese speech loops at temperature 0) is decoded again at rising
//! temperatures until it passes the checks; the compression ratio is zlib's, as Python's
//! `zlib` gives it; the same seed gives the same text. And silence: a window that never
//! rises above -60 dBFS is not decoded (digital silence used to come out as "you"). A window
//! that still loops after the last temperature keeps its first copy of the phrase only.

mod common;
use common::*;

fn longest_repeat(words: &[&str]) -> usize {
    (1..=words.len() / 2)
        .filter(|&n| (0..=words.len() - 2 * n).any(|i| words[i..i + n] == words[i + n..i + 2 * n]))
        .max()
        .unwrap_or(0)
}

/// The most copies of one phrase back to back.
fn max_copies(words: &[&str]) -> usize {
    let mut best = 1;
    for n in 1..=words.len() / 2 {
        for i in 0..words.len() {
            let mut k = 1;
            while i + (k + 1) * n <= words.len() && words[i + k * n..i + (k + 1) * n] == words[i..i + n] {
                k += 1;
            }
            best = best.max(k);
        }
    }
    best
}

#[test]
fn a_looping_window_falls_back_to_a_higher_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(dir.path());
    let clip = shared_data().join("audio/multilingual/leopard_test_pt.wav");
    // Greedy windows without timestamps: the decoding that loops on this clip.
    let plain = ["--without-timestamps", "--beam-size", "1"];
    let run_plain = |extra: &[&str]| -> String {
        let mut args = vec!["run", p(&wbin), p(&clip)];
        args.extend_from_slice(&plain);
        args.extend_from_slice(extra);
        wcc_ok(&args)
    };
    let greedy = run_plain(&["--temperatures", "0", "--keep-repeats"]);
    let words: Vec<&str> = greedy.split_whitespace().collect();
    assert!(longest_repeat(&words) >= 5, "greedy was expected to loop here: {greedy}");
    assert!(wcc_runtime::transcribe::compression_ratio(greedy.trim()) > 2.4);
    // Without fallback the runaway guard cuts the loop after its first copy: what is left is
    // a prefix of the looping text, and no phrase comes three times in a row.
    let cut = run_plain(&["--temperatures", "0"]);
    let cut_words: Vec<&str> = cut.split_whitespace().collect();
    assert!(cut_words.len() < words.len() / 2, "not cut: {cut}");
    assert_eq!(cut_words[..cut_words.len() - 1], words[..cut_words.len() - 1], "{cut}");
    assert!(max_copies(&cut_words) < 3, "{cut}");
    let run =
        |seed: &str| -> serde_json::Value { serde_json::from_str(&run_plain(&["--json", "--seed", seed])).unwrap() };
    let v = run("3");
    let seg = &v["segments"][0];
    assert!(seg["temperature"].as_f64().unwrap() > 0.0, "{seg}");
    let text = v["text"].as_str().unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(longest_repeat(&words) < 5, "still looping: {text}");
    // Kept either because it passed, or because it was the last temperature.
    let passed =
        wcc_runtime::transcribe::compression_ratio(text) <= 2.4 && seg["avg_logprob"].as_f64().unwrap() >= -1.0;
    assert!(passed || seg["temperature"].as_f64().unwrap() == 1.0, "{seg}");
    assert_eq!(run("3")["text"], v["text"], "the same seed, the same text");
    // A temperature that is not one is refused.
    let e = wcc_err(&["run", p(&wbin), p(&clip), "--temperatures", "0,-1"]);
    assert!(e.contains("--temperatures"), "{e}");
}

#[test]
fn compression_ratio_is_zlibs() {
    let texts = [
        "And so my fellow Americans, ask not what your country can do for you.",
        "I am going to be able to see what happens when I am going to be able to see what happens when",
        "Printing, in the only sense with which we are at present concerned, differs from most.",
    ];
    let script =
        "import sys, zlib\nfor t in sys.argv[1:]:\n    b = t.encode()\n    print(len(b) / len(zlib.compress(b)))";
    let out = std::process::Command::new(ref_python()).arg("-c").arg(script).args(texts).output().unwrap();
    let theirs: Vec<f64> = String::from_utf8(out.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(theirs.len(), texts.len());
    for (t, want) in texts.iter().zip(theirs) {
        let got = wcc_runtime::transcribe::compression_ratio(t);
        assert!((got - want).abs() < 1e-9, "{t}: {got} vs Python's {want}");
    }
}

#[test]
fn digital_silence_and_a_faint_hum_give_no_text() {
    // 10 s of zeros came out as "you" (the no-speech rule lets it through); a hum at
    // -70 dBFS is as silent. Neither is decoded; speech after silence still is.
    let dir = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(dir.path());
    let write = |name: &str, samples: &[f32]| -> std::path::PathBuf {
        let path = dir.path().join(name);
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        samples.iter().for_each(|&s| w.write_sample(s).unwrap());
        w.finalize().unwrap();
        path
    };
    let zeros = write("zeros.wav", &vec![0.0; 160_000]);
    let hum: Vec<f32> = (0..160_000).map(|i| 3e-4 * (i as f32 * 0.0393).sin()).collect();
    let hum = write("hum.wav", &hum);
    for clip in [&zeros, &hum] {
        for extra in [&["--without-timestamps"][..], &[][..]] {
            let mut args = vec!["run", p(&wbin), p(clip)];
            args.extend_from_slice(extra);
            assert_eq!(wcc_ok(&args).trim(), "", "{} {extra:?}", clip.display());
        }
    }
    let mut speech = vec![0.0f32; 80_000];
    speech.extend(wcc_runtime::audio::load_audio(&jfk()).unwrap());
    let speech = write("late.wav", &speech);
    assert!(wcc_ok(&["run", p(&wbin), p(&speech)]).contains("ask not what your country"));

    // A first window gated as silent does not use up the initial prompt: the speech after it
    // is decoded with the prompt, as it is without the silence (a prompt in lower case
    // without punctuation gives text in that style).
    let mut late = vec![0.0f32; 16_000 * 35];
    late.extend(wcc_runtime::audio::load_audio(&jfk()).unwrap());
    let late = write("very-late.wav", &late);
    let prompt = "hello everyone welcome to the speech of the president of the united states of america";
    for extra in [&["--without-timestamps"][..], &[][..]] {
        let run = |clip: &std::path::Path, with_prompt: bool| {
            let mut args = vec!["run", p(&wbin), p(clip), "--temperatures", "0", "--json"];
            args.extend_from_slice(extra);
            if with_prompt {
                args.extend(["--initial-prompt", prompt]);
            }
            let v: serde_json::Value = serde_json::from_str(&wcc_ok(&args)).unwrap();
            v["text"].as_str().unwrap().trim().to_string()
        };
        let (styled, plain) = (run(&jfk(), true), run(&jfk(), false));
        assert_ne!(styled, plain, "the prompt was expected to change the text {extra:?}");
        let after_silence = run(&late, true);
        assert!(after_silence.ends_with(&styled) && !after_silence.contains(&plain), "{extra:?}: {after_silence}");
    }
    // What the gate assumes: every clip of the shared audio peaks far above it.
    for sub in ["en", "longform", "multilingual"] {
        for e in std::fs::read_dir(shared_data().join("audio").join(sub)).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "wav") {
                let s = wcc_runtime::audio::load_audio(&path).unwrap();
                let peak = s.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(peak > 30.0 * wcc_runtime::transcribe::SILENCE_PEAK, "{}: peak {peak}", path.display());
            }
        }
    }
}

#[test]
fn white_noise_gives_no_text() {
    // 10 s of white noise (uniform, ±0.17, -21 dBFS RMS): the f32 tiny.en beam decodes it
    // as dots with a no-speech probability of 0.8 and a mean log-probability just above -1,
    // under openai-whisper's rule; a window the model judges speechless whose text has no
    // word is dropped too.
    let dir = tempfile::tempdir().unwrap();
    let wbin = dir.path().join("tiny.wbin");
    wcc_ok(&["compile", "--model", "tiny.en", "-o", p(&wbin)]);
    let path = dir.path().join("white.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..160_000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.write_sample(((s >> 48) as i16 as f32 * 0.17) as i16).unwrap();
    }
    w.finalize().unwrap();
    for extra in [&[][..], &["--beam-size", "1"][..], &["--without-timestamps"][..]] {
        let mut args = vec!["run", p(&wbin), p(&path), "--json"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&wcc_ok(&args)).unwrap();
        assert_eq!(v["text"].as_str().unwrap().trim(), "", "{extra:?}: {v}");
    }
}
