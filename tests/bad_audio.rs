//! Audio at the edges: every sample layout WAV allows gives the words of the 16 kHz file
//! (24-bit, float, 7 channels, 192 kHz; the lossy 8-bit and 8 kHz the sentence), a clip of 0.05 s transcribes
//! without error, and what cannot be audio (NaN or infinite samples, a directory, a path
//! that does not exist, a text file, a file the audio decoder panics on) is refused in one
//! line naming the file, exit status 1, no panic.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// jfk.wav at 16 kHz mono, as f32.
fn jfk_samples() -> Vec<f32> {
    wcc_runtime::audio::load_audio(&jfk()).unwrap()
}

/// Linear-interpolation resampling: only the test's way to make other rates.
fn at_rate(x: &[f32], rate: u32) -> Vec<f32> {
    let n = (x.len() as u64 * rate as u64 / 16000) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 * 16000.0 / rate as f64;
            let (k, f) = (t as usize, (t - t.floor()) as f32);
            let a = x[k.min(x.len() - 1)];
            let b = x[(k + 1).min(x.len() - 1)];
            a + (b - a) * f
        })
        .collect()
}

fn write_wav(path: &Path, rate: u32, channels: u16, bits: u16, float: bool, mono: &[f32]) {
    let format = if float { hound::SampleFormat::Float } else { hound::SampleFormat::Int };
    let spec = hound::WavSpec { channels, sample_rate: rate, bits_per_sample: bits, sample_format: format };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in mono {
        for c in 0..channels {
            // Channels differ (half the signal on odd ones): the mix is their mean.
            let v = if c % 2 == 1 { s * 0.5 } else { s };
            if float {
                w.write_sample(v).unwrap();
            } else {
                let full = (1i64 << (bits - 1)) as f32 - 1.0;
                w.write_sample((v.clamp(-1.0, 1.0) * full) as i32).unwrap();
            }
        }
    }
    w.finalize().unwrap();
}

#[test]
fn every_wav_layout_gives_the_same_words_and_bad_samples_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(dir.path());
    let x = jfk_samples();
    let words = |t: &str| -> String {
        t.to_lowercase().chars().filter(|c| c.is_alphanumeric() || c.is_whitespace()).collect::<String>()
    };
    let want = words(wcc_ok(&["run", p(&wbin), p(&jfk())]).trim());
    assert!(want.contains("ask not what your country can do for you"));
    let cases: Vec<(&str, u32, u16, u16, bool)> = vec![
        ("8bit", 16000, 1, 8, false),
        ("24bit", 16000, 1, 24, false),
        ("float", 16000, 1, 32, true),
        ("7ch", 16000, 7, 16, false),
        ("8khz", 8000, 1, 16, false),
        ("192khz", 192000, 1, 16, false),
    ];
    let mut files: Vec<PathBuf> = vec![];
    for (name, rate, ch, bits, float) in &cases {
        let path = dir.path().join(format!("{name}.wav"));
        write_wav(&path, *rate, *ch, *bits, *float, &at_rate(&x, *rate));
        files.push(path);
    }
    let mut args = vec!["run", p(&wbin)];
    args.extend(files.iter().map(|f| p(f)));
    let out = wcc_ok(&args);
    for (line, (name, ..)) in out.lines().zip(&cases) {
        let said = words(line.split_once(": ").unwrap().1);
        // 8 kHz loses the upper half of the band and 8 bits leave 48 dB of signal to noise:
        // the sentence must survive; every lossless layout gives exactly the 16 kHz words.
        if *name == "8khz" || *name == "8bit" {
            assert!(said.contains("what your country can do for you"), "{name}: {said}");
        } else {
            assert_eq!(said, want, "{name}");
        }
    }
    // 0.05 s: transcribed (to little or nothing), no error.
    let short = dir.path().join("short.wav");
    write_wav(&short, 16000, 1, 16, false, &x[16000..16800]);
    wcc_ok(&["run", p(&wbin), p(&short)]);
    // NaN and infinite samples: refused, naming the file and where.
    let mut bad = x.clone();
    bad[8000] = f32::NAN;
    bad[9000] = f32::INFINITY;
    let nan = dir.path().join("nan.wav");
    write_wav(&nan, 16000, 1, 32, true, &bad);
    for (path, what) in [
        (nan.clone(), "2 samples are NaN or infinite (the first at 0.500 s)"),
        (dir.path().to_path_buf(), "is a directory"),
        (dir.path().join("absent.wav"), "No such file"),
        // A file symphonia's AAC reader panics on (found by the `audio` fuzz target).
        (repo().join("fuzz/regressions/audio/aac-adts-step-by-zero"), "the audio decoder failed on this file"),
    ] {
        let run = wcc(&["run", p(&wbin), p(&path)]);
        let e = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{e}");
        assert!(e.contains(p(&path)) && e.contains(what), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        assert!(!e.contains("panicked"));
    }
}
