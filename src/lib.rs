//! The `wcc` driver: glue between the compiler crates and the runtime, used by the CLI and
//! the end-to-end tests. The CLI itself (`main.rs`) only parses flags and calls in here.

pub mod bench;
pub mod interpret;
pub mod output;
pub mod quantize_report;

use std::path::Path;

use anyhow::{Context, Result};
use wcc_frontend::lower::LowerOptions;
use wcc_frontend::LoadedModel;

/// Resolves `--model` (a directory or a name) and lowers the checkpoint.
pub fn load_model(model: &str) -> Result<LoadedModel> {
    load_model_with(model, &LowerOptions::default())
}

/// [`load_model`] with lowering options (word timestamps' alignment output).
pub fn load_model_with(model: &str, opts: &LowerOptions) -> Result<LoadedModel> {
    let dir = wcc_frontend::resolve_model(model)?;
    Ok(wcc_frontend::load_with(&dir, opts)?)
}

/// The checkpoint's tokenizer and generation settings.
pub fn tokenizer_and_generation(
    loaded: &LoadedModel,
) -> Result<(wcc_runtime::tokenizer::WhisperTokenizer, wcc_format::GenerationConfig)> {
    let tokenizer = wcc_runtime::tokenizer::WhisperTokenizer::from_bytes(&loaded.checkpoint.tokenizer_json()?)?;
    Ok((tokenizer, loaded.generation()?))
}

/// Reads an audio file as 16 kHz mono samples.
pub fn load_audio(path: &Path) -> Result<Vec<f32>> {
    Ok(wcc_runtime::audio::load_audio(path)?)
}

/// The tokens of an initial prompt, encoded as openai-whisper does (`" " + text.trim()`).
pub fn prompt_tokens(tokenizer: &wcc_runtime::tokenizer::WhisperTokenizer, text: Option<&str>) -> Result<Vec<u32>> {
    match text.map(str::trim) {
        None | Some("") => Ok(vec![]),
        Some(t) => Ok(tokenizer.encode(&format!(" {t}"))?),
    }
}

/// Lowers `model`, runs `passes`, and returns the module.
pub fn module_after(model: &str, passes: &[&str], options: &wcc_passes::PassOptions) -> Result<wcc_ir::Module> {
    let loaded = load_model(model)?;
    run_passes(loaded.module, passes, options, &Dumps::default())
}

/// `--timesteps`: a number of mel frames, or `auto` (decided per clip).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timesteps {
    Frames(usize),
    Auto,
}

impl std::str::FromStr for Timesteps {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(Timesteps::Auto);
        }
        let n: usize = s.parse().map_err(|_| format!("`{s}` is neither a number of mel frames nor `auto`"))?;
        wcc_passes::check_timesteps(n, wcc_passes::MAX_TIMESTEPS)?;
        Ok(Timesteps::Frames(n))
    }
}

impl Timesteps {
    /// The pass options for a clip of `samples` (16 kHz) samples, if known.
    pub fn options(self, samples: Option<usize>) -> Result<wcc_passes::PassOptions> {
        let timesteps = match (self, samples) {
            (Timesteps::Frames(n), _) => Some(n),
            (Timesteps::Auto, Some(s)) => Some(wcc_passes::auto_timesteps(s)),
            (Timesteps::Auto, None) => {
                anyhow::bail!(
                    "--timesteps auto needs the clip: give a number of frames, or use it with `wcc transcribe`"
                )
            }
        };
        Ok(wcc_passes::PassOptions { timesteps, ..Default::default() })
    }
}

/// Where to show the module between passes (`--dump-ir`, `--dump-dir`).
#[derive(Default)]
pub struct Dumps {
    /// Pass names (or `frontend`, or `all`) after which to print the module on stdout.
    pub print_after: Vec<String>,
    /// Directory to write `NN-pass.ir` and `NN-pass.dot` into, for every pass.
    pub dir: Option<std::path::PathBuf>,
    /// Directory to write each kernel's text form into (`NNN-name.kir`).
    pub kernels: Option<std::path::PathBuf>,
}

impl Dumps {
    fn wanted(&self, pass: &str) -> bool {
        self.print_after.iter().any(|p| p == "all" || p == pass)
    }

    fn emit(&self, index: usize, pass: &str, m: &wcc_ir::Module) -> std::io::Result<()> {
        if self.wanted(pass) {
            println!("# after {pass}");
            print!("{}", wcc_ir::print_module(m));
        }
        if let Some(dir) = &self.dir {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{index:02}-{pass}.ir")), wcc_ir::print_module(m))?;
            std::fs::write(dir.join(format!("{index:02}-{pass}.dot")), wcc_ir::module_to_dot(m))?;
        }
        Ok(())
    }
}

/// Runs `passes` over the frontend's module, dumping as asked.
pub fn run_passes(
    module: wcc_ir::Module,
    passes: &[&str],
    options: &wcc_passes::PassOptions,
    dumps: &Dumps,
) -> Result<wcc_ir::Module> {
    for p in &dumps.print_after {
        if p != "all" && p != "frontend" && !passes.contains(&p.as_str()) {
            anyhow::bail!("--dump-ir {p}: not a pass of this pipeline ({})", passes.join(", "));
        }
    }
    dumps.emit(0, "frontend", &module).context("writing IR dumps")?;
    let mut io_err = None;
    let m = wcc_passes::run_observed(module, passes, options, &mut |i, name, m| {
        if let Err(e) = dumps.emit(i, name, m) {
            io_err = Some(e);
        }
        Ok(())
    })?;
    if let Some(e) = io_err {
        return Err(e).context("writing IR dumps");
    }
    Ok(m)
}

/// Calibrates `--int8-static`: compiles `model` in observe mode (the `quantize` pass outputs
/// the row scales of every activation it would quantize), transcribes the first window of
/// each `.wav` in `dirs` (at most `clips` from each) greedily, and returns each activation's largest
/// scale seen, by value name: the static scale that covers every row observed.
pub fn calibrate(
    model: &str,
    options: &wcc_passes::PassOptions,
    dirs: &[std::path::PathBuf],
    clips: usize,
    threads: usize,
) -> Result<std::collections::BTreeMap<String, f32>> {
    use wcc_runtime::decode::{self, Decoder};
    use wcc_runtime::transcribe::WhisperModel;

    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let wbin = tmp.path().join("calibrate.wbin");
    let observe =
        wcc_passes::PassOptions { int8: true, scales: wcc_passes::ActivationScales::Observe, ..options.clone() };
    compile(
        model,
        &LowerOptions::default(),
        "host",
        &wcc_passes::default_pipeline(),
        &observe,
        &Dumps::default(),
        &wbin,
        &|_, _| {},
    )?;
    let mut m = wcc_runtime::compiled::CompiledModel::load(&wbin, threads)?;
    let (n_mels, frames) = m.input_shape();
    let audio = quantize_report::calibration_clips(dirs, n_mels, frames, clips)?;
    let mut max = std::collections::BTreeMap::new();
    let mut seen = |outputs: Vec<(String, Vec<f32>)>| {
        for (name, v) in outputs {
            if let Some(x) = name.strip_suffix(".scale") {
                let m = v.iter().copied().fold(0f32, f32::max);
                let e = max.entry(x.to_string()).or_insert(0f32);
                *e = e.max(m);
            }
        }
    };
    /// Observes the decoder's outputs after every step.
    struct Observed<'a, F: FnMut(Vec<(String, Vec<f32>)>)> {
        m: &'a mut wcc_runtime::compiled::CompiledModel,
        seen: &'a mut F,
        logits: Vec<f32>,
    }
    impl<F: FnMut(Vec<(String, Vec<f32>)>)> Decoder for Observed<'_, F> {
        fn step(&mut self, token: u32, position: usize) -> std::result::Result<&[f32], String> {
            self.logits = self.m.step(token, position)?.to_vec();
            (self.seen)(self.m.decoder_outputs());
            Ok(&self.logits)
        }
        // Every token is a step: each one's outputs are observed.
        fn prefill(&mut self, tokens: &[u32], start: usize) -> std::result::Result<(), String> {
            decode::prefill_by_steps(self, tokens, start)
        }
    }
    let cfg = m.header().generation.clone();
    for (name, mel) in &audio {
        m.encode(mel).map_err(anyhow::Error::msg).with_context(|| format!("calibrating on {name}"))?;
        seen(m.encoder_outputs());
        let mut obs = Observed { m: &mut m, seen: &mut seen, logits: vec![] };
        let lang = if cfg.multilingual { Some(decode::detect_language(&mut obs, &cfg)?.1) } else { None };
        let prompt = decode::transcribe_prompt(&cfg, lang, false);
        decode::greedy(&mut obs, &cfg, &prompt)?;
    }
    if max.is_empty() {
        anyhow::bail!("calibration observed no activation: is anything quantizable?");
    }
    Ok(max)
}

/// What `compile` did, for the CLI to report.
pub struct CompileReport {
    pub kernels: usize,
    pub launches: usize,
    pub bytes: u64,
    pub arena_bytes: u64,
    /// What the user should know but that does not stop the build (NaN weights).
    pub warnings: Vec<String>,
}

/// Compiles `model` for `target` into a `.wbin` at `out`. `progress(done, total)` is called
/// as kernels are compiled.
pub fn compile(
    model: &str,
    lowering: &LowerOptions,
    target: &str,
    passes: &[&str],
    options: &wcc_passes::PassOptions,
    dumps: &Dumps,
    out: &Path,
    progress: &dyn Fn(usize, usize),
) -> Result<CompileReport> {
    use wcc_format as wbin;

    let target = wcc_targets::Target::named(target)?;
    let loaded = load_model_with(model, lowering)?;
    let generation = loaded.generation()?;
    let tokenizer = loaded.checkpoint.tokenizer_json()?;
    let module = run_passes(loaded.module, passes, options, dumps)?;
    let program = wcc_backend::program::build(&module, &loaded.checkpoint, &target)?;
    let warnings = loaded
        .checkpoint
        .non_finite_weights()
        .into_iter()
        .map(|(tensor, n)| {
            format!("{model}: tensor `{tensor}` holds {n} NaN or infinite values; the transcripts will likely be empty or garbage")
        })
        .collect();
    if let Some(dir) = &dumps.kernels {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, k) in program.kernels.iter().enumerate() {
            let path = dir.join(format!("{i:03}-{}.kir", k.name));
            std::fs::write(&path, k.to_string()).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let mut code = Vec::new();
    let mut kernels = Vec::new();
    // A GPU target's code is one PTX module; a CPU target's, each kernel's machine code.
    let gpu = target.gpu();
    let isa = if gpu.is_none() { Some(wcc_backend::cranelift::isa(&target)?) } else { None };
    if let Some(gpu) = gpu {
        progress(0, program.kernels.len());
        code = wcc_backend::ptx::module(&program.kernels, gpu)?.into_bytes();
        // The emitted PTX beside the kernel-IR dumps: what ptxas and the driver compile.
        if let Some(dir) = &dumps.kernels {
            let path = dir.join("module.ptx");
            std::fs::write(&path, &code).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    for (i, k) in program.kernels.iter().enumerate() {
        let (offset, len, launch) = match (&isa, k.launch) {
            (Some(isa), _) => {
                progress(i, program.kernels.len());
                let bytes = wcc_backend::cranelift::compile(k, &**isa)?;
                let offset = code.len().div_ceil(16) * 16;
                code.resize(offset, 0);
                code.extend_from_slice(&bytes);
                (offset, bytes.len(), None)
            }
            (None, Some(l)) => (
                0,
                code.len(),
                Some(wbin::GpuLaunchDesc {
                    entry: wcc_backend::ptx::entry_name(i, k),
                    grid: l.grid,
                    block: l.block,
                    shared_bytes: k.shared_bytes() as u32,
                }),
            ),
            (None, None) => anyhow::bail!("kernel {} has no GPU launch shape", k.name),
        };
        kernels.push(wbin::KernelEntry {
            name: k.name.clone(),
            offset: offset as u64,
            len: len as u64,
            kind: if launch.is_some() { "ptx".into() } else { "cpu".into() },
            gpu: launch,
            buffers: k
                .buffers
                .iter()
                .zip(k.access())
                .map(|(b, access)| wbin::BufferDesc {
                    name: b.name.clone(),
                    elem: b.elem.name().into(),
                    len: b.len as u64,
                    access,
                })
                .collect(),
            parallel_extent: k.parallel_extent,
            flops: k.flops,
        });
    }
    progress(program.kernels.len(), program.kernels.len());
    let enc = module.graph("encoder").context("no encoder graph")?;
    let mel_shape = &enc.ty(enc.inputs[0]).shape;
    let header = wbin::Header {
        wcc_version: env!("CARGO_PKG_VERSION").into(),
        model_name: module.name.clone(),
        target: wbin::TargetInfo { arch: target.arch.clone(), features: target.features.clone() },
        params: module.params.clone(),
        timesteps: mel_shape[1],
        n_mels: mel_shape[0],
        weight_dtype: if options.int8 { "int8".into() } else { "f32".into() },
        generation,
        alignment_heads: loaded.checkpoint.generation.alignment_heads.clone(),
        arena_bytes: program.arena_bytes,
        arena_persistent_bytes: program.persistent_bytes,
        arena_unshared_temporaries_bytes: program.temporaries.iter().flatten().map(|t| t.bytes as u64).sum(),
        weights: program.constants,
        kernels,
        graphs: program.graphs,
    };
    let filters: Vec<u8> = wcc_runtime::mel::mel_filters(mel_shape[0]).iter().flat_map(|v| v.to_le_bytes()).collect();
    let sections =
        wbin::Sections { code: &code, weights: &program.weights, tokenizer: &tokenizer, mel_filters: &filters };
    let bytes = wbin::write(out, &header, &sections)?;
    let launches = header.graphs.iter().map(|g| g.launches.len()).sum();
    Ok(CompileReport { kernels: header.kernels.len(), launches, bytes, arena_bytes: header.arena_bytes, warnings })
}

/// Where the time of a transcription went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub encode_s: f64,
    pub encodes: usize,
    pub step_s: f64,
    pub steps: usize,
    /// Prompt tokens fed without logits ([`wcc_runtime::decode::Decoder::prefill`]), and
    /// the time it took.
    pub prefill_s: f64,
    pub prefilled: usize,
}

/// Wraps any model to time its encoder runs and decoder steps.
pub struct Timed<'a, M: wcc_runtime::transcribe::WhisperModel> {
    pub model: &'a mut M,
    pub stats: Stats,
}

impl<'a, M: wcc_runtime::transcribe::WhisperModel> Timed<'a, M> {
    pub fn new(model: &'a mut M) -> Self {
        Timed { model, stats: Stats::default() }
    }
}

impl<M: wcc_runtime::transcribe::WhisperModel> wcc_runtime::decode::Decoder for Timed<'_, M> {
    fn step(&mut self, token: u32, position: usize) -> std::result::Result<&[f32], String> {
        let t0 = std::time::Instant::now();
        let r = self.model.step(token, position);
        self.stats.step_s += t0.elapsed().as_secs_f64();
        self.stats.steps += 1;
        r
    }
    fn prefill(&mut self, tokens: &[u32], start: usize) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        let r = self.model.prefill(tokens, start);
        self.stats.prefill_s += t0.elapsed().as_secs_f64();
        self.stats.prefilled += tokens.len();
        r
    }
}

impl<M: wcc_runtime::transcribe::WhisperModel> wcc_runtime::decode::BeamDecoder for Timed<'_, M> {
    fn beam_widths(&self) -> Vec<usize> {
        self.model.beam_widths()
    }
    /// A beam step counts as one decoder step (of all its hypotheses).
    fn beam_step(&mut self, tokens: &[u32], origin: &[u32], position: usize) -> std::result::Result<&[f32], String> {
        let t0 = std::time::Instant::now();
        let r = self.model.beam_step(tokens, origin, position);
        self.stats.step_s += t0.elapsed().as_secs_f64();
        self.stats.steps += 1;
        r
    }
    /// Counted as prefill, however the model feeds it.
    fn beam_prefill(&mut self, width: usize, prompt: &[u32]) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        let r = self.model.beam_prefill(width, prompt);
        self.stats.prefill_s += t0.elapsed().as_secs_f64();
        self.stats.prefilled += prompt.len();
        r
    }
}

impl<M: wcc_runtime::transcribe::WhisperModel> wcc_runtime::transcribe::WhisperModel for Timed<'_, M> {
    fn input_shape(&self) -> (usize, usize) {
        self.model.input_shape()
    }
    fn encode(&mut self, mel: &[f32]) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        let r = self.model.encode(mel);
        self.stats.encode_s += t0.elapsed().as_secs_f64();
        self.stats.encodes += 1;
        r
    }
    fn mel_filters(&self) -> Vec<f64> {
        self.model.mel_filters()
    }
    fn alignment(&self, out: &mut Vec<f32>) -> Option<(usize, usize)> {
        self.model.alignment(out)
    }
}
