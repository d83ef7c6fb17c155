//! Audio input of other rates, depths and channel counts comes out as 16 kHz mono with its
//! content intact.

use std::f32::consts::PI;
use std::path::Path;

use wcc_runtime::audio::load_audio;

/// Amplitude of the `hz` component of 16 kHz `x` (a single-bin DFT).
fn tone_amplitude(x: &[f32], hz: f32) -> f32 {
    let (mut re, mut im) = (0f64, 0f64);
    for (i, &v) in x.iter().enumerate() {
        let ph = 2.0 * std::f64::consts::PI * hz as f64 * i as f64 / 16000.0;
        re += v as f64 * ph.cos();
        im += v as f64 * ph.sin();
    }
    (2.0 * (re * re + im * im).sqrt() / x.len() as f64) as f32
}

fn write_wav(path: &Path, rate: u32, channels: u16, bits: u16, float: bool, secs: f32, hz: [f32; 2]) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: if float { hound::SampleFormat::Float } else { hound::SampleFormat::Int },
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let n = (rate as f32 * secs) as usize;
    for i in 0..n {
        for c in 0..channels as usize {
            let v = 0.5 * (2.0 * PI * hz[c.min(1)] * i as f32 / rate as f32).sin();
            if float {
                w.write_sample(v).unwrap();
            } else {
                w.write_sample((v * ((1i64 << (bits - 1)) - 1) as f32) as i32).unwrap();
            }
        }
    }
    w.finalize().unwrap();
}

#[test]
fn stereo_44k1_24bit_is_mixed_down_and_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.wav");
    // left 440 Hz, right 1000 Hz: the mix holds both at half amplitude.
    write_wav(&path, 44100, 2, 24, false, 2.0, [440.0, 1000.0]);
    let x = load_audio(&path).unwrap();
    assert!((x.len() as i64 - 32000).abs() <= 2, "{} samples", x.len());
    let mid = &x[4000..28000];
    let (a440, a1000, a3000) = (tone_amplitude(mid, 440.0), tone_amplitude(mid, 1000.0), tone_amplitude(mid, 3000.0));
    assert!((a440 - 0.25).abs() < 0.01, "440 Hz amplitude {a440}");
    assert!((a1000 - 0.25).abs() < 0.01, "1000 Hz amplitude {a1000}");
    assert!(a3000 < 0.005, "3000 Hz amplitude {a3000}");
}

#[test]
fn float_8khz_mono_is_upsampled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.wav");
    write_wav(&path, 8000, 1, 32, true, 1.0, [300.0, 300.0]);
    let x = load_audio(&path).unwrap();
    assert!((x.len() as i64 - 16000).abs() <= 2, "{} samples", x.len());
    assert!((tone_amplitude(&x[2000..14000], 300.0) - 0.5).abs() < 0.01);
}

#[test]
fn sixteen_bit_16k_is_read_exactly_as_int16_over_32768() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for s in [-32768i16, -1, 0, 1, 16384, 32767] {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    let x = load_audio(&path).unwrap();
    assert_eq!(x, vec![-1.0, -1.0 / 32768.0, 0.0, 1.0 / 32768.0, 0.5, 32767.0 / 32768.0]);
}

/// The crash inputs the audio fuzz targets found (`fuzz/regressions/audio`, `.../wav`): each
/// is refused with an error or decodes to finite samples, without a panic. (The fuzz replay
/// in `scripts/fuzz` runs them with overflow checks on as well.)
#[test]
fn inputs_that_crashed_the_fuzzers_are_answered() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut seen = 0;
    for (target, wav) in [("audio", false), ("wav", true)] {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else { continue };
        for e in dir {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let label = path.display().to_string();
            match wcc_runtime::audio::decode_audio(bytes, &label, wav.then_some("wav"), wav) {
                Ok(x) => assert!(x.iter().all(|v| v.is_finite()), "{label}"),
                Err(e) => assert!(e.to_string().contains(&label), "{label}: {e}"),
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "no regression inputs under {}", root.display());
}

/// Rates whose resampling block is longer than one call's input (rate / gcd(rate, 16000)
/// over 1024) used to lose the end of the stream: 0.5 s at 11127 Hz came out empty.
#[test]
fn odd_sample_rates_keep_the_whole_signal() {
    let dir = tempfile::tempdir().unwrap();
    for rate in [11127, 44101, 8001] {
        let path = dir.path().join(format!("{rate}.wav"));
        write_wav(&path, rate, 1, 16, false, 0.5, [440.0, 440.0]);
        let x = load_audio(&path).unwrap();
        assert!((x.len() as i64 - 8000).abs() <= 2, "{rate} Hz: {} samples", x.len());
        assert!((tone_amplitude(&x[1000..7000], 440.0) - 0.5).abs() < 0.03, "{rate} Hz: the tone is intact");
    }
}
