//! Transcript outputs: plain text, SRT and WebVTT subtitles, TSV and JSON, to stdout or as
//! files named after the audio in an output directory (never over an existing file unless
//! asked to).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use wcc_runtime::transcribe::Transcript;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Txt,
    Srt,
    Vtt,
    Tsv,
    Json,
    /// Every format above (files only).
    All,
}

impl Format {
    /// The formats this one stands for.
    pub fn expand(self) -> Vec<Format> {
        match self {
            Format::All => vec![Format::Txt, Format::Srt, Format::Vtt, Format::Tsv, Format::Json],
            f => vec![f],
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Txt => "txt",
            Format::Srt => "srt",
            Format::Vtt => "vtt",
            Format::Tsv => "tsv",
            Format::Json => "json",
            Format::All => "all",
        }
    }
}

/// How long things took, for the JSON output.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub load_s: f64,
    pub transcribe_s: f64,
    pub stats: crate::Stats,
}

/// The JSON form: text, language, tokens, segments (id, start, end, text, tokens,
/// avg_logprob, compression_ratio, no_speech_prob, temperature, skipped, and with word
/// timestamps words: word, start, end, probability, tokens), timings.
pub fn json(out: &Transcript, t: &Timings) -> serde_json::Value {
    serde_json::json!({
        "text": out.text(),
        "language": out.language,
        "tokens": out.tokens(),
        "segments": out.segments.iter().enumerate().map(|(id, s)| {
            let mut seg = serde_json::json!({
                "id": id, "start": s.start, "end": s.end, "text": s.text.trim(), "tokens": s.tokens,
                "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob, "temperature": s.temperature, "skipped": s.skipped,
            });
            if !s.words.is_empty() {
                seg["words"] = s.words.iter().map(|w| serde_json::json!({
                    "word": w.word, "start": w.start, "end": w.end, "probability": w.probability, "tokens": w.tokens,
                })).collect();
            }
            seg
        }).collect::<Vec<_>>(),
        "timings": {
            "load_s": t.load_s, "transcribe_s": t.transcribe_s,
            "encode_s": t.stats.encode_s, "decoder_steps": t.stats.steps, "decoder_s": t.stats.step_s,
            "prefilled_tokens": t.stats.prefilled, "prefill_s": t.stats.prefill_s,
        },
    })
}

/// `HH:MM:SS` then `sep` then milliseconds.
fn clock(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!("{:02}:{:02}:{:02}{sep}{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

/// `out` in format `f` (not `All`).
pub fn render(out: &Transcript, f: Format, t: &Timings) -> Result<String> {
    let kept: Vec<_> = out.segments.iter().filter(|s| !s.skipped && !s.text.trim().is_empty()).collect();
    Ok(match f {
        Format::Txt => kept.iter().map(|s| format!("{}\n", s.text.trim())).collect(),
        Format::Srt => kept
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!("{}\n{} --> {}\n{}\n\n", i + 1, clock(s.start, ','), clock(s.end, ','), s.text.trim())
            })
            .collect(),
        Format::Vtt => {
            let cues: String = kept
                .iter()
                .map(|s| format!("{} --> {}\n{}\n\n", clock(s.start, '.'), clock(s.end, '.'), s.text.trim()))
                .collect();
            format!("WEBVTT\n\n{cues}")
        }
        Format::Tsv => {
            let rows: String = kept
                .iter()
                .map(|s| {
                    let ms = |x: f64| (x * 1000.0).round() as i64;
                    format!("{}\t{}\t{}\n", ms(s.start), ms(s.end), s.text.trim().replace(['\t', '\n'], " "))
                })
                .collect();
            format!("start\tend\ttext\n{rows}")
        }
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&json(out, t))?),
        Format::All => bail!("--output-format all writes files: give --output-dir"),
    })
}

/// The files `audio` gets in `dir`: `<stem>.<extension>` per format. Refused before any
/// work when one exists and `force` is not set, or when two audio files share a stem.
pub fn plan(audio: &[PathBuf], dir: &Path, formats: &[Format], force: bool) -> Result<Vec<Vec<PathBuf>>> {
    if dir.exists() && !dir.is_dir() {
        bail!("--output-dir {}: not a directory", dir.display());
    }
    let mut seen = std::collections::HashSet::new();
    let mut plans = vec![];
    for a in audio {
        let stem = a.file_stem().with_context(|| format!("{}: no file name to name the outputs after", a.display()))?;
        if !seen.insert(stem.to_os_string()) {
            bail!(
                "two audio files are named {}: their outputs in {} would collide",
                stem.to_string_lossy(),
                dir.display()
            );
        }
        let files: Vec<PathBuf> =
            formats.iter().map(|f| dir.join(format!("{}.{}", stem.to_string_lossy(), f.extension()))).collect();
        for f in &files {
            if f.exists() && !force {
                bail!("{} exists (use --force to replace it)", f.display());
            }
        }
        plans.push(files);
    }
    Ok(plans)
}

/// Writes `out` in each format to its planned file (the directory is created if needed).
pub fn write(out: &Transcript, formats: &[Format], files: &[PathBuf], t: &Timings) -> Result<()> {
    for (f, path) in formats.iter().zip(files) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, render(out, *f, t)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One `[start --> end] text` line per segment kept (the text output with timestamps).
pub fn timestamp_lines(out: &Transcript) -> String {
    let lines: Vec<String> = out
        .segments
        .iter()
        .filter(|s| !s.skipped)
        .map(|s| format!("[{:.2} --> {:.2}] {}", s.start, s.end, s.text.trim()))
        .collect();
    lines.join("\n")
}

/// Where transcripts go: files in `dir` (in the formats `format` stands for), or stdout in
/// `format`.
#[derive(Clone, Debug)]
pub struct Output {
    pub dir: Option<PathBuf>,
    pub format: Format,
    pub force: bool,
    /// The plain text on stdout carries segment times.
    pub timestamps: bool,
}

impl Output {
    /// The files of each audio file, checked before any work ([`plan`]); `None` for stdout.
    pub fn plan(&self, audio: &[PathBuf]) -> Result<Option<Vec<Vec<PathBuf>>>> {
        match &self.dir {
            Some(dir) => Ok(Some(plan(audio, dir, &self.format.expand(), self.force)?)),
            None if self.format == Format::All => bail!("--output-format all writes files: give --output-dir"),
            None => Ok(None),
        }
    }

    /// Writes or prints one file's transcript. With several files on stdout, text lines are
    /// prefixed by the file's name and JSON objects are collected into `json_acc` (printed
    /// as one array by [`Output::finish`]).
    pub fn emit(
        &self,
        out: &Transcript,
        audio: &Path,
        files: Option<&[PathBuf]>,
        several: bool,
        t: &Timings,
        json_acc: &mut Vec<serde_json::Value>,
    ) -> Result<()> {
        if let Some(files) = files {
            return write(out, &self.format.expand(), files, t);
        }
        let text = || if self.timestamps { timestamp_lines(out) } else { out.text() };
        match self.format {
            Format::Json if several => {
                let mut v = json(out, t);
                v["file"] = serde_json::json!(audio.display().to_string());
                json_acc.push(v);
            }
            Format::Json => println!("{}", serde_json::to_string_pretty(&json(out, t))?),
            Format::Txt if several && self.timestamps => println!("{}:\n{}", audio.display(), text()),
            Format::Txt if several => println!("{}: {}", audio.display(), text()),
            Format::Txt => println!("{}", text()),
            f => {
                if several {
                    println!("{}:", audio.display());
                }
                print!("{}", render(out, f, t)?);
            }
        }
        Ok(())
    }

    pub fn finish(&self, several: bool, json_acc: Vec<serde_json::Value>) -> Result<()> {
        if several && self.dir.is_none() && self.format == Format::Json {
            println!("{}", serde_json::to_string_pretty(&json_acc)?);
        }
        Ok(())
    }
}

/// A progress bar on stderr for `name`, shown only when stderr is a terminal and the audio
/// is longer than one window (`window_s`); ends its line when the audio is done.
pub fn progress_bar(name: String, window_s: f64) -> impl FnMut(f64, f64) {
    use std::io::{IsTerminal, Write};
    let shown = std::io::stderr().is_terminal();
    move |done: f64, total: f64| {
        if !shown || total <= window_s {
            return;
        }
        const WIDTH: usize = 30;
        let filled = ((done / total).clamp(0.0, 1.0) * WIDTH as f64).round() as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{name} [{}{}] {done:.0}/{total:.0} s", "#".repeat(filled), ".".repeat(WIDTH - filled));
        if done >= total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}
