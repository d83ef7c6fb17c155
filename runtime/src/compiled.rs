//! Running a compiled `.wbin`: its kernels placed in executable memory, its program driven
//! over one arena allocated at load time. Nothing is allocated per kernel or per token.

use std::path::Path;

use memmap2::{Mmap, MmapMut};

use crate::decode::Decoder;
use crate::tokenizer::WhisperTokenizer;
use crate::transcribe::WhisperModel;
use crate::wbin::{BufRef, Header, IoSlot, WbinError, WbinFile};

use crate::team::{run_alone, split_ranges, KernelFn, Launch, Team};

/// Below this much work per call a kernel runs on one thread: waking the others costs more.
const PARALLEL_MIN_FLOPS: u64 = 200_000;

struct PreparedGraph {
    launches: Vec<Launch>,
    inputs: Vec<IoSlot>,
    outputs: Vec<IoSlot>,
}

/// A loaded `.wbin`.
pub struct CompiledModel {
    file: WbinFile,
    // Kept alive: the kernels' machine code (read + execute, never writable).
    _code: Mmap,
    /// Anonymous memory: zeroed and page-aligned, its pages faulted in on first use, so a
    /// large arena costs nothing at load.
    arena: MmapMut,
    encoder: PreparedGraph,
    decoder: PreparedGraph,
    /// The other threads (none for one thread).
    team: Option<Team>,
    logits: IoSlot,
    /// Seconds and calls per kernel, when profiling.
    profile: Option<std::cell::RefCell<Vec<(f64, u64)>>>,
}

fn invalid(path: &Path, msg: impl Into<String>) -> WbinError {
    WbinError::Invalid { path: path.display().to_string(), msg: msg.into() }
}

impl CompiledModel {
    /// Loads `path` to run on `threads` threads.
    pub fn load(path: &Path, threads: usize) -> Result<CompiledModel, WbinError> {
        let file = WbinFile::open(path)?;
        let h = &file.header;
        check_host(h).map_err(|m| invalid(path, m))?;
        let s = file.sections();
        // Code: copied into fresh anonymous memory, then made read+execute (W^X: it is
        // never writable and executable at once).
        let mut code =
            MmapMut::map_anon(s.code.len().max(1)).map_err(|e| invalid(path, format!("code memory: {e}")))?;
        code[..s.code.len()].copy_from_slice(s.code);
        let code = code.make_exec().map_err(|e| invalid(path, format!("making code executable: {e}")))?;
        let mut fns = Vec::new();
        for k in &h.kernels {
            if k.offset.checked_add(k.len).is_none_or(|e| e > s.code.len() as u64) || k.len == 0 {
                return Err(invalid(path, format!("kernel {} lies outside the code section", k.name)));
            }
            // SAFETY: the bytes at this offset are the entry of a function compiled by wcc
            // with the KernelFn signature for this target, whose features the host has
            // (checked above). That the bytes are what wcc wrote is a matter of trust, as for
            // a shared library: the CRC catches accidents, not a forged file (FORMAT.md).
            fns.push(unsafe { std::mem::transmute::<*const u8, KernelFn>(code.as_ptr().add(k.offset as usize)) });
        }
        let arena_bytes = h.arena_bytes as usize;
        let mut arena =
            MmapMut::map_anon(arena_bytes.max(1)).map_err(|e| invalid(path, format!("arena memory: {e}")))?;
        let arena_ptr = arena.as_mut_ptr() as *mut u8;
        let weights_ptr = s.weights.as_ptr() as *mut u8;
        let prepare = |name: &str| -> Result<PreparedGraph, WbinError> {
            let g = h.graph(name).ok_or_else(|| invalid(path, format!("no `{name}` program")))?;
            let mut launches = Vec::new();
            for l in &g.launches {
                let entry =
                    h.kernels.get(l.kernel as usize).ok_or_else(|| invalid(path, "launch of a missing kernel"))?;
                if l.buffers.len() != entry.buffers.len() {
                    return Err(invalid(
                        path,
                        format!(
                            "kernel {} takes {} buffers, launched with {}",
                            entry.name,
                            entry.buffers.len(),
                            l.buffers.len()
                        ),
                    ));
                }
                if entry.kind != "cpu" {
                    return Err(invalid(
                        path,
                        format!("kernel {} is a `{}` kernel, not CPU code", entry.name, entry.kind),
                    ));
                }
                let mut ptrs = Vec::with_capacity(l.buffers.len());
                for (b, desc) in l.buffers.iter().zip(&entry.buffers) {
                    let elem = desc.elem_bytes().ok_or_else(|| {
                        invalid(
                            path,
                            format!("kernel {} buffer {}: unknown element type {}", entry.name, desc.name, desc.elem),
                        )
                    })?;
                    let need = desc.len.checked_mul(elem).unwrap_or(u64::MAX);
                    let (base, limit, offset, len) = match *b {
                        BufRef::Arena { offset, len } => (arena_ptr, arena_bytes as u64, offset, len),
                        BufRef::Weight { offset, len } => {
                            // The weights are mapped read-only: no kernel may write them.
                            if desc.access.writes() {
                                return Err(invalid(
                                    path,
                                    format!("kernel {} would write the weights (buffer {})", entry.name, desc.name),
                                ));
                            }
                            (weights_ptr, s.weights.len() as u64, offset, len)
                        }
                    };
                    if len < need || offset.checked_add(len).is_none_or(|e| e > limit) || offset % elem != 0 {
                        return Err(invalid(
                            path,
                            format!("buffer {} of kernel {} is out of bounds", desc.name, entry.name),
                        ));
                    }
                    // SAFETY: offset + len is inside the arena / weights section (checked).
                    ptrs.push(unsafe { base.add(offset as usize) });
                }
                let split = threads > 1 && entry.parallel_extent > 1 && entry.flops >= PARALLEL_MIN_FLOPS;
                launches.push(Launch {
                    kernel: l.kernel as usize,
                    f: fns[l.kernel as usize],
                    ptrs,
                    extent: entry.parallel_extent,
                    split,
                    ranges: if split { split_ranges(entry.parallel_extent, threads) } else { vec![] },
                });
            }
            for slot in g.inputs.iter().chain(&g.outputs) {
                if slot.offset.checked_add(slot.bytes()).is_none_or(|e| e > arena_bytes as u64) {
                    return Err(invalid(path, format!("`{}` lies outside the arena", slot.name)));
                }
            }
            Ok(PreparedGraph { launches, inputs: g.inputs.clone(), outputs: g.outputs.clone() })
        };
        let encoder = prepare("encoder")?;
        let decoder = prepare("decoder_step")?;
        let logits = decoder
            .outputs
            .iter()
            .find(|o| o.name == "logits")
            .cloned()
            .ok_or_else(|| invalid(path, "the decoder has no logits output"))?;
        let team = if threads > 1 {
            Some(Team::new(threads).map_err(|e| invalid(path, format!("starting {threads} threads: {e}")))?)
        } else {
            None
        };
        Ok(CompiledModel { file, _code: code, arena, encoder, decoder, team, logits, profile: None })
    }

    /// Starts timing every kernel launch (see [`CompiledModel::profile`]).
    pub fn enable_profiling(&mut self) {
        self.profile = Some(std::cell::RefCell::new(vec![(0.0, 0); self.file.header.kernels.len()]));
    }

    /// `(kernel name, seconds, calls)` per kernel, most time first.
    pub fn profile(&self) -> Vec<(String, f64, u64)> {
        let Some(p) = &self.profile else {
            return vec![];
        };
        let mut rows: Vec<(String, f64, u64)> = p
            .borrow()
            .iter()
            .zip(&self.file.header.kernels)
            .filter(|((_, n), _)| *n > 0)
            .map(|(&(t, n), k)| (k.name.clone(), t, n))
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        rows
    }

    pub fn header(&self) -> &Header {
        &self.file.header
    }

    pub fn tokenizer(&self) -> Result<WhisperTokenizer, crate::tokenizer::TokenizerError> {
        WhisperTokenizer::from_bytes(self.file.sections().tokenizer)
    }

    fn arena_bytes_mut(&mut self) -> &mut [u8] {
        let n = self.file.header.arena_bytes as usize;
        // SAFETY: `arena` holds at least `arena_bytes` initialised bytes (u8 has no invalid values).
        unsafe { std::slice::from_raw_parts_mut(self.arena.as_mut_ptr() as *mut u8, n) }
    }

    /// The encoder's f32 outputs after the last `encode`, by name (the audio features, or the
    /// cross-attention K/V hoisted into the encoder): what calibration and accuracy reports
    /// compare.
    pub fn encoder_outputs(&self) -> Vec<(String, Vec<f32>)> {
        self.outputs(&self.encoder)
    }

    /// The decoder step's f32 outputs after the last `step` (logits, caches, and what a
    /// calibration build observes).
    pub fn decoder_outputs(&self) -> Vec<(String, Vec<f32>)> {
        self.outputs(&self.decoder)
    }

    fn outputs(&self, g: &PreparedGraph) -> Vec<(String, Vec<f32>)> {
        // SAFETY: `arena` holds `arena_bytes` initialised bytes; u8 has no invalid values.
        let arena = unsafe {
            std::slice::from_raw_parts(self.arena.as_ptr() as *const u8, self.file.header.arena_bytes as usize)
        };
        g.outputs
            .iter()
            .filter(|o| o.dtype == "f32")
            .map(|o| {
                let b = &arena[o.offset as usize..(o.offset + o.bytes()) as usize];
                (o.name.clone(), b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            })
            .collect()
    }

    fn write_f32(&mut self, slot: &IoSlot, data: &[f32]) {
        let at = slot.offset as usize;
        let dst = &mut self.arena_bytes_mut()[at..at + 4 * data.len()];
        for (d, v) in dst.chunks_exact_mut(4).zip(data) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn run(&self, g: &PreparedGraph) {
        let mut profile = self.profile.as_ref().map(|p| p.borrow_mut());
        let profile = profile.as_deref_mut().map(|v| v.as_mut_slice());
        match &self.team {
            Some(team) => team.run(&g.launches, profile),
            None => run_alone(&g.launches, profile),
        }
    }
}

/// Refuses a file built for another architecture or for CPU features this host lacks.
fn check_host(h: &Header) -> Result<(), String> {
    let arch = std::env::consts::ARCH;
    if h.target.arch != arch {
        return Err(format!("compiled for {}, this machine is {arch}: recompile with --target host", h.target.arch));
    }
    let missing: Vec<&str> =
        h.target.features.iter().filter(|f| !wcc_targets::host_has(f)).map(|s| s.as_str()).collect();
    if !missing.is_empty() {
        return Err(format!(
            "compiled for CPU features this CPU lacks ({}): recompile with --target host",
            missing.join(", ")
        ));
    }
    Ok(())
}

impl WhisperModel for CompiledModel {
    fn input_shape(&self) -> (usize, usize) {
        (self.file.header.n_mels, self.file.header.timesteps)
    }

    /// The filter bank stored in the file.
    fn mel_filters(&self) -> Vec<f64> {
        self.file.sections().mel_filters.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn encode(&mut self, mel: &[f32]) -> Result<(), String> {
        let slot = self.encoder.inputs.first().cloned().ok_or("the encoder has no input")?;
        if slot.bytes() != 4 * mel.len() as u64 {
            return Err(format!("the encoder takes {:?} features, got {}", slot.shape, mel.len()));
        }
        self.write_f32(&slot, mel);
        // A new window: empty self-attention caches (every decoder input that is neither the
        // token, the position, nor an encoder output).
        let enc_out: Vec<String> = self.encoder.outputs.iter().map(|o| o.name.clone()).collect();
        let state: Vec<IoSlot> = self
            .decoder
            .inputs
            .iter()
            .filter(|i| i.name != "tokens" && i.name != "position" && !enc_out.contains(&i.name))
            .cloned()
            .collect();
        for s in state {
            let at = s.offset as usize;
            self.arena_bytes_mut()[at..at + s.bytes() as usize].fill(0);
        }
        self.run(&self.encoder);
        Ok(())
    }
}

impl Decoder for CompiledModel {
    fn step(&mut self, token: u32, position: usize) -> Result<&[f32], String> {
        // The kernels clamp what they index with (they never read outside a buffer), so a
        // token or position out of range would give a wrong answer, not an error: refuse it
        // here, as the interpreter does.
        let n_vocab = self.logits.bytes() / 4;
        if u64::from(token) >= n_vocab {
            return Err(format!("token {token} is outside the vocabulary (0..{n_vocab})"));
        }
        let n_ctx = self.file.header.generation.max_text_ctx;
        if position >= n_ctx {
            return Err(format!("position {position} is outside the text context (0..{n_ctx})"));
        }
        for i in 0..self.decoder.inputs.len() {
            let (name, at) = (self.decoder.inputs[i].name.clone(), self.decoder.inputs[i].offset as usize);
            let v = match name.as_str() {
                "tokens" => token as i32,
                "position" => position as i32,
                _ => continue,
            };
            self.arena_bytes_mut()[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        self.run(&self.decoder);
        // Caches not updated in place are copied back to their inputs.
        for o in 0..self.decoder.outputs.len() {
            let out = self.decoder.outputs[o].clone();
            if let Some(state) = out.name.strip_suffix(".next") {
                if let Some(inp) = self.decoder.inputs.iter().find(|i| i.name == state).cloned() {
                    if inp.offset != out.offset {
                        let (a, b, n) = (out.offset as usize, inp.offset as usize, out.bytes() as usize);
                        self.arena_bytes_mut().copy_within(a..a + n, b);
                    }
                }
            }
        }
        let (at, n) = (self.logits.offset as usize, self.logits.bytes() as usize / 4);
        // SAFETY: the logits slot is inside the arena (checked at load) and 4-byte aligned
        // (arena offsets are multiples of 64); f32 has no invalid bit patterns.
        Ok(unsafe { std::slice::from_raw_parts(self.arena.as_ptr().cast::<u8>().add(at).cast::<f32>(), n) })
    }
}
