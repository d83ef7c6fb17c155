//! The wcc backend: IR ops are lowered to kernels of a small kernel IR ([`kir`], [`lower`]),
//! which the Cranelift emitter ([`cranelift`]) compiles to machine code. [`program`] turns a
//! whole module into a program: kernels, launches over one arena, and the weights.

pub mod cranelift;
pub mod jit;
pub mod kir;
pub mod kir_verify;
pub mod lower;
pub mod program;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);
