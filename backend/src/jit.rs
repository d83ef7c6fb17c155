//! In-process compilation with `cranelift-jit`, for tests: compile a kernel, call it on
//! host buffers.

use cranelift_codegen::Context;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};

use crate::kir::{Elem, Kernel};
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
    let isa = crate::cranelift::isa(&target)?;
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

/// A host buffer for a kernel argument.
pub enum HostBuf<'a> {
    F32(&'a mut [f32]),
    I32(&'a mut [i32]),
}

impl JitKernel {
    /// Runs the kernel over its whole parallel range, checking every buffer against the
    /// kernel's declared element type and length first.
    pub fn run(&self, bufs: &mut [HostBuf]) -> Result<(), BackendError> {
        if bufs.len() != self.kernel.buffers.len() {
            return Err(BackendError(format!(
                "{} takes {} buffers, got {}",
                self.kernel.name,
                self.kernel.buffers.len(),
                bufs.len()
            )));
        }
        let mut ptrs = Vec::new();
        for (b, decl) in bufs.iter_mut().zip(&self.kernel.buffers) {
            let (p, len) = match (b, decl.elem) {
                (HostBuf::F32(s), Elem::F32) => (s.as_mut_ptr() as *mut u8, s.len()),
                (HostBuf::I32(s), Elem::I32) => (s.as_mut_ptr() as *mut u8, s.len()),
                _ => {
                    return Err(BackendError(format!(
                        "{}: buffer {} has the wrong element type",
                        self.kernel.name, decl.name
                    )))
                }
            };
            if len < decl.len {
                return Err(BackendError(format!(
                    "{}: buffer {} holds {len}, needs {}",
                    self.kernel.name, decl.name, decl.len
                )));
            }
            ptrs.push(p);
        }
        // SAFETY: every buffer is at least as long as the kernel's declaration, and the
        // kernel's accesses stay inside its declared lengths (by construction in `lower`).
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
    use wcc_ir::interp::{Data, Tensor};

    use crate::lower::{lower_op, Slot};
    let tys: Vec<wcc_ir::TensorType> = inputs
        .iter()
        .map(|t| {
            let dt = match t.data {
                Data::F32(_) => wcc_ir::DType::F32,
                Data::I32(_) => wcc_ir::DType::I32,
            };
            wcc_ir::TensorType::new(dt, t.shape.clone())
        })
        .collect();
    let ty_refs: Vec<&wcc_ir::TensorType> = tys.iter().collect();
    let lowered = lower_op(op, &ty_refs, out, in_place)?;
    let mut ins: Vec<Data> = inputs.iter().map(|t| t.data.clone()).collect();
    let mut result = match (&op, in_place) {
        (wcc_ir::Op::Reshape { .. }, _) => {
            return Ok(Tensor { shape: out.shape.clone(), data: inputs[0].data.clone() })
        }
        (wcc_ir::Op::ScatterRow, true) => inputs[0].as_f32().map_err(|e| BackendError(e.to_string()))?.to_vec(),
        _ => vec![0.0f32; out.numel()],
    };
    let mut scratch: Vec<Vec<f32>> = lowered.scratch.iter().map(|&n| vec![0.0; n]).collect();
    for (k, slots) in &lowered.launches {
        let jk = compile(k)?;
        // Hand each slot's buffer to the kernel; each is borrowed mutably once per launch.
        let mut taken_scratch: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut taken_inputs: Vec<(usize, Data)> = Vec::new();
        let mut out_buf = std::mem::take(&mut result);
        let mut order = Vec::new();
        for s in slots {
            match *s {
                Slot::Input(i) => {
                    let d = std::mem::replace(&mut ins[i], Data::F32(vec![]));
                    taken_inputs.push((i, d));
                    order.push((0u8, taken_inputs.len() - 1));
                }
                Slot::Scratch(j) => {
                    taken_scratch.push((j, std::mem::take(&mut scratch[j])));
                    order.push((1, taken_scratch.len() - 1));
                }
                Slot::Output => order.push((2, 0)),
            }
        }
        {
            let mut ti = taken_inputs.iter_mut();
            let mut ts = taken_scratch.iter_mut();
            let mut bufs: Vec<HostBuf> = Vec::new();
            let mut out_slot = Some(&mut out_buf);
            for (kind, _) in &order {
                match kind {
                    0 => match &mut ti.next().unwrap().1 {
                        Data::F32(v) => bufs.push(HostBuf::F32(v)),
                        Data::I32(v) => bufs.push(HostBuf::I32(v)),
                    },
                    1 => bufs.push(HostBuf::F32(&mut ts.next().unwrap().1)),
                    _ => bufs.push(HostBuf::F32(out_slot.take().expect("output used once"))),
                }
            }
            jk.run(&mut bufs)?;
        }
        for (i, d) in taken_inputs {
            ins[i] = d;
        }
        for (j, v) in taken_scratch {
            scratch[j] = v;
        }
        result = out_buf;
    }
    Ok(Tensor::f32(out.shape.clone(), result))
}
