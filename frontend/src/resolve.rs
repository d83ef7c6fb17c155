//! Model names → checkpoint directories.

use std::path::{Path, PathBuf};

use crate::checkpoint::FrontendError;

/// The directories searched for a model name, in order: `$WCC_MODELS/<name>`,
/// `~/.cache/wcc/models/<name>`, and the Hugging Face hub cache
/// (`~/.cache/huggingface/hub/models--openai--whisper-<name>/snapshots/*`).
pub fn candidates(name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("WCC_MODELS") {
        out.push(PathBuf::from(dir).join(name));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        out.push(home.join(".cache/wcc/models").join(name));
        let hub = home.join(format!(".cache/huggingface/hub/models--openai--whisper-{name}/snapshots"));
        let mut snaps: Vec<PathBuf> =
            std::fs::read_dir(&hub).into_iter().flatten().flatten().map(|e| e.path()).collect();
        snaps.sort();
        out.extend(snaps);
        if out.last().map(|p| !p.starts_with(&hub)).unwrap_or(true) {
            out.push(hub);
        }
    }
    out
}

/// Resolves `--model`: an existing directory is used as it is; otherwise the name is looked
/// up in [`candidates`].
pub fn resolve_model(model: &str) -> Result<PathBuf, FrontendError> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let looks_like_path = model.contains('/') || model.starts_with('.');
    if !looks_like_path && !model.is_empty() {
        let c = candidates(model);
        if let Some(found) = c.iter().find(|d| d.join("model.bin").is_file() || d.join("model.safetensors").is_file()) {
            return Ok(found.clone());
        }
        let list: Vec<String> = c.iter().map(|d| d.display().to_string()).collect();
        return Err(FrontendError::NotFound(format!(
            "model `{model}` not found (looked in {}); `scripts/fetch-models {model}` fetches tiny.en and base",
            list.join(", ")
        )));
    }
    Err(FrontendError::NotFound(format!("model directory `{model}` does not exist")))
}
