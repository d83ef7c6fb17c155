//! In-process compilation with `cranelift-jit`, for tests: compile a kernel, call it on
//! host buffers.

use cranelift_codegen::Context;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};

use crate::kir::Kernel;
use crate::BackendError;

/// A kernel compiled into this process.
pub struct JitKernel {
    // Owns the executable memory `f` points into.
    _module: JITModule,
    f: unsafe extern "C" fn(*const *mut u8, *const u8, i64, i64),
    kernel: Kernel,
}

/// Compiles `k` for the host.
pub fn compile(k: &Kernel) -> Result<JitKernel, BackendError> {
    let target = wcc_targets::host().map_err(|e| BackendError(e.to_string()))?;
    compile_for(k, &target)
}

/// Compiles `k` for `target` (whose features this host must have to run it).
pub fn compile_for(k: &Kernel, target: &wcc_targets::Target) -> Result<JitKernel, BackendError> {
    let isa = crate::cranelift::isa(target)?;
    let mut module = JITModule::new(JITBuilder::with_isa(isa.clone(), cranelift_module::default_libcall_names()));
    let func = crate::cranelift::function(k, &*isa)?;
    let id = module
        .declare_function(&k.name, Linkage::Local, &func.signature)
        .map_err(|e| BackendError(format!("jit: {e}")))?;
    let mut ctx = Context::for_function(func);
    module.define_function(id, &mut ctx).map_err(|e| BackendError(format!("jit {}: {e:?}", k.name)))?;
    module.finalize_definitions().map_err(|e| BackendError(format!("jit: {e}")))?;
    let ptr = module.get_finalized_function(id);
    // SAFETY: `ptr` is the entry of the function just compiled with exactly this signature.
    let f = unsafe { std::mem::transmute::<*const u8, unsafe extern "C" fn(*const *mut u8, *const u8, i64, i64)>(ptr) };
    Ok(JitKernel { _module: module, f, kernel: k.clone() })
}

impl JitKernel {
    /// Runs the kernel over its whole parallel range on byte buffers, checking each against
    /// the kernel's declared size first.
    pub fn run(&self, bufs: &mut [&mut [u8]]) -> Result<(), BackendError> {
        if bufs.len() != self.kernel.buffers.len() {
            return Err(BackendError(format!(
                "{} takes {} buffers, got {}",
                self.kernel.name,
                self.kernel.buffers.len(),
                bufs.len()
            )));
        }
        for (b, decl) in bufs.iter().zip(&self.kernel.buffers) {
            if b.len() < decl.bytes() {
                return Err(BackendError(format!(
                    "{}: buffer {} holds {} bytes, needs {}",
                    self.kernel.name,
                    decl.name,
                    b.len(),
                    decl.bytes()
                )));
            }
        }
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        // SAFETY: every buffer is at least as long as the kernel's declaration, and the
        // kernel's accesses stay inside its declared lengths (by construction in `lower`,
        // checked by the kernel verifier). Loads and stores are unaligned, so byte buffers do.
        unsafe { (self.f)(ptrs.as_ptr(), std::ptr::null(), 0, self.kernel.parallel_extent as i64) };
        Ok(())
    }
}

/// Runs one IR op through its kernels (JIT-compiled), on host tensors: the backend's
/// answer for what the interpreter's `eval` computes. `in_place` selects the in-place
/// variant of `ScatterRow` (the result starts as a copy of the cache).
pub fn run_op(
    op: &wcc_ir::Op,
    inputs: &[&wcc_ir::interp::Tensor],
    out: &wcc_ir::TensorType,
    in_place: bool,
) -> Result<wcc_ir::interp::Tensor, BackendError> {
    run_op_for(op, inputs, out, in_place, None)
}

/// [`run_op`] with the kernels compiled for `target` (`None`: the host).
pub fn run_op_for(
    op: &wcc_ir::Op,
    inputs: &[&wcc_ir::interp::Tensor],
    out: &wcc_ir::TensorType,
    in_place: bool,
    target: Option<&wcc_targets::Target>,
) -> Result<wcc_ir::interp::Tensor, BackendError> {
    let tys: Vec<wcc_ir::TensorType> =
        inputs.iter().map(|t| wcc_ir::TensorType::new(t.dtype(), t.shape.clone())).collect();
    let ty_refs: Vec<&wcc_ir::TensorType> = tys.iter().collect();
    let host = wcc_targets::host().map_err(|e| BackendError(e.to_string()))?;
    let target = target.unwrap_or(&host);
    let lowered = crate::lower::lower_op(op, &ty_refs, out, in_place, target)?;
    run_launches(op, &lowered, inputs, out, in_place, &mut |k, bufs| compile_for(k, target)?.run(bufs))
}

/// Runs the launches of one lowered op on host tensors with `run` (a JIT-compiled kernel,
/// or the GPU simulator): the operands, the result and the scratch buffers as byte
/// buffers, each launch handed its slots. `in_place`: a `ScatterRow`'s result starts as a
/// copy of the cache.
pub fn run_launches(
    op: &wcc_ir::Op,
    lowered: &crate::lower::OpKernels,
    inputs: &[&wcc_ir::interp::Tensor],
    out: &wcc_ir::TensorType,
    in_place: bool,
    run: &mut dyn FnMut(&crate::kir::Kernel, &mut [&mut [u8]]) -> Result<(), BackendError>,
) -> Result<wcc_ir::interp::Tensor, BackendError> {
    use wcc_ir::interp::{Data, Tensor};

    use crate::lower::Slot;
    if matches!(op, wcc_ir::Op::Reshape { .. }) {
        return Ok(Tensor { shape: out.shape.clone(), data: inputs[0].data.clone() });
    }
    let mut ins: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let mut result =
        if matches!(op, wcc_ir::Op::ScatterRow) && in_place { ins[0].clone() } else { vec![0u8; out.size_bytes()] };
    let mut scratch: Vec<Vec<u8>> = lowered.scratch.iter().map(|&n| vec![0u8; n]).collect();
    for (k, slots) in &lowered.launches {
        // Each slot is borrowed mutably once per launch: take the buffers out, put them back.
        let mut taken: Vec<Vec<u8>> = slots
            .iter()
            .map(|s| match *s {
                Slot::Input(i) => std::mem::take(&mut ins[i]),
                Slot::Scratch(j) => std::mem::take(&mut scratch[j]),
                Slot::Output => std::mem::take(&mut result),
            })
            .collect();
        {
            let mut bufs: Vec<&mut [u8]> = taken.iter_mut().map(|v| v.as_mut_slice()).collect();
            run(k, &mut bufs)?;
        }
        for (s, v) in slots.iter().zip(taken) {
            match *s {
                Slot::Input(i) => ins[i] = v,
                Slot::Scratch(j) => scratch[j] = v,
                Slot::Output => result = v,
            }
        }
    }
    let data = Data::from_le_bytes(out.dtype, &result)
        .ok_or_else(|| BackendError(format!("results of type {} are not supported", out.dtype)))?;
    Ok(Tensor::new(out.shape.clone(), data))
}
