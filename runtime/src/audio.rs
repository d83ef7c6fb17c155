//! Audio input: WAV of any sample rate, bit depth and channel count, down-mixed to mono and
//! resampled to 16 kHz.

use std::path::Path;

use rubato::{FftFixedIn, Resampler};

use crate::SAMPLE_RATE;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: cannot read audio: {msg}")]
    Read { path: String, msg: String },
    #[error("{path}: the file holds no audio samples")]
    Empty { path: String },
    #[error("resampling from {from} Hz failed: {msg}")]
    Resample { from: u32, msg: String },
}

/// Reads `path` and returns 16 kHz mono samples in [-1, 1].
pub fn load_audio(path: &Path) -> Result<Vec<f32>, AudioError> {
    let p = path.display().to_string();
    let read_err = |msg: String| AudioError::Read { path: p.clone(), msg };
    match std::fs::metadata(path) {
        Err(e) => return Err(read_err(e.to_string())),
        Ok(m) if m.is_dir() => return Err(read_err("is a directory".into())),
        Ok(m) if m.len() == 0 => return Err(AudioError::Empty { path: p }),
        Ok(_) => {}
    }
    let mut reader = hound::WavReader::open(path).map_err(|e| read_err(describe_hound(e)))?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    if channels == 0 || spec.sample_rate == 0 {
        return Err(read_err("the WAV header declares no channels or a zero sample rate".into()));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>(),
        hound::SampleFormat::Int => {
            // int16 / 32768 for 16-bit, as openai-whisper and faster-whisper read it.
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect()
        }
    }
    .map_err(|e| read_err(describe_hound(e)))?;
    let mono: Vec<f32> =
        interleaved.chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32).collect();
    if mono.is_empty() {
        return Err(AudioError::Empty { path: p });
    }
    resample(&mono, spec.sample_rate)
}

fn describe_hound(e: hound::Error) -> String {
    match e {
        hound::Error::FormatError(m) => format!("not a valid WAV file ({m})"),
        hound::Error::Unsupported => "unsupported WAV encoding (PCM integer or float expected)".into(),
        // hound reports a file that ends inside its header as this `Other` I/O error.
        hound::Error::IoError(e)
            if e.kind() == std::io::ErrorKind::UnexpectedEof || e.to_string().contains("read enough") =>
        {
            "not a valid WAV file (it ends before its header does)".into()
        }
        other => other.to_string(),
    }
}

/// Resamples mono audio from `from` Hz to 16 kHz with a band-limited FFT resampler.
pub fn resample(input: &[f32], from: u32) -> Result<Vec<f32>, AudioError> {
    if from == SAMPLE_RATE {
        return Ok(input.to_vec());
    }
    let err = |e: &dyn std::fmt::Display| AudioError::Resample { from, msg: e.to_string() };
    let mut r = FftFixedIn::<f32>::new(from as usize, SAMPLE_RATE as usize, 1024, 2, 1).map_err(|e| err(&e))?;
    let delay = r.output_delay();
    let expected = (input.len() as u64 * SAMPLE_RATE as u64 / from as u64) as usize;
    let mut out = Vec::with_capacity(expected + delay + 2048);
    let mut pos = 0;
    while input.len() - pos >= r.input_frames_next() {
        let n = r.input_frames_next();
        let chunk = r.process(&[&input[pos..pos + n]], None).map_err(|e| err(&e))?;
        out.extend_from_slice(&chunk[0]);
        pos += n;
    }
    if pos < input.len() {
        let chunk = r.process_partial(Some(&[&input[pos..]]), None).map_err(|e| err(&e))?;
        out.extend_from_slice(&chunk[0]);
    }
    // Flush the filter's delay line until the whole signal has come out.
    while out.len() < expected + delay {
        let chunk = r.process_partial::<&[f32]>(None, None).map_err(|e| err(&e))?;
        if chunk[0].is_empty() {
            break;
        }
        out.extend_from_slice(&chunk[0]);
    }
    let end = (delay + expected).min(out.len());
    Ok(out[delay.min(end)..end].to_vec())
}
