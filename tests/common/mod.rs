//! Shared helpers of the end-to-end tests: where the models, the shared data and the Python
//! references are, and how to run the `wcc` binary. Missing prerequisites fail loudly with
//! the command that provides them (the README's test command runs them all).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data` beside the repository (or `$WCC_SHARED_DATA`).
pub fn shared_data() -> PathBuf {
    let p = std::env::var_os("WCC_SHARED_DATA").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared/data"));
    assert!(
        p.join("audio/en/jfk.wav").is_file(),
        "shared test data not found at {} (set WCC_SHARED_DATA)",
        p.display()
    );
    p
}

pub fn jfk() -> PathBuf {
    shared_data().join("audio/en/jfk.wav")
}

/// The directory of a fetched model.
pub fn model_dir(name: &str) -> PathBuf {
    wcc_frontend::resolve_model(name)
        .unwrap_or_else(|e| panic!("{e}\nrun `scripts/fetch-models {name}` first (scripts/test does)"))
}

/// The Python of the reference venv (`scripts/setup-reference`).
pub fn ref_python() -> PathBuf {
    let p = std::env::var_os("WCC_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/ref-venv/bin/python"));
    assert!(
        p.exists(),
        "reference Python not found at {}: run scripts/setup-reference (scripts/test does)",
        p.display()
    );
    p
}

/// Runs `scripts/reference.py` with `args`; returns its stdout.
pub fn reference(args: &[&str]) -> String {
    let out = Command::new(ref_python()).arg(repo().join("scripts/reference.py")).args(args).output().unwrap();
    assert!(out.status.success(), "reference.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn wcc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wcc")).args(args).output().unwrap()
}

/// Runs wcc, asserting success; returns stdout.
pub fn wcc_ok(args: &[&str]) -> String {
    let out = wcc(args);
    assert!(out.status.success(), "wcc {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs wcc expecting a clean failure: non-zero exit, one `error:` line, no panic.
/// Returns the message.
pub fn wcc_err(args: &[&str]) -> String {
    let out = wcc(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "wcc {args:?} should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "wcc {args:?}: exit status {:?}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "wcc {args:?} panicked:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "wcc {args:?}: expected a one-line error, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

pub fn read_npy(p: &Path) -> (Vec<usize>, Vec<f32>) {
    wcc_runtime::npy::read_f32(p).unwrap()
}

/// `‖a − b‖₂ / ‖b‖₂` and `max|a − b| / max|b|`.
pub fn relative_errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den, mut maxd, mut maxb) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y) as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
        maxd = maxd.max(d.abs());
        maxb = maxb.max((y as f64).abs());
    }
    ((num / den).sqrt(), maxd / maxb)
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `wcc compile --model tiny.en --int8` into `dir/tiny8.wbin`: the quick model of the
/// end-to-end tests.
pub fn compile_tiny_int8(dir: &Path) -> std::path::PathBuf {
    let wbin = dir.join("tiny8.wbin");
    wcc_ok(&["compile", "--model", "tiny.en", "--int8", "-o", p(&wbin)]);
    wbin
}

/// The inputs of one `decoder_step` of `m`: `token` at `position`, each self-attention cache
/// (`self_*`) made by `cache`, every other input fed from the encoder output of the same name
/// (`enc_out`, in the encoder's output order), as the runtime binds graphs.
pub fn decoder_step_inputs(
    m: &wcc_ir::Module,
    enc_out: &[wcc_ir::interp::Tensor],
    token: i32,
    position: i32,
    cache: &dyn Fn(&wcc_ir::TensorType) -> wcc_ir::interp::Tensor,
) -> Vec<wcc_ir::interp::Tensor> {
    use wcc_ir::interp::Tensor;
    let (enc, dec) = (m.graph("encoder").unwrap(), m.graph("decoder_step").unwrap());
    dec.inputs
        .iter()
        .map(|&i| {
            let v = dec.value(i);
            match v.name.as_str() {
                "tokens" => Tensor::i32([1], vec![token]),
                "position" => Tensor::i32([1], vec![position]),
                name if name.starts_with("self_") => cache(&v.ty),
                name => enc_out[enc.outputs.iter().position(|&o| enc.value(o).name == name).unwrap()].clone(),
            }
        })
        .collect()
}
