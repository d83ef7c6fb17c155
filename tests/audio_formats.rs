//! Audio in other containers and codecs (`../shared/data/audio/formats`, read by symphonia):
//! the same speech gives the same samples (lossless FLAC at another rate and depth) and the
//! same words as the 16 kHz WAV; several files in one `wcc run` share the loaded model, and
//! a file that cannot be read is reported by name without stopping the others.

mod common;
use common::*;

use std::path::PathBuf;

fn formats() -> PathBuf {
    shared_data().join("audio/formats")
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn flac_at_44_1_khz_stereo_24_bit_decodes_to_the_wav_samples() {
    let wav = wcc_runtime::audio::load_audio(&jfk()).unwrap();
    let flac = wcc_runtime::audio::load_audio(&formats().join("jfk.flac")).unwrap();
    // Resampled from 44.1 kHz: the same length to within a few samples, and the same signal
    // (the 16 kHz WAV and the 44.1 kHz FLAC are two renderings of one recording).
    assert!(wav.len().abs_diff(flac.len()) <= 16, "{} vs {} samples", wav.len(), flac.len());
    let n = wav.len().min(flac.len());
    let dot: f64 = (0..n).map(|i| wav[i] as f64 * flac[i] as f64).sum();
    let (ea, eb): (f64, f64) =
        ((0..n).map(|i| (wav[i] as f64).powi(2)).sum(), (0..n).map(|i| (flac[i] as f64).powi(2)).sum());
    let corr = dot / (ea * eb).sqrt();
    assert!(corr > 0.99, "correlation {corr}");
    // MP3 at 24 kHz: decodes to a plausible length of audio.
    let mp3 = wcc_runtime::audio::load_audio(&formats().join("multilingual.mp3")).unwrap();
    assert!(mp3.len() > 16_000 && mp3.iter().all(|v| v.is_finite()), "{} samples", mp3.len());
}

#[test]
fn one_run_transcribes_wav_flac_and_mp3_to_the_same_words() {
    let dir = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(dir.path());
    let (flac, mp3) = (formats().join("jfk.flac"), formats().join("jfk.mp3"));
    let out = wcc_ok(&["run", p(&wbin), p(&jfk()), p(&flac), p(&mp3)]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let of = |path: &PathBuf, line: &str| -> Vec<String> {
        let prefix = format!("{}: ", path.display());
        assert!(line.starts_with(&prefix), "{line}");
        words(&line[prefix.len()..])
    };
    let want = of(&jfk(), lines[0]);
    assert!(want.join(" ").contains("ask not what your country can do for you"), "{want:?}");
    assert_eq!(of(&flac, lines[1]), want, "FLAC");
    assert_eq!(of(&mp3, lines[2]), want, "MP3");
    // A file that is not audio, among good ones: named in the error, the others still
    // transcribed, and the exit code says one failed.
    let bad = dir.path().join("notes.mp3");
    std::fs::write(&bad, "these are not audio samples\n").unwrap();
    let run = wcc(&["run", p(&wbin), p(&bad), p(&jfk())]);
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(!run.status.success());
    assert!(stderr.contains("notes.mp3") && stderr.contains("1 of 2 files"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("ask not what your country"), "{stdout}");
    // JSON: one object per file, naming it.
    let v: serde_json::Value = serde_json::from_str(&wcc_ok(&["run", p(&wbin), p(&jfk()), p(&mp3), "--json"])).unwrap();
    let files: Vec<&str> = v.as_array().unwrap().iter().map(|o| o["file"].as_str().unwrap()).collect();
    assert_eq!(files, [p(&jfk()), p(&mp3)]);
}
