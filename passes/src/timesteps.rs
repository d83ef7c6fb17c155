//! `timesteps`: fixes the encoder's input length to `N` mel frames (`N/2` audio positions)
//! instead of Whisper's 30 s (3000 frames, 1500 positions).
//!
//! Rewrites: the `mel` input becomes `[n_mels, N]`; every graph input with an axis of
//! `n_audio_ctx` positions (the audio features or the hoisted cross-attention K/V the decoder
//! reads) gets `N/2` there; the slice of the encoder's positional embedding ends at `N/2`;
//! reshapes that name `n_audio_ctx` name `N/2`. Every node's type is then inferred afresh
//! and checked by the verifier.
//!
//! Why it is sound: the convolutions, attention and layer norms of Whisper's encoder are
//! defined for any length; only the positional embedding fixes one, and using its first `N/2`
//! rows is what running Whisper on a shorter (unpadded) input means. The rewrite finds the
//! audio-position axis by its extent, so it first checks that no other extent of the model
//! (width, heads, head size, FFN width, text context, vocabulary, mel bins) equals
//! `n_audio_ctx`; if one did, the pass refuses rather than guess.

use wcc_ir::{infer_type, Module, Op, TensorType, ValueDef};

use crate::{PassError, PassOptions};

const NAME: &str = "timesteps";
/// Whisper's full window: 30 s of mel frames.
pub const MAX_TIMESTEPS: usize = 3000;

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed { pass: NAME, msg: msg.into() }
}

/// Checks a `--timesteps` value against a model whose full window is `max` frames.
pub fn check_timesteps(n: usize, max: usize) -> Result<(), String> {
    if (2..=max).contains(&n) && n.is_multiple_of(2) {
        Ok(())
    } else {
        Err(format!("--timesteps {n} is out of range: an even number of mel frames from 2 to {max}"))
    }
}

/// `auto`: the clip's frames plus a tail of silence (so the model sees the speech end and
/// emits end-of-text), rounded up to a multiple of 64, at most 3000. The tail is 3 s and the
/// window at least 10.24 s: with less, tiny.en falls into repetition loops on short clips of
/// the dev set (measured with `scripts/bench-timesteps.py`: a 1 s tail left 6 of 22 clips
/// looping to the token cap, a 3 s tail with a 7.68 s minimum still 1).
pub fn auto_timesteps(samples: usize) -> usize {
    const TAIL: usize = 300;
    const MIN: usize = 1024;
    let frames = (samples.div_ceil(160) + TAIL).max(MIN);
    (frames.div_ceil(64) * 64).min(MAX_TIMESTEPS)
}

pub fn timesteps(mut m: Module, options: &PassOptions) -> Result<Module, PassError> {
    let Some(n) = options.timesteps else { return Ok(m) };
    let param = |k: &str| m.param(k).map(|v| v as usize).ok_or_else(|| fail(format!("the module has no `{k}`")));
    let ctx = param("n_audio_ctx")?;
    check_timesteps(n, 2 * ctx).map_err(fail)?;
    let d = param("n_audio_state")?;
    let heads = param("n_audio_head")?;
    let others = [d, heads, d / heads.max(1), 4 * d, param("n_text_ctx")?, param("n_vocab")?, param("n_mels")?];
    if others.contains(&ctx) {
        return Err(fail(format!(
            "n_audio_ctx = {ctx} equals another extent of the model; cannot tell the axes apart"
        )));
    }
    let new_ctx = n / 2;
    let frames = 2 * ctx;
    let resize =
        |shape: &[usize]| -> Vec<usize> { shape.iter().map(|&x| if x == ctx { new_ctx } else { x }).collect() };
    for g in &mut m.graphs {
        for &i in &g.inputs.clone() {
            let v = &mut g.values[i.index()];
            v.ty = if g.name == "encoder" && v.name == "mel" {
                if v.ty.shape.len() != 2 || v.ty.shape[1] != frames {
                    return Err(fail(format!("the encoder input is {}, expected [n_mels, {frames}]", v.ty)));
                }
                TensorType::new(v.ty.dtype, [v.ty.shape[0], n])
            } else {
                TensorType::new(v.ty.dtype, resize(&v.ty.shape))
            };
        }
        for k in 0..g.nodes.len() {
            let node = &mut g.nodes[k];
            match &mut node.op {
                Op::Reshape { shape } => *shape = resize(shape),
                Op::Slice { axis: 0, start: 0, end } if *end == ctx => *end = new_ctx,
                _ => {}
            }
            let node = &g.nodes[k];
            let tys: Vec<&TensorType> = node.inputs.iter().map(|&i| g.ty(i)).collect();
            let ty = infer_type(&node.op, &tys).map_err(|e| fail(format!("%{}: {e}", g.value(node.output).name)))?;
            let out = node.output.index();
            debug_assert!(matches!(g.values[out].def, ValueDef::Node(_)));
            g.values[out].ty = ty;
        }
    }
    m.params.insert("timesteps".into(), n as i64);
    Ok(m)
}
