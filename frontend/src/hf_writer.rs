//! Writes Hugging Face Whisper checkpoints (`config.json`, `model.safetensors`,
//! `generation_config.json`, and `tokenizer.json` when there is one):
//! - [`convert`]: any loaded checkpoint, tensors copied bit for bit (CTranslate2's fused
//!   projections split back into Q/K/V);
//! - [`write_random`]: seeded random weights with the real hyper-parameters of a published
//!   Whisper size, for measuring speed, memory and compile time at sizes whose weights are
//!   not available here.
//!
//! Tensors are produced one at a time while the file is written, so memory stays at one
//! tensor even for large-v3.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, View};
use serde_json::json;
use wcc_ir::DType;

use crate::checkpoint::{Checkpoint, FrontendError, WhisperDims};

/// The published sizes and their hyper-parameters (used only to *write* random
/// checkpoints; reading never looks sizes up by name).
pub const SIZES: &[&str] = &[
    "tiny",
    "tiny.en",
    "base",
    "base.en",
    "small",
    "small.en",
    "medium",
    "medium.en",
    "large-v2",
    "large-v3",
    "large-v3-turbo",
];

pub fn size_dims(size: &str) -> Option<WhisperDims> {
    let english = size.ends_with(".en");
    let (d, heads, enc, dec, mels) = match size.trim_end_matches(".en") {
        "tiny" => (384, 6, 4, 4, 80),
        "base" => (512, 8, 6, 6, 80),
        "small" => (768, 12, 12, 12, 80),
        "medium" => (1024, 16, 24, 24, 80),
        "large" | "large-v1" | "large-v2" => (1280, 20, 32, 32, 80),
        "large-v3" => (1280, 20, 32, 32, 128),
        "large-v3-turbo" | "turbo" => (1280, 20, 32, 4, 128),
        _ => return None,
    };
    let n_vocab = if english {
        51864
    } else if mels == 128 {
        51866
    } else {
        51865
    };
    Some(WhisperDims {
        n_mels: mels,
        n_audio_ctx: 1500,
        n_audio_state: d,
        n_audio_head: heads,
        n_audio_layer: enc,
        n_audio_ffn: 4 * d,
        n_vocab,
        n_text_ctx: 448,
        n_text_state: d,
        n_text_head: heads,
        n_text_layer: dec,
        n_text_ffn: 4 * d,
    })
}

/// Every tensor of a Whisper model: logical name (HF's, without `model.`) and shape.
pub fn tensor_list(dims: &WhisperDims) -> Vec<(String, Vec<usize>)> {
    let d = dims.n_audio_state;
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("encoder.conv1.weight".into(), vec![d, dims.n_mels, 3]),
        ("encoder.conv1.bias".into(), vec![d]),
        ("encoder.conv2.weight".into(), vec![d, d, 3]),
        ("encoder.conv2.bias".into(), vec![d]),
        ("encoder.embed_positions.weight".into(), vec![dims.n_audio_ctx, d]),
    ];
    let attn = |t: &mut Vec<(String, Vec<usize>)>, p: String| {
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push((format!("{p}.{proj}.weight"), vec![d, d]));
            if proj != "k_proj" {
                t.push((format!("{p}.{proj}.bias"), vec![d]));
            }
        }
    };
    let norm = |t: &mut Vec<(String, Vec<usize>)>, p: String| {
        t.push((format!("{p}.weight"), vec![d]));
        t.push((format!("{p}.bias"), vec![d]));
    };
    let ffn = |t: &mut Vec<(String, Vec<usize>)>, p: &str, f: usize| {
        t.push((format!("{p}.fc1.weight"), vec![f, d]));
        t.push((format!("{p}.fc1.bias"), vec![f]));
        t.push((format!("{p}.fc2.weight"), vec![d, f]));
        t.push((format!("{p}.fc2.bias"), vec![d]));
    };
    for i in 0..dims.n_audio_layer {
        let p = format!("encoder.layers.{i}");
        norm(&mut t, format!("{p}.self_attn_layer_norm"));
        attn(&mut t, format!("{p}.self_attn"));
        norm(&mut t, format!("{p}.final_layer_norm"));
        ffn(&mut t, &p, dims.n_audio_ffn);
    }
    norm(&mut t, "encoder.layer_norm".into());
    t.push(("decoder.embed_tokens.weight".into(), vec![dims.n_vocab, d]));
    t.push(("decoder.embed_positions.weight".into(), vec![dims.n_text_ctx, d]));
    for i in 0..dims.n_text_layer {
        let p = format!("decoder.layers.{i}");
        norm(&mut t, format!("{p}.self_attn_layer_norm"));
        attn(&mut t, format!("{p}.self_attn"));
        norm(&mut t, format!("{p}.encoder_attn_layer_norm"));
        attn(&mut t, format!("{p}.encoder_attn"));
        norm(&mut t, format!("{p}.final_layer_norm"));
        ffn(&mut t, &p, dims.n_text_ffn);
    }
    norm(&mut t, "decoder.layer_norm".into());
    t
}

fn config_json(dims: &WhisperDims, dtype: DType) -> serde_json::Value {
    json!({
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": dims.n_mels,
        "d_model": dims.n_audio_state,
        "encoder_layers": dims.n_audio_layer,
        "encoder_attention_heads": dims.n_audio_head,
        "encoder_ffn_dim": dims.n_audio_ffn,
        "decoder_layers": dims.n_text_layer,
        "decoder_attention_heads": dims.n_text_head,
        "decoder_ffn_dim": dims.n_text_ffn,
        "vocab_size": dims.n_vocab,
        "max_source_positions": dims.n_audio_ctx,
        "max_target_positions": dims.n_text_ctx,
        "activation_function": "gelu",
        "scale_embedding": false,
        "tie_word_embeddings": true,
        "torch_dtype": match dtype { DType::F32 => "float32", DType::BF16 => "bfloat16", _ => "float16" },
    })
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
    }
}

/// A tensor whose bytes are made when the writer asks for them.
struct Lazy<'a> {
    dtype: DType,
    shape: Vec<usize>,
    make: Box<dyn Fn() -> Vec<u8> + 'a>,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        st_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned((self.make)())
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

fn io_err(dir: &Path, e: impl std::fmt::Display) -> FrontendError {
    FrontendError::Checkpoint { path: dir.display().to_string(), msg: e.to_string() }
}

/// Refuses to write into a directory that already holds a checkpoint.
fn prepare_dir(dir: &Path) -> Result<(), FrontendError> {
    if dir.join("model.safetensors").exists() || dir.join("model.bin").exists() {
        return Err(io_err(dir, "already holds a checkpoint; refusing to overwrite it"));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<(), FrontendError> {
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).unwrap()).map_err(|e| io_err(dir, e))
}

/// splitmix64: a tiny seeded generator, so random checkpoints are reproducible.
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn encode(values: impl Iterator<Item = f32>, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.flat_map(f32::to_le_bytes).collect(),
        DType::BF16 => values.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
        _ => values.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// Writes a checkpoint of the published size `size` with weights drawn from `seed`:
/// uniform in ±0.02·√3·(fan-in/384)^-½ for matrices, small biases, layer-norm gains near 1.
pub fn write_random(dir: &Path, size: &str, seed: u64, dtype: DType) -> Result<WhisperDims, FrontendError> {
    let dims = size_dims(size)
        .ok_or_else(|| FrontendError::NotFound(format!("unknown model size `{size}`; sizes: {}", SIZES.join(", "))))?;
    write_random_dims(dir, &dims, seed, dtype)?;
    Ok(dims)
}

/// [`write_random`] for any hyper-parameters (a miniature model, say: the fuzzers' seeds).
pub fn write_random_dims(dir: &Path, dims: &WhisperDims, seed: u64, dtype: DType) -> Result<(), FrontendError> {
    let dims = dims.clone();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(io_err(dir, format!("random checkpoints are f32, f16 or bf16, not {dtype}")));
    }
    prepare_dir(dir)?;
    write_json(dir, "config.json", &config_json(&dims, dtype))?;
    let tensors = tensor_list(&dims);
    let views = tensors.iter().enumerate().map(|(i, (name, shape))| {
        let (name2, shape2) = (name.clone(), shape.clone());
        let tensor_seed = seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let make = move || {
            let n: usize = shape2.iter().product();
            let mut rng = SplitMix(tensor_seed);
            let is_norm = name2.contains("layer_norm");
            let (centre, amp) = if is_norm && name2.ends_with(".weight") {
                (1.0, 0.1)
            } else if shape2.len() == 1 {
                (0.0, 0.02)
            } else {
                let fan_in: usize = shape2[1..].iter().product();
                (0.0, 0.02 * 3f32.sqrt() * (384.0 / fan_in as f32).sqrt())
            };
            encode((0..n).map(|_| centre + amp * rng.next_f32()), dtype)
        };
        (format!("model.{name}"), Lazy { dtype, shape: shape.clone(), make: Box::new(make) })
    });
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors")).map_err(|e| io_err(dir, e))?;
    Ok(())
}

/// Writes `ck` as a Hugging Face checkpoint in `dir`, tensors copied bit for bit.
pub fn convert(ck: &Checkpoint, dir: &Path) -> Result<(), FrontendError> {
    let dims = &ck.dims;
    let tensors = tensor_list(dims);
    // Resolve every tensor first, so a bad checkpoint fails before anything is written.
    let mut views = Vec::new();
    let mut dtype = DType::F16;
    for (name, shape) in &tensors {
        let src = ck.source(name).ok_or_else(|| ck.error(format!("no tensor holds `{name}`")))?;
        let info = ck.tensor(&src.tensor)?;
        dtype = info.dtype;
        let bytes = ck.bytes(&src.tensor, src.rows)?;
        if bytes.len() != shape.iter().product::<usize>() * info.dtype.size_bytes() {
            return Err(ck.error(format!("`{}` does not have the shape {shape:?} of `{name}`", src.tensor)));
        }
        views.push((
            format!("model.{name}"),
            Lazy { dtype: info.dtype, shape: shape.clone(), make: Box::new(move || bytes.to_vec()) },
        ));
    }
    // Whisper's K projections have no bias; CTranslate2 stores zeros for them in its fused
    // tensors. A non-zero one could not be expressed in HF's format.
    for i in 0..dims.n_text_layer.max(dims.n_audio_layer) {
        for p in ["encoder.layers", "decoder.layers"] {
            for a in ["self_attn", "encoder_attn"] {
                let name = format!("{p}.{i}.{a}.k_proj.bias");
                if let Some(src) = ck.source(&name) {
                    if let Ok(v) = ck.read_f32(&src.tensor, src.rows) {
                        if v.iter().any(|&x| x != 0.0) {
                            return Err(ck.error(format!("`{name}` is not zero; HF Whisper has no K bias")));
                        }
                    }
                }
            }
        }
    }
    prepare_dir(dir)?;
    write_json(dir, "config.json", &config_json(dims, dtype))?;
    if ck.tokenizer_json().is_ok() {
        write_vocabulary(ck, dims, dir)?;
    } else {
        write_json(dir, "generation_config.json", &generation_json(dims, &ck.generation, serde_json::Map::new()))?;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors")).map_err(|e| io_err(dir, e))
}

/// `generation_config.json`: the settings wcc reads back (suppressed tokens, alignment heads,
/// the language tokens by name).
fn generation_json(
    dims: &WhisperDims,
    g: &crate::checkpoint::GenerationSettings,
    langs: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut gen = json!({
        "suppress_tokens": g.suppress,
        "begin_suppress_tokens": g.suppress_begin,
        "alignment_heads": g.alignment_heads.iter().map(|&(l, h)| json!([l, h])).collect::<Vec<_>>(),
        "is_multilingual": dims.n_vocab >= 51865,
    });
    if !langs.is_empty() {
        gen["lang_to_id"] = serde_json::Value::Object(langs);
    }
    gen
}

/// Whether `src`'s vocabulary can serve a model of `dims` (see [`write_vocabulary`]): the
/// number of ids its special tokens move up by (0 or 1), or why not.
pub fn check_vocabulary(src: &Checkpoint, dims: &WhisperDims) -> Result<u32, FrontendError> {
    let (from, to) = (src.dims.n_vocab, dims.n_vocab);
    match (from, to) {
        _ if from == to => Ok(0),
        (51865, 51866) => Ok(1),
        _ => {
            let kind = |n: usize| if n < 51865 { "English-only" } else { "multilingual" };
            Err(src.error(format!(
                "its vocabulary ({from} tokens, {}) cannot serve a model of {to} tokens: take it from a {} checkpoint",
                kind(from),
                kind(to)
            )))
        }
    }
}

/// The id large-v3 gave its hundredth language, Cantonese: every special token from it on
/// sits one higher than in the earlier multilingual vocabularies (51866 tokens, not 51865).
const YUE: u32 = 50358;

/// Writes `tokenizer.json` and `generation_config.json` into `dir` for a model of `dims`,
/// from the vocabulary of `src` (a real checkpoint: its tokenizer, language and special
/// tokens, suppressed tokens). The same vocabulary size is copied as it is; a 51865-token
/// multilingual vocabulary also serves large-v3's 51866 tokens, with `<|yue|>` inserted at
/// 50358 and the special tokens after it moved up by one (as large-v3's own tokenizer has
/// them). Any other pair is refused: an English-only vocabulary lacks the language tokens a
/// multilingual model is prompted with, and the other way round the ids disagree. Alignment
/// heads are not copied (they belong to the source's weights).
pub fn write_vocabulary(src: &Checkpoint, dims: &WhisperDims, dir: &Path) -> Result<(), FrontendError> {
    use wcc_format::Vocabulary;
    let shift = check_vocabulary(src, dims)?;
    let (from, to) = (src.dims.n_vocab, dims.n_vocab);
    let bytes = src.tokenizer_json()?;
    let mut tok: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| src.error(format!("tokenizer.json: {e}")))?;
    let vocab = crate::Vocab::read(src)?;
    let moved = |id: u32| if shift == 1 && id >= YUE { id + 1 } else { id };
    let mut langs: serde_json::Map<String, serde_json::Value> =
        src.generation.lang_ids.iter().filter_map(|&id| Some((vocab.token(id)?, json!(moved(id))))).collect();
    if shift == 1 {
        let added = tok["added_tokens"]
            .as_array_mut()
            .ok_or_else(|| src.error("tokenizer.json has no added_tokens list".to_string()))?;
        for t in added.iter_mut() {
            if let Some(id) = t["id"].as_u64() {
                t["id"] = json!(moved(id as u32));
            }
        }
        let at = added.iter().position(|t| t["id"].as_u64().is_some_and(|id| id > YUE as u64)).unwrap_or(added.len());
        added.insert(
            at,
            json!({"id": YUE, "content": "<|yue|>", "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true}),
        );
        langs.insert("<|yue|>".into(), json!(YUE));
    }
    let g = crate::checkpoint::GenerationSettings {
        suppress: src.generation.suppress.iter().map(|&id| moved(id)).collect(),
        suppress_begin: src.generation.suppress_begin.iter().map(|&id| moved(id)).collect(),
        lang_ids: vec![],
        alignment_heads: if from == to && src.dims == *dims { src.generation.alignment_heads.clone() } else { vec![] },
    };
    // The same vocabulary is copied byte for byte.
    let text = if shift == 0 { bytes } else { serde_json::to_vec(&tok).map_err(|e| io_err(dir, e))? };
    std::fs::write(dir.join("tokenizer.json"), text).map_err(|e| io_err(dir, e))?;
    write_json(dir, "generation_config.json", &generation_json(dims, &g, langs))
}
