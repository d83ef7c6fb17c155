//! The `.wbin` artifact (format version 2; see `FORMAT.md` beside this crate): reading,
//! validation and writing, and the kernel ABI it describes (typed buffers, their access,
//! kernel kinds). Everything a compiled model needs to run is in the one file.
//!
//! This crate is shared by the compiler (which writes) and the runtime (which reads) and
//! depends on neither: it is the one home of what they must agree on. It also holds the
//! generation settings ([`GenerationConfig`]) the file carries.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"WCCWBIN\0";
/// 2: typed buffers (element type and access per kernel argument), the weight table, int8.
pub const VERSION: u32 = 2;
/// Fixed-size start of the file: magic, version, checksum, section table, file length.
pub const PRELUDE_LEN: usize = 104;
/// Alignment of the weights section (a page, so it maps cleanly).
pub const WEIGHTS_ALIGN: usize = 4096;
/// Alignment of every other section.
pub const SECTION_ALIGN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WbinError {
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    /// The message carries the I/O error (it is not a `source`: the CLI prints an error's
    /// chain, and the cause would be printed twice).
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub arch: String,
    pub features: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub name: String,
    /// Byte range of the machine code inside the code section.
    pub offset: u64,
    pub len: u64,
    /// Where the code runs: `cpu` (machine code for `target`), or `ptx` (an entry of the
    /// PTX module that is the whole code section, for a CUDA target).
    pub kind: String,
    /// Each buffer argument, in order: what it holds and how the kernel uses it.
    pub buffers: Vec<BufferDesc>,
    pub parallel_extent: u64,
    pub flops: u64,
    /// For `ptx` kernels: the entry's name and its launch shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuLaunchDesc>,
}

/// How a `ptx` kernel is launched: `grid` blocks of `block` threads, `shared_bytes` of static
/// shared memory per block (declared in the PTX; recorded to check the device has it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuLaunchDesc {
    pub entry: String,
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
}

/// How a kernel uses a buffer argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn writes(self) -> bool {
        self != Access::Read
    }

    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
        }
    }
}

/// One buffer argument of a kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferDesc {
    pub name: String,
    /// `f32`, `i32`, `i8` or `u8`.
    pub elem: String,
    /// Length in elements.
    pub len: u64,
    pub access: Access,
}

impl BufferDesc {
    /// Bytes of one element, or `None` for an element type this runtime does not know.
    pub fn elem_bytes(&self) -> Option<u64> {
        match self.elem.as_str() {
            "f32" | "i32" => Some(4),
            "i8" | "u8" => Some(1),
            _ => None,
        }
    }
}

/// A constant stored in the weights section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightEntry {
    /// `@weight`, or `graph:%value` for a value computed from weights at compile time.
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte offset in the weights section.
    pub offset: u64,
    /// For int8 values: how they were quantized and where their scales are.
    pub quantization: Option<Quantization>,
}

/// Quantization parameters of an int8 entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quantization {
    /// `symmetric_per_row`: `value = q · scale[row]`, zero point 0.
    pub scheme: String,
    /// The entry holding the f32 scales.
    pub scales: String,
}

/// A buffer handed to a kernel: bytes of the arena or of the weights section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufRef {
    Arena { offset: u64, len: u64 },
    Weight { offset: u64, len: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: u32,
    pub buffers: Vec<BufRef>,
}

/// A graph input or output: where it lives in the arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IoSlot {
    pub name: String,
    pub offset: u64,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl IoSlot {
    /// Bytes of the slot: its elements times their size (`i8`/`u8` 1, `f32`/`i32` 4).
    pub fn bytes(&self) -> u64 {
        let elem = if matches!(self.dtype.as_str(), "i8" | "u8") { 1 } else { 4 };
        elem * self.shape.iter().product::<usize>() as u64
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphProgram {
    pub name: String,
    pub inputs: Vec<IoSlot>,
    pub outputs: Vec<IoSlot>,
    pub launches: Vec<Launch>,
}

/// The header: everything but the bulk sections, as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub wcc_version: String,
    pub model_name: String,
    pub target: TargetInfo,
    /// Hyper-parameters (`n_mels`, `n_audio_ctx`, ...).
    pub params: BTreeMap<String, i64>,
    /// Mel frames of the encoder's static input.
    pub timesteps: usize,
    pub n_mels: usize,
    /// Storage type of the weights section.
    pub weight_dtype: String,
    pub generation: GenerationConfig,
    pub alignment_heads: Vec<(usize, usize)>,
    pub arena_bytes: u64,
    /// How the arena splits: graph inputs/outputs (persistent), the shared region of
    /// temporaries, and what the temporaries would take unshared.
    pub arena_persistent_bytes: u64,
    pub arena_unshared_temporaries_bytes: u64,
    /// What the weights section holds.
    pub weights: Vec<WeightEntry>,
    pub kernels: Vec<KernelEntry>,
    pub graphs: Vec<GraphProgram>,
}

impl Header {
    pub fn graph(&self, name: &str) -> Option<&GraphProgram> {
        self.graphs.iter().find(|g| g.name == name)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
}

/// The bulk data of a `.wbin` besides its header.
pub struct Sections<'a> {
    pub code: &'a [u8],
    pub weights: &'a [u8],
    pub tokenizer: &'a [u8],
    /// `[n_mels, 201]` f32, little-endian.
    pub mel_filters: &'a [u8],
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// The bytes of a `.wbin` holding `header` and `s`.
pub fn to_bytes(header: &Header, s: &Sections) -> Vec<u8> {
    let header_json = serde_json::to_vec(header).expect("header serialises");
    let mut table = [Section::default(); 5];
    let mut pos = PRELUDE_LEN;
    let parts: [(&[u8], usize); 5] = [
        (&header_json, 8),
        (s.code, SECTION_ALIGN),
        (s.weights, WEIGHTS_ALIGN),
        (s.tokenizer, SECTION_ALIGN),
        (s.mel_filters, SECTION_ALIGN),
    ];
    for (i, (data, a)) in parts.iter().enumerate() {
        pos = align(pos, *a);
        table[i] = Section { offset: pos as u64, len: data.len() as u64 };
        pos += data.len();
    }
    let mut buf = vec![0u8; pos];
    buf[..8].copy_from_slice(&MAGIC);
    buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
    for (i, sec) in table.iter().enumerate() {
        let at = 16 + 16 * i;
        buf[at..at + 8].copy_from_slice(&sec.offset.to_le_bytes());
        buf[at + 8..at + 16].copy_from_slice(&sec.len.to_le_bytes());
    }
    for (sec, (data, _)) in table.iter().zip(parts) {
        buf[sec.offset as usize..sec.offset as usize + data.len()].copy_from_slice(data);
    }
    reseal(&mut buf);
    buf
}

/// Sets the declared file length and the CRC-32 of a `.wbin`'s bytes to match its content
/// (nothing if it is shorter than the prelude). The writer's last step; a test or a fuzzer
/// that edits a file's body uses it to get past the checksum to what it means to test.
pub fn reseal(buf: &mut [u8]) {
    if buf.len() < PRELUDE_LEN {
        return;
    }
    let n = buf.len() as u64;
    buf[96..104].copy_from_slice(&n.to_le_bytes());
    let crc = crc32fast::hash(&buf[16..]);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Writes a `.wbin` to `path` (through a temporary file in the same directory, renamed at
/// the end, so a failed write leaves nothing half-written behind).
pub fn write(path: &Path, header: &Header, s: &Sections) -> Result<u64, WbinError> {
    let io = |err| WbinError::Io { path: path.display().to_string(), err };
    let buf = to_bytes(header, s);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.partial", path.file_name().and_then(|n| n.to_str()).unwrap_or("out.wbin")));
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&buf).map_err(io)?;
    f.sync_all().ok();
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(buf.len() as u64)
}

/// The bytes of a `.wbin`: mapped from its file, or held in memory (a file read whole, a
/// fuzzer's input).
enum Backing {
    Map(Mmap),
    Bytes(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

/// A validated `.wbin`, memory-mapped or in memory.
pub struct WbinFile {
    map: Backing,
    pub header: Header,
    table: [Section; 5],
}

impl WbinFile {
    /// Maps and validates `path`: magic, version, section bounds, checksum, header.
    pub fn open(path: &Path) -> Result<WbinFile, WbinError> {
        let p = path.display().to_string();
        let bad = |msg: String| WbinError::Invalid { path: p.clone(), msg };
        let f = File::open(path).map_err(|err| WbinError::Io { path: p.clone(), err })?;
        // SAFETY: a read-only private map; wcc never writes to a .wbin it is running, and
        // every offset read from it is bounds-checked below before use.
        let map = unsafe { Mmap::map(&f) }.map_err(|err| WbinError::Io { path: p.clone(), err })?;
        Self::from_backing(Backing::Map(map)).map_err(bad)
    }

    /// Validates a `.wbin` held in memory, as [`WbinFile::open`] validates a file; `label`
    /// names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<WbinFile, WbinError> {
        Self::from_backing(Backing::Bytes(bytes)).map_err(|msg| WbinError::Invalid { path: label.to_string(), msg })
    }

    fn from_backing(map: Backing) -> Result<WbinFile, String> {
        let b = &map[..];
        if b.len() < 8 || b[..8] != MAGIC {
            return Err("not a .wbin file (bad magic number)".into());
        }
        if b.len() < PRELUDE_LEN {
            return Err(format!("truncated: {} bytes, shorter than the {PRELUDE_LEN}-byte prelude", b.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "format version {version}, but this wcc reads version {VERSION}: recompile the model with this wcc"
            ));
        }
        let declared = u64_at(96);
        if declared > b.len() as u64 {
            return Err(format!("truncated: {} of its {declared} bytes", b.len()));
        }
        let crc = crc32fast::hash(&b[16..]);
        if crc != u32_at(12) || declared != b.len() as u64 {
            return Err("checksum mismatch: the file is corrupt".into());
        }
        let mut table = [Section::default(); 5];
        for (i, sec) in table.iter_mut().enumerate() {
            *sec = Section { offset: u64_at(16 + 16 * i), len: u64_at(24 + 16 * i) };
            if sec.offset.checked_add(sec.len).is_none_or(|end| end > b.len() as u64) {
                return Err("corrupt section table".into());
            }
        }
        let h = table[0];
        let header: Header = serde_json::from_slice(&b[h.offset as usize..(h.offset + h.len) as usize])
            .map_err(|e| format!("corrupt header: {e}"))?;
        Ok(WbinFile { map, header, table })
    }

    fn section(&self, i: usize) -> &[u8] {
        let s = self.table[i];
        &self.map[s.offset as usize..(s.offset + s.len) as usize]
    }

    pub fn sections(&self) -> Sections<'_> {
        Sections {
            code: self.section(1),
            weights: self.section(2),
            tokenizer: self.section(3),
            mel_filters: self.section(4),
        }
    }

    pub fn file_len(&self) -> usize {
        self.map.len()
    }
}

/// The special tokens of a Whisper vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `<|startofprev|>`, which opens the previous window's text in a conditioned prompt.
    #[serde(default)]
    pub sot_prev: Option<u32>,
}

/// What a decoding strategy needs to know about the model's vocabulary and settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// A vocabulary as generation settings need it: token text ↔ id.
pub trait Vocabulary {
    fn token_id(&self, token: &str) -> Option<u32>;
    fn token(&self, id: u32) -> Option<String>;
}

impl SpecialTokens {
    /// Looks the special tokens up; `Err` names the first one missing.
    pub fn of(v: &dyn Vocabulary) -> Result<SpecialTokens, &'static str> {
        let get = |t: &'static str| v.token_id(t).ok_or(t);
        let no_timestamps = get("<|notimestamps|>")?;
        Ok(SpecialTokens {
            eot: get("<|endoftext|>")?,
            sot: get("<|startoftranscript|>")?,
            transcribe: get("<|transcribe|>")?,
            translate: get("<|translate|>")?,
            no_timestamps,
            timestamp_begin: no_timestamps + 1,
            no_speech: v.token_id("<|nospeech|>").or_else(|| v.token_id("<|nocaptions|>")),
            sot_prev: v.token_id("<|startofprev|>"),
        })
    }
}

impl GenerationConfig {
    /// Builds the generation settings from a vocabulary and the checkpoint's lists.
    /// `n_vocab` decides whether the model is multilingual (openai-whisper's rule: 51865 or
    /// more entries). `Err` names a special token the vocabulary lacks.
    pub fn new(
        v: &dyn Vocabulary,
        n_vocab: usize,
        max_text_ctx: usize,
        lang_ids: &[u32],
        suppress: Vec<u32>,
        suppress_begin: Vec<u32>,
    ) -> Result<GenerationConfig, &'static str> {
        let special = SpecialTokens::of(v)?;
        let languages = lang_ids
            .iter()
            .filter_map(|&id| {
                let t = v.token(id)?;
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
