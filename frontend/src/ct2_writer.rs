//! Writes a CTranslate2 Whisper checkpoint (`model.bin`, binary version 6) from any loaded
//! checkpoint, so faster-whisper can run the same weights as wcc: a random checkpoint of a
//! size with no published weights here (medium, large-v3), in particular. CTranslate2's own
//! converter needs `transformers` and PyTorch.
//!
//! The variable list comes from a *template*, a real CTranslate2 Whisper checkpoint of the
//! same vocabulary (base for the multilingual sizes): its non-layer variables in its order,
//! its `layer_0` variables repeated for every layer of the model written, its aliases, its
//! scalars (activation, ALiBi flags, alignment settings) except the head counts, and its
//! `config.json`, `vocabulary.json` and `tokenizer.json`. The weights are the checkpoint's,
//! in its own float type, placed where [`crate::ct2::source`] (the reader's map) says each
//! logical tensor lives: Q, K, V rows of one fused self-attention tensor, the cross K, V rows
//! of another, zeros for the K biases Whisper does not have. Reading the file back gives the
//! same tensors (`tests/sizes.rs`).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::checkpoint::{Checkpoint, Format, FrontendError};

fn io_err(dir: &Path, e: impl std::fmt::Display) -> FrontendError {
    FrontendError::Checkpoint { path: dir.display().to_string(), msg: e.to_string() }
}

/// A layer variable's side, layer index and the rest of its name.
fn layer_var(name: &str) -> Option<(&str, usize, &str)> {
    let (side, rest) = name.split_once('/')?;
    let rest = rest.strip_prefix("layer_")?;
    let (i, tail) = rest.split_once('/')?;
    Some((side, i.parse().ok()?, tail))
}

/// Writes `ck` as a CTranslate2 checkpoint in `dir`, laid out as `template` (see the module
/// comment). Refuses a template that is not CTranslate2 or whose vocabulary differs, and a
/// directory that already holds a checkpoint.
pub fn write_ct2(ck: &Checkpoint, template: &Checkpoint, dir: &Path) -> Result<(), FrontendError> {
    if template.format != Format::Ct2 {
        return Err(template.error("the template must be a CTranslate2 checkpoint (model.bin)"));
    }
    if template.dims.n_vocab != ck.dims.n_vocab {
        return Err(template.error(format!(
            "its vocabulary has {} tokens, the model {}: take a template of the same vocabulary",
            template.dims.n_vocab, ck.dims.n_vocab
        )));
    }
    let layout = crate::ct2::parse_layout(template.raw()).map_err(|e| template.error(e))?;
    let dtype = ck
        .source("encoder.conv1.weight")
        .and_then(|s| ck.tensors.get(&s.tensor))
        .map(|t| t.dtype)
        .ok_or_else(|| ck.error("no encoder.conv1.weight"))?;
    let dtype_id = crate::ct2::dtype_id(dtype).ok_or_else(|| ck.error(format!("{dtype} weights")))?;
    let d = ck.dims.n_text_state;
    // Every logical tensor of the model, by the CTranslate2 variable it goes to.
    let mut parts: HashMap<String, Vec<(String, Option<(usize, usize)>, Vec<usize>)>> = HashMap::new();
    for (logical, shape) in crate::hf_writer::tensor_list(&ck.dims) {
        if let Some(at) = crate::ct2::source(&logical, d) {
            parts.entry(at.tensor).or_default().push((logical, at.rows, shape));
        }
    }
    // The variables to write: the template's, its layer 0 repeated per layer.
    let mut names: Vec<(String, String)> = Vec::new(); // (name written, template name)
    for (name, _) in &layout.vars {
        match layer_var(name) {
            Some((side, 0, tail)) => {
                let n = if side == "encoder" { ck.dims.n_audio_layer } else { ck.dims.n_text_layer };
                names.extend((0..n).map(|i| (format!("{side}/layer_{i}/{tail}"), name.clone())));
            }
            Some(_) => {}
            None => names.push((name.clone(), name.clone())),
        }
    }
    let by_name: HashMap<&str, &crate::checkpoint::TensorInfo> =
        layout.vars.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if dir.join("model.bin").exists() || dir.join("model.safetensors").exists() {
        return Err(io_err(dir, "already holds a checkpoint; refusing to overwrite it"));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let file = std::fs::File::create(dir.join("model.bin")).map_err(|e| io_err(dir, e))?;
    let mut w = std::io::BufWriter::new(file);
    let mut out = |b: &[u8]| w.write_all(b).map_err(|e| io_err(dir, e));
    let string = |s: &str| -> Vec<u8> {
        let mut v = ((s.len() + 1) as u16).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        v
    };
    out(&6u32.to_le_bytes())?;
    out(&string("WhisperSpec"))?;
    out(&layout.revision.to_le_bytes())?;
    out(&(names.len() as u32).to_le_bytes())?;
    for (name, tname) in &names {
        let t = by_name[tname.as_str()];
        let (shape, id, bytes): (Vec<usize>, u8, Vec<u8>) = if let Some(ps) = parts.get(name) {
            // Rows of one fused tensor (or the whole tensor): zeros where no logical
            // tensor goes (Whisper's K biases).
            let cols: usize = ps[0].2[1..].iter().product();
            // A fused tensor has as many blocks of `d` rows as the template's has of its width.
            let rows = match ps[0].1 {
                Some(_) => t.shape.first().copied().unwrap_or(0) / template.dims.n_text_state.max(1) * d,
                None => ps[0].2[0],
            };
            let elem = dtype.size_bytes();
            let mut data = vec![0u8; rows * cols * elem];
            for (logical, r, _) in ps {
                let src = ck.source(logical).ok_or_else(|| ck.error(format!("no tensor holds `{logical}`")))?;
                let b = ck.bytes(&src.tensor, src.rows)?;
                let start = r.map_or(0, |(a, _)| a) * cols * elem;
                data[start..start + b.len()].copy_from_slice(b);
            }
            let mut shape = ps[0].2.clone();
            shape[0] = rows;
            (shape, dtype_id, data)
        } else if name.ends_with("num_heads") {
            let heads = if name.starts_with("encoder") { ck.dims.n_audio_head } else { ck.dims.n_text_head };
            let id = crate::ct2::dtype_id(t.dtype).unwrap_or(2);
            let bytes = (heads as u64).to_le_bytes();
            let v = bytes.get(..t.nbytes).ok_or_else(|| template.error(format!("`{name}` is {} bytes", t.nbytes)))?;
            (vec![], id, v.to_vec())
        } else if t.shape.is_empty() {
            let b = &template.raw()[t.offset..t.offset + t.nbytes];
            (vec![], crate::ct2::dtype_id(t.dtype).unwrap_or(0), b.to_vec())
        } else {
            return Err(template.error(format!("no weight of the model goes to `{name}`")));
        };
        out(&string(name))?;
        out(&[shape.len() as u8])?;
        for s in &shape {
            out(&(*s as u32).to_le_bytes())?;
        }
        out(&[id])?;
        out(&(bytes.len() as u32).to_le_bytes())?;
        out(&bytes)?;
    }
    out(&(layout.aliases.len() as u32).to_le_bytes())?;
    for (a, t) in &layout.aliases {
        out(&string(a))?;
        out(&string(t))?;
    }
    drop(out);
    w.flush().map_err(|e| io_err(dir, e))?;
    for f in ["config.json", "vocabulary.json", "vocabulary.txt", "tokenizer.json"] {
        let p = template.dir.join(f);
        if p.is_file() {
            std::fs::copy(&p, dir.join(f)).map_err(|e| io_err(dir, e))?;
        }
    }
    Ok(())
}
