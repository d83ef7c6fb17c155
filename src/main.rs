//! The `wcc` command line. Thin: parses flags and calls the crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use wcc::interpret::InterpretedModel;
use wcc_runtime::transcribe::{transcribe, TranscribeOptions};

#[derive(Parser)]
#[command(
    name = "wcc",
    version,
    about = "An ahead-of-time compiler for Whisper speech recognition"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// Passes to run first, comma-separated (e.g. hoist-cross-kv).
        #[arg(long, value_delimiter = ',')]
        passes: Vec<String>,
    },
    /// Transcribe an audio file.
    Transcribe {
        /// Run the IR with the reference interpreter (slow; the development path).
        #[arg(long)]
        interpret: bool,
        #[arg(long, default_value = "tiny.en")]
        model: String,
        /// Language code for multilingual models; detected when not given.
        #[arg(long)]
        language: Option<String>,
        /// Translate to English instead of transcribing (multilingual models).
        #[arg(long)]
        translate: bool,
        /// Print JSON (text, tokens, language, timings) instead of the text.
        #[arg(long)]
        json: bool,
        audio: PathBuf,
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
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Convert a checkpoint (e.g. CTranslate2) to Hugging Face format, bit for bit.
    Convert {
        #[arg(long)]
        model: String,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
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
        Command::Ir {
            model,
            graph,
            format,
            passes,
        } => {
            let passes: Vec<&str> = passes.iter().map(String::as_str).collect();
            let module = wcc::module_after(&model, &passes)?;
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
        Command::Transcribe {
            interpret,
            model,
            language,
            translate,
            json,
            audio,
        } => {
            if !interpret {
                bail!("only the interpreter path exists so far: add --interpret");
            }
            let t0 = Instant::now();
            let samples = wcc::load_audio(&audio)?;
            let loaded = wcc::load_model(&model)?;
            let (tokenizer, cfg) = loaded.generation()?;
            let module = wcc_passes::run(loaded.module, wcc::INTERPRETER_PASSES)?;
            let mut m =
                InterpretedModel::new(&module, &loaded.checkpoint).map_err(anyhow::Error::msg)?;
            let load_s = t0.elapsed().as_secs_f64();
            let opts = TranscribeOptions {
                language,
                translate,
            };
            let t1 = Instant::now();
            let out = transcribe(&mut m, &tokenizer, &cfg, &samples, &opts)?;
            let run_s = t1.elapsed().as_secs_f64();
            if json {
                let st = m.stats();
                let v = serde_json::json!({
                    "text": out.text(),
                    "language": out.language,
                    "tokens": out.tokens(),
                    "segments": out.segments.iter().map(|s| serde_json::json!({
                        "start": s.start, "end": s.end, "tokens": s.tokens, "text": s.text.trim(),
                    })).collect::<Vec<_>>(),
                    "timings": {
                        "load_s": load_s, "transcribe_s": run_s,
                        "encode_s": st.encode_s, "decoder_steps": st.steps, "decoder_s": st.step_s,
                    },
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", out.text());
            }
        }
        Command::Features {
            audio,
            n_mels,
            frames,
            output,
        } => {
            if frames == 0 || n_mels == 0 {
                bail!("--frames and --n-mels must be positive");
            }
            let samples = wcc::load_audio(&audio)?;
            let mel = wcc_runtime::mel::log_mel_spectrogram(&samples, n_mels, frames);
            wcc_runtime::npy::write_f32(&output, &[n_mels, frames], &mel)?;
        }
        Command::Checkpoint(CheckpointCommand::Random {
            size,
            seed,
            dtype,
            output,
        }) => {
            let dtype = wcc_ir::DType::from_name(&dtype)
                .with_context(|| format!("unknown dtype `{dtype}`"))?;
            let dims = wcc_frontend::hf_writer::write_random(&output, &size, seed, dtype)?;
            eprintln!(
                "wrote {size} ({} + {} layers, width {}) to {}",
                dims.n_audio_layer,
                dims.n_text_layer,
                dims.n_audio_state,
                output.display()
            );
        }
        Command::Checkpoint(CheckpointCommand::Convert { model, output }) => {
            let dir = wcc_frontend::resolve_model(&model)?;
            let ck = wcc_frontend::Checkpoint::open(&dir)?;
            wcc_frontend::hf_writer::convert(&ck, &output)?;
            eprintln!(
                "wrote {} as a Hugging Face checkpoint to {}",
                dir.display(),
                output.display()
            );
        }
    }
    Ok(())
}
