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

pub use wcc_format::{GenerationConfig, SpecialTokens, Vocabulary};

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
        SpecialTokens::of(self).map_err(TokenizerError::MissingSpecial)
    }

    /// The text of the ordinary tokens among `ids`; special and timestamp tokens (every id
    /// from end-of-text on) are left out.
    pub fn decode(&self, ids: &[u32], eot: u32) -> Result<String, TokenizerError> {
        let text: Vec<u32> = ids.iter().copied().filter(|&t| t < eot).collect();
        self.inner.decode(&text, false).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Builds the generation settings from this vocabulary and the checkpoint's lists
    /// (see [`GenerationConfig::new`]).
    pub fn generation_config(
        &self,
        n_vocab: usize,
        max_text_ctx: usize,
        lang_ids: &[u32],
        suppress: Vec<u32>,
        suppress_begin: Vec<u32>,
    ) -> Result<GenerationConfig, TokenizerError> {
        GenerationConfig::new(self, n_vocab, max_text_ctx, lang_ids, suppress, suppress_begin)
            .map_err(TokenizerError::MissingSpecial)
    }
}

impl Vocabulary for WhisperTokenizer {
    fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}
