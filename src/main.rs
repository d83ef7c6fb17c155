//! The `wcc` command line. Thin: parses flags and calls the crates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use wcc::interpret::InterpretedModel;
use wcc_frontend::lower::LowerOptions;
use wcc_runtime::tokenizer::{GenerationConfig, WhisperTokenizer};
use wcc_runtime::transcribe::{transcribe, transcribe_with_progress, TranscribeOptions, WhisperModel};

#[derive(Parser)]
#[command(name = "wcc", version, about = "An ahead-of-time compiler for Whisper speech recognition")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The beam size `run` uses when none is asked for: faster-whisper's and openai-whisper's
/// command line's.
const DEFAULT_BEAM: usize = 5;

/// How to decode and what to print, shared by `transcribe` and `run`.
#[derive(Args)]
struct DecodingArgs {
    /// Language code for multilingual models; detected when not given.
    #[arg(long)]
    language: Option<String>,
    /// Translate to English instead of transcribing (multilingual models).
    #[arg(long)]
    translate: bool,
    /// Print JSON (text, tokens, language, timings) instead of the text.
    #[arg(long)]
    json: bool,
    /// Print each segment's times in the text output (`[0.00 --> 8.00] text`). Decoding has
    /// timestamps by default: segments with start and end times, each window resuming at the
    /// last complete timestamp.
    #[arg(long, conflicts_with = "without_timestamps")]
    timestamps: bool,
    /// Decode without timestamp tokens (`<|notimestamps|>`): one segment per window, windows
    /// cut at quiet points (faster-whisper's `without_timestamps=True`).
    #[arg(long)]
    without_timestamps: bool,
    /// Each window's prompt carries the previous windows' text (openai-whisper's and
    /// faster-whisper's `condition_on_previous_text`; with timestamps only).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    condition_on_previous_text: bool,
    /// Temperature fallback: a window is decoded at these temperatures in turn until its text
    /// does not repeat itself (zlib compression ratio at most 2.4) and its mean log-probability
    /// is at least -1 (`0` alone: greedy only).
    #[arg(long, value_delimiter = ',', default_value = "0,0.2,0.4,0.6,0.8,1.0")]
    temperatures: Vec<f32>,
    /// Seed of the sampling at temperatures above 0 (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time each word (`words` in the JSON output): cross-attention of the alignment heads
    /// aligned to the tokens by dynamic time warping, as openai-whisper does. Needs a model
    /// compiled with `--word-timestamps`.
    #[arg(long)]
    word_timestamps: bool,
    /// Emit a window that still repeats a phrase after every temperature as decoded, as
    /// openai-whisper and faster-whisper do (by default the repeats after the first copy are
    /// cut).
    #[arg(long)]
    keep_repeats: bool,
    /// Output format: on stdout, or with --output-dir the files `<audio name>.<format>`
    /// (`all`: every format, files only).
    #[arg(long, value_enum, conflicts_with = "json")]
    output_format: Option<wcc::output::Format>,
    /// Write the transcripts into this directory (created if needed) instead of stdout.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Replace output files that exist.
    #[arg(long)]
    force: bool,
    /// Text given to the first window as if it had come before (names, spellings, style),
    /// as openai-whisper's and faster-whisper's `initial_prompt`.
    #[arg(long)]
    initial_prompt: Option<String>,
    /// Beam search with this many hypotheses at temperature 0 (1: greedy). The model must be
    /// compiled with this size (`wcc compile --beam-sizes`; a default build has 1 and 5).
    /// Default: 5 (faster-whisper's and openai-whisper's command line), or 1 for a build
    /// without a beam of 5.
    #[arg(long)]
    beam_size: Option<usize>,
    /// Beam search ends when `beam_size · patience` hypotheses have ended.
    #[arg(long, default_value_t = 1.0)]
    patience: f32,
    /// Ended hypotheses are ranked by log-probability over `length^length_penalty`.
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Candidates sampled at each fallback temperature above 0, the likeliest per token kept.
    #[arg(long, default_value_t = 5)]
    best_of: usize,
}

impl DecodingArgs {
    /// The transcription options and where the transcripts go.
    /// Also says whether the beam size was asked for (else it is the default, which a build
    /// without that beam falls back from to greedy).
    fn split(self) -> Result<(TranscribeOptions, wcc::output::Output, Option<String>, bool)> {
        use wcc::output::{Format, Output};
        let DecodingArgs {
            language,
            translate,
            json,
            timestamps,
            without_timestamps,
            condition_on_previous_text,
            temperatures,
            seed,
            word_timestamps,
            keep_repeats,
            output_format,
            output_dir,
            force,
            initial_prompt,
            beam_size,
            patience,
            length_penalty,
            best_of,
        } = self;
        if beam_size == Some(0) {
            bail!("--beam-size must be at least 1");
        }
        if best_of == 0 {
            bail!("--best-of must be at least 1");
        }
        if !(patience.is_finite() && patience > 0.0) {
            bail!("--patience: {patience} is not above 0");
        }
        if !length_penalty.is_finite() {
            bail!("--length-penalty: {length_penalty} is not a number");
        }
        let beam =
            wcc_runtime::decode::BeamOptions { width: beam_size.unwrap_or(DEFAULT_BEAM), patience, length_penalty };
        if let Some(t) = temperatures.iter().find(|t| !t.is_finite() || **t < 0.0) {
            bail!("--temperatures: {t} is not a temperature (0 or more)");
        }
        // `--json` is `--output-format json` (clap refuses both at once).
        let format = if json { Format::Json } else { output_format.unwrap_or(Format::Txt) };
        let opts = TranscribeOptions {
            language,
            translate,
            timestamps: !without_timestamps,
            condition_on_previous_text,
            temperatures,
            seed,
            word_timestamps,
            keep_repeats,
            initial_prompt: vec![],
            beam: Some(beam),
            best_of,
        };
        let output = Output { dir: output_dir, format, force, timestamps };
        Ok((opts, output, initial_prompt, beam_size.is_some()))
    }
}

/// Quantization, shared by `compile` and `transcribe`.
#[derive(Args)]
struct QuantArgs {
    /// int8 linear layers: weights int8 per output channel, activations quantized per row at
    /// run time, integer products (`vpdpbusd` where the CPU has VNNI).
    #[arg(long)]
    int8: bool,
    /// With --int8: layers kept in f32, by value or weight name (`*` wildcards), e.g.
    /// `logits,enc.l0.*`; replaces the default list (`--keep-float ''` keeps none).
    #[arg(long, value_delimiter = ',')]
    keep_float: Vec<String>,
    /// int8 with static activation scales, calibrated on the clips of --calibrate (one scale
    /// per activation, stored in the artifact; no per-row scaling at run time).
    #[arg(long, conflicts_with = "int8", requires = "calibrate")]
    int8_static: bool,
    /// Directories of .wav clips to calibrate --int8-static on, comma-separated (the first
    /// window of each clip).
    #[arg(long, requires = "int8_static", value_delimiter = ',')]
    calibrate: Vec<PathBuf>,
    /// At most this many calibration clips from each directory.
    #[arg(long, default_value_t = 8)]
    calibration_clips: usize,
}

impl QuantArgs {
    /// Sets the quantization options; `--int8-static` runs the calibration (a compile and a
    /// pass over the clips) first.
    fn apply(self, model: &str, options: &mut wcc_passes::PassOptions) -> Result<()> {
        if !self.keep_float.is_empty() && !self.int8 && !self.int8_static {
            bail!("--keep-float needs --int8 or --int8-static");
        }
        options.int8 = self.int8 || self.int8_static;
        // Given, the list replaces the default one (an empty pattern keeps nothing).
        if !self.keep_float.is_empty() {
            options.keep_float = Some(self.keep_float);
        }
        if self.int8_static {
            let dirs: Vec<String> = self.calibrate.iter().map(|d| d.display().to_string()).collect();
            eprintln!("calibrating on {} ...", dirs.join(", "));
            let scales = wcc::calibrate(model, options, &self.calibrate, self.calibration_clips, 2)?;
            eprintln!("calibrated {} activation scales", scales.len());
            options.scales = wcc_passes::ActivationScales::Static(scales);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum IrFormat {
    Text,
    Dot,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's IR.
    Ir {
        /// Model name (tiny.en, base, ...) or checkpoint directory.
        #[arg(long)]
        model: String,
        /// Only this graph (encoder or decoder_step).
        #[arg(long)]
        graph: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: IrFormat,
        /// Show the module after this pass of the default pipeline.
        #[arg(long, conflicts_with = "passes")]
        after: Option<String>,
        /// Mel frames for the `timesteps` pass (an even number up to 3000).
        #[arg(long)]
        timesteps: Option<wcc::Timesteps>,
        /// Run this list of passes instead (comma-separated, e.g. hoist-cross-kv).
        #[arg(long, value_delimiter = ',')]
        passes: Vec<String>,
        #[command(flatten)]
        quant: QuantArgs,
    },
    /// Run passes over a module in IR text form (a `.ir` file, as `--dump-dir` writes them)
    /// and print the result: passes tested and tuned without a checkpoint.
    Opt {
        /// The `.ir` file.
        file: PathBuf,
        /// Passes to run, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        passes: Vec<String>,
        /// Mel frames for the `timesteps` pass.
        #[arg(long)]
        timesteps: Option<wcc::Timesteps>,
        #[command(flatten)]
        quant: QuantArgs,
    },
    /// How much each layer costs in accuracy when it alone is int8, on calibration clips:
    /// the table (or JSON) the default `--int8` policy comes from.
    QuantizeReport {
        #[arg(long)]
        model: String,
        /// Directories of .wav clips, comma-separated (the first window of each is used).
        #[arg(long, value_delimiter = ',', required = true)]
        calibrate: Vec<PathBuf>,
        /// At most this many clips from each directory (sorted by name).
        #[arg(long, default_value_t = 4)]
        clips: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the passes of the default pipeline.
    Passes,
    /// Transcribe an audio file: compile the model for this machine and run it (or, with
    /// --interpret, run its IR with the reference interpreter).
    Transcribe {
        /// Run the IR with the reference interpreter (slow; the development path).
        #[arg(long)]
        interpret: bool,
        #[arg(long, default_value = "tiny.en")]
        model: String,
        /// Mel frames of the encoder input: an even number up to 3000, or `auto` (the clip's
        /// length plus 3 s, at least 1024, rounded up to a multiple of 64).
        #[arg(long, default_value = "3000")]
        timesteps: wcc::Timesteps,
        /// Threads for the compiled kernels.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[command(flatten)]
        decoding: DecodingArgs,
        #[command(flatten)]
        quant: QuantArgs,
        audio: PathBuf,
    },
    /// Compile a model ahead of time into one `.wbin` file.
    Compile {
        /// Model name (tiny.en, base, ...) or checkpoint directory.
        #[arg(long)]
        model: String,
        /// Mel frames of the static encoder input: an even number up to 3000 (30 s). Longer
        /// audio is transcribed in windows of this length.
        #[arg(long, default_value = "3000")]
        timesteps: wcc::Timesteps,
        /// host, x86_64-v2, x86_64-v3, x86_64-v4, aarch64 or aarch64-i8mm (Armv8.6 int8: `usdot`).
        #[arg(long, default_value = "host")]
        target: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
        /// Run these passes instead of the default pipeline (comma-separated; `none` for none).
        #[arg(long, value_delimiter = ',')]
        passes: Vec<String>,
        /// Print the IR after these passes (comma-separated pass names, `frontend`, or `all`).
        #[arg(long, value_delimiter = ',')]
        dump_ir: Vec<String>,
        /// Write `NN-pass.ir` and `NN-pass.dot` after every pass into this directory.
        #[arg(long)]
        dump_dir: Option<PathBuf>,
        /// Write every kernel's kernel IR as text (`NNN-name.kir`) into this directory, and for
        /// a GPU target the PTX module (`module.ptx`).
        #[arg(long)]
        dump_kernels: Option<PathBuf>,
        /// Also output the alignment heads' cross-attention from the decoder, so that `wcc
        /// run --word-timestamps` can time each word (a build without it pays nothing).
        #[arg(long)]
        word_timestamps: bool,
        /// The beam sizes `wcc run --beam-size` may ask for (1, greedy, is always built;
        /// each other size adds a decoder step for that many hypotheses).
        #[arg(long, value_delimiter = ',', default_value = "1,5")]
        beam_sizes: Vec<usize>,
        /// Prompt blocks fed at once (each size adds a prefill graph): a window's prompt, the
        /// previous text included, is fed in blocks of these many tokens instead of one
        /// decoder step per token.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        prefill_sizes: Vec<usize>,
        /// Build no prefill graph: prompts are fed one decoder step per token.
        #[arg(long, conflicts_with = "prefill_sizes")]
        no_prefill: bool,
        #[command(flatten)]
        quant: QuantArgs,
    },
    /// Transcribe an audio file with a compiled model.
    Run {
        wbin: PathBuf,
        /// Audio files (WAV, FLAC, MP3, Ogg Vorbis, AAC/M4A, ALAC, ...), transcribed one
        /// after the other by the same loaded model.
        #[arg(required = true, num_args = 1..)]
        audio: Vec<PathBuf>,
        /// Threads for the kernels.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[command(flatten)]
        decoding: DecodingArgs,
        /// Time every kernel and print a table (stderr) at the end.
        #[arg(long)]
        profile: bool,
    },
    /// Print the header of a `.wbin`.
    Info { wbin: PathBuf },
    /// Time a compiled model: load, log-mel, encoder, decoder step, end to end (median and
    /// spread over runs), and each kernel class's rate against this machine's peak.
    Bench {
        wbin: PathBuf,
        /// Audio to transcribe; without it, 30 s of generated audio.
        clip: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Timed runs, after one warm-up run.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Write the log-mel features wcc computes for an audio file (first window) as .npy.
    Features {
        audio: PathBuf,
        #[arg(long, default_value_t = 80)]
        n_mels: usize,
        #[arg(long, default_value_t = wcc_runtime::N_FRAMES)]
        frames: usize,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write checkpoints in Hugging Face format.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Seeded random weights with the real hyper-parameters of a Whisper size.
    Random {
        /// tiny, tiny.en, base, small, medium, large-v2, large-v3, large-v3-turbo, ...
        #[arg(long)]
        size: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// Copy the tokenizer, language and special tokens of this checkpoint (a name such as
        /// `base`, or a directory), so the random model runs end to end (`wcc run`, `wcc
        /// bench`). A multilingual vocabulary serves every multilingual size (large-v3's
        /// extra language added); English-only sizes need an English-only one (`tiny.en`).
        #[arg(long, value_name = "MODEL")]
        vocabulary_from: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Convert a checkpoint (e.g. CTranslate2) to Hugging Face format, bit for bit; or, with
    /// `--format ct2 --template MODEL`, to CTranslate2's format (for faster-whisper).
    Convert {
        #[arg(long)]
        model: String,
        /// hf (Hugging Face) or ct2 (CTranslate2, laid out as `--template`).
        #[arg(long, default_value = "hf")]
        format: String,
        /// With `--format ct2`: a CTranslate2 checkpoint of the same vocabulary (e.g. base)
        /// whose variable list, scalars and vocabulary files are copied.
        #[arg(long, value_name = "MODEL")]
        template: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// Transcribes `samples` with `m`, timing the encoder and the decoder steps, and writes or
/// prints it (`t0`: when loading began).
#[allow(clippy::too_many_arguments)]
fn transcribe_to<M: WhisperModel>(
    m: &mut M,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    samples: &[f32],
    opts: &TranscribeOptions,
    output: &wcc::output::Output,
    audio: &std::path::Path,
    files: Option<&[PathBuf]>,
    t0: Instant,
) -> Result<()> {
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut timed = wcc::Timed::new(m);
    let out = transcribe(&mut timed, tokenizer, cfg, samples, opts)?;
    let t = wcc::output::Timings { load_s, transcribe_s: t1.elapsed().as_secs_f64(), stats: timed.stats };
    output.emit(&out, audio, files, false, &t, &mut vec![])
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`wcc ir ... | head`) ends wcc quietly, as
    // it ends any Unix tool, instead of failing the next write with a panic: Rust ignores
    // SIGPIPE by default, so restore the default action.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A panic inside the audio decoder is caught and reported as that file's error; the
    // default hook would print it first, breaking the one-line error.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !wcc_runtime::audio::in_decoder() {
            default_hook(info);
        }
    }));
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Passes => {
            for p in wcc_passes::PASSES {
                println!("{:16} {}", p.name, p.about);
            }
        }
        Command::QuantizeReport { model, calibrate, clips, threads, json } => {
            let report = wcc::quantize_report::quantize_report(&model, &calibrate, clips, threads.max(1), &|s| {
                eprintln!("quantize-report: {s}")
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
        Command::Opt { file, passes, timesteps, quant } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let module = wcc_ir::parse_module(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let mut options = match timesteps {
                Some(t) => t.options(None)?,
                None => wcc_passes::PassOptions::default(),
            };
            if quant.int8_static {
                bail!("--int8-static calibrates on a model's activations: use it with `wcc compile --model`");
            }
            quant.apply("", &mut options)?;
            let passes: Vec<&str> = passes.iter().map(String::as_str).collect();
            let module = wcc::run_passes(module, &passes, &options, &wcc::Dumps::default())?;
            print!("{}", wcc_ir::print_module(&module));
        }
        Command::Ir { model, graph, format, after, timesteps, passes, quant } => {
            let passes: Vec<&str> = match &after {
                Some(last) => wcc_passes::pipeline_until(last)?,
                None => passes.iter().map(String::as_str).collect(),
            };
            let mut options = match timesteps {
                Some(t) => t.options(None)?,
                None => wcc_passes::PassOptions::default(),
            };
            quant.apply(&model, &mut options)?;
            let module = wcc::module_after(&model, &passes, &options)?;
            let graphs: Vec<&wcc_ir::Graph> = match &graph {
                None => module.graphs.iter().collect(),
                Some(name) => vec![module.graph(name).with_context(|| {
                    let names: Vec<&str> = module.graphs.iter().map(|g| g.name.as_str()).collect();
                    format!("no graph `{name}` (graphs: {})", names.join(", "))
                })?],
            };
            match (format, &graph) {
                (IrFormat::Text, None) => print!("{}", wcc_ir::print_module(&module)),
                (IrFormat::Text, Some(_)) => print!("{}", wcc_ir::print_graph(graphs[0])),
                (IrFormat::Dot, _) => graphs.iter().for_each(|g| print!("{}", wcc_ir::to_dot(g))),
            }
        }
        Command::Transcribe { interpret, model, timesteps, threads, decoding, quant, audio } => {
            let (mut opts, output, initial_prompt, _) = decoding.split()?;
            let plans = output.plan(std::slice::from_ref(&audio))?;
            let files = plans.as_ref().map(|p| &p[0][..]);
            let t0 = Instant::now();
            let samples = wcc::load_audio(&audio)?;
            let mut options = timesteps.options(Some(samples.len()))?;
            quant.apply(&model, &mut options)?;
            let pipeline = wcc_passes::default_pipeline();
            if interpret {
                if opts.word_timestamps {
                    bail!("--word-timestamps needs a compiled model: leave out --interpret");
                }
                let loaded = wcc::load_model(&model)?;
                let (tokenizer, cfg) = wcc::tokenizer_and_generation(&loaded)?;
                opts.initial_prompt = wcc::prompt_tokens(&tokenizer, initial_prompt.as_deref())?;
                let module = wcc::run_passes(loaded.module, &pipeline, &options, &wcc::Dumps::default())?;
                let mut m = InterpretedModel::new(&module, &loaded.checkpoint).map_err(anyhow::Error::msg)?;
                transcribe_to(&mut m, &tokenizer, &cfg, &samples, &opts, &output, &audio, files, t0)?;
            } else {
                // Compile for this machine into a temporary file, then run it.
                let tmp = tempfile::tempdir().context("creating a temporary directory")?;
                let wbin = tmp.path().join("model.wbin");
                let beam_sizes = opts.beam.map(|b| vec![b.width]).unwrap_or_default();
                let prefill_sizes = wcc_frontend::lower::DEFAULT_PREFILL_SIZES.to_vec();
                let lowering = LowerOptions { alignment: opts.word_timestamps, beam_sizes, prefill_sizes };
                let dumps = wcc::Dumps::default();
                let report = wcc::compile(&model, &lowering, "host", &pipeline, &options, &dumps, &wbin, &|_, _| {})?;
                for w in &report.warnings {
                    eprintln!("warning: {w}");
                }
                let mut m = wcc_runtime::compiled::CompiledModel::load(&wbin, threads.max(1))?;
                let tokenizer = m.tokenizer()?;
                let cfg = m.header().generation.clone();
                opts.initial_prompt = wcc::prompt_tokens(&tokenizer, initial_prompt.as_deref())?;
                transcribe_to(&mut m, &tokenizer, &cfg, &samples, &opts, &output, &audio, files, t0)?;
            }
        }
        Command::Compile {
            model,
            timesteps,
            target,
            output,
            force,
            passes,
            dump_ir,
            dump_dir,
            dump_kernels,
            word_timestamps,
            beam_sizes,
            prefill_sizes,
            no_prefill,
            quant,
        } => {
            if let Some(n) = beam_sizes.iter().find(|&&n| n == 0 || n > 64) {
                bail!("--beam-sizes: {n} is not a beam size (1 to 64)");
            }
            if let Some(n) = prefill_sizes.iter().find(|&&n| n == 0 || n > 256) {
                bail!("--prefill-sizes: {n} is not a prompt block (1 to 256 tokens)");
            }
            let prefill_sizes = if no_prefill { vec![] } else { prefill_sizes };
            let passes: Vec<&str> = match passes.as_slice() {
                [] => wcc_passes::default_pipeline(),
                [none] if none == "none" => vec![],
                list => list.iter().map(String::as_str).collect(),
            };
            let dumps = wcc::Dumps { print_after: dump_ir, dir: dump_dir, kernels: dump_kernels };
            let mut options = timesteps.options(None)?;
            quant.apply(&model, &mut options)?;
            if output.exists() && !force {
                bail!("{} exists (use --force to replace it)", output.display());
            }
            // Found out before minutes of compiling, not after.
            let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                bail!("cannot write {}: {} is not a directory", output.display(), dir.display());
            }
            let t0 = Instant::now();
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("compiling kernels {bar:30} {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let lowering = LowerOptions { alignment: word_timestamps, beam_sizes, prefill_sizes };
            let report =
                wcc::compile(&model, &lowering, &target, &passes, &options, &dumps, &output, &|done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })?;
            bar.finish_and_clear();
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "wrote {} ({:.1} MB, {} kernels, {} launches, arena {:.1} MB) in {:.1} s",
                output.display(),
                report.bytes as f64 / 1e6,
                report.kernels,
                report.launches,
                report.arena_bytes as f64 / 1e6,
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Run { wbin, audio, threads, decoding, profile } => {
            let (mut opts, output, initial_prompt, beam_asked) = decoding.split()?;
            if threads == 0 {
                bail!("--threads must be at least 1");
            }
            // Output files are checked before any work: nothing is overwritten unasked.
            let plans = output.plan(&audio)?;
            let t0 = Instant::now();
            let mut m = wcc_runtime::compiled::CompiledModel::load(&wbin, threads)?;
            if opts.word_timestamps && m.alignment(&mut Vec::new()).is_none() {
                bail!("{}: compiled without word timestamps; compile it with --word-timestamps", wbin.display());
            }
            if let Some(b) = opts.beam.filter(|b| b.width > 1) {
                use wcc_runtime::decode::BeamDecoder;
                let mut has = vec![1];
                has.extend(m.beam_widths());
                if !has.contains(&b.width) && !beam_asked {
                    opts.beam = None;
                } else if !has.contains(&b.width) {
                    bail!(
                        "{}: built for beam sizes {has:?}, not {}; compile it with --beam-sizes {}",
                        wbin.display(),
                        b.width,
                        b.width
                    );
                }
            }
            if profile {
                m.enable_profiling();
            }
            let tokenizer = m.tokenizer()?;
            let cfg = m.header().generation.clone();
            opts.initial_prompt = wcc::prompt_tokens(&tokenizer, initial_prompt.as_deref())?;
            let load_s = t0.elapsed().as_secs_f64();
            // Several files share the model; one that cannot be read is reported and skipped,
            // and the exit code then says that one failed.
            let several = audio.len() > 1;
            let (mut json_acc, mut failed) = (vec![], 0);
            let window_s = (m.input_shape().1 * wcc_runtime::HOP_LENGTH) as f64 / wcc_runtime::SAMPLE_RATE as f64;
            for (i, path) in audio.iter().enumerate() {
                let t1 = Instant::now();
                let mut bar = wcc::output::progress_bar(path.display().to_string(), window_s);
                let done = wcc::load_audio(path).and_then(|samples| {
                    let mut timed = wcc::Timed::new(&mut m);
                    let out = transcribe_with_progress(&mut timed, &tokenizer, &cfg, &samples, &opts, &mut bar)?;
                    Ok((out, timed.stats))
                });
                match done {
                    Ok((out, stats)) => {
                        let t = wcc::output::Timings { load_s, transcribe_s: t1.elapsed().as_secs_f64(), stats };
                        let files = plans.as_ref().map(|p| &p[i][..]);
                        output.emit(&out, path, files, several, &t, &mut json_acc)?;
                    }
                    Err(e) if several => {
                        eprintln!("error: {e:#}");
                        failed += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            output.finish(several, json_acc)?;
            if failed > 0 {
                bail!("{failed} of {} files could not be transcribed", audio.len());
            }
            if profile {
                eprintln!("{:>9} {:>7}  kernel", "ms", "calls");
                for (name, t, n) in m.profile() {
                    eprintln!("{:>9.2} {n:>7}  {name}", t * 1e3);
                }
            }
        }
        Command::Bench { wbin, clip, threads, runs, json } => {
            let r = wcc::bench::bench(&wbin, clip.as_deref(), threads, runs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                wcc::bench::print(&r);
            }
        }
        Command::Info { wbin } => {
            let f = wcc_runtime::wbin::WbinFile::open(&wbin)?;
            let h = &f.header;
            println!("file          {} ({} bytes)", wbin.display(), f.file_len());
            println!("model         {}", h.model_name);
            println!("target        {} [{}]", h.target.arch, h.target.features.join(", "));
            println!("timesteps     {} mel frames x {} bins", h.timesteps, h.n_mels);
            println!("weights       {} ({} bytes)", h.weight_dtype, f.sections().weights.len());
            for (k, v) in &h.params {
                println!("param         {k} = {v}");
            }
            println!("kernels       {} ({} bytes of code)", h.kernels.len(), f.sections().code.len());
            for g in &h.graphs {
                println!(
                    "program       {}: {} launches, {} inputs, {} outputs",
                    g.name,
                    g.launches.len(),
                    g.inputs.len(),
                    g.outputs.len()
                );
            }
            println!(
                "arena         {} bytes: {} persistent (inputs, outputs, caches) + {} temporaries, shared ({} unshared)",
                h.arena_bytes,
                h.arena_persistent_bytes,
                h.arena_bytes - h.arena_persistent_bytes,
                h.arena_unshared_temporaries_bytes
            );
            println!(
                "vocabulary    multilingual={} languages={}",
                h.generation.multilingual,
                h.generation.languages.len()
            );
        }
        Command::Features { audio, n_mels, frames, output } => {
            if frames == 0 || n_mels == 0 {
                bail!("--frames and --n-mels must be positive");
            }
            let samples = wcc::load_audio(&audio)?;
            let mel = wcc_runtime::mel::log_mel_spectrogram(&samples, n_mels, frames);
            wcc_runtime::npy::write_f32(&output, &[n_mels, frames], &mel)?;
        }
        Command::Checkpoint(CheckpointCommand::Random { size, seed, dtype, vocabulary_from, output }) => {
            let dtype = wcc_ir::DType::from_name(&dtype).with_context(|| format!("unknown dtype `{dtype}`"))?;
            // The vocabulary's source is opened and checked before anything is written.
            let source = match &vocabulary_from {
                Some(m) => {
                    let ck = wcc_frontend::Checkpoint::open(&wcc_frontend::resolve_model(m)?)?;
                    ck.tokenizer_json()?;
                    Some(ck)
                }
                None => None,
            };
            let want = wcc_frontend::hf_writer::size_dims(&size);
            if let (Some(src), Some(dims)) = (&source, &want) {
                wcc_frontend::hf_writer::check_vocabulary(src, dims)?;
            }
            let dims = wcc_frontend::hf_writer::write_random(&output, &size, seed, dtype)?;
            match &source {
                Some(src) => wcc_frontend::hf_writer::write_vocabulary(src, &dims, &output)?,
                None => eprintln!(
                    "note: no tokenizer: `wcc ir` and `wcc compile` read this checkpoint, `wcc run` needs \
                     --vocabulary-from (e.g. base, or tiny.en for an English-only size)"
                ),
            }
            eprintln!(
                "wrote {size} ({} + {} layers, width {}) to {}",
                dims.n_audio_layer,
                dims.n_text_layer,
                dims.n_audio_state,
                output.display()
            );
        }
        Command::Checkpoint(CheckpointCommand::Convert { model, format, template, output }) => {
            let dir = wcc_frontend::resolve_model(&model)?;
            let ck = wcc_frontend::Checkpoint::open(&dir)?;
            match (format.as_str(), &template) {
                ("hf", None) => {
                    wcc_frontend::hf_writer::convert(&ck, &output)?;
                    eprintln!("wrote {} as a Hugging Face checkpoint to {}", dir.display(), output.display());
                }
                ("ct2", Some(t)) => {
                    let template = wcc_frontend::Checkpoint::open(&wcc_frontend::resolve_model(t)?)?;
                    wcc_frontend::ct2_writer::write_ct2(&ck, &template, &output)?;
                    eprintln!("wrote {} as a CTranslate2 checkpoint to {}", dir.display(), output.display());
                }
                ("ct2", None) => bail!("--format ct2 needs --template MODEL (a CTranslate2 checkpoint, e.g. base)"),
                ("hf", Some(_)) => bail!("--template is for --format ct2"),
                (other, _) => bail!("unknown checkpoint format `{other}` (hf or ct2)"),
            }
        }
    }
    Ok(())
}
