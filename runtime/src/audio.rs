//! Audio input: any sample rate and channel count, down-mixed to mono and resampled to
//! 16 kHz. WAV is read by `hound` (integer PCM of any depth, float); every other container
//! and codec by `symphonia` (FLAC, MP3, Ogg Vorbis, AAC and ALAC in MP4/M4A, MKV/WebM, ...).

use std::path::Path;

use rubato::{FftFixedIn, Resampler};

use crate::SAMPLE_RATE;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}: cannot read audio: {msg}")]
    Read { path: String, msg: String },
    #[error("{path}: the file holds no audio samples")]
    Empty { path: String },
    #[error("{path}: {count} samples are NaN or infinite (the first at {at:.3} s): not audio wcc can transcribe")]
    NotFinite { path: String, count: usize, at: f64 },
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
    // A file named .wav that is not one gets the WAV reader's diagnosis.
    let named_wav = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    if !named_wav && !is_riff_wave(path) {
        let (mono, rate) = decode_other(path).map_err(read_err)?;
        if mono.is_empty() {
            return Err(AudioError::Empty { path: p });
        }
        check_finite(&mono, rate, &p)?;
        return resample(&mono, rate);
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
    check_finite(&mono, spec.sample_rate, &p)?;
    resample(&mono, spec.sample_rate)
}

/// Refuses samples that are NaN or infinite (a float file can hold them): they would turn
/// every feature of their window into NaN and the transcript into noise.
fn check_finite(mono: &[f32], rate: u32, path: &str) -> Result<(), AudioError> {
    let bad = mono.iter().filter(|x| !x.is_finite()).count();
    match mono.iter().position(|x| !x.is_finite()) {
        Some(first) => {
            Err(AudioError::NotFinite { path: path.to_string(), count: bad, at: first as f64 / rate as f64 })
        }
        None => Ok(()),
    }
}

/// Whether the file starts like a WAV file (`RIFF....WAVE`).
fn is_riff_wave(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 12];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok()
        && &head[..4] == b"RIFF"
        && &head[8..] == b"WAVE"
}

/// Decodes a non-WAV file with symphonia: the first audio track, every channel averaged.
/// Returns the mono samples and their rate, or why the file cannot be read.
fn decode_other(path: &Path) -> Result<(Vec<f32>, u32), String> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
    use symphonia::core::errors::Error;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &FormatOptions::default(), &MetadataOptions::default())
        .map_err(|e| format!("not an audio file wcc can read ({e})"))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL && t.codec_params.sample_rate.is_some())
        .ok_or("the file has no audio track")?;
    let (id, rate) = (track.id, track.codec_params.sample_rate.unwrap_or(0));
    if rate == 0 {
        return Err("the audio track declares a zero sample rate".into());
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| format!("unsupported audio codec ({e})"))?;
    let mut mono = Vec::new();
    let mut buf: Option<SampleBuffer<f32>> = None;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(Error::ResetRequired) => break,
            Err(e) => return Err(format!("cannot read the audio stream ({e})")),
        };
        if packet.track_id() != id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A corrupt frame is skipped, as players do; the rest of the stream still counts.
            Err(Error::DecodeError(_)) => continue,
            Err(e) => return Err(format!("cannot decode the audio ({e})")),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count();
        if channels == 0 {
            return Err("an audio frame has no channels".into());
        }
        let b = match &mut buf {
            Some(b) if b.capacity() >= decoded.capacity() * channels => b,
            _ => buf.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        b.copy_interleaved_ref(decoded);
        mono.extend(b.samples().chunks_exact(channels).map(|f| f.iter().sum::<f32>() / channels as f32));
    }
    Ok((mono, rate))
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
