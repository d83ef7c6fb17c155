//! The GPU path without a GPU: every GPU kernel of tiny.en and base emitted as PTX for every
//! CUDA target and assembled by `ptxas` (from the reference venv, `scripts/setup-reference`),
//! and run by the simulating interpreter against the graph interpreter.

mod common;

use std::path::PathBuf;
use std::process::Command;

use wcc_backend::gpu::lower_op_gpu;
use wcc_backend::kir::Kernel;
use wcc_targets::Target;

const CUDA_TARGETS: [&str; 3] = ["cuda-sm80", "cuda-sm89", "cuda-sm90"];

/// `ptxas` of the reference venv (`WCC_PTXAS` overrides).
fn ptxas() -> PathBuf {
    if let Ok(p) = std::env::var("WCC_PTXAS") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::env::var("WCC_REF_VENV").map(PathBuf::from).unwrap_or(root.join("target/ref-venv"));
    let lib = venv.join("lib");
    for e in std::fs::read_dir(&lib).unwrap_or_else(|e| panic!("{}: {e}: run scripts/setup-reference", lib.display())) {
        let p = e.unwrap().path().join("site-packages/nvidia/cuda_nvcc/bin/ptxas");
        if p.exists() {
            return p;
        }
    }
    panic!("no ptxas under {}: run scripts/setup-reference", lib.display())
}

/// The default builds of tiny.en and base, f32 and int8, at `timesteps` mel frames (`None`:
/// 30 s).
fn default_builds(timesteps: Option<usize>) -> Vec<wcc_ir::Module> {
    let mut modules = vec![];
    for name in ["tiny.en", "base"] {
        let loaded = common::load_default_build(name);
        for int8 in [false, true] {
            let opts = wcc_passes::PassOptions { int8, timesteps, ..Default::default() };
            let m = wcc_passes::run_observed(
                loaded.module.clone(),
                &wcc_passes::default_pipeline(),
                &opts,
                &mut |_, _, _| Ok(()),
            )
            .unwrap();
            modules.push(m);
        }
    }
    modules
}

/// The GPU kernels of every distinct op of the default builds of tiny.en and base, f32 and
/// int8, at `timesteps` mel frames (`None`: 30 s).
fn gpu_kernels(target: &Target, timesteps: Option<usize>) -> Vec<Kernel> {
    let modules = default_builds(timesteps);
    let mut kernels: Vec<Kernel> = vec![];
    for (key, (op, tys, out)) in common::op_cases(&modules.iter().collect::<Vec<_>>()) {
        let refs: Vec<_> = tys.iter().collect();
        for in_place in [false, true] {
            if in_place && !matches!(op, wcc_ir::Op::ScatterRow) {
                continue;
            }
            let lowered = lower_op_gpu(&op, &refs, &out, in_place, target).unwrap_or_else(|e| panic!("{key}: {e}"));
            for (k, _) in lowered.launches {
                if !kernels.iter().any(|o| *o == k) {
                    kernels.push(k);
                }
            }
        }
    }
    kernels
}

#[test]
fn every_gpu_kernel_of_tiny_en_and_base_is_accepted_by_ptxas_for_every_cuda_target() {
    let ptxas = ptxas();
    let dir = tempfile::tempdir().unwrap();
    for name in CUDA_TARGETS {
        let target = Target::named(name).unwrap();
        let gpu = target.gpu().unwrap();
        let kernels = gpu_kernels(&target, None);
        let module = wcc_backend::ptx::module(&kernels, gpu).unwrap();
        let path = dir.path().join(format!("{name}.ptx"));
        std::fs::write(&path, &module).unwrap();
        let out = Command::new(&ptxas)
            .arg(format!("--gpu-name=sm_{}", gpu.sm))
            .arg("-v")
            .arg("-o")
            .arg(dir.path().join(format!("{name}.cubin")))
            .arg(&path)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: ptxas failed:\n{}", &log[..log.len().min(4000)]);
        assert!(!log.contains("error"), "{name}: {log}");
        // `ptxas -v`: per kernel, registers and shared memory.
        let mut rows = 0;
        let mut current = String::new();
        for line in log.lines() {
            if let Some(i) = line.find("Compiling entry function '") {
                current = line[i + 26..].trim_end_matches("' for 'sm_80'").split('\'').next().unwrap_or("").to_string();
            }
            if let Some(i) = line.find("Used ") {
                eprintln!("{name} {current}: {}", &line[i..]);
                rows += 1;
            }
        }
        assert_eq!(rows, kernels.len(), "{name}: ptxas -v reported {rows} kernels of {}", kernels.len());
        eprintln!("{name}: {} kernels assembled, {} bytes of PTX", kernels.len(), module.len());
    }
}

/// The PTX of one matrix product and one softmax, reviewable and stable: a change to the
/// emitter or to these schedules shows here as a diff.
#[test]
fn ptx_of_a_matrix_product_and_a_softmax() {
    use wcc_ir::{DType, Op, TensorType};
    let target = Target::named("cuda-sm80").unwrap();
    let f = |s: &[usize]| TensorType::new(DType::F32, s.to_vec());
    let linear =
        lower_op_gpu(&Op::Linear, &[&f(&[20, 24]), &f(&[18, 24]), &f(&[18])], &f(&[20, 18]), false, &target).unwrap();
    let softmax = lower_op_gpu(&Op::Softmax, &[&f(&[3, 200])], &f(&[3, 200]), false, &target).unwrap();
    let kernels: Vec<Kernel> = linear.launches.into_iter().chain(softmax.launches).map(|(k, _)| k).collect();
    let kir: String = kernels.iter().map(|k| k.to_string()).collect::<Vec<_>>().join("\n");
    insta::assert_snapshot!("gpu_kernels_kir", kir);
    insta::assert_snapshot!("gpu_kernels_ptx", wcc_backend::ptx::module(&kernels, target.gpu().unwrap()).unwrap());
}

/// Runs one op's GPU kernels in the simulator on host tensors.
fn simulate(
    op: &wcc_ir::Op,
    inputs: &[&wcc_ir::interp::Tensor],
    tys: &[&wcc_ir::TensorType],
    out: &wcc_ir::TensorType,
    in_place: bool,
    target: &Target,
) -> Result<wcc_ir::interp::Tensor, wcc_backend::BackendError> {
    let lowered = lower_op_gpu(op, tys, out, in_place, target)?;
    wcc_backend::jit::run_launches(op, &lowered, inputs, out, in_place, &mut |k, bufs| {
        wcc_backend::gpusim::run(k, bufs).map_err(|e| wcc_backend::BackendError(e.to_string()))
    })
}

#[test]
fn every_gpu_kernel_of_tiny_en_and_base_matches_the_interpreter_in_the_simulator() {
    use wcc_ir::interp::{eval, Data};
    let target = Target::named("cuda-sm80").unwrap();
    // Every op class and every width of both models, f32 and int8; the encoder at 128 mel
    // frames (64 positions) so that the simulation stays short.
    let modules = default_builds(Some(128));
    let cases = common::op_cases(&modules.iter().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (key, (op, tys, out)) in &cases {
        let inputs = common::case_inputs(op, tys);
        let refs: Vec<_> = inputs.iter().collect();
        let ty_refs: Vec<_> = tys.iter().collect();
        let want = eval(op, &refs).unwrap();
        let variants: &[bool] = if matches!(op, wcc_ir::Op::ScatterRow) { &[false, true] } else { &[false] };
        for &in_place in variants {
            let got = simulate(op, &refs, &ty_refs, out, in_place, &target).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(got.shape, want.shape, "{key}");
            match (&got.data, &want.data) {
                (Data::F32(g), Data::F32(w)) => {
                    let scale = w.iter().fold(1f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
                    let e = g.iter().zip(w).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0f32, f32::max)
                        / scale;
                    // The fused attention quantizes its probabilities with exp_low's
                    // exponentials, the interpreter with libm's: a byte may round one step
                    // the other way (see backend/tests/int8.rs).
                    let tol = if matches!(op, wcc_ir::Op::QAttention) { 1e-3 } else { 2e-5 };
                    if tol == 2e-5 {
                        worst = worst.max(e);
                    }
                    assert!(e < tol, "{key}: relative error {e}");
                }
                // Quantized results: a value on a rounding boundary may land one step over.
                (g, w) => {
                    let (g, w) = (g.to_le_bytes(), w.to_le_bytes());
                    let off = g.iter().zip(&w).filter(|(a, b)| a != b).count();
                    assert!(off * 1000 <= w.len(), "{key}: {off} of {} bytes differ", w.len());
                }
            }
        }
    }
    eprintln!("{} ops simulated, worst relative error {worst:.2e}", cases.len());
}

/// Removes the `n`-th barrier (in statement order) of a body.
fn without_barrier(body: &[wcc_backend::kir::Stmt], n: &mut usize) -> Vec<wcc_backend::kir::Stmt> {
    use wcc_backend::kir::Stmt;
    let mut out = vec![];
    for s in body {
        match s {
            Stmt::Barrier if *n == 0 => {
                *n = usize::MAX;
                continue;
            }
            Stmt::Barrier => *n = n.wrapping_sub(1),
            Stmt::For { var, start, end, step, body } => {
                out.push(Stmt::For {
                    var: *var,
                    start: start.clone(),
                    end: end.clone(),
                    step: *step,
                    body: without_barrier(body, n),
                });
                continue;
            }
            Stmt::If { op, a, b, then } => {
                out.push(Stmt::If { op: *op, a: a.clone(), b: b.clone(), then: without_barrier(then, n) });
                continue;
            }
            _ => {}
        }
        out.push(s.clone());
    }
    out
}

#[test]
fn a_kernel_with_a_barrier_removed_is_caught_by_the_simulator() {
    use wcc_backend::gpusim::{run, SimError};
    use wcc_ir::{DType, Op, TensorType};
    let target = Target::named("cuda-sm80").unwrap();
    let f = |s: &[usize]| TensorType::new(DType::F32, s.to_vec());
    let cases = [
        (Op::Linear, vec![f(&[20, 40]), f(&[18, 40]), f(&[18])], f(&[20, 18])),
        (Op::Softmax, vec![f(&[3, 200])], f(&[3, 200])),
        (Op::LayerNorm { eps: 1e-5 }, vec![f(&[3, 200]), f(&[200]), f(&[200])], f(&[3, 200])),
    ];
    for (op, tys, out) in cases {
        let refs: Vec<_> = tys.iter().collect();
        let lowered = lower_op_gpu(&op, &refs, &out, false, &target).unwrap();
        let k = &lowered.launches[0].0;
        let mut bufs: Vec<Vec<u8>> = k
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| common::noise(b.len, i as u64 + 1).iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        run(k, &mut views).unwrap_or_else(|e| panic!("{}: {e}", k.name));
        let barriers = k.to_string().matches("barrier").count();
        assert!(barriers >= 2, "{}: {barriers} barriers", k.name);
        for which in 0..barriers {
            let mut broken = k.clone();
            broken.body = without_barrier(&k.body, &mut { which });
            let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
            match run(&broken, &mut views) {
                Err(e @ (SimError::SharedRace { .. } | SimError::Uninit { .. })) => {
                    eprintln!("{} without barrier {which}: {e}", k.name)
                }
                other => panic!("{} without barrier {which}: {other:?}", k.name),
            }
        }
    }
}
