//! Hugging Face Whisper checkpoints: `config.json`, `model.safetensors` (f32, f16 or bf16;
//! memory-mapped), optional `generation_config.json` and `tokenizer.json`.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use wcc_ir::{DType, WeightSource};

use crate::checkpoint::{
    check_not_empty, count_layers, Checkpoint, Format, FrontendError, GenerationSettings, TensorInfo, WhisperDims,
};

pub(crate) fn open(dir: &Path) -> Result<Checkpoint, FrontendError> {
    let err = |msg: String| FrontendError::Checkpoint { path: dir.display().to_string(), msg };
    let config = std::fs::read(dir.join("config.json")).map_err(|e| err(format!("cannot read config.json: {e}")))?;
    let gen = std::fs::read(dir.join("generation_config.json")).ok();
    let file = dir.join("model.safetensors");
    let f = File::open(&file).map_err(|e| err(format!("cannot open model.safetensors: {e}")))?;
    // SAFETY: read-only map of a file wcc does not modify (see ct2::open).
    let mmap = unsafe { Mmap::map(&f) }.map_err(|e| err(format!("cannot map model.safetensors: {e}")))?;
    from_bytes(dir, file, Box::new(mmap), &config, gen.as_deref())
}

/// Reads a checkpoint from the bytes of its `model.safetensors`, `config.json` and
/// `generation_config.json`.
pub(crate) fn from_bytes(
    dir: &Path,
    file: std::path::PathBuf,
    data: Box<dyn AsRef<[u8]> + Send + Sync>,
    config: &[u8],
    gen: Option<&[u8]>,
) -> Result<Checkpoint, FrontendError> {
    let err = |msg: String| FrontendError::Checkpoint { path: dir.display().to_string(), msg };
    let json = |name: &str, b: Option<&[u8]>| -> Result<serde_json::Value, FrontendError> {
        b.map_or(Ok(serde_json::Value::Null), |b| serde_json::from_slice(b).map_err(|e| err(format!("{name}: {e}"))))
    };
    let config = json("config.json", Some(config))?;
    let gen = json("generation_config.json", gen)?;
    let mmap: &[u8] = data.as_ref().as_ref();
    let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| err(format!("model.safetensors: {e}")))?;
    let base = 8 + header_len;
    let mut tensors = HashMap::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I8 => DType::I8,
            Dtype::I16 => DType::I16,
            Dtype::I32 => DType::I32,
            other => return Err(err(format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        let (a, b) = info.data_offsets;
        check_not_empty(&name, &info.shape).map_err(err)?;
        if a > b || base.checked_add(b).is_none_or(|end| end > mmap.len()) {
            return Err(err(format!("model.safetensors is truncated (tensor `{name}` ends past the file)")));
        }
        // Drop the `model.` prefix so names are the logical ones the lowering uses.
        let logical = name.strip_prefix("model.").unwrap_or(&name).to_string();
        tensors.insert(logical, TensorInfo { dtype, shape: info.shape.clone(), offset: base + a, nbytes: b - a });
    }

    let int = |key: &str| -> Result<usize, FrontendError> {
        config[key].as_u64().map(|v| v as usize).ok_or_else(|| err(format!("config.json has no integer `{key}`")))
    };
    let shape = |name: &str| -> Result<Vec<usize>, FrontendError> {
        tensors.get(name).map(|t| t.shape.clone()).ok_or_else(|| err(format!("tensor `model.{name}` is missing")))
    };
    let conv1 = shape("encoder.conv1.weight")?;
    let emb = shape("decoder.embed_tokens.weight")?;
    let dims = WhisperDims {
        n_mels: int("num_mel_bins")?,
        n_audio_ctx: int("max_source_positions")?,
        n_audio_state: int("d_model")?,
        n_audio_head: int("encoder_attention_heads")?,
        n_audio_layer: int("encoder_layers")?,
        n_audio_ffn: int("encoder_ffn_dim")?,
        n_vocab: int("vocab_size")?,
        n_text_ctx: int("max_target_positions")?,
        n_text_state: int("d_model")?,
        n_text_head: int("decoder_attention_heads")?,
        n_text_layer: int("decoder_layers")?,
        n_text_ffn: int("decoder_ffn_dim")?,
    };
    if conv1.len() != 3
        || conv1[1] != dims.n_mels
        || conv1[0] != dims.n_audio_state
        || emb.first() != Some(&dims.n_vocab)
    {
        return Err(err(format!(
            "config.json (num_mel_bins {}, d_model {}, vocab_size {}) disagrees with the weights (conv1 {:?}, embed_tokens {:?})",
            dims.n_mels, dims.n_audio_state, dims.n_vocab, conv1, emb
        )));
    }
    for (side, n) in [("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)] {
        let found = count_layers(&tensors, &format!("{side}.layers."), ".fc1.weight");
        if found < n {
            return Err(err(format!("config.json says {n} {side} layers, the weights have {found}")));
        }
    }

    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
    };
    let mut lang_ids: Vec<u32> = gen["lang_to_id"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).map(|v| v as u32).collect())
        .unwrap_or_default();
    lang_ids.sort_unstable();
    let generation = GenerationSettings {
        suppress: ids(&gen["suppress_tokens"]),
        suppress_begin: ids(&gen["begin_suppress_tokens"]),
        lang_ids,
        alignment_heads: gen["alignment_heads"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| Some((p[0].as_u64()? as usize, p[1].as_u64()? as usize))).collect())
            .unwrap_or_default(),
    };
    Ok(Checkpoint::new(Format::HuggingFace, dir, file, data, tensors, dims, generation))
}

/// HF tensors are stored under their logical names (the `model.` prefix is dropped on load).
pub(crate) fn source(logical: &str) -> Option<WeightSource> {
    Some(WeightSource { tensor: logical.to_string(), rows: None })
}
