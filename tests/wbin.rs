//! The `.wbin` artifact: what is written is what the compiler built, and damaged, foreign
//! or incompatible files are refused with a clear message (never a panic).

mod common;
use common::*;

use std::path::Path;

use wcc_runtime::wbin::{self, WbinFile};

fn compile_tiny(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("tiny.wbin");
    wcc_ok(&["compile", "--model", "tiny.en", "-o", p(&out)]);
    out
}

/// Rewrites a valid file with `edit` applied to its header (checksum recomputed).
fn with_header(src: &Path, dst: &Path, edit: impl Fn(&mut wbin::Header)) {
    let f = WbinFile::open(src).unwrap();
    let mut h = f.header.clone();
    edit(&mut h);
    wbin::write(dst, &h, &f.sections()).unwrap();
}

fn refused(path: &Path, needle: &str) {
    for cmd in [vec!["run", p(path), p(&jfk())], vec!["info", p(path)]] {
        let e = wcc_err(&cmd);
        assert!(e.contains(needle), "{cmd:?}: `{e}` does not say `{needle}`");
    }
}

#[test]
fn written_program_and_weights_are_what_the_compiler_built() {
    let tmp = tempfile::tempdir().unwrap();
    let path = compile_tiny(tmp.path());
    let f = WbinFile::open(&path).unwrap();
    // `wcc compile`'s default build: the beam step of 5 beside the plain one, and the
    // prompt blocks.
    let opts = wcc_frontend::lower::LowerOptions {
        beam_sizes: vec![1, 5],
        prefill_sizes: wcc_frontend::lower::DEFAULT_PREFILL_SIZES.to_vec(),
        ..Default::default()
    };
    let loaded = wcc_frontend::load_with(&model_dir("tiny.en"), &opts).unwrap();
    let module = wcc_passes::run(loaded.module, &wcc_passes::default_pipeline()).unwrap();
    let program = wcc_backend::program::build(&module, &loaded.checkpoint, &wcc_targets::host().unwrap()).unwrap();
    let names: Vec<&str> = f.header.graphs.iter().map(|g| g.name.as_str()).collect();
    let want = ["encoder", "decoder_step", "decoder_beam5", "decoder_prefill8", "decoder_prefill64", "beam_init5"];
    assert_eq!(names, want);
    assert_eq!(f.header.graphs, program.graphs);
    assert_eq!(f.header.arena_bytes, program.arena_bytes);
    assert!(f.sections().weights == &program.weights[..]);
    let names: Vec<&str> = program.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(f.header.kernels.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), names);
    assert_eq!(f.header.timesteps, 3000);
    assert_eq!(f.header.params["n_vocab"], 51864);
    assert_eq!(f.sections().tokenizer, &std::fs::read(model_dir("tiny.en").join("tokenizer.json")).unwrap()[..]);
    // Written again from what was read: byte-identical.
    let again = tmp.path().join("again.wbin");
    wbin::write(&again, &f.header, &f.sections()).unwrap();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap());
    // The output is never overwritten without --force.
    let e = wcc_err(&["compile", "--model", "tiny.en", "-o", p(&path)]);
    assert!(e.contains("--force"), "{e}");
}

#[test]
fn damaged_foreign_and_incompatible_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = compile_tiny(tmp.path());
    let bytes = std::fs::read(&good).unwrap();
    let bad = tmp.path().join("bad.wbin");
    let n = bytes.len();
    for cut in [0, 5, 60, 96, 4000, n / 2, n - 1] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let needle = if cut < 8 { "not a .wbin" } else { "truncated" };
        refused(&bad, needle);
    }
    for at in [20, 200, n / 3, n - 10] {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        std::fs::write(&bad, &b).unwrap();
        refused(&bad, "checksum mismatch");
    }
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"RIFF");
    std::fs::write(&bad, &b).unwrap();
    refused(&bad, "not a .wbin file");
    let mut b = bytes.clone();
    // An older format (version 1: f32 only, untyped buffers) and a newer one.
    for v in [1u32, 3] {
        b[8..12].copy_from_slice(&v.to_le_bytes());
        std::fs::write(&bad, &b).unwrap();
        refused(&bad, &format!("format version {v}, but this wcc reads version 2"));
    }

    // A CPU feature this host lacks, and another architecture.
    // A listed feature this host lacks if there is one, else a feature no CPU has (this
    // wcc cannot detect it, so no host has it): the check holds on any host.
    let lacking =
        wcc_targets::X86_FEATURES.iter().find(|f| !wcc_targets::host_has(f)).copied().unwrap_or("avx-future-42");
    with_header(&good, &bad, |h| h.target.features.push(lacking.to_string()));
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("lacks") && e.contains(lacking), "{e}");
    with_header(&good, &bad, |h| h.target.arch = "aarch64".into());
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("compiled for aarch64"), "{e}");
    // A well-formed file whose program points outside its buffers.
    with_header(&good, &bad, |h| {
        if let Some(wbin::BufRef::Arena { offset, .. }) = h.graphs[0].launches[0].buffers.first_mut() {
            *offset = u64::MAX - 8;
        }
    });
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("out of bounds"), "{e}");
    // A launch of a kernel the file does not have.
    with_header(&good, &bad, |h| h.graphs[0].launches[0].kernel = 99_999);
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("launches kernel 99999, but the file has"), "{e}");
    // A kernel whose code lies past the end of the code section.
    with_header(&good, &bad, |h| h.kernels[0].offset = u64::MAX - 1);
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("lies outside the code section"), "{e}");
    // A logits output placed across the end of the arena.
    with_header(&good, &bad, |h| {
        let n = h.arena_bytes;
        let g = h.graphs.iter_mut().find(|g| g.name == "decoder_step").unwrap();
        g.outputs.iter_mut().find(|o| o.name == "logits").unwrap().offset = n - 4;
    });
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("`logits` lies outside the arena"), "{e}");
    // Generation settings naming a token beyond the logits (the decoding loop indexes the
    // logits with it).
    with_header(&good, &bad, |h| h.generation.special.eot = 99_999);
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("token 99999 of the generation settings is outside the"), "{e}");
    // A program whose kernel would write into the (read-only) weights.
    with_header(&good, &bad, |h| {
        let l = &mut h.graphs[0].launches[0];
        let k = &h.kernels[l.kernel as usize];
        let w = k.buffers.iter().position(|b| b.access.writes()).expect("a kernel writes something");
        let need = k.buffers[w].len * k.buffers[w].elem_bytes().unwrap();
        l.buffers[w] = wbin::BufRef::Weight { offset: 0, len: need };
    });
    let e = wcc_err(&["run", p(&bad), p(&jfk())]);
    assert!(e.contains("would write the weights"), "{e}");
}

#[test]
fn the_runtime_depends_on_no_compiler_crate_and_the_compiler_not_on_the_runtime() {
    let tree = |krate: &str| -> Vec<String> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["tree", "--offline", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}"])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8(out.stdout).unwrap();
        tree.lines().map(|l| l.split_whitespace().next().unwrap_or("").to_string()).collect()
    };
    let runtime = tree("wcc-runtime");
    assert!(runtime.len() > 10, "suspiciously small tree: {runtime:?}");
    assert!(runtime.iter().any(|n| n == "wcc-format"), "the runtime reads .wbin files through wcc-format");
    for name in &runtime {
        for banned in ["wcc-frontend", "wcc-passes", "wcc-backend", "wcc-ir", "egg", "cranelift"] {
            assert!(!name.starts_with(banned), "wcc-runtime depends on {name}");
        }
    }
    // The artifact format is its own crate; the compiler's crates reach it without the runtime.
    for krate in ["wcc-frontend", "wcc-backend", "wcc-format"] {
        let deps = tree(krate);
        assert!(!deps.iter().any(|n| n == "wcc-runtime"), "{krate} depends on wcc-runtime");
    }
}
