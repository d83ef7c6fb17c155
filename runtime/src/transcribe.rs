//! The transcription loop shared by every way of running a model: audio → fixed-length
//! windows → log-mel → encoder → language → greedy decoding → text.

use crate::decode::{
    beam_search, best_of, detect_language, sample_scored, timestamp_prompt, transcribe_prompt, BeamDecoder,
    BeamOptions, DecodeError, Decoded, Decoder, Rng,
};
use crate::mel::{log_mel_max, log_mel_spectrogram_with, log_mel_window};
use crate::tokenizer::{GenerationConfig, WhisperTokenizer};
use crate::{HOP_LENGTH, SAMPLE_RATE};

/// A Whisper model that can encode one window of features and then run decoder steps
/// against it.
pub trait WhisperModel: Decoder + BeamDecoder {
    /// Mel bins and frames of the encoder's static input.
    fn input_shape(&self) -> (usize, usize);
    /// Runs the encoder on `mel` (`[n_mels, frames]`, row-major); later decoder steps attend
    /// to its output.
    fn encode(&mut self, mel: &[f32]) -> Result<(), String>;
    /// The `[n_mels, 201]` mel filter bank to compute features with.
    fn mel_filters(&self) -> Vec<f64> {
        crate::mel::mel_filters(self.input_shape().0)
    }
    /// After a decoder step: appends to `out` the cross-attention scores of the alignment
    /// heads for the token it took (`heads × frames`, head-major) and returns `(heads,
    /// frames)`; `None` if the model was built without them. No default: a wrapper that
    /// forgot to forward it would silently lose word timestamps.
    fn alignment(&self, out: &mut Vec<f32>) -> Option<(usize, usize)>;
}

#[derive(Clone, Debug, Default)]
pub struct TranscribeOptions {
    /// Language code (`en`, `de`, ...); `None` detects it on multilingual models.
    pub language: Option<String>,
    pub translate: bool,
    /// Decode with timestamp tokens (segments with their times; the next window starts at
    /// the last complete timestamp), instead of `<|notimestamps|>` windows cut at quiet
    /// points.
    pub timestamps: bool,
    /// With `timestamps`: each window's prompt carries the text decoded so far
    /// (`<|startofprev|>` and up to half the context of previous tokens), as openai-whisper's
    /// and faster-whisper's `condition_on_previous_text`.
    pub condition_on_previous_text: bool,
    /// Temperatures to decode a window at, in turn, until the result passes the checks
    /// (compression ratio at most [`COMPRESSION_RATIO_THRESHOLD`], mean log-probability at
    /// least [`LOGPROB_THRESHOLD`]) or the window is judged silent. Empty: greedy only.
    pub temperatures: Vec<f32>,
    /// Seed of the sampling at temperatures above 0.
    pub seed: u64,
    /// Time each word of each segment ([`Segment::words`]); the model must output the
    /// alignment heads' cross-attention ([`WhisperModel::alignment`]).
    pub word_timestamps: bool,
    /// Emit a window that still repeats itself after the last temperature as decoded,
    /// instead of cutting the repeats ([`runaway_cut`]).
    pub keep_repeats: bool,
    /// Tokens given as previous text to the first window (`--initial-prompt`, encoded as
    /// `" " + text`), and to the later ones while they are conditioned on previous text.
    pub initial_prompt: Vec<u32>,
    /// Beam search at temperature 0 (`None`, or a width of 1: greedy); the model must have
    /// a beam step of that width ([`BeamDecoder::beam_widths`]).
    pub beam: Option<BeamOptions>,
    /// Candidates drawn at each temperature above 0, the likeliest kept (openai-whisper's
    /// and faster-whisper's `best_of`; 0 counts as 1).
    pub best_of: usize,
}

/// The prompt of a window: `<|startofprev|>` and the last tokens of `previous` (at most half
/// the context), when there are any and the vocabulary has the token, then `task`.
fn with_previous(cfg: &GenerationConfig, previous: &[u32], task: Vec<u32>) -> Vec<u32> {
    let mut prompt = vec![];
    if let (Some(sp), false) = (cfg.special.sot_prev, previous.is_empty()) {
        prompt.push(sp);
        let keep = (cfg.max_text_ctx / 2).saturating_sub(1);
        prompt.extend_from_slice(&previous[previous.len().saturating_sub(keep)..]);
    }
    prompt.extend(task);
    prompt
}

/// A window whose samples all stay under this magnitude (-60 dBFS) is silent: it is not
/// decoded at all. The model's own no-speech rule lets through 10 s of digital silence as
/// "you" (no-speech probability 0.92-0.99, but mean log-probability -0.55 to -0.62); speech
/// reaches far above this level, so no real speech is gated (the quietest clip of
/// `../shared/data/audio`, dev set, long-form and multilingual, peaks at -15 dBFS).
pub const SILENCE_PEAK: f32 = 1e-3;

/// Whether a window is silent by [`SILENCE_PEAK`] (NaN samples count as not silent: the
/// model sees them).
pub fn is_silent(chunk: &[f32]) -> bool {
    chunk.iter().all(|x| x.abs() < SILENCE_PEAK)
}

/// The segment of a window gated as silent: skipped, nothing decoded.
fn silent_segment(start: f64, end: f64) -> Segment {
    Segment {
        start,
        end,
        tokens: vec![],
        text: String::new(),
        no_speech_prob: 1.0,
        avg_logprob: 0.0,
        compression_ratio: 0.0,
        skipped: true,
        temperature: 0.0,
        words: vec![],
    }
}

/// A window whose text compresses better than this (zlib) repeats itself: decoded again at
/// the next temperature (openai-whisper's and faster-whisper's default).
pub const COMPRESSION_RATIO_THRESHOLD: f64 = 2.4;

/// `len(text) / len(zlib(text))` in bytes, as openai-whisper computes it.
pub fn compression_ratio(text: &str) -> f64 {
    use std::io::Write;
    if text.is_empty() {
        return 0.0;
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let packed = z.write_all(text.as_bytes()).and_then(|_| z.finish()).map(|v| v.len()).unwrap_or(text.len());
    text.len() as f64 / packed.max(1) as f64
}

/// One window decoded with temperature fallback (see [`TranscribeOptions::temperatures`]):
/// the first result that passes, else the last one tried. Returns it with its text and the
/// temperature that gave it.
fn decode_window(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    prompt: &[u32],
    opts: &TranscribeOptions,
    rng: &mut Rng,
) -> Result<(Decoded, String, f32), TranscribeError> {
    let temperatures: &[f32] = if opts.temperatures.is_empty() { &[0.0] } else { &opts.temperatures };
    let mut tried: Vec<(Decoded, String, bool)> = Vec::new();
    for &t in temperatures {
        let d = match opts.beam.filter(|b| b.width > 1) {
            Some(beam) if t == 0.0 => beam_search(model, cfg, prompt, beam)?,
            _ if t == 0.0 => sample_scored(model, cfg, prompt, t, rng)?,
            _ => best_of(model, cfg, prompt, t, opts.best_of, rng)?,
        };
        let text = tokenizer.decode(&d.tokens, cfg.special.eot).map_err(|e| TranscribeError::Text(e.to_string()))?;
        let silent = judged_silent(&d, &text);
        // Of the text without its surrounding spaces, as openai-whisper and faster-whisper
        // measure it.
        let repeats = compression_ratio(text.trim()) > COMPRESSION_RATIO_THRESHOLD;
        let failed = repeats || d.avg_logprob < LOGPROB_THRESHOLD;
        if silent || !failed {
            return Ok((d, text, t));
        }
        tried.push((d, text, repeats));
    }
    // Every temperature failed: the likeliest result (highest mean log-probability, the
    // first of equals) among those that do not repeat themselves, else among all, reported
    // at the last temperature tried (faster-whisper's choice; the last temperature decides
    // the prompt reset).
    let t = *temperatures.last().expect("at least one temperature");
    let pool: Vec<usize> = match (0..tried.len()).filter(|&i| !tried[i].2).collect::<Vec<_>>() {
        v if v.is_empty() => (0..tried.len()).collect(),
        v => v,
    };
    let best =
        pool.iter().copied().fold(pool[0], |b, i| if tried[i].0.avg_logprob > tried[b].0.avg_logprob { i } else { b });
    let (mut d, mut text, repeats) = tried.swap_remove(best);
    // Every temperature failed and the text still repeats itself: cut the runaway.
    if !opts.keep_repeats && repeats {
        let keep = runaway_cut(&d.tokens, cfg.special.timestamp_begin);
        if keep < d.tokens.len() {
            d.tokens.truncate(keep);
            text = tokenizer.decode(&d.tokens, cfg.special.eot).map_err(|e| TranscribeError::Text(e.to_string()))?;
        }
    }
    Ok((d, text, t))
}

/// A phrase of up to this many tokens repeated back to back ...
const RUNAWAY_MAX_PHRASE: usize = 32;
/// ... at least this many times in a row (a phrase of one token: twice as many) is a runaway.
const RUNAWAY_MIN_REPEATS: usize = 3;

/// The last guard against a runaway, for a window that still repeats itself after every
/// temperature of the fallback: where the first phrase repeated back to back at least
/// [`RUNAWAY_MIN_REPEATS`] times starts, keep one copy of it and cut the rest. Returns how
/// many of `tokens` to keep (all of them if nothing repeats). Timestamp tokens (from
/// `timestamp_begin` on) are passed over in the comparison: a runaway with timestamps repeats
/// its text between ever-later times. Neither openai-whisper nor faster-whisper has this
/// guard; both emit the repeats.
pub fn runaway_cut(tokens: &[u32], timestamp_begin: u32) -> usize {
    let at: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i] < timestamp_begin).collect();
    let text: Vec<u32> = at.iter().map(|&i| tokens[i]).collect();
    for start in 0..text.len() {
        for n in 1..=RUNAWAY_MAX_PHRASE {
            let repeats = if n == 1 { 2 * RUNAWAY_MIN_REPEATS } else { RUNAWAY_MIN_REPEATS };
            if start + n * repeats > text.len() {
                break;
            }
            let phrase = &text[start..start + n];
            if (1..repeats).all(|k| &text[start + k * n..start + (k + 1) * n] == phrase) {
                // Keep the first copy, and the timestamps that closed it.
                return at[start + n];
            }
        }
    }
    tokens.len()
}

#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub tokens: Vec<u32>,
    pub text: String,
    pub no_speech_prob: f32,
    pub avg_logprob: f32,
    /// [`compression_ratio`] of its window's whole text (openai-whisper's and
    /// faster-whisper's segments carry their window's, the figure fallback judged).
    pub compression_ratio: f64,
    /// Judged silent (see [`NO_SPEECH_THRESHOLD`]): left out of the transcript.
    pub skipped: bool,
    /// The temperature its window was decoded at (above 0 after a fallback).
    pub temperature: f32,
    /// Each word with its times, with `word_timestamps`.
    pub words: Vec<crate::words::Word>,
}

/// openai-whisper's silence rule: a window whose `<|nospeech|>` probability exceeds this
/// while its tokens' mean log-probability is below [`LOGPROB_THRESHOLD`] holds no speech
/// (whatever was decoded there is a hallucination).
pub const NO_SPEECH_THRESHOLD: f32 = 0.6;
pub const LOGPROB_THRESHOLD: f32 = -1.0;

/// openai-whisper's silence rule on a decoded window, and one more: a window the model
/// thinks holds no speech (`<|nospeech|>` above [`NO_SPEECH_THRESHOLD`]) whose text has no
/// letter or digit is silent too, whatever its log-probability. tiny.en's beam gives 10 s
/// of white noise as ". . . . ." (no-speech probability 0.84, mean log-probability -0.89,
/// which keeps it under openai's rule); a window with any word is never dropped by it.
fn judged_silent(d: &Decoded, text: &str) -> bool {
    let openai = d.avg_logprob < LOGPROB_THRESHOLD;
    let wordless = !text.chars().any(char::is_alphanumeric);
    d.no_speech_prob > NO_SPEECH_THRESHOLD && (openai || wordless)
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transcript {
    pub language: Option<String>,
    pub segments: Vec<Segment>,
}

impl Transcript {
    pub fn text(&self) -> String {
        let parts: Vec<&str> =
            self.segments.iter().filter(|s| !s.skipped).map(|s| s.text.trim()).filter(|t| !t.is_empty()).collect();
        parts.join(" ")
    }

    /// The tokens of the segments kept in the transcript.
    pub fn tokens(&self) -> Vec<u32> {
        self.segments.iter().filter(|s| !s.skipped).flat_map(|s| s.tokens.iter().copied()).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("the audio is empty")]
    EmptyAudio,
    #[error("encoder: {0}")]
    Encode(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("unknown language `{0}` for this model")]
    UnknownLanguage(String),
    #[error("{0}")]
    Text(String),
    #[error("word timestamps: {0}")]
    Align(String),
    #[error("word timestamps need a model compiled with --word-timestamps (this one has no alignment output)")]
    NoAlignment,
}

/// Where the window starting at `start` ends: the end of the audio if it fits, else the
/// quietest 100 ms (lowest energy, 10 ms steps) in the window's last third, so that words
/// are not cut and the window ends in (near) silence, after which the model can emit
/// end-of-text. The next window starts there: no audio is dropped.
pub fn window_end(samples: &[f32], start: usize, window: usize) -> usize {
    const FRAME: usize = SAMPLE_RATE as usize / 10;
    const STEP: usize = SAMPLE_RATE as usize / 100;
    if samples.len() - start <= window {
        return samples.len();
    }
    // A window too short to search (a static build of under 0.3 s) is cut where it ends.
    if window < 3 * FRAME {
        return start + window;
    }
    let (lo, hi) = (start + window * 2 / 3, start + window - FRAME);
    let energy = |at: usize| -> f64 { samples[at..at + FRAME].iter().map(|&x| (x as f64) * (x as f64)).sum() };
    let quietest = (lo..=hi).step_by(STEP).min_by(|&a, &b| energy(a).total_cmp(&energy(b))).unwrap_or(hi);
    quietest + FRAME / 2
}

/// Transcribes 16 kHz mono `samples`. Audio longer than the encoder's window is cut into
/// consecutive windows of at most that length, at quiet points ([`window_end`]), each
/// decoded on its own; a shorter window is padded with silence (openai-whisper's
/// convention, see [`crate::mel`]). Windows judged silent are kept but marked `skipped`.
pub fn transcribe(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    samples: &[f32],
    opts: &TranscribeOptions,
) -> Result<Transcript, TranscribeError> {
    transcribe_with_progress(model, tokenizer, cfg, samples, opts, &mut |_, _| {})
}

/// [`transcribe`], calling `progress(done_s, total_s)` before each window and at the end.
pub fn transcribe_with_progress(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    samples: &[f32],
    opts: &TranscribeOptions,
    progress: &mut dyn FnMut(f64, f64),
) -> Result<Transcript, TranscribeError> {
    if samples.is_empty() {
        return Err(TranscribeError::EmptyAudio);
    }
    let (_, frames) = model.input_shape();
    let filters = model.mel_filters();
    let window = frames * HOP_LENGTH;
    let mut language: Option<(String, u32)> = None;
    if cfg.multilingual {
        if let Some(code) = &opts.language {
            let id = cfg
                .languages
                .iter()
                .find(|(c, _)| c == code)
                .map(|(_, id)| *id)
                .ok_or_else(|| TranscribeError::UnknownLanguage(code.clone()))?;
            language = Some((code.clone(), id));
        }
    }
    if opts.timestamps {
        return transcribe_timestamped(model, tokenizer, cfg, samples, opts, language, (&filters, frames), progress);
    }
    let mut segments = Vec::new();
    let mut rng = Rng::new(opts.seed);
    let mut start_sample = 0;
    let mut last_speech = 0.0f64;
    let total_s = samples.len() as f64 / SAMPLE_RATE as f64;
    while start_sample < samples.len() {
        progress(start_sample as f64 / SAMPLE_RATE as f64, total_s);
        let end_sample = window_end(samples, start_sample, window);
        let chunk = &samples[start_sample..end_sample];
        let start = start_sample as f64 / SAMPLE_RATE as f64;
        start_sample = end_sample;
        if is_silent(chunk) {
            segments.push(silent_segment(start, start + chunk.len() as f64 / SAMPLE_RATE as f64));
            continue;
        }
        let mel = log_mel_spectrogram_with(chunk, &filters, frames);
        model.encode(&mel).map_err(TranscribeError::Encode)?;
        if cfg.multilingual && language.is_none() {
            language = Some(detect_language(model, cfg)?);
        }
        // The plain path is not conditioned: only its first window that is decoded and kept
        // sees the initial prompt (a window gated or judged silent before it does not use it
        // up, as in openai-whisper's loop and the timestamped one).
        let fresh = segments.iter().all(|s: &Segment| s.skipped);
        let previous: &[u32] = if fresh { &opts.initial_prompt } else { &[] };
        let prompt =
            with_previous(cfg, previous, transcribe_prompt(cfg, language.as_ref().map(|l| l.1), opts.translate));
        let (d, text, temperature) = decode_window(model, tokenizer, cfg, &prompt, opts, &mut rng)?;
        let skipped = judged_silent(&d, &text);
        segments.push(Segment {
            start,
            end: start + chunk.len() as f64 / SAMPLE_RATE as f64,
            skipped,
            temperature,
            compression_ratio: compression_ratio(text.trim()),
            tokens: d.tokens,
            text,
            no_speech_prob: d.no_speech_prob,
            avg_logprob: d.avg_logprob,
            words: vec![],
        });
        if opts.word_timestamps && !skipped {
            let sot = timestamp_prompt(cfg, language.as_ref().map(|l| l.1), opts.translate);
            let n = segments.len();
            let lang = language.as_ref().map(|l| l.0.as_str());
            let frames = chunk.len() / HOP_LENGTH;
            add_words(model, tokenizer, cfg, &sot, lang, &mut segments[n - 1..], frames, start, &mut last_speech)?;
        }
    }
    progress(total_s, total_s);
    Ok(Transcript { language: language.map(|l| l.0), segments })
}

/// Seconds per timestamp step (`<|0.02|>` after `<|0.00|>`): two mel frames.
const TIMESTAMP_STEP_S: f64 = 0.02;
const FRAMES_PER_TIMESTAMP: usize = 2;
/// Mel frames per second.
const FRAMES_PER_SECOND: f64 = SAMPLE_RATE as f64 / HOP_LENGTH as f64;

/// The timestamped loop (openai-whisper's): each window starts at `seek` (in mel frames),
/// is decoded with timestamp tokens, and is cut into segments at each pair of consecutive
/// timestamps. If the window ends on such a pair (the last segment is closed but the speech
/// may go on), the next window starts at that last timestamp, so a word cut by the window's
/// edge is decoded again whole in the next one; if it ends on a lone timestamp or none,
/// the whole window is consumed.
fn transcribe_timestamped(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    samples: &[f32],
    opts: &TranscribeOptions,
    mut language: Option<(String, u32)>,
    (filters, frames): (&[f64], usize),
    progress: &mut dyn FnMut(f64, f64),
) -> Result<Transcript, TranscribeError> {
    let total_s = samples.len() as f64 / SAMPLE_RATE as f64;
    // The frames of the audio, a partial last one not counted (openai-whisper's and
    // faster-whisper's `content_frames`).
    let total_frames = samples.len() / HOP_LENGTH;
    let tb = cfg.special.timestamp_begin;
    let text = |tokens: &[u32]| -> Result<String, TranscribeError> {
        tokenizer.decode(tokens, cfg.special.eot).map_err(|e| TranscribeError::Text(e.to_string()))
    };
    let mut segments: Vec<Segment> = Vec::new();
    // The previous text of the next window's prompt: the initial prompt, then the tokens of
    // the segments kept so far (while conditioned).
    let mut previous: Vec<u32> = opts.initial_prompt.clone();
    let mut rng = Rng::new(opts.seed);
    // Each window's features are the whole file's log-mel sliced at `seek`, as openai-whisper
    // and faster-whisper compute them (one floor for the file; frames at a window's edges
    // see the audio beyond it), one window at a time.
    let file_max = log_mel_max(samples, filters);
    let mut seek = 0usize;
    // Where the last word kept so far ended (word timestamps' pause rule).
    let mut last_speech = 0.0f64;
    while seek < total_frames {
        progress((seek * HOP_LENGTH).min(samples.len()) as f64 / SAMPLE_RATE as f64, total_s);
        let size = frames.min(total_frames - seek);
        let offset = seek as f64 * HOP_LENGTH as f64 / SAMPLE_RATE as f64;
        let lo = seek * HOP_LENGTH;
        let chunk = &samples[lo..(lo + size * HOP_LENGTH).min(samples.len())];
        if is_silent(chunk) {
            segments.push(silent_segment(offset, offset + chunk.len() as f64 / SAMPLE_RATE as f64));
            seek += size;
            continue;
        }
        let mel = log_mel_window(samples, seek, frames, filters, file_max);
        model.encode(&mel).map_err(TranscribeError::Encode)?;
        if cfg.multilingual && language.is_none() {
            language = Some(detect_language(model, cfg)?);
        }
        let task = timestamp_prompt(cfg, language.as_ref().map(|l| l.1), opts.translate);
        let prompt = with_previous(cfg, &previous, task);
        let (d, window_text, temperature) = decode_window(model, tokenizer, cfg, &prompt, opts, &mut rng)?;
        let window_s = size as f64 * HOP_LENGTH as f64 / SAMPLE_RATE as f64;
        let ratio = compression_ratio(window_text.trim());
        if judged_silent(&d, &window_text) {
            segments.push(Segment {
                start: offset,
                end: offset + window_s,
                text: text(&d.tokens)?,
                tokens: d.tokens,
                no_speech_prob: d.no_speech_prob,
                avg_logprob: d.avg_logprob,
                compression_ratio: ratio,
                skipped: true,
                temperature,
                words: vec![],
            });
            seek += size;
            continue;
        }
        let tokens = &d.tokens;
        let is_ts = |t: u32| t >= tb;
        let time = |t: u32| offset + (t - tb) as f64 * TIMESTAMP_STEP_S;
        let n = tokens.len();
        let single_ending = n >= 2 && !is_ts(tokens[n - 2]) && is_ts(tokens[n - 1]);
        let pairs: Vec<usize> = (1..n).filter(|&i| is_ts(tokens[i - 1]) && is_ts(tokens[i])).collect();
        let segment = |toks: &[u32], start: f64, end: f64| -> Result<Segment, TranscribeError> {
            Ok(Segment {
                start,
                end: end.max(start),
                text: text(toks)?,
                tokens: toks.to_vec(),
                no_speech_prob: d.no_speech_prob,
                avg_logprob: d.avg_logprob,
                compression_ratio: ratio,
                skipped: false,
                temperature,
                words: vec![],
            })
        };
        // The window's segments, before the words (which may move their times) and before
        // the segments with no time or no text are dropped.
        let mut window: Vec<Segment> = Vec::new();
        let mut advance = size;
        if pairs.is_empty() {
            // No closed segment inside: one segment for the window, ending at its last
            // timestamp if that says more than its start.
            let end = match tokens.iter().rev().find(|&&t| is_ts(t)) {
                Some(&t) if t != tb => time(t),
                _ => offset + window_s,
            };
            window.push(segment(tokens, offset, end)?);
        } else {
            let mut cuts = pairs;
            if single_ending {
                cuts.push(n);
            }
            let mut from = 0;
            for &cut in &cuts {
                let part = &tokens[from..cut];
                if let (Some(&first), Some(&last)) = (part.first(), part.last()) {
                    let start = if is_ts(first) { time(first) } else { offset };
                    let end = if is_ts(last) { time(last) } else { offset + window_s };
                    window.push(segment(part, start, end)?);
                }
                from = cut;
            }
            if !single_ending {
                // Resume at the last closed segment's end.
                let last = tokens[from - 1];
                advance = (last - tb) as usize * FRAMES_PER_TIMESTAMP;
            }
        }
        if opts.word_timestamps && !window.is_empty() {
            let sot = timestamp_prompt(cfg, language.as_ref().map(|l| l.1), opts.translate);
            let lang = language.as_ref().map(|l| l.0.as_str());
            add_words(model, tokenizer, cfg, &sot, lang, &mut window, size, offset, &mut last_speech)?;
            // With words, a window that does not end on a lone timestamp resumes where its
            // last word ends (openai-whisper's rule), not at its last timestamp. (Kept within
            // the window below, where faster-whisper would follow a last word stretched past
            // it.)
            if let Some(end) = last_word_end(&window) {
                if !single_ending && end > offset {
                    advance = ((end * FRAMES_PER_SECOND).round() as usize).saturating_sub(seek);
                }
            }
        }
        // A segment that takes no time or holds no text is dropped, and is not previous
        // text for the next window (openai-whisper and faster-whisper alike).
        for s in window {
            if s.start == s.end || s.text.trim().is_empty() {
                continue;
            }
            previous.extend_from_slice(&s.tokens);
            segments.push(s);
        }
        // A window always moves on (a first segment closed at 0.00 would not).
        seek += advance.clamp(1, size);
        // Text found only at a high temperature does not condition the next window; without
        // conditioning, only the first window had a previous text (the initial prompt).
        if temperature > 0.5 || !opts.condition_on_previous_text {
            previous.clear();
        }
    }
    progress(total_s, total_s);
    Ok(Transcript { language: language.map(|l| l.0), segments })
}

/// Times the words of a window's kept segments `segs` (their text tokens aligned together,
/// as openai-whisper's `add_word_timestamps` does), long words clipped, punctuation merged,
/// each word given to the segment its tokens came from, and the words' and segments' times
/// reconciled ([`crate::words::reconcile`]). `num_frames`: mel frames of the window's audio;
/// `last_speech`: where the speech before these segments ended, updated.
#[allow(clippy::too_many_arguments)]
fn add_words(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    sot_sequence: &[u32],
    language: Option<&str>,
    segs: &mut [Segment],
    num_frames: usize,
    offset: f64,
    last_speech: &mut f64,
) -> Result<(), TranscribeError> {
    let eot = cfg.special.eot;
    let text: Vec<u32> = segs.iter().flat_map(|s| s.tokens.iter().copied().filter(|&t| t < eot)).collect();
    // Aligned, measured and clipped in the window's own time (as faster-whisper does: the
    // `>` tests on durations then see the same rounding); the offset comes in `reconcile`.
    let mut words =
        crate::words::find_alignment(model, tokenizer, cfg, sot_sequence, language, &text, num_frames, 0.0)?;
    let limits = crate::words::duration_limits(&words);
    crate::words::clip_at_sentence_ends(&mut words, limits.1);
    crate::words::merge_punctuations(&mut words);
    let mut words = words.into_iter();
    // Within the window, each segment's end is the next one's last speech.
    let mut last = *last_speech;
    for s in segs.iter_mut() {
        let n = s.tokens.iter().filter(|&&t| t < eot).count();
        let mut taken = 0;
        while taken < n {
            let Some(w) = words.next() else { break };
            taken += w.tokens.len();
            s.words.push(w);
        }
        last = crate::words::reconcile(&mut s.words, (&mut s.start, &mut s.end), offset, last, limits);
    }
    // After it, the last word's end, or the last segment's if no word was found
    // (faster-whisper's `get_end`).
    if let Some(end) = last_word_end(segs) {
        *last_speech = end;
    }
    Ok(())
}

/// The end of the last word of `segs`, else of the last segment (openai-whisper's and
/// faster-whisper's `get_end`).
fn last_word_end(segs: &[Segment]) -> Option<f64> {
    segs.iter().rev().flat_map(|s| s.words.iter().rev()).next().map(|w| w.end).or(segs.last().map(|s| s.end))
}

#[cfg(test)]
mod tests {
    use super::runaway_cut;

    const TS: u32 = 1000;

    #[test]
    fn a_phrase_repeated_back_to_back_keeps_one_copy() {
        // "a b | c d e | c d e | c d e | c d e" -> "a b c d e"
        let t = [1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 3, 4, 5];
        assert_eq!(runaway_cut(&t, TS), 5);
        // Twice is speech ("no, no"), three times a runaway.
        assert_eq!(runaway_cut(&[1, 3, 4, 3, 4, 9], TS), 6);
        assert_eq!(runaway_cut(&[1, 3, 4, 3, 4, 3, 4], TS), 3);
        // One token: six in a row ("!!!!!!"), not five.
        assert_eq!(runaway_cut(&[7, 7, 7, 7, 7, 2], TS), 6);
        assert_eq!(runaway_cut(&[2, 7, 7, 7, 7, 7, 7], TS), 2);
        assert_eq!(runaway_cut(&[], TS), 0);
    }

    #[test]
    fn timestamps_between_the_copies_are_passed_over() {
        // <0> x y <5><5> x y <9><9> x y <12>: the text repeats between ever-later times; the
        // first copy is kept with the timestamps that close it.
        let t = [TS, 1, 2, TS + 5, TS + 5, 1, 2, TS + 9, TS + 9, 1, 2, TS + 12];
        assert_eq!(runaway_cut(&t, TS), 5);
    }
}
