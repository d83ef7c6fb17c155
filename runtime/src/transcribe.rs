//! The transcription loop shared by every way of running a model: audio → fixed-length
//! windows → log-mel → encoder → language → greedy decoding → text.

use crate::decode::{detect_language, greedy, transcribe_prompt, DecodeError, Decoder};
use crate::mel::log_mel_spectrogram_with;
use crate::tokenizer::{GenerationConfig, WhisperTokenizer};
use crate::{HOP_LENGTH, SAMPLE_RATE};

/// A Whisper model that can encode one window of features and then run decoder steps
/// against it.
pub trait WhisperModel: Decoder {
    /// Mel bins and frames of the encoder's static input.
    fn input_shape(&self) -> (usize, usize);
    /// Runs the encoder on `mel` (`[n_mels, frames]`, row-major); later decoder steps attend
    /// to its output.
    fn encode(&mut self, mel: &[f32]) -> Result<(), String>;
    /// The `[n_mels, 201]` mel filter bank to compute features with.
    fn mel_filters(&self) -> Vec<f64> {
        crate::mel::mel_filters(self.input_shape().0)
    }
}

#[derive(Clone, Debug, Default)]
pub struct TranscribeOptions {
    /// Language code (`en`, `de`, ...); `None` detects it on multilingual models.
    pub language: Option<String>,
    pub translate: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub tokens: Vec<u32>,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transcript {
    pub language: Option<String>,
    pub segments: Vec<Segment>,
}

impl Transcript {
    pub fn text(&self) -> String {
        let parts: Vec<&str> = self
            .segments
            .iter()
            .map(|s| s.text.trim())
            .filter(|t| !t.is_empty())
            .collect();
        parts.join(" ")
    }

    pub fn tokens(&self) -> Vec<u32> {
        self.segments
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect()
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
}

/// Transcribes 16 kHz mono `samples`. Audio longer than the encoder's window is cut into
/// consecutive windows of that length (each decoded on its own); a shorter window is padded
/// with silence (openai-whisper's convention, see [`crate::mel`]).
pub fn transcribe(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    samples: &[f32],
    opts: &TranscribeOptions,
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
    let mut segments = Vec::new();
    for (w, chunk) in samples.chunks(window).enumerate() {
        let mel = log_mel_spectrogram_with(chunk, &filters, frames);
        model.encode(&mel).map_err(TranscribeError::Encode)?;
        if cfg.multilingual && language.is_none() {
            language = Some(detect_language(model, cfg)?);
        }
        let prompt = transcribe_prompt(cfg, language.as_ref().map(|l| l.1), opts.translate);
        let tokens = greedy(model, cfg, &prompt)?;
        let text = tokenizer
            .decode(&tokens, cfg.special.eot)
            .map_err(|e| TranscribeError::Text(e.to_string()))?;
        let start = (w * window) as f64 / SAMPLE_RATE as f64;
        segments.push(Segment {
            start,
            end: start + chunk.len() as f64 / SAMPLE_RATE as f64,
            tokens,
            text,
        });
    }
    Ok(Transcript {
        language: language.map(|l| l.0),
        segments,
    })
}
