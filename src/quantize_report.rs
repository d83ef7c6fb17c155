//! `wcc quantize-report`: how much each quantizable layer costs in accuracy when it alone is
//! int8, measured on calibration clips against the f32 build of the same model.
//!
//! For every layer the `quantize` pass would make int8 (linear layers, the encoder's
//! attention products, the token embedding) a build is compiled with that layer int8 and
//! every other one kept in f32; each calibration clip's first window is encoded, and the
//! decoder is teacher-forced along the f32 build's greedy transcript. Reported per layer:
//! the relative L2 error of the encoder's outputs, the mean KL divergence of the decoder's
//! next-token distribution from the f32 one (nats per token), and how often its most likely
//! token is the f32 build's. The rows are ranked by the KL divergence; layers that a default
//! `--int8` keeps in f32 are marked, with the reason.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use wcc_ir::Op;
use wcc_runtime::compiled::CompiledModel;
use wcc_runtime::decode::{self, Decoder};
use wcc_runtime::transcribe::WhisperModel;

/// One layer quantized alone (or, for the first row, every layer a default `--int8` build
/// quantizes).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerRow {
    pub layer: String,
    /// `linear`, `attention` or `embedding`.
    pub kind: &'static str,
    pub encoder_rel_l2: f64,
    pub decoder_kl: f64,
    pub top1_agreement: f64,
    /// Why a default `--int8` keeps this layer in f32, if it does.
    pub kept_float: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub clips: Vec<String>,
    /// The default `--int8` build, all its layers at once.
    pub default_int8: LayerRow,
    /// Each layer alone, most harmful first.
    pub layers: Vec<LayerRow>,
}

/// The quantizable layers of `model` under `--int8` (names of the nodes that become int8).
pub fn quantizable_layers(model: &str) -> Result<Vec<(String, &'static str)>> {
    let options = wcc_passes::PassOptions { int8: true, keep_float: Some(vec![]), ..Default::default() };
    // The layers as `quantize` makes them (and `--keep-float` names them): before `flash`
    // fuses each attention's two products into one op.
    let m = crate::module_after(model, &wcc_passes::pipeline_until("quantize")?, &options)?;
    let mut out = Vec::new();
    for g in &m.graphs {
        for n in &g.nodes {
            let kind = match n.op {
                Op::QLinear { .. } => "linear",
                Op::QMatMul => "attention",
                Op::Gather if n.inputs.len() == 3 => "embedding",
                _ => continue,
            };
            out.push((g.value(n.output).name.clone(), kind));
        }
    }
    Ok(out)
}

/// The first window's log-mel of the audio files in `dirs` (each directory's sorted by name,
/// at most `max` from each).
pub(crate) fn calibration_clips(
    dirs: &[PathBuf],
    n_mels: usize,
    frames: usize,
    max: usize,
) -> Result<Vec<(String, Vec<f32>)>> {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let mut here: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading the calibration directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("wav")))
            .collect();
        here.sort();
        if here.is_empty() {
            bail!("{}: no .wav files to calibrate on", dir.display());
        }
        here.truncate(max.max(1));
        files.extend(here);
    }
    let filters = wcc_runtime::mel::mel_filters(n_mels);
    files
        .iter()
        .map(|f| {
            let samples = crate::load_audio(f)?;
            let end = samples.len().min(frames * wcc_runtime::HOP_LENGTH);
            let mel = wcc_runtime::mel::log_mel_spectrogram_with(&samples[..end], &filters, frames);
            Ok((f.file_name().unwrap_or_default().to_string_lossy().into_owned(), mel))
        })
        .collect()
}

/// What the f32 build gives on the calibration clips.
struct Reference {
    encoder: Vec<Vec<(String, Vec<f32>)>>,
    /// Per clip: the token fed at each position (prompt, then the greedy transcript).
    tokens: Vec<Vec<u32>>,
    /// Per clip, per position from the last prompt token on: log-probabilities.
    logprobs: Vec<Vec<Vec<f32>>>,
    prompt_len: usize,
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    logits.iter().map(|&x| x - lse).collect()
}

/// Feeds `tokens` and returns the log-probabilities after each of them from `from` on.
fn teacher_forced(m: &mut CompiledModel, tokens: &[u32], from: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        let logits = m.step(t, pos).map_err(anyhow::Error::msg)?;
        if pos + 1 >= from {
            out.push(log_softmax(logits));
        }
    }
    Ok(out)
}

fn reference(m: &mut CompiledModel, clips: &[(String, Vec<f32>)]) -> Result<Reference> {
    let cfg = m.header().generation.clone();
    let prompt = decode::transcribe_prompt(&cfg, cfg.languages.first().map(|l| l.1), false);
    let mut r = Reference { encoder: vec![], tokens: vec![], logprobs: vec![], prompt_len: prompt.len() };
    for (_, mel) in clips {
        m.encode(mel).map_err(anyhow::Error::msg)?;
        r.encoder.push(m.encoder_outputs());
        let mut tokens = prompt.clone();
        tokens.extend(decode::greedy(m, &cfg, &prompt)?);
        r.logprobs.push(teacher_forced(m, &tokens, prompt.len())?);
        r.tokens.push(tokens);
    }
    Ok(r)
}

/// `(encoder relative L2, mean KL, top-1 agreement)` of a build against the reference.
fn compare(m: &mut CompiledModel, clips: &[(String, Vec<f32>)], r: &Reference) -> Result<(f64, f64, f64)> {
    let (mut num, mut den) = (0f64, 0f64);
    let (mut kl, mut agree, mut n) = (0f64, 0usize, 0usize);
    for (c, (_, mel)) in clips.iter().enumerate() {
        m.encode(mel).map_err(anyhow::Error::msg)?;
        for ((_, a), (_, b)) in m.encoder_outputs().iter().zip(&r.encoder[c]) {
            for (&x, &y) in a.iter().zip(b) {
                num += ((x - y) as f64).powi(2);
                den += (y as f64).powi(2);
            }
        }
        let lp = teacher_forced(m, &r.tokens[c], r.prompt_len)?;
        for (q, p) in lp.iter().zip(&r.logprobs[c]) {
            kl += p.iter().zip(q).map(|(&lp, &lq)| (lp.exp() as f64) * (lp - lq) as f64).sum::<f64>();
            let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|x| x.0);
            agree += (argmax(p) == argmax(q)) as usize;
            n += 1;
        }
    }
    Ok(((num / den.max(1e-30)).sqrt(), kl / n.max(1) as f64, agree as f64 / n.max(1) as f64))
}

/// Why a default `--int8` keeps `layer` in f32, if it does.
fn kept_by_default(layer: &str) -> Option<String> {
    wcc_passes::quantize::DEFAULT_KEEP_FLOAT
        .iter()
        .find(|(p, _)| wcc_passes::quantize::glob_match(p, layer))
        .map(|(_, why)| why.to_string())
}

/// Builds the report: one compile and one pass over the clips per layer.
pub fn quantize_report(
    model: &str,
    calibrate: &[PathBuf],
    clips: usize,
    threads: usize,
    progress: &dyn Fn(&str),
) -> Result<Report> {
    let layers = quantizable_layers(model)?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let wbin = tmp.path().join("m.wbin");
    let pipeline = wcc_passes::default_pipeline();
    let build = |options: &wcc_passes::PassOptions| -> Result<CompiledModel> {
        crate::compile(
            model,
            &Default::default(),
            "host",
            &pipeline,
            options,
            &crate::Dumps::default(),
            &wbin,
            &|_, _| {},
        )?;
        Ok(CompiledModel::load(&wbin, threads)?)
    };
    progress("f32 reference");
    let mut f32m = build(&wcc_passes::PassOptions::default())?;
    let (n_mels, frames) = f32m.input_shape();
    let audio = calibration_clips(calibrate, n_mels, frames, clips)?;
    let r = reference(&mut f32m, &audio)?;
    drop(f32m);
    let row = |layer: &str, kind: &'static str, options: wcc_passes::PassOptions| -> Result<LayerRow> {
        let mut m = build(&options)?;
        let (encoder_rel_l2, decoder_kl, top1_agreement) = compare(&mut m, &audio, &r)?;
        Ok(LayerRow {
            layer: layer.to_string(),
            kind,
            encoder_rel_l2,
            decoder_kl,
            top1_agreement,
            kept_float: kept_by_default(layer),
        })
    };
    progress("default --int8");
    let default_int8 = row("(default --int8)", "all", wcc_passes::PassOptions { int8: true, ..Default::default() })?;
    let mut rows = Vec::new();
    for (i, (layer, kind)) in layers.iter().enumerate() {
        progress(&format!("{}/{} {layer}", i + 1, layers.len()));
        let others = layers.iter().filter(|(l, _)| l != layer).map(|(l, _)| l.clone()).collect();
        rows.push(row(
            layer,
            kind,
            wcc_passes::PassOptions { int8: true, keep_float: Some(others), ..Default::default() },
        )?);
    }
    rows.sort_by(|a, b| b.decoder_kl.total_cmp(&a.decoder_kl));
    Ok(Report {
        model: model.to_string(),
        clips: audio.into_iter().map(|(n, _)| n).collect(),
        default_int8,
        layers: rows,
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "quantization sensitivity of {} on {} clip(s): {}",
            self.model,
            self.clips.len(),
            self.clips.join(", ")
        )?;
        writeln!(f, "each layer int8 alone vs the f32 build; ranked by the decoder's KL divergence")?;
        writeln!(
            f,
            "{:>4}  {:<44} {:<9} {:>11} {:>12} {:>6}  default --int8",
            "rank", "layer", "kind", "encoder L2", "KL nats/tok", "top-1"
        )?;
        let line = |f: &mut std::fmt::Formatter<'_>, rank: String, r: &LayerRow| {
            writeln!(
                f,
                "{rank:>4}  {:<44} {:<9} {:>11.3e} {:>12.3e} {:>5.1}%  {}",
                r.layer,
                r.kind,
                r.encoder_rel_l2,
                r.decoder_kl,
                100.0 * r.top1_agreement,
                match &r.kept_float {
                    Some(why) => format!("kept f32: {why}"),
                    None => "int8".into(),
                }
            )
        };
        line(f, "all".into(), &self.default_int8)?;
        for (i, r) in self.layers.iter().enumerate() {
            line(f, (i + 1).to_string(), r)?;
        }
        Ok(())
    }
}
