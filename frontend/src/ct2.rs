//! CTranslate2 Whisper checkpoints: `model.bin` (binary version 6, spec `WhisperSpec`),
//! `config.json` (generation settings), `tokenizer.json`.
//!
//! `model.bin` layout (little-endian): u32 version; string spec name; u32 spec revision;
//! u32 variable count; per variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32
//! byte count, the bytes; then u32 alias count and (alias, target) string pairs. A string
//! is a u16 length (including a trailing NUL) and the bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use wcc_ir::{DType, WeightSource};

use crate::checkpoint::{
    check_not_empty, count_layers, read_int_scalar, Checkpoint, Format, FrontendError, GenerationSettings, TensorInfo,
    WhisperDims,
};

const SUPPORTED_VERSION: u32 = 6;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.b.len() - self.pos < n {
            return Err(format!(
                "model.bin is truncated: {what} needs bytes up to {}, the file has {}",
                self.pos + n,
                self.b.len()
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn dtype(id: u8) -> Option<DType> {
    Some(match id {
        0 => DType::F32,
        1 => DType::I8,
        2 => DType::I16,
        3 => DType::I32,
        4 => DType::F16,
        5 => DType::BF16,
        _ => return None,
    })
}

/// A `model.bin`'s variables in file order (name, tensor) and its aliases, as read.
pub(crate) struct Layout {
    pub revision: u32,
    pub vars: Vec<(String, TensorInfo)>,
    pub aliases: Vec<(String, String)>,
}

fn parse_model_bin(b: &[u8]) -> Result<HashMap<String, TensorInfo>, String> {
    let layout = parse_layout(b)?;
    let mut tensors: HashMap<String, TensorInfo> = layout.vars.into_iter().collect();
    for (alias, target) in layout.aliases {
        let t = tensors.get(&target).cloned().ok_or_else(|| format!("alias `{alias}` names a missing `{target}`"))?;
        tensors.insert(alias, t);
    }
    Ok(tensors)
}

/// The dtype id CTranslate2 stores for `d`.
pub(crate) fn dtype_id(d: DType) -> Option<u8> {
    (0..=5u8).find(|&id| dtype(id) == Some(d))
}

pub(crate) fn parse_layout(b: &[u8]) -> Result<Layout, String> {
    let mut r = Reader { b, pos: 0 };
    let version = r.u32("the format version")?;
    if version != SUPPORTED_VERSION {
        return Err(format!(
            "model.bin has binary version {version}; wcc reads version {SUPPORTED_VERSION} (CTranslate2 >= 3)"
        ));
    }
    let spec = r.string("the spec name")?;
    if spec != "WhisperSpec" {
        return Err(format!("model.bin holds a `{spec}` model, not Whisper (`WhisperSpec`)"));
    }
    let revision = r.u32("the spec revision")?;
    let n = r.u32("the variable count")?;
    let mut vars = Vec::new();
    for i in 0..n {
        let name = r.string(&format!("variable {i}'s name"))?;
        let rank = r.u8(&name)? as usize;
        let shape = (0..rank).map(|_| r.u32(&name).map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
        let id = r.u8(&name)?;
        let dt = dtype(id).ok_or_else(|| format!("variable `{name}` has unknown dtype id {id}"))?;
        let nbytes = r.u32(&name)? as usize;
        check_not_empty(&name, &shape)?;
        let size = shape.iter().try_fold(dt.size_bytes(), |n, &d| n.checked_mul(d));
        if size != Some(nbytes) {
            return Err(format!("variable `{name}`: {nbytes} bytes do not match {dt}{shape:?}"));
        }
        let offset = r.pos;
        r.take(nbytes, &format!("the data of `{name}`"))?;
        vars.push((name, TensorInfo { dtype: dt, shape, offset, nbytes }));
    }
    let n_alias = r.u32("the alias count")?;
    let mut aliases = Vec::new();
    for _ in 0..n_alias {
        let alias = r.string("an alias")?;
        let target = r.string("an alias target")?;
        aliases.push((alias, target));
    }
    Ok(Layout { revision, vars, aliases })
}

pub(crate) fn open(dir: &Path) -> Result<Checkpoint, FrontendError> {
    let err = |msg: String| FrontendError::Checkpoint { path: dir.display().to_string(), msg };
    let file = dir.join("model.bin");
    let f = File::open(&file).map_err(|e| err(format!("cannot open model.bin: {e}")))?;
    // SAFETY: the map is read-only and the checkpoint is not modified while wcc runs; a
    // concurrent writer could change the bytes we read, never memory safety of our own.
    let mmap = unsafe { Mmap::map(&f) }.map_err(|e| err(format!("cannot map model.bin: {e}")))?;
    let config = std::fs::read(dir.join("config.json")).ok();
    from_bytes(dir, file, Box::new(mmap), config.as_deref())
}

/// Reads a checkpoint from the bytes of its `model.bin` and `config.json`.
pub(crate) fn from_bytes(
    dir: &Path,
    file: std::path::PathBuf,
    data: Box<dyn AsRef<[u8]> + Send + Sync>,
    config: Option<&[u8]>,
) -> Result<Checkpoint, FrontendError> {
    let err = |msg: String| FrontendError::Checkpoint { path: dir.display().to_string(), msg };
    let tensors = parse_model_bin(data.as_ref().as_ref()).map_err(err)?;
    let config: serde_json::Value = match config {
        Some(b) => serde_json::from_slice(b).map_err(|e| err(format!("config.json: {e}")))?,
        None => serde_json::Value::Null,
    };
    let ids = |key: &str| -> Vec<u32> {
        config[key]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect())
            .unwrap_or_default()
    };
    let generation = GenerationSettings {
        suppress: ids("suppress_ids"),
        suppress_begin: ids("suppress_ids_begin"),
        lang_ids: ids("lang_ids"),
        alignment_heads: config["alignment_heads"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| Some((p[0].as_u64()? as usize, p[1].as_u64()? as usize))).collect())
            .unwrap_or_default(),
    };

    let placeholder = WhisperDims {
        n_mels: 0,
        n_audio_ctx: 0,
        n_audio_state: 0,
        n_audio_head: 0,
        n_audio_layer: 0,
        n_audio_ffn: 0,
        n_vocab: 0,
        n_text_ctx: 0,
        n_text_state: 0,
        n_text_head: 0,
        n_text_layer: 0,
        n_text_ffn: 0,
    };
    let mut ck = Checkpoint::new(Format::Ct2, dir, file, data, tensors, placeholder, generation);
    ck.dims = dims(&ck)?;
    if let Ok(act) = read_int_scalar(&ck, "decoder/activation") {
        // CTranslate2's ActivationType: 3 is GELU with erf, the one Whisper uses.
        if act != 3 {
            return Err(ck.error(format!("unsupported activation type {act} (Whisper uses GELU, type 3)")));
        }
    }
    Ok(ck)
}

fn dims(ck: &Checkpoint) -> Result<WhisperDims, FrontendError> {
    let shape = |name: &str, rank: usize| -> Result<Vec<usize>, FrontendError> {
        let t = ck.tensor(name)?;
        if t.shape.len() != rank {
            return Err(ck.error(format!("`{name}` has shape {:?}, expected rank {rank}", t.shape)));
        }
        Ok(t.shape.clone())
    };
    let conv1 = shape("encoder/conv1/weight", 3)?;
    let enc_pos = shape("encoder/position_encodings/encodings", 2)?;
    let emb = shape("decoder/embeddings/weight", 2)?;
    let dec_pos = shape("decoder/position_encodings/encodings", 2)?;
    let enc_ffn = shape("encoder/layer_0/ffn/linear_0/weight", 2)?;
    let dec_ffn = shape("decoder/layer_0/ffn/linear_0/weight", 2)?;
    let heads = |name: &str| -> Result<usize, FrontendError> {
        let h = read_int_scalar(ck, name)?;
        usize::try_from(h)
            .ok()
            .filter(|&h| h > 0)
            .ok_or_else(|| ck.error(format!("`{name}` = {h} is not a head count")))
    };
    Ok(WhisperDims {
        n_mels: conv1[1],
        n_audio_ctx: enc_pos[0],
        n_audio_state: conv1[0],
        n_audio_head: heads("encoder/num_heads")?,
        n_audio_layer: count_layers(&ck.tensors, "encoder/layer_", "/ffn/linear_0/weight"),
        n_audio_ffn: enc_ffn[0],
        n_vocab: emb[0],
        n_text_ctx: dec_pos[0],
        n_text_state: emb[1],
        n_text_head: heads("decoder/num_heads")?,
        n_text_layer: count_layers(&ck.tensors, "decoder/layer_", "/ffn/linear_0/weight"),
        n_text_ffn: dec_ffn[0],
    })
}

/// Where a weight with a logical (Hugging Face style, without `model.`) name lives in a
/// CTranslate2 checkpoint. Self-attention Q, K, V are rows of one fused `linear_0`;
/// cross-attention K, V rows of one fused `linear_1`; layer norms are `gamma`/`beta`.
pub(crate) fn source(logical: &str, d: usize) -> Option<WeightSource> {
    let parts: Vec<&str> = logical.split('.').collect();
    let side = *parts.first()?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let norm = |p: &str| match p {
        "weight" => Some("gamma"),
        "bias" => Some("beta"),
        _ => None,
    };
    let whole = |t: String| Some(WeightSource { tensor: t, rows: None });
    let part = |t: String, k: usize| Some(WeightSource { tensor: t, rows: Some((k * d, (k + 1) * d)) });
    match parts[1..] {
        [conv @ ("conv1" | "conv2"), p] if side == "encoder" => whole(format!("encoder/{conv}/{p}")),
        ["embed_positions", "weight"] => whole(format!("{side}/position_encodings/encodings")),
        ["embed_tokens", "weight"] if side == "decoder" => whole("decoder/embeddings/weight".into()),
        ["layer_norm", p] => whole(format!("{side}/layer_norm/{}", norm(p)?)),
        ["layers", i, module, ref rest @ ..] => {
            let l = format!("{side}/layer_{i}");
            match (module, rest) {
                ("self_attn_layer_norm", [p]) => whole(format!("{l}/self_attention/layer_norm/{}", norm(p)?)),
                ("encoder_attn_layer_norm", [p]) => whole(format!("{l}/attention/layer_norm/{}", norm(p)?)),
                ("final_layer_norm", [p]) => whole(format!("{l}/ffn/layer_norm/{}", norm(p)?)),
                ("fc1", [p]) => whole(format!("{l}/ffn/linear_0/{p}")),
                ("fc2", [p]) => whole(format!("{l}/ffn/linear_1/{p}")),
                ("self_attn", [proj, p]) => {
                    let fused = format!("{l}/self_attention/linear_0/{p}");
                    match *proj {
                        "q_proj" => part(fused, 0),
                        "k_proj" => part(fused, 1),
                        "v_proj" => part(fused, 2),
                        "out_proj" => whole(format!("{l}/self_attention/linear_1/{p}")),
                        _ => None,
                    }
                }
                ("encoder_attn", [proj, p]) if side == "decoder" => match *proj {
                    "q_proj" => whole(format!("{l}/attention/linear_0/{p}")),
                    "k_proj" => part(format!("{l}/attention/linear_1/{p}"), 0),
                    "v_proj" => part(format!("{l}/attention/linear_1/{p}"), 1),
                    "out_proj" => whole(format!("{l}/attention/linear_2/{p}")),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projections_map_to_row_ranges() {
        let s = source("encoder.layers.2.self_attn.v_proj.weight", 384).unwrap();
        assert_eq!(s.tensor, "encoder/layer_2/self_attention/linear_0/weight");
        assert_eq!(s.rows, Some((768, 1152)));
        let s = source("decoder.layers.0.encoder_attn.k_proj.weight", 512).unwrap();
        assert_eq!(s.tensor, "decoder/layer_0/attention/linear_1/weight");
        assert_eq!(s.rows, Some((0, 512)));
        let s = source("decoder.layers.3.final_layer_norm.bias", 8).unwrap();
        assert_eq!(s.tensor, "decoder/layer_3/ffn/layer_norm/beta");
        assert!(source("decoder.conv1.weight", 8).is_none());
    }

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        let mut b = Vec::new();
        b.extend_from_slice(&6u32.to_le_bytes());
        let name = b"WhisperSpec\0";
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        let v = b"x\0";
        b.extend_from_slice(&(v.len() as u16).to_le_bytes());
        b.extend_from_slice(v);
        b.push(1);
        b.extend_from_slice(&4u32.to_le_bytes());
        b.push(0);
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_model_bin(&b).unwrap()["x"].shape, vec![4]);
        for cut in [0, 3, 10, 30, b.len() - 5] {
            let e = parse_model_bin(&b[..cut]).unwrap_err();
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
        let mut other = b.clone();
        other[0] = 5;
        assert!(parse_model_bin(&other).unwrap_err().contains("version 5"));
    }
}
