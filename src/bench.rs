//! `wcc bench`: how fast a compiled model runs on this machine, and how close its kernels come
//! to the machine's peak.
//!
//! Times, each the median and the spread (min, max) over `runs` runs after one warm-up run:
//! load, log-mel of the clip's first window, the encoder on it, one decoder step (the mean of
//! `STEPS` steps at positions `0..STEPS`, fed the prompt and then the greedy token), and the
//! whole transcription of the clip without load. Then one profiled pass (an encoder window
//! and the same decoder steps) gives each class of kernel its time and achieved rate, set
//! against the peak of the instruction it is built on (`f32` FMA for float products,
//! `vpdpbusd`/`usdot`-style dot products for int8), measured at the start by a
//! Cranelift-emitted loop that keeps independent accumulators in registers.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use wcc_backend::kir::build::*;
use wcc_backend::kir::{Buffer, Elem, Kernel, Stmt, Ty, END, START};
use wcc_runtime::compiled::CompiledModel;
use wcc_runtime::decode::{argmax, transcribe_prompt, Decoder};
use wcc_runtime::mel::log_mel_spectrogram_with;
use wcc_runtime::transcribe::{transcribe, TranscribeOptions, WhisperModel};
use wcc_runtime::{HOP_LENGTH, SAMPLE_RATE};

/// Decoder steps timed per run.
pub const STEPS: usize = 32;

/// Median, min and max of some timings, in seconds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Spread { median, min: v[0], max: v[n - 1] }
    }
}

/// A kernel class's share of one profiled pass.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassRow {
    pub class: &'static str,
    pub encoder_s: f64,
    pub step_s: f64,
    /// Operations (multiply and add counted apart) per second over encoder and steps.
    pub gops: f64,
    /// Against the peak of its instruction on all threads, for the product classes.
    pub percent_of_peak: Option<f64>,
}

/// Peaks measured on this machine, in G-ops per second.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Peaks {
    pub fma_f32_per_thread: f64,
    pub fma_f32_all: f64,
    pub dot_i8_per_thread: f64,
    pub dot_i8_all: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub wbin: String,
    pub clip: String,
    pub clip_s: f64,
    pub threads: usize,
    pub runs: usize,
    pub load: Spread,
    pub log_mel: Spread,
    pub encoder: Spread,
    pub decoder_step: Spread,
    pub end_to_end: Spread,
    pub tokens: usize,
    pub peaks: Peaks,
    pub classes: Vec<ClassRow>,
}

/// Which class a kernel belongs to, by the name the lowering gives it, and whether it is an
/// integer product.
fn class_of(name: &str) -> &'static str {
    let starts = |p: &str| name.starts_with(p);
    if starts("qlinear") || starts("qmatmul") {
        "int8 products"
    } else if starts("qattention") {
        "int8 attention"
    } else if starts("linear") || starts("matmul") {
        "f32 products"
    } else if starts("cache_attention") || starts("softmax") || starts("masked_softmax") || starts("causal_mask") {
        "attention, softmax"
    } else if starts("row_scale") || starts("quantize") || starts("row_sum") {
        "quantize"
    } else if starts("layer_norm") {
        "layer norm"
    } else if starts("im2col") || starts("gelu") || starts("conv") {
        "convolution"
    } else {
        "data movement, other"
    }
}

/// Runs `STEPS` decoder steps from position 0: the prompt, then greedy tokens.
fn steps(m: &mut CompiledModel, prompt: &[u32]) -> Result<()> {
    let mut token = prompt[0];
    for pos in 0..STEPS {
        let logits = m.step(token, pos).map_err(anyhow::Error::msg)?;
        token = if pos + 1 < prompt.len() { prompt[pos + 1] } else { argmax(logits) };
    }
    Ok(())
}

/// 30 s of generated audio (a gliding tone in noise) for a bench without a clip.
fn generated_audio() -> Vec<f32> {
    let mut s = 0x2545f4914f6cdd1du64;
    (0..30 * SAMPLE_RATE as usize)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let t = i as f32 / SAMPLE_RATE as f32;
            let noise = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            0.3 * (2.0 * std::f32::consts::PI * (200.0 + 20.0 * t) * t).sin() + 0.05 * noise
        })
        .collect()
}

/// Benchmarks `wbin` on `clip` (or 30 s of generated audio).
pub fn bench(wbin: &Path, clip: Option<&Path>, threads: usize, runs: usize) -> Result<Report> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
    let samples = match clip {
        Some(c) => crate::load_audio(c)?,
        None => generated_audio(),
    };
    let clip_name = clip.map(|c| c.display().to_string()).unwrap_or_else(|| "30 s of generated audio".into());
    anyhow::ensure!(!samples.is_empty(), "{clip_name}: no samples");
    let peaks = peaks(threads)?;

    let mut load = vec![];
    let mut m = None;
    for _ in 0..=runs {
        let t = Instant::now();
        let model = CompiledModel::load(wbin, threads)?;
        load.push(t.elapsed().as_secs_f64());
        m = Some(model);
    }
    load.remove(0);
    let mut m = m.expect("loaded");
    let tokenizer = m.tokenizer()?;
    let cfg = m.header().generation.clone();
    anyhow::ensure!(
        cfg.max_text_ctx >= STEPS,
        "the model's text context ({}) is shorter than {STEPS} steps",
        cfg.max_text_ctx
    );
    let (_, frames) = m.input_shape();
    let filters = m.mel_filters();
    let window = &samples[..samples.len().min(frames * HOP_LENGTH)];
    let language = cfg.multilingual.then(|| cfg.languages.iter().find(|(c, _)| c == "en").map(|l| l.1)).flatten();
    let prompt = transcribe_prompt(&cfg, language, false);
    let opts = TranscribeOptions {
        language: cfg.multilingual.then(|| "en".to_string()),
        translate: false,
        ..Default::default()
    };

    let (mut mel_t, mut enc_t, mut step_t, mut e2e_t) = (vec![], vec![], vec![], vec![]);
    let mut tokens = 0;
    for run in 0..=runs {
        let t = Instant::now();
        let mel = log_mel_spectrogram_with(window, &filters, frames);
        let t_mel = t.elapsed().as_secs_f64();
        let t = Instant::now();
        m.encode(&mel).map_err(anyhow::Error::msg)?;
        let t_enc = t.elapsed().as_secs_f64();
        let t = Instant::now();
        steps(&mut m, &prompt)?;
        let t_step = t.elapsed().as_secs_f64() / STEPS as f64;
        let t = Instant::now();
        let out = transcribe(&mut m, &tokenizer, &cfg, &samples, &opts)?;
        let t_e2e = t.elapsed().as_secs_f64();
        tokens = out.tokens().len();
        if run > 0 {
            mel_t.push(t_mel);
            enc_t.push(t_enc);
            step_t.push(t_step);
            e2e_t.push(t_e2e);
        }
    }

    // One profiled pass: an encoder window and the same steps.
    m.enable_profiling();
    let mel = log_mel_spectrogram_with(window, &filters, frames);
    m.encode(&mel).map_err(anyhow::Error::msg)?;
    let enc_profile = m.profile();
    steps(&mut m, &prompt)?;
    let all_profile = m.profile();
    let flops: std::collections::HashMap<&str, u64> =
        m.header().kernels.iter().map(|k| (k.name.as_str(), k.flops)).collect();
    let mut classes: Vec<ClassRow> = vec![];
    for (name, secs, calls) in &all_profile {
        let enc = enc_profile.iter().find(|r| &r.0 == name).map(|r| r.1).unwrap_or(0.0);
        let class = class_of(name);
        let ops = flops.get(name.as_str()).copied().unwrap_or(0) as f64 * *calls as f64;
        let row = match classes.iter_mut().position(|c| c.class == class) {
            Some(i) => &mut classes[i],
            None => {
                classes.push(ClassRow { class, encoder_s: 0.0, step_s: 0.0, gops: 0.0, percent_of_peak: None });
                classes.last_mut().unwrap()
            }
        };
        row.encoder_s += enc;
        row.step_s += (secs - enc) / STEPS as f64;
        // Accumulated as operations for now; turned into a rate below.
        row.gops += ops;
    }
    for c in &mut classes {
        let secs = c.encoder_s + c.step_s * STEPS as f64;
        c.gops = if secs > 0.0 { c.gops / secs / 1e9 } else { 0.0 };
        c.percent_of_peak = match c.class {
            "f32 products" => Some(100.0 * c.gops / peaks.fma_f32_all),
            "int8 products" | "int8 attention" => Some(100.0 * c.gops / peaks.dot_i8_all),
            _ => None,
        };
    }
    classes.sort_by(|a, b| (b.encoder_s + b.step_s).total_cmp(&(a.encoder_s + a.step_s)));

    Ok(Report {
        wbin: wbin.display().to_string(),
        clip: clip_name,
        clip_s: samples.len() as f64 / SAMPLE_RATE as f64,
        threads,
        runs,
        load: Spread::of(load),
        log_mel: Spread::of(mel_t),
        encoder: Spread::of(enc_t),
        decoder_step: Spread::of(step_t),
        end_to_end: Spread::of(e2e_t),
        tokens,
        peaks,
        classes,
    })
}

pub fn print(r: &Report) {
    let ms = |s: &Spread| format!("{:>9.2} {:>9.2} {:>9.2}", s.median * 1e3, s.min * 1e3, s.max * 1e3);
    println!("{} on {} ({:.1} s), {} thread(s), {} runs after a warm-up", r.wbin, r.clip, r.clip_s, r.threads, r.runs);
    println!("{:<28} {:>9} {:>9} {:>9}", "ms", "median", "min", "max");
    println!("{:<28} {}", "load", ms(&r.load));
    println!("{:<28} {}", "log-mel (one window)", ms(&r.log_mel));
    println!("{:<28} {}", "encoder (one window)", ms(&r.encoder));
    println!("{:<28} {}", format!("decoder step (pos 0..{STEPS})"), ms(&r.decoder_step));
    println!("{:<28} {}", format!("end to end ({} tokens)", r.tokens), ms(&r.end_to_end));
    let p = &r.peaks;
    println!(
        "peak (Cranelift register loop, 128-bit): f32 FMA {:.1} GFLOP/s per thread, {:.1} on {} thread(s); \
         int8 dot {:.1} GOP/s per thread, {:.1} on {} thread(s)",
        p.fma_f32_per_thread, p.fma_f32_all, r.threads, p.dot_i8_per_thread, p.dot_i8_all, r.threads
    );
    println!("kernel classes (one profiled window and {STEPS} steps):");
    println!("{:<24} {:>11} {:>13} {:>9} {:>8}", "class", "encoder ms", "ms per step", "G-ops/s", "% peak");
    for c in &r.classes {
        println!(
            "{:<24} {:>11.1} {:>13.3} {:>9.1} {:>8}",
            c.class,
            c.encoder_s * 1e3,
            c.step_s * 1e3,
            c.gops,
            c.percent_of_peak.map(|v| format!("{v:.0}%")).unwrap_or_else(|| "-".into())
        );
    }
}

/// How many accumulators the peak loops keep (enough independent chains to cover the
/// instruction's latency at its throughput).
const ACCS: usize = 10;
const ITERS: i64 = 200_000;
const UNROLL: usize = 4;

/// A kernel that runs `ITERS` iterations of `ACCS` independent FMAs (or int8 dot products)
/// on registers, then stores their sum so none of it is dead.
pub fn peak_kernel(int8: bool) -> Kernel {
    let (p, i, x, y) = (2, 3, 4, 5);
    let accs: Vec<u32> = (6..6 + ACCS as u32).collect();
    let mut body: Vec<Stmt> = vec![];
    if int8 {
        body.push(let_(x, load_as(Ty::I8x16, 0, int(0))));
        body.push(let_(y, load_as(Ty::U8x16, 1, int(0))));
    } else {
        body.push(let_(x, load4(2, int(0))));
        body.push(let_(y, load4(2, int(4))));
    }
    for &a in &accs {
        body.push(let_(a, if int8 { splat(int(0)) } else { splat(f(0.0)) }));
    }
    // Unrolled UNROLL times, so the loop's own instructions are a small share.
    let inner: Vec<Stmt> = (0..UNROLL)
        .flat_map(|_| accs.iter())
        .map(|&a| set(a, if int8 { dot4(var(a), var(x), var(y)) } else { fma(var(a), var(x), var(y)) }))
        .collect();
    body.push(for_(i, int(0), int(ITERS), UNROLL as i64, inner));
    let total = accs.iter().skip(1).fold(var(accs[0]), |s, &a| add(s, var(a)));
    body.push(if int8 {
        store(3, mul(var(p), int(4)), cvt(Ty::F32x4, total))
    } else {
        store(3, mul(var(p), int(4)), total)
    });
    let buffers = vec![
        Buffer { name: "w".into(), elem: Elem::I8, len: 16 },
        Buffer { name: "x".into(), elem: Elem::U8, len: 16 },
        Buffer { name: "c".into(), elem: Elem::F32, len: 8 },
        Buffer { name: "out".into(), elem: Elem::F32, len: 4 },
    ];
    Kernel {
        name: if int8 { "peak_dot_i8".into() } else { "peak_fma_f32".into() },
        buffers,
        parallel_extent: 1,
        flops: 0,
        body: vec![for_(p, var(START), var(END), 1, body)],
        vars: 6 + ACCS as u32,
        launch: None,
        shared: vec![],
    }
}

/// Best G-ops/s of the peak loop on each of `threads` threads at once, summed.
fn peak_on(int8: bool, threads: usize) -> Result<f64> {
    let k = peak_kernel(int8);
    let ops_per_call = ACCS as f64 * ITERS as f64 * if int8 { 32.0 } else { 8.0 };
    let target = wcc_targets::host()?;
    let results: Vec<Result<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<f64> {
                    let jk = wcc_backend::jit::compile_for(&k, &target).context("compiling the peak loop")?;
                    // Bytes of 1 for the int8 operands; 1.0 for the f32 ones (normal numbers: no
                    // denormal slow path).
                    let mut bufs: Vec<Vec<u8>> = k
                        .buffers
                        .iter()
                        .map(|b| match b.elem {
                            Elem::F32 => 1f32.to_le_bytes().repeat(b.len),
                            _ => vec![1u8; b.bytes()],
                        })
                        .collect();
                    let mut best = f64::MAX;
                    for _ in 0..15 {
                        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                        let t = Instant::now();
                        jk.run(&mut refs)?;
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    Ok(ops_per_call / best / 1e9)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a peak thread panicked")))).collect()
    });
    results.into_iter().sum()
}

fn peaks(threads: usize) -> Result<Peaks> {
    Ok(Peaks {
        fma_f32_per_thread: peak_on(false, 1)?,
        fma_f32_all: peak_on(false, threads)?,
        dot_i8_per_thread: peak_on(true, 1)?,
        dot_i8_all: peak_on(true, threads)?,
    })
}
