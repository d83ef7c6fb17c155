//! The wcc backend: IR ops are lowered to kernels of a small kernel IR ([`kir`], [`lower`]),
//! which the Cranelift emitter ([`cranelift`]) compiles to machine code. [`program`] turns a
//! whole module into a program: kernels, launches over one arena, and the weights. For a GPU
//! target, [`gpu`] chooses the GPU schedules (grid, blocks, shared memory) and [`ptx`] emits
//! them as one PTX module; [`gpusim`] runs GPU kernels on the CPU, catching races,
//! out-of-bounds accesses and divergent barriers.

pub mod cranelift;
pub mod gpu;
pub mod gpusim;
pub mod jit;
pub mod kir;
pub mod kir_verify;
pub mod lower;
pub mod math;
pub mod program;
pub mod ptx;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);
