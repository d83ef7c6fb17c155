//! Three hours of audio: wcc's memory stays bounded by the 16 kHz samples it must hold, not
//! by the file's own rate and width, and speech at both ends is transcribed.
//!
//! Alone in its test binary: it reads the peak memory of this process's children, which
//! another test's `wcc` would inflate.

mod common;
use common::*;

use std::io::{BufWriter, Write};
use std::path::Path;

const RATE: u32 = 32_000;
const HOURS: u64 = 3;

/// Writes a 16-bit mono WAV at [`RATE`] of `HOURS` hours: `speech` at the start and at the
/// end, digital silence between. The header is written by hand so that the three hours
/// stream to disk in large blocks.
fn write_long_wav(path: &Path, speech: &[i16]) {
    let frames = HOURS * 3600 * RATE as u64;
    let data_bytes = frames * 2;
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut h = Vec::new();
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&((36 + data_bytes) as u32).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&RATE.to_le_bytes());
    h.extend_from_slice(&(RATE * 2).to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&(data_bytes as u32).to_le_bytes());
    w.write_all(&h).unwrap();
    let bytes = |s: &[i16]| s.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    w.write_all(&bytes(speech)).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = data_bytes - 4 * speech.len() as u64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    w.write_all(&bytes(speech)).unwrap();
    w.flush().unwrap();
}

/// The largest resident set of any child this process has waited for, in bytes.
fn children_max_rss() -> u64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

#[test]
fn three_hours_of_audio_stay_within_the_samples_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(tmp.path());
    // jfk.wav at 32 kHz, by the test's own linear interpolation.
    let jfk16 = wcc_runtime::audio::load_audio(&jfk()).unwrap();
    let speech: Vec<i16> = (0..jfk16.len() * 2)
        .map(|i| {
            let (k, f) = (i / 2, (i % 2) as f32 * 0.5);
            let a = jfk16[k];
            let b = jfk16[(k + 1).min(jfk16.len() - 1)];
            ((a + (b - a) * f) * 32767.0) as i16
        })
        .collect();
    let wav = tmp.path().join("three-hours.wav");
    write_long_wav(&wav, &speech);
    let before = children_max_rss();
    let out = wcc_ok(&["run", p(&wbin), p(&wav), "--json"]);
    let rss = children_max_rss();
    assert!(rss > before, "the child's peak was not measured");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = v["text"].as_str().unwrap().to_lowercase();
    let told = text.matches("ask not what your country can do for you").count();
    assert_eq!(told, 2, "the speech at each end, once each: {text}");
    // What must be held: the 16 kHz samples (f32). Allowed beyond them: 512 MB for the
    // model, its arena and one window's features. Read as 32 kHz samples, the file alone
    // would take 1.4 GB.
    let samples = HOURS * 3600 * 16_000 * 4;
    let bound = samples + (512 << 20);
    eprintln!("peak resident memory of wcc run: {} MB (bound {} MB)", rss >> 20, bound >> 20);
    assert!(rss <= bound, "wcc run peaked at {} MB on 3 hours, over {} MB", rss >> 20, bound >> 20);
}
