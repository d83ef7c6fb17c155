//! The wcc runtime: everything needed to run a Whisper model that is not the model itself.
//! Audio decoding and resampling ([`audio`]), Whisper's log-mel features ([`mel`]), the
//! tokenizer and generation settings ([`tokenizer`]), and decoding strategies over any
//! model that implements [`decode::Decoder`] ([`decode`]).
//!
//! This crate depends on no compiler crate: a compiled model runs with it alone.

pub mod audio;
pub mod compiled;
pub mod cuda;
pub mod decode;
pub mod mel;
pub mod npy;
mod team;
pub mod tokenizer;
pub mod transcribe;
pub mod words;
/// The `.wbin` format lives in its own crate, shared with the compiler.
pub use wcc_format as wbin;

/// Whisper's fixed audio constants.
pub const SAMPLE_RATE: u32 = 16_000;
pub const N_FFT: usize = 400;
pub const HOP_LENGTH: usize = 160;
/// Samples in one 30 s window.
pub const N_SAMPLES: usize = 30 * SAMPLE_RATE as usize;
/// Mel frames in one 30 s window.
pub const N_FRAMES: usize = N_SAMPLES / HOP_LENGTH;
