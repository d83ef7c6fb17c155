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

/// The GPU kernels of every distinct op of the default builds of tiny.en and base, f32 and
/// int8, at `timesteps` mel frames (`None`: 30 s).
fn gpu_kernels(target: &Target, timesteps: Option<usize>) -> Vec<Kernel> {
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
