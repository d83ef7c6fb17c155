//! Running a compiled `.wbin`: its kernels placed in executable memory, its program driven
//! over one arena allocated at load time. Nothing is allocated per kernel or per token.

use std::path::Path;

use memmap2::{Mmap, MmapMut};

use crate::cuda::{Cuda, DeviceBuffer, Function, Graph as CudaGraph, Module as CudaModule, Stream};
use crate::decode::{BeamDecoder, Decoder};
use crate::tokenizer::WhisperTokenizer;
use crate::transcribe::WhisperModel;
use crate::wbin::{BufRef, Header, IoSlot, WbinError, WbinFile};

use crate::team::{run_alone, split_ranges, KernelFn, Launch, Team};

/// The decoder output of a build with word timestamps: the alignment heads' cross-attention
/// scores `f32[heads, 1, frames]` (the frontend's `ALIGNMENT_OUTPUT`).
const ALIGNMENT_OUTPUT: &str = "alignment";

/// Below this much work per call a kernel runs on one thread: waking the others costs more.
const PARALLEL_MIN_FLOPS: u64 = 200_000;

/// The decoder step of a beam of `width` hypotheses (graph `decoder_beam{width}`, its own
/// inputs and outputs named `beam{width}.*`).
struct Beam {
    width: usize,
    graph: PreparedGraph,
    tokens: IoSlot,
    position: IoSlot,
    origin: IoSlot,
    logits: IoSlot,
}

/// The prompt block of `m` tokens (graph `decoder_prefill{m}`, its own inputs named
/// `prefill{m}.*`), writing into the plain step's caches.
struct Prefill {
    m: usize,
    graph: PreparedGraph,
    tokens: IoSlot,
    positions: IoSlot,
    position: IoSlot,
}

struct PreparedGraph {
    launches: Vec<Launch>,
    /// On a CUDA build, the launches instead: kernel index, function, grid, block, device
    /// pointers.
    gpu_launches: Vec<(usize, Function, u32, u32, Vec<u64>)>,
    /// On a CUDA build whose driver has graphs, the launches recorded as one (replayed per
    /// run: one submission instead of one per kernel).
    cuda_graph: Option<CudaGraph>,
    /// On a CUDA build, the outputs the host reads after a run (`(offset, bytes)` in the
    /// arena): every decoder output but the caches (`*.next`), which stay on the device.
    fetch: Vec<(usize, usize)>,
    inputs: Vec<IoSlot>,
    outputs: Vec<IoSlot>,
}

/// A `.wbin` built for a CUDA target: the driver, the module, and the device copies of the
/// arena (same offsets as the host's) and of the weights (copied once, at load).
struct Gpu {
    cuda: Cuda,
    /// The stream graphs are replayed on (`None`: a driver without graphs).
    stream: Option<Stream>,
    _module: CudaModule,
    arena: DeviceBuffer,
    _weights: DeviceBuffer,
    /// The host arena's base: outputs are downloaded there (see `CompiledModel::run`).
    host_arena: *mut u8,
}

/// Whether the file was built for a GPU (its kernels are PTX).
fn is_gpu(h: &Header) -> bool {
    h.target.arch == "nvptx64"
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
    /// The alignment heads, `(layer output, head)`, and each layer's cross-attention
    /// scores output, in builds with word timestamps.
    alignment: Vec<(usize, usize)>,
    alignment_outputs: Vec<IoSlot>,
    /// The decoder steps of beams, by width.
    beams: Vec<Beam>,
    /// The prompt blocks, by size, smallest first.
    prefills: Vec<Prefill>,
    /// The graphs that start a beam from the plain step's caches, by width, with their
    /// `source` input (all zeros: every hypothesis copies the one plain cache).
    beam_inits: Vec<(usize, PreparedGraph, IoSlot)>,
    /// Seconds and calls per kernel, when profiling.
    profile: Option<std::cell::RefCell<Vec<(f64, u64)>>>,
    /// A CUDA build's device state (`None` on the CPU).
    gpu: Option<Gpu>,
}

fn invalid(path: &Path, msg: impl Into<String>) -> WbinError {
    WbinError::Invalid { path: path.display().to_string(), msg: msg.into() }
}

impl CompiledModel {
    /// Loads `path` to run on `threads` threads.
    pub fn load(path: &Path, threads: usize) -> Result<CompiledModel, WbinError> {
        let file = WbinFile::open(path)?;
        let h = &file.header;
        let gpu_build = is_gpu(h);
        if !gpu_build {
            check_host(h).map_err(|m| invalid(path, m))?;
        }
        // Every check of the program against the file, before any code is made executable.
        let plan = plan(&file, threads).map_err(|m| invalid(path, m))?;
        let s = file.sections();
        let arena_bytes = h.arena_bytes as usize;
        let mut arena =
            MmapMut::map_anon(arena_bytes.max(1)).map_err(|e| invalid(path, format!("arena memory: {e}")))?;
        let arena_ptr = arena.as_mut_ptr();
        let gpu = if gpu_build { Some(open_gpu(h, &s, arena_ptr).map_err(|m| invalid(path, m))?) } else { None };
        // Code: copied into fresh anonymous memory, then made read+execute (W^X: it is
        // never writable and executable at once). A CUDA build's code is the PTX, which the
        // driver compiled above: nothing here is executable.
        let code_len = if gpu_build { 0 } else { s.code.len() };
        let mut code = MmapMut::map_anon(code_len.max(1)).map_err(|e| invalid(path, format!("code memory: {e}")))?;
        code[..code_len].copy_from_slice(&s.code[..code_len]);
        let code = code.make_exec().map_err(|e| invalid(path, format!("making code executable: {e}")))?;
        let fns: Vec<KernelFn> = if gpu_build {
            vec![]
        } else {
            h.kernels
                .iter()
                .map(|k| {
                    // SAFETY: the offset is inside the code section (checked by `plan`) and is
                    // the entry of a function compiled by wcc with the KernelFn signature for
                    // this target, whose features the host has (checked above). That the bytes
                    // are what wcc wrote is a matter of trust, as for a shared library: the CRC
                    // catches accidents, not a forged file (FORMAT.md).
                    unsafe { std::mem::transmute::<*const u8, KernelFn>(code.as_ptr().add(k.offset as usize)) }
                })
                .collect()
        };
        let gpu_fns: Vec<Function> = match &gpu {
            Some(g) => h
                .kernels
                .iter()
                .map(|k| {
                    let entry = k.gpu.as_ref().map(|d| d.entry.as_str()).unwrap_or_default();
                    g._module.function(entry).map_err(|e| invalid(path, format!("kernel {}: {e}", k.name)))
                })
                .collect::<Result<_, _>>()?,
            None => vec![],
        };
        // Never written through: `plan` refused any launch that writes the weights.
        let weights_ptr = s.weights.as_ptr() as *mut u8;
        let device_bases = gpu.as_ref().map(|g| (g.arena.ptr(), g._weights.ptr()));
        let prepare = |g: GraphPlan, decoder_side: bool| PreparedGraph {
            cuda_graph: None,
            gpu_launches: match device_bases {
                Some((arena_dev, weights_dev)) => g
                    .launches
                    .iter()
                    .map(|l| {
                        let d = h.kernels[l.kernel].gpu.as_ref().expect("checked by plan");
                        let ptrs = l
                            .args
                            .iter()
                            .map(|&(region, offset)| match region {
                                Region::Arena => arena_dev + offset as u64,
                                Region::Weights => weights_dev + offset as u64,
                            })
                            .collect();
                        (l.kernel, gpu_fns[l.kernel], d.grid, d.block, ptrs)
                    })
                    .collect(),
                None => vec![],
            },
            fetch: if decoder_side && gpu_build {
                g.outputs
                    .iter()
                    .filter(|o| !o.name.ends_with(".next"))
                    .map(|o| (o.offset as usize, o.bytes() as usize))
                    .collect()
            } else {
                vec![]
            },
            launches: if gpu_build {
                vec![]
            } else {
                g.launches
                    .into_iter()
                    .map(|l| Launch {
                        kernel: l.kernel,
                        f: fns[l.kernel],
                        ptrs: l
                            .args
                            .iter()
                            .map(|&(region, offset)| {
                                let base = match region {
                                    Region::Arena => arena_ptr,
                                    Region::Weights => weights_ptr,
                                };
                                // SAFETY: `plan` checked that the buffer lies inside its region.
                                unsafe { base.add(offset) }
                            })
                            .collect(),
                        extent: l.extent,
                        split: l.split,
                        ranges: l.ranges,
                    })
                    .collect()
            },
            inputs: g.inputs,
            outputs: g.outputs,
        };
        let (encoder, decoder, logits) = (prepare(plan.encoder, false), prepare(plan.decoder, true), plan.logits);
        let (alignment, alignment_outputs) = plan.alignment;
        let beams = plan
            .beams
            .into_iter()
            .map(|(width, g, [tokens, position, origin, logits])| Beam {
                width,
                graph: prepare(g, true),
                tokens,
                position,
                origin,
                logits,
            })
            .collect();
        let prefills = plan
            .prefills
            .into_iter()
            .map(|(m, g, [tokens, positions, position])| Prefill {
                m,
                graph: prepare(g, true),
                tokens,
                positions,
                position,
            })
            .collect();
        let beam_inits = plan.beam_inits.into_iter().map(|(n, g, source)| (n, prepare(g, true), source)).collect();
        let (mut encoder, mut decoder) = (encoder, decoder);
        let mut beams: Vec<Beam> = beams;
        let mut prefills: Vec<Prefill> = prefills;
        let mut beam_inits: Vec<(usize, PreparedGraph, IoSlot)> = beam_inits;
        if let Some(g) = &gpu {
            let graphs = [&mut encoder, &mut decoder]
                .into_iter()
                .chain(beams.iter_mut().map(|b| &mut b.graph))
                .chain(prefills.iter_mut().map(|p| &mut p.graph))
                .chain(beam_inits.iter_mut().map(|b| &mut b.1));
            for pg in graphs {
                pg.cuda_graph =
                    record_graph(g, pg).map_err(|e| invalid(path, format!("recording a CUDA graph: {e}")))?;
            }
        }
        let team = if threads > 1 && !gpu_build {
            Some(Team::new(threads).map_err(|e| invalid(path, format!("starting {threads} threads: {e}")))?)
        } else {
            None
        };
        Ok(CompiledModel {
            file,
            _code: code,
            arena,
            encoder,
            decoder,
            team,
            logits,
            alignment,
            alignment_outputs,
            beams,
            prefills,
            beam_inits,
            profile: None,
            gpu,
        })
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
                let range = o.offset as usize..(o.offset + o.bytes()) as usize;
                let mut bytes = arena[range.clone()].to_vec();
                if let Some(gpu) = &self.gpu {
                    // On the device the outputs are current; the host copy may not be.
                    if let Err(e) = gpu.arena.download(range.start, &mut bytes) {
                        eprintln!("warning: reading {} from the GPU: {e}", o.name);
                    }
                }
                (o.name.clone(), bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            })
            .collect()
    }

    /// Copies bytes `at..at + len` of the host arena to the device's (a CUDA build): what the
    /// host wrote there (tokens, positions, features, cleared caches).
    fn upload(&self, at: usize, len: usize) {
        if let Some(gpu) = &self.gpu {
            // SAFETY: the range lies inside the arena (the callers write it first, checked
            // slots), which holds `arena_bytes` initialised bytes.
            let bytes = unsafe { std::slice::from_raw_parts(self.arena.as_ptr().add(at), len) };
            if let Err(e) = gpu.arena.upload(at, bytes) {
                panic!("copying {len} bytes to the GPU: {e}");
            }
        }
    }

    fn write_f32(&mut self, slot: &IoSlot, data: &[f32]) {
        let at = slot.offset as usize;
        let dst = &mut self.arena_bytes_mut()[at..at + 4 * data.len()];
        for (d, v) in dst.chunks_exact_mut(4).zip(data) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        self.upload(at, 4 * data.len());
    }

    /// Zeroes bytes `at..at + len` of the arena (on the device too, for a CUDA build).
    fn clear(&mut self, at: usize, len: usize) {
        self.arena_bytes_mut()[at..at + len].fill(0);
        self.upload(at, len);
    }

    /// Writes `values` as little-endian i32 from byte `at` of the arena (a slot the loader
    /// checked to hold them).
    fn write_i32s(&mut self, at: usize, values: impl IntoIterator<Item = i32>) {
        let arena = self.arena_bytes_mut();
        let mut n = 0;
        for (k, v) in values.into_iter().enumerate() {
            arena[at + 4 * k..at + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
            n = k + 1;
        }
        self.upload(at, 4 * n);
    }

    fn run(&self, g: &PreparedGraph) {
        let mut profile = self.profile.as_ref().map(|p| p.borrow_mut());
        if let Some(gpu) = &self.gpu {
            let profile = profile.as_deref_mut().map(|v| v.as_mut_slice());
            return run_gpu(gpu, g, profile).unwrap_or_else(|e| panic!("running on the GPU: {e}"));
        }
        let profile = profile.as_deref_mut().map(|v| v.as_mut_slice());
        match &self.team {
            Some(team) => team.run(&g.launches, profile),
            None => run_alone(&g.launches, profile),
        }
    }
}

/// Opens the GPU of a CUDA build: the driver, the PTX module (compiled by the driver for
/// this device), the device arena (zeroed) and the weights, copied once.
fn open_gpu(h: &Header, s: &crate::wbin::Sections<'_>, host_arena: *mut u8) -> Result<Gpu, String> {
    let target = h.target.features.first().cloned().unwrap_or_default();
    let cuda = Cuda::open().map_err(|e| format!("built for a CUDA GPU ({target}), and {e}"))?;
    let (major, minor) = cuda.compute_capability();
    let want: u32 = target.trim_start_matches("sm_").parse().unwrap_or(0);
    if ((major * 10 + minor) as u32) < want {
        return Err(format!(
            "built for {target}; this GPU ({}) is sm_{major}{minor}: recompile with --target cuda-sm{major}{minor}",
            cuda.device_name()
        ));
    }
    let ptx = std::str::from_utf8(s.code).map_err(|_| "the PTX module is not text".to_string())?;
    let module = cuda.load_module(ptx).map_err(|e| e.to_string())?;
    let arena = cuda.alloc(h.arena_bytes as usize).map_err(|e| format!("the arena on the GPU: {e}"))?;
    let weights = cuda.alloc(s.weights.len()).map_err(|e| format!("the weights on the GPU: {e}"))?;
    weights.upload(0, s.weights).map_err(|e| format!("copying the weights to the GPU: {e}"))?;
    let stream = cuda.stream().map_err(|e| e.to_string())?;
    Ok(Gpu { cuda, stream, _module: module, arena, _weights: weights, host_arena })
}

/// Records a graph's launches as one CUDA graph, where the driver has them.
fn record_graph(gpu: &Gpu, g: &PreparedGraph) -> Result<Option<CudaGraph>, crate::cuda::CudaError> {
    let Some(stream) = &gpu.stream else { return Ok(None) };
    let graph = gpu.cuda.capture(stream, &mut |s| {
        for (_, f, grid, block, ptrs) in &g.gpu_launches {
            gpu.cuda.launch_on(Some(s), *f, *grid, *block, 0, ptrs)?;
        }
        Ok(())
    })?;
    Ok(Some(graph))
}

/// Launches a graph's kernels in order on the GPU (its recorded CUDA graph when there is
/// one), waits, and downloads the outputs the host reads into the host arena. When
/// profiling, each launch is made alone, waited for and timed.
fn run_gpu(gpu: &Gpu, g: &PreparedGraph, mut profile: Option<&mut [(f64, u64)]>) -> Result<(), crate::cuda::CudaError> {
    if let (None, Some(graph), Some(stream)) = (&profile, &g.cuda_graph, &gpu.stream) {
        graph.launch(stream)?;
        stream.synchronize()?;
        return fetch(gpu, g);
    }
    for (k, f, grid, block, ptrs) in &g.gpu_launches {
        let t0 = profile.as_ref().map(|_| std::time::Instant::now());
        gpu.cuda.launch(*f, *grid, *block, 0, ptrs)?;
        if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
            gpu.cuda.synchronize()?;
            p[*k].0 += t0.elapsed().as_secs_f64();
            p[*k].1 += 1;
        }
    }
    gpu.cuda.synchronize()?;
    fetch(gpu, g)
}

/// Downloads the outputs of `g` the host reads into the host arena.
fn fetch(gpu: &Gpu, g: &PreparedGraph) -> Result<(), crate::cuda::CudaError> {
    for &(at, len) in &g.fetch {
        // SAFETY: `plan` checked every output slot lies inside the arena. As with the CPU
        // kernels, which write the arena through pointers taken at load, no Rust reference to
        // these bytes is alive during a run (the logits a step returns borrow the model
        // mutably, so they end before the next run).
        let out = unsafe { std::slice::from_raw_parts_mut(gpu.host_arena.add(at), len) };
        gpu.arena.download(at, out)?;
    }
    Ok(())
}

/// Which memory a kernel argument points into.
#[derive(Clone, Copy)]
enum Region {
    Arena,
    Weights,
}

struct LaunchPlan {
    kernel: usize,
    /// Each buffer argument: its region and byte offset there (checked in bounds).
    args: Vec<(Region, usize)>,
    extent: u64,
    split: bool,
    ranges: Vec<(u64, u64)>,
}

struct GraphPlan {
    launches: Vec<LaunchPlan>,
    inputs: Vec<IoSlot>,
    outputs: Vec<IoSlot>,
}

struct Plan {
    encoder: GraphPlan,
    decoder: GraphPlan,
    logits: IoSlot,
    /// The alignment heads as `(index into the outputs, head)`, and the outputs.
    alignment: (Vec<(usize, usize)>, Vec<IoSlot>),
    /// Per beam width: its step and its tokens, position, origin and logits slots.
    beams: Vec<(usize, GraphPlan, [IoSlot; 4])>,
    /// Per prompt block size: its graph and its tokens, positions and position slots.
    prefills: Vec<(usize, GraphPlan, [IoSlot; 3])>,
    /// Per beam width: the graph that starts the beam from the plain step's caches, and its
    /// `source` slot.
    beam_inits: Vec<(usize, GraphPlan, IoSlot)>,
}

/// Checks a `.wbin`'s program against its own sections, as [`CompiledModel::load`] does
/// before it makes any code executable; `Err` says what is wrong. Nothing here runs code:
/// this is the whole of what a forged or damaged header can reach (it is what the `wbin`
/// fuzz target drives).
pub fn check_program(file: &WbinFile) -> Result<(), String> {
    plan(file, 2).map(|_| ())
}

/// The byte length of a slot of `dtype` and `shape`, or `None` if the type is unknown or
/// the size overflows.
fn slot_bytes(slot: &IoSlot) -> Option<u64> {
    let elem: u64 = match slot.dtype.as_str() {
        "i8" | "u8" => 1,
        "f32" | "i32" => 4,
        _ => return None,
    };
    slot.shape.iter().try_fold(elem, |n, &d| n.checked_mul(d as u64))
}

/// Every check of the program: each kernel inside the code section and CPU code; each launch
/// naming an existing kernel with as many buffers as it takes, each buffer of a known
/// element type, aligned to it, large enough and inside the arena or the weights, and no
/// kernel writing the weights; each graph input and output of a known type, aligned and
/// inside the arena; the inputs the runtime writes and the outputs it reads of the types and
/// sizes it uses them as; the mel filter bank of the size the features need.
fn plan(file: &WbinFile, threads: usize) -> Result<Plan, String> {
    let h = &file.header;
    let s = file.sections();
    for k in &h.kernels {
        if k.offset.checked_add(k.len).is_none_or(|e| e > s.code.len() as u64) || k.len == 0 {
            return Err(format!("kernel {} lies outside the code section", k.name));
        }
        let want = if is_gpu(h) { "ptx" } else { "cpu" };
        if k.kind != want {
            return Err(format!("kernel {} is a `{}` kernel in a file of `{want}` kernels", k.name, k.kind));
        }
        if want == "ptx" {
            match &k.gpu {
                Some(g) if g.grid >= 1 && (1..=1024).contains(&g.block) && !g.entry.is_empty() => {}
                _ => return Err(format!("kernel {} has no valid GPU launch shape", k.name)),
            }
        }
    }
    let arena_bytes = h.arena_bytes;
    let graph = |name: &str| -> Result<GraphPlan, String> {
        let g = h.graph(name).ok_or_else(|| format!("no `{name}` program"))?;
        let mut launches = Vec::new();
        for l in &g.launches {
            let entry = h.kernels.get(l.kernel as usize).ok_or_else(|| {
                format!("`{name}` launches kernel {}, but the file has {}", l.kernel, h.kernels.len())
            })?;
            if l.buffers.len() != entry.buffers.len() {
                return Err(format!(
                    "kernel {} takes {} buffers, launched with {}",
                    entry.name,
                    entry.buffers.len(),
                    l.buffers.len()
                ));
            }
            let mut args = Vec::with_capacity(l.buffers.len());
            for (b, desc) in l.buffers.iter().zip(&entry.buffers) {
                let elem = desc.elem_bytes().ok_or_else(|| {
                    format!("kernel {} buffer {}: unknown element type {}", entry.name, desc.name, desc.elem)
                })?;
                let need = desc.len.checked_mul(elem).unwrap_or(u64::MAX);
                let (region, limit, offset, len) = match *b {
                    BufRef::Arena { offset, len } => (Region::Arena, arena_bytes, offset, len),
                    BufRef::Weight { offset, len } => {
                        // The weights are mapped read-only: no kernel may write them.
                        if desc.access.writes() {
                            return Err(format!(
                                "kernel {} would write the weights (buffer {})",
                                entry.name, desc.name
                            ));
                        }
                        (Region::Weights, s.weights.len() as u64, offset, len)
                    }
                };
                if len < need || offset.checked_add(len).is_none_or(|e| e > limit) || offset % elem != 0 {
                    return Err(format!("buffer {} of kernel {} is out of bounds", desc.name, entry.name));
                }
                // The PTX emitter's vector accesses assume every buffer starts 16-byte aligned.
                if is_gpu(h) && offset % 16 != 0 {
                    return Err(format!("buffer {} of kernel {} is not 16-byte aligned", desc.name, entry.name));
                }
                args.push((region, offset as usize));
            }
            let split = threads > 1 && entry.parallel_extent > 1 && entry.flops >= PARALLEL_MIN_FLOPS;
            launches.push(LaunchPlan {
                kernel: l.kernel as usize,
                args,
                extent: entry.parallel_extent,
                split,
                ranges: if split { split_ranges(entry.parallel_extent, threads) } else { vec![] },
            });
        }
        for slot in g.inputs.iter().chain(&g.outputs) {
            let bytes = slot_bytes(slot).ok_or_else(|| {
                format!("`{}` of `{name}` has an unknown type {} or an oversized shape", slot.name, slot.dtype)
            })?;
            let align = if matches!(slot.dtype.as_str(), "i8" | "u8") { 1 } else { 4 };
            if slot.offset.checked_add(bytes).is_none_or(|e| e > arena_bytes) {
                return Err(format!("`{}` lies outside the arena", slot.name));
            }
            if slot.offset % align != 0 {
                return Err(format!("`{}` is misaligned for {}", slot.name, slot.dtype));
            }
        }
        // A cache copied back to its input after a step (an output `X.next` placed apart from
        // `X`) must not overlap it: the device's copy refuses overlapping ranges.
        for out in &g.outputs {
            let Some(state) = out.name.strip_suffix(".next") else { continue };
            if let Some(inp) = g.inputs.iter().find(|i| i.name == state) {
                let (a, b, n) = (out.offset, inp.offset, out.bytes());
                if a != b && a.abs_diff(b) < n {
                    return Err(format!("`{}` overlaps `{}` in the arena", out.name, inp.name));
                }
            }
        }
        Ok(GraphPlan { launches, inputs: g.inputs.clone(), outputs: g.outputs.clone() })
    };
    let encoder = graph("encoder")?;
    let decoder = graph("decoder_step")?;
    if h.n_mels == 0 || h.timesteps < 2 || !h.timesteps.is_multiple_of(2) {
        return Err(format!("{} mel bins of {} frames is no encoder input", h.n_mels, h.timesteps));
    }
    let features = h.n_mels.checked_mul(h.timesteps).and_then(|n| n.checked_mul(4));
    match encoder.inputs.first() {
        Some(i) if i.dtype == "f32" && features == slot_bytes(i).map(|b| b as usize) => {}
        _ => return Err(format!("the encoder's input is not the {} x {} f32 features", h.n_mels, h.timesteps)),
    }
    if Some(s.mel_filters.len()) != h.n_mels.checked_mul(8 * (crate::N_FFT / 2 + 1)) {
        return Err(format!("the mel filter bank is not {} x {} f64", h.n_mels, crate::N_FFT / 2 + 1));
    }
    for i in &decoder.inputs {
        if matches!(i.name.as_str(), "tokens" | "position") && (i.dtype != "i32" || slot_bytes(i) != Some(4)) {
            return Err(format!("the decoder's `{}` input is not one i32", i.name));
        }
    }
    states_fit(&decoder)?;
    let logits =
        decoder.outputs.iter().find(|o| o.name == "logits").cloned().ok_or("the decoder has no logits output")?;
    if logits.dtype != "f32" {
        return Err("the decoder's logits are not f32".into());
    }
    // Every token id the decoding loop indexes the logits with is a row of them.
    let n_vocab = slot_bytes(&logits).unwrap_or(0) / 4;
    let gen = &h.generation;
    let sp = &gen.special;
    let ids = [sp.eot, sp.sot, sp.transcribe, sp.translate, sp.no_timestamps, sp.timestamp_begin]
        .into_iter()
        .chain(sp.no_speech)
        .chain(sp.sot_prev)
        .chain(gen.languages.iter().map(|l| l.1))
        .chain(gen.suppress.iter().copied())
        .chain(gen.suppress_begin.iter().copied());
    for id in ids {
        if u64::from(id) >= n_vocab {
            return Err(format!("token {id} of the generation settings is outside the {n_vocab} logits"));
        }
    }
    if gen.max_text_ctx == 0 {
        return Err("the decoder's context is empty".into());
    }
    let alignment = alignment_plan(h, &decoder.outputs)?;
    let mut beams = Vec::new();
    for g in &h.graphs {
        let Some(width) = g.name.strip_prefix("decoder_beam") else { continue };
        let width: usize = match width.parse() {
            Ok(w) if w > 1 && w <= 64 => w,
            _ => return Err(format!("`{}` is no beam width (2 to 64)", g.name)),
        };
        let plan = graph(&g.name)?;
        let slot = |list: &[IoSlot], what: &str, dtype: &str, len: u64| {
            io_slot(&g.name, list, &format!("beam{width}.{what}"), dtype, len)
        };
        let w = width as u64;
        let tokens = slot(&plan.inputs, "tokens", "i32", w)?;
        let position = slot(&plan.inputs, "position", "i32", 1)?;
        let origin = slot(&plan.inputs, "origin", "i32", w)?;
        let logits = slot(&plan.outputs, "logits", "f32", w * n_vocab)?;
        states_fit(&plan)?;
        beams.push((width, plan, [tokens, position, origin, logits]));
    }
    let n_ctx = gen.max_text_ctx as u64;
    let mut prefills = Vec::new();
    let mut beam_inits = Vec::new();
    for g in &h.graphs {
        if let Some(m) = g.name.strip_prefix("decoder_prefill") {
            let m: u64 = match m.parse() {
                Ok(m) if m >= 1 && m <= n_ctx => m,
                _ => return Err(format!("`{}` is no prompt block (1 to {n_ctx} tokens)", g.name)),
            };
            let plan = graph(&g.name)?;
            let slot = |what: &str, len: u64| io_slot(&g.name, &plan.inputs, &format!("prefill{m}.{what}"), "i32", len);
            let io = [slot("tokens", m)?, slot("positions", m)?, slot("position", 1)?];
            states_fit(&plan)?;
            prefills.push((m as usize, plan, io));
        } else if let Some(n) = g.name.strip_prefix("beam_init") {
            let n: usize = match n.parse() {
                Ok(n) if beams.iter().any(|b| b.0 == n) => n,
                _ => return Err(format!("`{}` starts no beam this file has", g.name)),
            };
            let plan = graph(&g.name)?;
            let source = io_slot(&g.name, &plan.inputs, &format!("beam_init{n}.source"), "i32", n as u64)?;
            beam_inits.push((n, plan, source));
        }
    }
    prefills.sort_by_key(|p| p.0);
    Ok(Plan { encoder, decoder, logits, alignment, beams, prefills, beam_inits })
}

/// The slot `name` of `list` (graph `graph`'s inputs or outputs), which the runtime writes or
/// reads as `len` elements of `dtype` (4 bytes each: i32 or f32).
fn io_slot(graph: &str, list: &[IoSlot], name: &str, dtype: &str, len: u64) -> Result<IoSlot, String> {
    match list.iter().find(|s| s.name == name) {
        Some(s) if s.dtype == dtype && slot_bytes(s) == Some(4 * len) => Ok(s.clone()),
        _ => Err(format!("`{graph}` has no {dtype}[{len}] `{name}`")),
    }
}

/// Each output `X.next` of a graph is as large as its input `X`.
fn states_fit(plan: &GraphPlan) -> Result<(), String> {
    for o in &plan.outputs {
        if let Some(state) = o.name.strip_suffix(".next") {
            if let Some(i) = plan.inputs.iter().find(|i| i.name == state) {
                if slot_bytes(i) != slot_bytes(o) {
                    return Err(format!("`{}` and `{state}` differ in size", o.name));
                }
            }
        }
    }
    Ok(())
}

/// The alignment heads of a build with word timestamps: each decoder output
/// `alignment.{layer}` holds a layer's cross-attention scores `f32[heads, 1, frames]`; the
/// heads are the header's list, or every head of those layers if the list is empty (the
/// frontend's rule). `(index into the returned outputs, head)` per alignment head.
fn alignment_plan(h: &Header, outputs: &[IoSlot]) -> Result<(Vec<(usize, usize)>, Vec<IoSlot>), String> {
    let mut slots = Vec::new();
    let mut layers = Vec::new();
    for o in outputs {
        let Some(l) = o.name.strip_prefix(ALIGNMENT_OUTPUT).and_then(|r| r.strip_prefix('.')) else { continue };
        let l: usize = l.parse().map_err(|_| format!("decoder output `{}` names no layer", o.name))?;
        if o.dtype != "f32" || o.shape.len() != 3 || o.shape[1] != 1 || o.shape[0] == 0 || o.shape[2] == 0 {
            return Err(format!("the decoder's `{}` is not f32 [heads, 1, frames]", o.name));
        }
        if slots.first().is_some_and(|s: &IoSlot| s.shape[2] != o.shape[2]) {
            return Err(format!("the decoder's `{}` disagrees with the others on the frames", o.name));
        }
        layers.push(l);
        slots.push(o.clone());
    }
    let mut heads = Vec::new();
    if h.alignment_heads.is_empty() {
        for (i, s) in slots.iter().enumerate() {
            heads.extend((0..s.shape[0]).map(|hd| (i, hd)));
        }
    } else if !slots.is_empty() {
        for &(l, hd) in &h.alignment_heads {
            let i = layers
                .iter()
                .position(|&x| x == l)
                .ok_or_else(|| format!("alignment head ({l}, {hd}) has no output"))?;
            if hd >= slots[i].shape[0] {
                return Err(format!("alignment head ({l}, {hd}) is outside its layer's {} heads", slots[i].shape[0]));
            }
            heads.push((i, hd));
        }
    }
    Ok((heads, slots))
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

    fn alignment(&self, out: &mut Vec<f32>) -> Option<(usize, usize)> {
        let frames = self.alignment_outputs.first()?.shape[2];
        for &(i, head) in &self.alignment {
            let s = &self.alignment_outputs[i];
            let at = s.offset as usize + head * frames * 4;
            // SAFETY: the slot is inside the arena, f32 and 4-byte aligned, and `head` is
            // below its head count (checked by `plan`); f32 has no invalid bit patterns.
            let row = unsafe { std::slice::from_raw_parts(self.arena.as_ptr().add(at).cast::<f32>(), frames) };
            out.extend_from_slice(row);
        }
        Some((self.alignment.len(), frames))
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
            self.clear(s.offset as usize, s.bytes() as usize);
        }
        self.run(&self.encoder);
        Ok(())
    }
}

/// The caches a step did not update in place: `(output offset, input offset, bytes)` of
/// each output `X.next` whose input `X` lies elsewhere (a build places them in place; this
/// is what a plan that could not would need).
fn state_copies(g: &PreparedGraph) -> Vec<(usize, usize, usize)> {
    g.outputs
        .iter()
        .filter_map(|out| {
            let state = out.name.strip_suffix(".next")?;
            let inp = g.inputs.iter().find(|i| i.name == state)?;
            (inp.offset != out.offset).then(|| (out.offset as usize, inp.offset as usize, out.bytes() as usize))
        })
        .collect()
}

impl CompiledModel {
    /// Copies each cache of `copies` ([`state_copies`]) back to its input.
    fn copy_states(&mut self, copies: &[(usize, usize, usize)]) {
        for &(a, b, len) in copies {
            self.arena_bytes_mut().copy_within(a..a + len, b);
            if let Some(gpu) = &self.gpu {
                if let Err(e) = gpu.arena.copy_within(a, b, len) {
                    panic!("copying a cache on the GPU: {e}");
                }
            }
        }
    }
}

impl BeamDecoder for CompiledModel {
    fn beam_widths(&self) -> Vec<usize> {
        self.beams.iter().map(|b| b.width).collect()
    }

    /// With a `beam_init{width}` graph: the prompt goes through the plain step's caches
    /// ([`Decoder::prefill`], in blocks where the build has them), which that graph then
    /// copies to every hypothesis. Else one beam step per token.
    fn beam_prefill(&mut self, width: usize, prompt: &[u32]) -> Result<(), String> {
        let Some(i) = self.beam_inits.iter().position(|b| b.0 == width) else {
            return crate::decode::beam_prefill_by_steps(self, width, prompt);
        };
        if prompt.is_empty() {
            return Ok(());
        }
        self.prefill(prompt, 0)?;
        let (at, len) = (self.beam_inits[i].2.offset as usize, self.beam_inits[i].2.bytes() as usize);
        self.clear(at, len);
        self.run(&self.beam_inits[i].1);
        Ok(())
    }

    fn beam_step(&mut self, tokens: &[u32], origin: &[u32], position: usize) -> Result<&[f32], String> {
        let n = tokens.len();
        let i = self.beams.iter().position(|b| b.width == n).ok_or_else(|| {
            format!("this build has no beam of {n}; it has {:?} (compile with --beam-sizes)", self.beam_widths())
        })?;
        let n_vocab = self.logits.bytes() / 4;
        if let Some(t) = tokens.iter().find(|&&t| u64::from(t) >= n_vocab) {
            return Err(format!("token {t} is outside the vocabulary (0..{n_vocab})"));
        }
        if origin.len() != n || origin.iter().any(|&o| o as usize >= n) {
            return Err(format!("beam origins {origin:?} are not hypotheses of a beam of {n}"));
        }
        let n_ctx = self.file.header.generation.max_text_ctx;
        if position >= n_ctx {
            return Err(format!("position {position} is outside the text context (0..{n_ctx})"));
        }
        let (t_at, p_at, o_at) = {
            let b = &self.beams[i];
            (b.tokens.offset as usize, b.position.offset as usize, b.origin.offset as usize)
        };
        self.write_i32s(t_at, tokens.iter().map(|&t| t as i32));
        self.write_i32s(o_at, origin.iter().map(|&o| o as i32));
        self.write_i32s(p_at, [position as i32]);
        self.run(&self.beams[i].graph);
        let copies = state_copies(&self.beams[i].graph);
        self.copy_states(&copies);
        let logits = &self.beams[i].logits;
        let (at, len) = (logits.offset as usize, logits.bytes() as usize / 4);
        // SAFETY: the logits slot is inside the arena (checked at load) and 4-byte aligned
        // (arena offsets are multiples of 64); f32 has no invalid bit patterns.
        Ok(unsafe { std::slice::from_raw_parts(self.arena.as_ptr().cast::<u8>().add(at).cast::<f32>(), len) })
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
            self.write_i32s(at, [v]);
        }
        self.run(&self.decoder);
        let copies = state_copies(&self.decoder);
        self.copy_states(&copies);
        let (at, n) = (self.logits.offset as usize, self.logits.bytes() as usize / 4);
        // SAFETY: the logits slot is inside the arena (checked at load) and 4-byte aligned
        // (arena offsets are multiples of 64); f32 has no invalid bit patterns.
        Ok(unsafe { std::slice::from_raw_parts(self.arena.as_ptr().cast::<u8>().add(at).cast::<f32>(), n) })
    }

    /// Feeds the tokens in prompt blocks: the largest block that the tokens left fill, and
    /// the rest in the smallest block, padded with repeats of the last token. The padding
    /// rows land in cache rows after the prompt, which every later step overwrites before
    /// any step reads them. Without blocks, or where a padded block would run past the
    /// context, one step per token.
    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<(), String> {
        let n_vocab = self.logits.bytes() / 4;
        if let Some(t) = tokens.iter().find(|&&t| u64::from(t) >= n_vocab) {
            return Err(format!("token {t} is outside the vocabulary (0..{n_vocab})"));
        }
        let n_ctx = self.file.header.generation.max_text_ctx;
        if start + tokens.len() > n_ctx {
            return Err(format!(
                "a prompt to position {} is outside the text context (0..{n_ctx})",
                start + tokens.len()
            ));
        }
        let mut done = 0;
        while done < tokens.len() {
            let left = tokens.len() - done;
            let at = start + done;
            let block = self.prefills.iter().rev().position(|p| p.m <= left).map(|i| self.prefills.len() - 1 - i);
            let block = block.or_else(|| (!self.prefills.is_empty() && at + self.prefills[0].m <= n_ctx).then_some(0));
            let Some(i) = block else {
                for (k, &t) in tokens[done..].iter().enumerate() {
                    self.step(t, at + k)?;
                }
                return Ok(());
            };
            let m = self.prefills[i].m;
            let (t_at, ps_at, p_at) = {
                let p = &self.prefills[i];
                (p.tokens.offset as usize, p.positions.offset as usize, p.position.offset as usize)
            };
            let last = tokens[tokens.len() - 1];
            self.write_i32s(t_at, (0..m).map(|k| tokens.get(done + k).copied().unwrap_or(last) as i32));
            self.write_i32s(ps_at, (0..m).map(|k| (at + k) as i32));
            self.write_i32s(p_at, [at as i32]);
            self.run(&self.prefills[i].graph);
            let copies = state_copies(&self.prefills[i].graph);
            self.copy_states(&copies);
            done += m.min(left);
        }
        Ok(())
    }
}
