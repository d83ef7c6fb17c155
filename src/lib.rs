//! The `wcc` driver: glue between the compiler crates and the runtime, used by the CLI and
//! the end-to-end tests. The CLI itself (`main.rs`) only parses flags and calls in here.

pub mod interpret;

use std::path::Path;

use anyhow::{Context, Result};
use wcc_frontend::LoadedModel;

/// The passes the interpreter path applies: the cross-attention K/V hoisting, without which
/// every decoder step would recompute them from the audio features.
pub const INTERPRETER_PASSES: &[&str] = &["hoist-cross-kv"];

/// Resolves `--model` (a directory or a name) and lowers the checkpoint.
pub fn load_model(model: &str) -> Result<LoadedModel> {
    let dir = wcc_frontend::resolve_model(model)?;
    let loaded = wcc_frontend::load(&dir)?;
    Ok(loaded)
}

/// Reads an audio file as 16 kHz mono samples.
pub fn load_audio(path: &Path) -> Result<Vec<f32>> {
    Ok(wcc_runtime::audio::load_audio(path)?)
}

/// Lowers `model`, runs `passes`, and returns the module.
pub fn module_after(model: &str, passes: &[&str]) -> Result<wcc_ir::Module> {
    let loaded = load_model(model)?;
    wcc_passes::run(loaded.module, passes).context("running passes")
}
