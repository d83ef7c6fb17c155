//! The format-independent view of a checkpoint: a table of named tensors over one memory
//! map, the model's hyper-parameters, and its generation settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use wcc_ir::interp::WeightLoader;
use wcc_ir::{DType, WeightDecl, WeightSource};

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{0}")]
    NotFound(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// CTranslate2 (`model.bin`, as used by faster-whisper).
    Ct2,
    /// Hugging Face transformers (`config.json` + `model.safetensors`).
    HuggingFace,
}

/// Where one tensor's bytes are in the mapped file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub nbytes: usize,
}

/// Whisper's hyper-parameters, read from the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhisperDims {
    pub n_mels: usize,
    pub n_audio_ctx: usize,
    pub n_audio_state: usize,
    pub n_audio_head: usize,
    pub n_audio_layer: usize,
    pub n_audio_ffn: usize,
    pub n_vocab: usize,
    pub n_text_ctx: usize,
    pub n_text_state: usize,
    pub n_text_head: usize,
    pub n_text_layer: usize,
    pub n_text_ffn: usize,
}

/// Generation settings stored with the checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationSettings {
    pub suppress: Vec<u32>,
    pub suppress_begin: Vec<u32>,
    pub lang_ids: Vec<u32>,
    pub alignment_heads: Vec<(usize, usize)>,
}

pub struct Checkpoint {
    pub format: Format,
    pub dir: PathBuf,
    /// The file the tensor offsets refer to.
    pub file: PathBuf,
    /// The bytes the tensor offsets index: the mapped file, or bytes held in memory.
    data: Box<dyn AsRef<[u8]> + Send + Sync>,
    pub tensors: HashMap<String, TensorInfo>,
    pub dims: WhisperDims,
    pub generation: GenerationSettings,
    /// NaN or infinite values met by [`Checkpoint::read_f32`], per tensor: a checkpoint
    /// damaged this way still loads, and the compiler warns.
    non_finite: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Checkpoint {
    /// Opens a checkpoint directory, recognising its format by its files.
    pub fn open(dir: &Path) -> Result<Checkpoint, FrontendError> {
        if dir.join("model.bin").is_file() {
            crate::ct2::open(dir)
        } else if dir.join("model.safetensors").is_file() {
            crate::hf::open(dir)
        } else if !dir.is_dir() {
            Err(FrontendError::NotFound(format!("{}: no such model directory", dir.display())))
        } else {
            Err(FrontendError::Checkpoint {
                path: dir.display().to_string(),
                msg: "not a Whisper checkpoint: neither model.bin (CTranslate2) nor model.safetensors (Hugging Face) is here".into(),
            })
        }
    }

    /// A CTranslate2 checkpoint held in memory: the bytes of `model.bin` and of
    /// `config.json` if there is one. `label` names it in errors. What [`Checkpoint::open`]
    /// does after reading the files; the checkpoint fuzz targets drive it.
    pub fn from_ct2_bytes(
        label: &Path,
        model_bin: Vec<u8>,
        config: Option<&[u8]>,
    ) -> Result<Checkpoint, FrontendError> {
        crate::ct2::from_bytes(label, label.join("model.bin"), Box::new(model_bin), config)
    }

    /// A Hugging Face checkpoint held in memory: `model.safetensors`, `config.json` and
    /// `generation_config.json` if there is one (see [`Checkpoint::from_ct2_bytes`]).
    pub fn from_safetensors_bytes(
        label: &Path,
        safetensors: Vec<u8>,
        config: &[u8],
        generation: Option<&[u8]>,
    ) -> Result<Checkpoint, FrontendError> {
        crate::hf::from_bytes(label, label.join("model.safetensors"), Box::new(safetensors), config, generation)
    }

    pub(crate) fn new(
        format: Format,
        dir: &Path,
        file: PathBuf,
        data: Box<dyn AsRef<[u8]> + Send + Sync>,
        tensors: HashMap<String, TensorInfo>,
        dims: WhisperDims,
        generation: GenerationSettings,
    ) -> Checkpoint {
        Checkpoint {
            format,
            dir: dir.to_path_buf(),
            file,
            data,
            tensors,
            dims,
            generation,
            non_finite: Default::default(),
        }
    }

    pub fn error(&self, msg: impl Into<String>) -> FrontendError {
        FrontendError::Checkpoint { path: self.dir.display().to_string(), msg: msg.into() }
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, FrontendError> {
        self.tensors.get(name).ok_or_else(|| self.error(format!("tensor `{name}` is missing")))
    }

    /// The whole file the tensor offsets index.
    pub(crate) fn raw(&self) -> &[u8] {
        self.data.as_ref().as_ref()
    }

    /// The raw bytes of a tensor, or of rows `[a, b)` of it (axis 0).
    pub fn bytes(&self, name: &str, rows: Option<(usize, usize)>) -> Result<&[u8], FrontendError> {
        let t = self.tensor(name)?;
        let (start, len) = match rows {
            None => (t.offset, t.nbytes),
            Some((a, b)) => {
                let n0 = *t.shape.first().ok_or_else(|| self.error(format!("`{name}` is a scalar, it has no rows")))?;
                if a >= b || b > n0 {
                    return Err(self.error(format!("rows [{a}:{b}] are out of range for `{name}` {:?}", t.shape)));
                }
                let row = t.nbytes / n0;
                (t.offset + a * row, (b - a) * row)
            }
        };
        Ok(&self.data.as_ref().as_ref()[start..start + len])
    }

    /// The tensor (or rows of it) widened to f32.
    pub fn read_f32(&self, name: &str, rows: Option<(usize, usize)>) -> Result<Vec<f32>, FrontendError> {
        let dtype = self.tensor(name)?.dtype;
        let b = self.bytes(name, rows)?;
        let v: Vec<f32> = match dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(self.error(format!("`{name}` holds {other}, expected a float tensor"))),
        };
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            *self.non_finite.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default() += bad;
        }
        Ok(v)
    }

    /// Each tensor read so far that held NaN or infinite values, with how many.
    pub fn non_finite_weights(&self) -> Vec<(String, usize)> {
        self.non_finite.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, &v)| (k.clone(), v)).collect()
    }

    /// Where the weight with logical (Hugging Face style, without `model.`) name `logical`
    /// lives in this checkpoint.
    pub fn source(&self, logical: &str) -> Option<WeightSource> {
        match self.format {
            Format::Ct2 => crate::ct2::source(logical, self.dims.n_text_state),
            Format::HuggingFace => crate::hf::source(logical),
        }
    }

    /// The source of the checkpoint's tokenizer.json.
    pub fn tokenizer_json(&self) -> Result<Vec<u8>, FrontendError> {
        let p = self.dir.join("tokenizer.json");
        std::fs::read(&p).map_err(|e| self.error(format!("cannot read tokenizer.json: {e}")))
    }
}

impl WeightLoader for Checkpoint {
    fn load_f32(&self, decl: &WeightDecl) -> Result<Vec<f32>, String> {
        let WeightSource { tensor, rows } = &decl.source;
        self.read_f32(tensor, *rows).map_err(|e| e.to_string())
    }
}

/// Reads a little-endian integer scalar of any integer dtype.
pub(crate) fn read_int_scalar(ck: &Checkpoint, name: &str) -> Result<i64, FrontendError> {
    let t = ck.tensor(name)?;
    let b = ck.bytes(name, None)?;
    Ok(match (t.dtype, b.len()) {
        (DType::I8, 1) => b[0] as i8 as i64,
        (DType::I32, 4) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
        (_, 2) => i16::from_le_bytes([b[0], b[1]]) as i64,
        _ => return Err(ck.error(format!("`{name}` is not an integer scalar"))),
    })
}

/// Refuses a tensor with a zero-sized dimension (it holds nothing, and every size derived
/// from it divides by zero).
pub(crate) fn check_not_empty(name: &str, shape: &[usize]) -> Result<(), String> {
    if shape.contains(&0) {
        return Err(format!("tensor `{name}` has a zero-sized dimension: {shape:?}"));
    }
    Ok(())
}

/// Counts `prefix{i}suffix` tensors for i = 0, 1, ... (the number of layers).
pub(crate) fn count_layers(tensors: &HashMap<String, TensorInfo>, prefix: &str, suffix: &str) -> usize {
    (0..).take_while(|i| tensors.contains_key(&format!("{prefix}{i}{suffix}"))).count()
}
