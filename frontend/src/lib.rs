//! Whisper checkpoints in, wcc IR out.
//!
//! Two real formats are read, both memory-mapped without copying the weights:
//! CTranslate2 directories (`model.bin`, as faster-whisper ships them) and Hugging Face
//! directories (`config.json` + `model.safetensors`, fp32/fp16/bf16). Hyper-parameters come
//! from the files (tensor shapes, CTranslate2's scalar variables, HF's `config.json`), never
//! from a table keyed by model name. [`lower::lower`] builds the IR module with two graphs,
//! `encoder` and `decoder_step`. [`hf_writer`] writes HF checkpoints: conversions of a loaded
//! checkpoint, and seeded random weights with a real model size's hyper-parameters.

pub mod checkpoint;
mod ct2;
pub mod ct2_writer;
mod hf;
pub mod hf_writer;
pub mod lower;
pub mod resolve;

pub use checkpoint::{Checkpoint, Format, FrontendError, TensorInfo, WhisperDims};
pub use lower::lower;
pub use resolve::resolve_model;

use std::path::Path;

use wcc_format::{GenerationConfig, Vocabulary};
use wcc_ir::Module;

/// A checkpoint lowered to IR, with what running it needs besides the weights.
pub struct LoadedModel {
    pub checkpoint: Checkpoint,
    pub module: Module,
}

impl LoadedModel {
    /// The generation settings (needs the checkpoint's `tokenizer.json`).
    pub fn generation(&self) -> Result<GenerationConfig, FrontendError> {
        let ck = &self.checkpoint;
        let tok = Vocab::read(ck)?;
        let g = &ck.generation;
        GenerationConfig::new(
            &tok,
            ck.dims.n_vocab,
            ck.dims.n_text_ctx,
            &g.lang_ids,
            g.suppress.clone(),
            g.suppress_begin.clone(),
        )
        .map_err(|t| ck.error(format!("tokenizer.json has no special token {t}")))
    }
}

/// The checkpoint's vocabulary (token text ↔ id), read with the `tokenizers` crate.
pub(crate) struct Vocab(tokenizers::Tokenizer);

impl Vocab {
    pub(crate) fn read(ck: &Checkpoint) -> Result<Vocab, FrontendError> {
        let json = ck.tokenizer_json()?;
        tokenizers::Tokenizer::from_bytes(&json).map(Vocab).map_err(|e| ck.error(format!("tokenizer.json: {e}")))
    }
}

impl Vocabulary for Vocab {
    fn token_id(&self, token: &str) -> Option<u32> {
        self.0.token_to_id(token)
    }

    fn token(&self, id: u32) -> Option<String> {
        self.0.id_to_token(id)
    }
}

/// Opens the checkpoint at `dir` (either format) and lowers it.
pub fn load(dir: &Path) -> Result<LoadedModel, FrontendError> {
    load_with(dir, &lower::LowerOptions::default())
}

/// [`load`] with lowering options.
pub fn load_with(dir: &Path, opts: &lower::LowerOptions) -> Result<LoadedModel, FrontendError> {
    let checkpoint = Checkpoint::open(dir)?;
    let module = lower::lower_with(&checkpoint, opts)?;
    Ok(LoadedModel { checkpoint, module })
}
