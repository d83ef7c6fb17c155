//! Audio input: any sample rate and channel count, down-mixed to mono and resampled to
//! 16 kHz. WAV is read by `hound` (integer PCM of any depth, float); every other container
//! and codec by `symphonia` (FLAC, MP3, Ogg Vorbis, AAC and ALAC in MP4/M4A; not MKV/WebM,
//! whose reader panics on crafted files).

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

/// The sample rates wcc reads. Below 1 kHz no speech survives; above 768 kHz no audio
/// interface records. Bounding the rate also bounds the resampler's FFT sizes.
pub const MIN_RATE: u32 = 1_000;
pub const MAX_RATE: u32 = 768_000;

/// Reads `path` and returns 16 kHz mono samples in [-1, 1].
///
/// The file is decoded as a stream: each decoded frame is mixed down and resampled as it
/// comes, so the memory held is the 16 kHz samples plus a few blocks, whatever the rate,
/// depth and channel count of the file (a 3-hour 48 kHz stereo file does not pass through
/// memory at its own size).
pub fn load_audio(path: &Path) -> Result<Vec<f32>, AudioError> {
    let p = path.display().to_string();
    let read_err = |msg: String| AudioError::Read { path: p.clone(), msg };
    match std::fs::metadata(path) {
        Err(e) => return Err(read_err(e.to_string())),
        Ok(m) if m.is_dir() => return Err(read_err("is a directory".into())),
        Ok(m) if m.len() == 0 => return Err(AudioError::Empty { path: p }),
        Ok(_) => {}
    }
    let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    // A file named .wav that is not one gets the WAV reader's diagnosis.
    let named_wav = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    let ext = path.extension().and_then(|e| e.to_str());
    decode(file, &p, ext, named_wav)
}

/// Decodes an audio file held in memory, as [`load_audio`] decodes a file: `label` names it
/// in errors, `ext` is its extension if it has one (a hint for the container probe), and
/// `force_wav` sends it to the WAV reader whatever its first bytes are.
pub fn decode_audio(bytes: Vec<u8>, label: &str, ext: Option<&str>, force_wav: bool) -> Result<Vec<f32>, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty { path: label.to_string() });
    }
    decode(std::io::Cursor::new(bytes), label, ext, force_wav)
}

fn decode<S>(mut src: S, label: &str, ext: Option<&str>, force_wav: bool) -> Result<Vec<f32>, AudioError>
where
    S: symphonia::core::io::MediaSource + 'static,
{
    let read_err = |msg: String| AudioError::Read { path: label.to_string(), msg };
    let wav = force_wav || is_riff_wave(&mut src).map_err(|e| read_err(e.to_string()))?;
    let out = if wav {
        decode_wav(src, label)?
    } else {
        // symphonia 0.5 has panicked on crafted files (an overflow in its ADTS reader's frame
        // count, found by the `audio` fuzz target): a panic inside it is this file's error,
        // not the end of a run over many files. Nothing of ours is shared with it, so no
        // state is left half-updated by the unwinding.
        IN_DECODER.with(|c| c.set(true));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_other(src, ext, label)));
        IN_DECODER.with(|c| c.set(false));
        caught.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(read_err(format!("the audio decoder failed on this file ({why})")))
        })?
    };
    if out.is_empty() {
        return Err(AudioError::Empty { path: label.to_string() });
    }
    Ok(out)
}

thread_local! {
    static IN_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside symphonia, whose panics [`decode_audio`] and [`load_audio`]
/// catch and report as the file's error: a panic hook can stay quiet about those (the CLI's
/// does, so that such a file gets one error line).
pub fn in_decoder() -> bool {
    IN_DECODER.with(|c| c.get())
}

/// Whether the stream starts like a WAV file (`RIFF....WAVE`); leaves it at its start.
fn is_riff_wave<S: std::io::Read + std::io::Seek>(s: &mut S) -> std::io::Result<bool> {
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match s.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    s.seek(std::io::SeekFrom::Start(0))?;
    Ok(got == 12 && &head[..4] == b"RIFF" && &head[8..] == b"WAVE")
}

/// Reads a WAV stream with hound: integer PCM of any depth or float, every channel averaged.
fn decode_wav<S: std::io::Read + std::io::Seek>(src: S, label: &str) -> Result<Vec<f32>, AudioError> {
    let read_err = |msg: String| AudioError::Read { path: label.to_string(), msg };
    let mut reader = hound::WavReader::new(std::io::BufReader::new(src)).map_err(|e| read_err(describe_hound(e)))?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    if channels == 0 || spec.sample_rate == 0 {
        return Err(read_err("the WAV header declares no channels or a zero sample rate".into()));
    }
    let mut sink = Mono16k::new(spec.sample_rate, label)?;
    let mut frame = 0f32;
    let mut in_frame = 0;
    let mut push = |v: f32, sink: &mut Mono16k| -> Result<(), AudioError> {
        frame += v;
        in_frame += 1;
        if in_frame == channels {
            sink.push(frame / channels as f32)?;
            (frame, in_frame) = (0.0, 0);
        }
        Ok(())
    };
    match spec.sample_format {
        hound::SampleFormat::Float => {
            for s in reader.samples::<f32>() {
                push(s.map_err(|e| read_err(describe_hound(e)))?, &mut sink)?;
            }
        }
        hound::SampleFormat::Int => {
            if !(1..=32).contains(&spec.bits_per_sample) {
                return Err(read_err(format!("unsupported WAV depth of {} bits", spec.bits_per_sample)));
            }
            // int16 / 32768 for 16-bit, as openai-whisper and faster-whisper read it.
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            for s in reader.samples::<i32>() {
                push(s.map_err(|e| read_err(describe_hound(e)))? as f32 * scale, &mut sink)?;
            }
        }
    }
    sink.finish()
}

/// Decodes a non-WAV stream with symphonia: the first audio track, every channel averaged.
fn decode_other<S>(src: S, ext: Option<&str>, label: &str) -> Result<Vec<f32>, AudioError>
where
    S: symphonia::core::io::MediaSource + 'static,
{
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
    use symphonia::core::errors::Error;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let read_err = |msg: String| AudioError::Read { path: label.to_string(), msg };
    let mss = MediaSourceStream::new(Box::new(src), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = ext {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &FormatOptions::default(), &MetadataOptions::default())
        .map_err(|e| read_err(format!("not an audio file wcc can read ({e})")))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL && t.codec_params.sample_rate.is_some())
        .ok_or_else(|| read_err("the file has no audio track".into()))?;
    let (id, rate) = (track.id, track.codec_params.sample_rate.unwrap_or(0));
    if rate == 0 {
        return Err(read_err("the audio track declares a zero sample rate".into()));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| read_err(format!("unsupported audio codec ({e})")))?;
    let mut sink = Mono16k::new(rate, label)?;
    let mut buf: Option<SampleBuffer<f32>> = None;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(Error::ResetRequired) => break,
            Err(e) => return Err(read_err(format!("cannot read the audio stream ({e})"))),
        };
        if packet.track_id() != id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A corrupt frame is skipped, as players do; the rest of the stream still counts.
            Err(Error::DecodeError(_)) => continue,
            Err(e) => return Err(read_err(format!("cannot decode the audio ({e})"))),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count();
        if channels == 0 {
            return Err(read_err("an audio frame has no channels".into()));
        }
        // A frame's rate is the track's: a stream that changes rate midway is not one
        // signal wcc can resample.
        if spec.rate != rate {
            return Err(read_err(format!("the stream changes sample rate ({rate} Hz, then {} Hz)", spec.rate)));
        }
        let b = match &mut buf {
            Some(b) if b.capacity() >= decoded.capacity() * channels => b,
            _ => buf.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        b.copy_interleaved_ref(decoded);
        for f in b.samples().chunks_exact(channels) {
            sink.push(f.iter().sum::<f32>() / channels as f32)?;
        }
    }
    sink.finish()
}

/// Mono samples at the file's rate in, 16 kHz out, one block at a time. It refuses NaN or
/// infinite samples (a float file can hold them): they would turn every feature of their
/// window into NaN and the transcript into noise.
struct Mono16k {
    label: String,
    rate: u32,
    /// Input samples not yet resampled (at most one block).
    pending: Vec<f32>,
    resampler: Option<FftFixedIn<f32>>,
    out: Vec<f32>,
    /// Input samples seen, and the first non-finite one's index and how many there are.
    seen: u64,
    bad: Option<(u64, usize)>,
    /// Output samples still to drop: the resampler's delay.
    skip: usize,
}

impl Mono16k {
    fn new(rate: u32, label: &str) -> Result<Mono16k, AudioError> {
        if !(MIN_RATE..=MAX_RATE).contains(&rate) {
            return Err(AudioError::Read {
                path: label.to_string(),
                msg: format!(
                    "a sample rate of {rate} Hz is outside what wcc reads ({} kHz to {} kHz)",
                    MIN_RATE / 1000,
                    MAX_RATE / 1000
                ),
            });
        }
        let resampler = if rate == SAMPLE_RATE {
            None
        } else {
            Some(
                FftFixedIn::<f32>::new(rate as usize, SAMPLE_RATE as usize, 1024, 2, 1)
                    .map_err(|e| AudioError::Resample { from: rate, msg: e.to_string() })?,
            )
        };
        let skip = resampler.as_ref().map_or(0, |r| r.output_delay());
        Ok(Mono16k {
            label: label.to_string(),
            rate,
            pending: Vec::new(),
            resampler,
            out: Vec::new(),
            seen: 0,
            bad: None,
            skip,
        })
    }

    fn push(&mut self, v: f32) -> Result<(), AudioError> {
        if !v.is_finite() {
            match &mut self.bad {
                Some((_, n)) => *n += 1,
                None => self.bad = Some((self.seen, 1)),
            }
        }
        self.seen += 1;
        let Some(r) = &mut self.resampler else {
            self.out.push(v);
            return Ok(());
        };
        self.pending.push(v);
        if self.pending.len() >= r.input_frames_next() {
            let block = r.process(&[&self.pending[..]], None).map_err(|e| self.resample_err(&e))?;
            self.pending.clear();
            self.emit(&block[0]);
        }
        Ok(())
    }

    fn resample_err(&self, e: &dyn std::fmt::Display) -> AudioError {
        AudioError::Resample { from: self.rate, msg: e.to_string() }
    }

    fn emit(&mut self, block: &[f32]) {
        let drop = self.skip.min(block.len());
        self.skip -= drop;
        self.out.extend_from_slice(&block[drop..]);
    }

    fn finish(mut self) -> Result<Vec<f32>, AudioError> {
        if let Some((first, count)) = self.bad {
            return Err(AudioError::NotFinite { path: self.label, count, at: first as f64 / self.rate as f64 });
        }
        let Some(mut r) = self.resampler.take() else {
            return Ok(self.out);
        };
        let expected = (self.seen * SAMPLE_RATE as u64 / self.rate as u64) as usize;
        if !self.pending.is_empty() {
            let block = r.process_partial(Some(&[&self.pending[..]]), None).map_err(|e| self.resample_err(&e))?;
            self.emit(&block[0]);
        }
        // Flush the filter's delay line with silence until the whole signal has come out. A
        // rate whose FFT block is longer than a call's input (rate / gcd(rate, 16000) over
        // 1024: 11127 Hz, 44101 Hz) yields empty blocks until a block fills, so empty ones do
        // not end the flush; two seconds of silence always suffice.
        let mut calls = 2 * self.rate as usize / r.input_frames_next().max(1) + 4;
        while self.out.len() < expected && calls > 0 {
            let block = r.process_partial::<&[f32]>(None, None).map_err(|e| self.resample_err(&e))?;
            self.emit(&block[0]);
            calls -= 1;
        }
        self.out.truncate(expected);
        Ok(self.out)
    }
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
