//! Token ids ↔ text through the checkpoint's `tokenizer.json`, and the generation settings
//! (special tokens, suppressed tokens, languages) every decoding strategy needs.

use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer.json: {0}")]
    Load(String),
    #[error("tokenizer.json has no special token {0}")]
    MissingSpecial(&'static str),
    #[error("decoding token ids: {0}")]
    Decode(String),
}

/// The special tokens of a Whisper vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecialTokens {
    pub eot: u32,
    pub sot: u32,
    pub transcribe: u32,
    pub translate: u32,
    pub no_timestamps: u32,
    /// `<|0.00|>`, the first timestamp token: `no_timestamps + 1` in every Whisper vocabulary.
    pub timestamp_begin: u32,
    /// `<|nospeech|>` (`<|nocaptions|>` in older vocabularies), if the vocabulary has it.
    #[serde(default)]
    pub no_speech: Option<u32>,
}

/// What a decoding strategy needs to know about the model's vocabulary and settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    pub special: SpecialTokens,
    /// Multilingual models have language and task tokens in their prompt.
    pub multilingual: bool,
    /// `(code, token)` of every language token, e.g. `("en", 50259)`.
    pub languages: Vec<(String, u32)>,
    /// Never generated.
    pub suppress: Vec<u32>,
    /// Not generated as the first token (blank and end-of-text).
    pub suppress_begin: Vec<u32>,
    /// The decoder's context (448): prompt plus generated tokens never exceed it.
    pub max_text_ctx: usize,
}

/// A loaded Whisper tokenizer.
pub struct WhisperTokenizer {
    inner: Tokenizer,
}

impl WhisperTokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_bytes(json).map_err(|e| TokenizerError::Load(e.to_string()))?;
        Ok(WhisperTokenizer { inner })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn special_tokens(&self) -> Result<SpecialTokens, TokenizerError> {
        let get = |t: &'static str| self.token_id(t).ok_or(TokenizerError::MissingSpecial(t));
        let no_timestamps = get("<|notimestamps|>")?;
        Ok(SpecialTokens {
            eot: get("<|endoftext|>")?,
            sot: get("<|startoftranscript|>")?,
            transcribe: get("<|transcribe|>")?,
            translate: get("<|translate|>")?,
            no_timestamps,
            timestamp_begin: no_timestamps + 1,
            no_speech: self.token_id("<|nospeech|>").or_else(|| self.token_id("<|nocaptions|>")),
        })
    }

    /// The text of the ordinary tokens among `ids`; special and timestamp tokens (every id
    /// from end-of-text on) are left out.
    pub fn decode(&self, ids: &[u32], eot: u32) -> Result<String, TokenizerError> {
        let text: Vec<u32> = ids.iter().copied().filter(|&t| t < eot).collect();
        self.inner.decode(&text, false).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Builds the generation settings from this vocabulary and the checkpoint's lists.
    /// `n_vocab` decides whether the model is multilingual (openai-whisper's rule: 51865 or
    /// more entries).
    pub fn generation_config(
        &self,
        n_vocab: usize,
        max_text_ctx: usize,
        lang_ids: &[u32],
        suppress: Vec<u32>,
        suppress_begin: Vec<u32>,
    ) -> Result<GenerationConfig, TokenizerError> {
        let special = self.special_tokens()?;
        let languages = lang_ids
            .iter()
            .filter_map(|&id| {
                let t = self.token(id)?;
                let code = t.strip_prefix("<|")?.strip_suffix("|>")?;
                Some((code.to_string(), id))
            })
            .collect();
        Ok(GenerationConfig {
            special,
            multilingual: n_vocab >= 51865,
            languages,
            suppress,
            suppress_begin,
            max_text_ctx,
        })
    }
}
