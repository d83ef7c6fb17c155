//! Whisper's log-mel spectrogram, following openai-whisper (`whisper/audio.py`): a periodic
//! Hann window of 400 samples, hop 160, centred frames with reflect padding, power spectrum,
//! Slaney-normalised mel filters on the Slaney mel scale (librosa's defaults, computed here),
//! `log10(max(x, 1e-10))`, clamped to `max - 8`, then `(x + 4) / 4`.
//!
//! Padding convention: openai-whisper's. The audio is extended by 30 s of zeros *before* the
//! STFT, so the frames after the speech hold the log-mel of silence (faster-whisper instead
//! pads with zeros in the log-mel domain, which changes tiny.en's greedy text).

use std::f64::consts::PI;

use realfft::RealFftPlanner;

use crate::{HOP_LENGTH, N_FFT, N_SAMPLES, SAMPLE_RATE};

const N_FREQS: usize = N_FFT / 2 + 1;

fn hz_to_mel(hz: f64) -> f64 {
    // Slaney: linear below 1 kHz, logarithmic above.
    let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        f_sp * mel
    }
}

/// The `[n_mels, 201]` filter bank (librosa.filters.mel with sr 16000, n_fft 400, htk=False,
/// norm="slaney"), row-major.
pub fn mel_filters(n_mels: usize) -> Vec<f64> {
    let sr = SAMPLE_RATE as f64;
    let fft_freqs: Vec<f64> = (0..N_FREQS).map(|i| i as f64 * sr / N_FFT as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64)).collect();
    let mut w = vec![0.0; n_mels * N_FREQS];
    for m in 0..n_mels {
        let (f0, f1, f2) = (mel_f[m], mel_f[m + 1], mel_f[m + 2]);
        let enorm = 2.0 / (f2 - f0);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - f0) / (f1 - f0);
            let upper = (f2 - f) / (f2 - f1);
            w[m * N_FREQS + k] = lower.min(upper).max(0.0) * enorm;
        }
    }
    w
}

/// Log-mel features `[n_mels, frames]` (row-major) of 16 kHz mono `samples`, with
/// openai-whisper's padding: the audio followed by 30 s of zeros, cut to `frames` columns.
pub fn log_mel_spectrogram(samples: &[f32], n_mels: usize, frames: usize) -> Vec<f32> {
    log_mel_spectrogram_with(samples, &mel_filters(n_mels), frames)
}

/// [`log_mel_spectrogram`] with a given `[n_mels, 201]` filter bank (a `.wbin` carries its own).
pub fn log_mel_spectrogram_with(samples: &[f32], filters: &[f64], frames: usize) -> Vec<f32> {
    let n_mels = filters.len() / N_FREQS;
    let n_total = (samples.len() + N_SAMPLES) / HOP_LENGTH;
    // One pass holding the log-mel: the floor needs every frame before any is written.
    let mut logmel = vec![0.0f64; n_mels * n_total];
    file_frames(samples, filters, 0..n_total, &mut |t, m, v| logmel[m * n_total + t] = v);
    let max = logmel.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0f32; n_mels * frames];
    for m in 0..n_mels {
        for t in 0..frames.min(n_total) {
            let v = logmel[m * n_total + t].max(max - 8.0);
            out[m * frames + t] = ((v + 4.0) / 4.0) as f32;
        }
    }
    out
}

/// The largest log10 mel energy of the whole file, `samples` followed by 30 s of silence
/// (what Whisper's log-mel of a file floors at, less 8): computed frame by frame, without
/// holding the spectrogram. With [`log_mel_window`], every window's features are the
/// whole file's log-mel sliced at the window, as openai-whisper and faster-whisper compute
/// them once per file, in the memory of one window.
pub fn log_mel_max(samples: &[f32], filters: &[f64]) -> f64 {
    let mut max = f64::NEG_INFINITY;
    let total = (samples.len() + N_SAMPLES) / HOP_LENGTH;
    file_frames(samples, filters, 0..total, &mut |_, _, v| max = max.max(v));
    max
}

/// Frames `first..first + frames` of the whole file's log-mel ([`log_mel_max`]'s `max`
/// given), `[n_mels, frames]` row-major: each frame's STFT reads the file's samples around
/// it (the samples before the window and after it included), and the floor is the file's.
pub fn log_mel_window(samples: &[f32], first: usize, frames: usize, filters: &[f64], max: f64) -> Vec<f32> {
    let n_mels = filters.len() / N_FREQS;
    let total = (samples.len() + N_SAMPLES) / HOP_LENGTH;
    let mut out = vec![0.0f32; n_mels * frames];
    let end = (first + frames).min(total);
    file_frames(samples, filters, first.min(end)..end, &mut |t, m, v| {
        out[m * frames + (t - first)] = ((v.max(max - 8.0) + 4.0) / 4.0) as f32;
    });
    out
}

/// For each frame `t` of `range` of the file's STFT (`samples` followed by 30 s of zeros,
/// centred frames of `N_FFT` samples under a periodic Hann window, every `HOP_LENGTH`, reflected
/// at both ends, the last one dropped as `torch.stft` does) and each mel band `m`:
/// `f(t, m, log10(max(energy, 1e-10)))`.
fn file_frames(samples: &[f32], filters: &[f64], range: std::ops::Range<usize>, f: &mut dyn FnMut(usize, usize, f64)) {
    let n_mels = filters.len() / N_FREQS;
    let half = N_FFT / 2;
    let n = samples.len() + N_SAMPLES;
    let at = |i: usize| -> f64 { samples.get(i).map_or(0.0, |&x| x as f64) };
    let reflect = |i: isize| -> f64 {
        let j = if i < 0 {
            (-i) as usize
        } else if i as usize >= n {
            2 * (n - 1) - i as usize
        } else {
            i as usize
        };
        at(j)
    };
    let support: Vec<(usize, usize)> = (0..n_mels)
        .map(|m| {
            let row = &filters[m * N_FREQS..(m + 1) * N_FREQS];
            let lo = row.iter().position(|&w| w != 0.0).unwrap_or(0);
            let hi = row.iter().rposition(|&w| w != 0.0).map_or(0, |i| i + 1);
            (lo, hi.max(lo))
        })
        .collect();
    let window: Vec<f64> = (0..N_FFT).map(|i| 0.5 - 0.5 * (2.0 * PI * i as f64 / N_FFT as f64).cos()).collect();
    let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
    let mut buf = fft.make_input_vec();
    let mut spectrum = fft.make_output_vec();
    let mut scratch = fft.make_scratch_vec();
    let mut power = vec![0.0f64; N_FREQS];
    for t in range {
        let start = (t * HOP_LENGTH) as isize - half as isize;
        for (k, b) in buf.iter_mut().enumerate() {
            *b = reflect(start + k as isize) * window[k];
        }
        fft.process_with_scratch(&mut buf, &mut spectrum, &mut scratch).expect("buffer lengths from the plan");
        for (o, c) in power.iter_mut().zip(&spectrum) {
            *o = c.norm_sqr();
        }
        for (m, &(lo, hi)) in support.iter().enumerate() {
            let row = &filters[m * N_FREQS + lo..m * N_FREQS + hi];
            let e: f64 = row.iter().zip(&power[lo..hi]).map(|(a, b)| a * b).sum();
            f(t, m, e.max(1e-10).log10());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_of_the_file_log_mel_equal_the_whole_file_spectrogram_sliced() {
        // 70 s of a chirp with a loud middle: the file's maximum lies outside the first
        // window, and frames at a window's edges read samples across it.
        let n = 16000 * 70;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / 16000.0;
                let gain = if (30.0..40.0).contains(&t) { 0.9 } else { 0.05 };
                gain * (2.0 * std::f32::consts::PI * (200.0 + 40.0 * t) * t).sin()
            })
            .collect();
        let filters = mel_filters(80);
        let total = (n + N_SAMPLES) / HOP_LENGTH;
        let whole = log_mel_spectrogram_with(&x, &filters, total);
        let max = log_mel_max(&x, &filters);
        for (first, frames) in [(0, 3000), (1234, 3000), (4000, 3000), (total - 100, 100)] {
            let w = log_mel_window(&x, first, frames, &filters, max);
            for m in 0..80 {
                assert_eq!(&w[m * frames..(m + 1) * frames], &whole[m * total + first..m * total + first + frames]);
            }
        }
        // A clip shorter than a window: the same features as before.
        let short = &x[..16000 * 5];
        let w = log_mel_window(short, 0, 3000, &filters, log_mel_max(short, &filters));
        assert_eq!(w, log_mel_spectrogram_with(short, &filters, 3000));
    }

    #[test]
    fn slaney_scale_round_trips_and_is_linear_below_1khz() {
        for hz in [0.0, 100.0, 999.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9);
        }
        assert!((hz_to_mel(500.0) - 7.5).abs() < 1e-12);
    }

    #[test]
    fn filters_are_triangles_with_slaney_area() {
        let f = mel_filters(80);
        // Each triangle peaks at its centre frequency and is zero far from it; with Slaney
        // normalisation its integral over Hz is 1, so the sum over bins is 1 / bin width.
        for m in 0..80 {
            let row = &f[m * N_FREQS..(m + 1) * N_FREQS];
            assert!(row.iter().all(|&v| v >= 0.0));
            assert!(row.iter().any(|&v| v > 0.0), "filter {m} is empty");
        }
        let sum_mid: f64 = f[40 * N_FREQS..41 * N_FREQS].iter().sum();
        assert!((sum_mid * 40.0 - 1.0).abs() < 0.1, "{sum_mid}");
    }

    #[test]
    fn a_pure_tone_lands_in_the_right_mel_band() {
        let tone: Vec<f32> =
            (0..16000).map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin()).collect();
        let mel = log_mel_spectrogram(&tone, 80, 100);
        let col: Vec<f32> = (0..80).map(|m| mel[m * 100 + 50]).collect();
        let best = col.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let centre_hz = |m: usize| mel_to_hz(hz_to_mel(8000.0) * (m + 1) as f64 / 81.0);
        assert!((centre_hz(best) - 1000.0).abs() < 60.0, "peak at band {best} ({} Hz)", centre_hz(best));
    }
}
