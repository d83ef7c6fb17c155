//! Lowering of fused IR groups to kernels: the kernel IR, the Cranelift (CPU) emitter and the
//! PTX (GPU) emitter. Empty until the Cranelift backend issue.
