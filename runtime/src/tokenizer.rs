//! Token ids ↔ text through the checkpoint's `tokenizer.json`, and the generation settings
//! (special tokens, suppressed tokens, languages) every decoding strategy needs.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;
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
///
/// Decoding (ids → text) and the special-token lookups read only the vocabulary: each token
/// is a string of GPT-2's byte-level alphabet, one character per byte, so the text is the
/// bytes of the tokens concatenated, read as UTF-8 (what the `ByteLevel` decoder of
/// `tokenizer.json` does). That takes a few milliseconds where building the whole BPE model
/// (50 000 merges) takes about 150; the full `tokenizers` model is built on first need
/// (encoding text), not at load.
pub struct WhisperTokenizer {
    json: Vec<u8>,
    /// Token string by id (`None` for ids the file does not define).
    vocab: Vec<Option<String>>,
    ids: HashMap<String, u32>,
    full: OnceLock<Result<Tokenizer, String>>,
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: ModelJson,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(Deserialize)]
struct ModelJson {
    vocab: HashMap<String, u32>,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

/// GPT-2's byte-level alphabet, inverted: the byte each character of a token stands for.
fn byte_of_char() -> HashMap<char, u8> {
    // Printable bytes stand for themselves; the others are mapped, in order, to 256, 257, ...
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        map.insert(char::from_u32(c).expect("a valid code point"), b);
    }
    map
}

impl WhisperTokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<Self, TokenizerError> {
        let parsed: TokenizerJson = serde_json::from_slice(json).map_err(|e| TokenizerError::Load(e.to_string()))?;
        let mut ids = parsed.model.vocab;
        for t in parsed.added_tokens {
            ids.insert(t.content, t.id);
        }
        let n = ids.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if n > 1 << 24 {
            return Err(TokenizerError::Load(format!("token id {} is implausibly large", n - 1)));
        }
        let mut vocab = vec![None; n];
        for (t, &i) in &ids {
            vocab[i as usize] = Some(t.clone());
        }
        Ok(WhisperTokenizer { json: json.to_vec(), vocab, ids, full: OnceLock::new() })
    }

    /// The whole `tokenizers` model (BPE merges included), built on first use.
    pub fn full(&self) -> Result<&Tokenizer, TokenizerError> {
        self.full
            .get_or_init(|| Tokenizer::from_bytes(&self.json).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| TokenizerError::Load(e.clone()))
    }

    /// The ids of `text` (no special tokens added), as Whisper encodes a prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.full()?.encode(text, false).map_err(|e| TokenizerError::Load(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn token(&self, id: u32) -> Option<String> {
        self.vocab.get(id as usize).cloned().flatten()
    }

    pub fn special_tokens(&self) -> Result<SpecialTokens, TokenizerError> {
        SpecialTokens::of(self).map_err(TokenizerError::MissingSpecial)
    }

    /// The text of the ordinary tokens among `ids`; special and timestamp tokens (every id
    /// from end-of-text on) are left out.
    pub fn decode(&self, ids: &[u32], eot: u32) -> Result<String, TokenizerError> {
        static BYTES: OnceLock<HashMap<char, u8>> = OnceLock::new();
        let bytes_of = BYTES.get_or_init(byte_of_char);
        let mut bytes = Vec::new();
        for &id in ids.iter().filter(|&&t| t < eot) {
            let t = self.vocab.get(id as usize).and_then(|t| t.as_deref());
            let t = t.ok_or_else(|| TokenizerError::Decode(format!("no token has id {id}")))?;
            // A token with a character outside the byte alphabet (an added token's text)
            // stands for its own UTF-8, as the ByteLevel decoder has it.
            match t.chars().map(|c| bytes_of.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                Some(b) => bytes.extend(b),
                None => bytes.extend_from_slice(t.as_bytes()),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
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
        WhisperTokenizer::token_id(self, token)
    }

    fn token(&self, id: u32) -> Option<String> {
        WhisperTokenizer::token(self, id)
    }
}
