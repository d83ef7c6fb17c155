//! Bad input gets a one-line error and exit status 1, never a panic, and nothing the user
//! had is overwritten.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// One tensor of a safetensors file: dtype, shape, bytes.
type Tensor = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `dir/model.safetensors`, letting `edit` drop (None) or replace each tensor.
fn rewrite_tensors(dir: &Path, edit: impl Fn(&str, Tensor) -> Option<Tensor>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Tensor)> = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(t) = edit(&name, (view.dtype(), view.shape().to_vec(), view.data().to_vec())) {
            owned.push((name, t));
        }
    }
    let views: HashMap<String, TensorView> =
        owned.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(&views, None, &path).unwrap();
}

/// Rewrites `dir/model.safetensors`, letting `edit` drop (None) or reshape tensors (data cut
/// or zero-padded to the new size).
fn rewrite_safetensors(dir: &Path, edit: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>) {
    rewrite_tensors(dir, |name, (dtype, shape, mut data)| {
        let shape = edit(name, shape)?;
        data.resize(shape.iter().product::<usize>() * (dtype.bitsize() / 8), 0);
        Some((dtype, shape, data))
    });
}

fn random_tiny(dir: &Path) {
    wcc_ok(&["checkpoint", "random", "--size", "tiny", "--seed", "3", "-o", p(dir)]);
    // A readable checkpoint needs no tokenizer for `wcc ir`.
    let e = wcc_ok(&["ir", "--model", p(dir), "--graph", "encoder"]);
    assert!(e.contains("graph encoder"));
}

#[test]
fn checkpoint_with_a_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    random_tiny(&dir);
    rewrite_safetensors(&dir, |name, shape| (name != "model.encoder.layers.1.self_attn.v_proj.bias").then_some(shape));
    let e = wcc_err(&["ir", "--model", p(&dir)]);
    assert!(e.contains("encoder.layers.1.self_attn.v_proj.bias") && e.contains("missing"), "{e}");
}

#[test]
fn checkpoint_with_a_misshapen_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    random_tiny(&dir);
    rewrite_safetensors(&dir, |name, shape| {
        Some(if name == "model.decoder.layers.0.fc2.weight" { vec![shape[0], shape[1] - 1] } else { shape })
    });
    let e = wcc_err(&["ir", "--model", p(&dir)]);
    assert!(e.contains("decoder.layers.0.fc2.weight") && e.contains("[384, 1535]") && e.contains("[384, 1536]"), "{e}");
}

#[test]
fn checkpoint_with_a_wrong_dtype_or_a_zero_sized_dimension() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    random_tiny(&dir);
    rewrite_tensors(&dir, |name, (dtype, shape, data)| {
        Some(if name == "model.encoder.layers.0.fc1.weight" {
            (safetensors::Dtype::I16, shape, data)
        } else {
            (dtype, shape, data)
        })
    });
    let e = wcc_err(&["ir", "--model", p(&dir)]);
    assert!(e.contains("encoder.layers.0.fc1.weight") && e.contains("holds i16, expected floats"), "{e}");

    let dir = tmp.path().join("ck0");
    random_tiny(&dir);
    rewrite_safetensors(&dir, |name, shape| {
        Some(if name == "model.decoder.layers.0.fc2.weight" { vec![shape[0], 0] } else { shape })
    });
    let e = wcc_err(&["ir", "--model", p(&dir)]);
    assert!(e.contains("model.decoder.layers.0.fc2.weight") && e.contains("zero-sized dimension: [384, 0]"), "{e}");
}

/// NaN weights do not stop a build (a user may want to inspect it), but the compiler says
/// which tensor holds them and how many.
#[test]
fn nan_weights_are_warned_about() {
    let src = model_dir("tiny.en");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "model.bin"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let name = "decoder/layer_1/ffn/linear_1/weight";
    let t = wcc_frontend::checkpoint::Checkpoint::open(&src).unwrap().tensors[name].clone();
    let mut bin = std::fs::read(dir.join("model.bin")).unwrap();
    // Three NaNs in the tensor's own float type.
    let nan: &[u8] = match t.dtype.size_bytes() {
        2 => &[0x00, 0x7e],
        _ => &[0x00, 0x00, 0xc0, 0x7f],
    };
    for i in [0, 7, 100] {
        let at = t.offset + i * nan.len();
        bin[at..at + nan.len()].copy_from_slice(nan);
    }
    std::fs::write(dir.join("model.bin"), &bin).unwrap();
    let out = wcc(&["compile", "--model", p(&dir), "--int8", "-o", p(&tmp.path().join("nan.wbin"))]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning =
        stderr.lines().find(|l| l.starts_with("warning: ")).unwrap_or_else(|| panic!("no warning:\n{stderr}"));
    assert!(warning.contains(name) && warning.contains("holds 3 NaN or infinite values"), "{warning}");
    assert!(tmp.path().join("nan.wbin").is_file());
}

#[test]
fn truncated_ctranslate2_model_bin() {
    let src = model_dir("tiny.en");
    let tmp = tempfile::tempdir().unwrap();
    let bin = std::fs::read(src.join("model.bin")).unwrap();
    for cut in [0, 7, 100, bin.len() / 2, bin.len() - 1] {
        let dir = tmp.path().join(format!("cut{cut}"));
        std::fs::create_dir(&dir).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("model.bin"), &bin[..cut]).unwrap();
        let e = wcc_err(&["ir", "--model", p(&dir)]);
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
        let e = wcc_err(&["transcribe", "--interpret", "--model", p(&dir), p(&jfk())]);
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn empty_and_non_audio_files() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    let e = wcc_err(&["transcribe", "--interpret", "--model", "tiny.en", p(&empty)]);
    assert!(e.contains("no audio samples"), "{e}");

    let text = tmp.path().join("notes.wav");
    std::fs::write(&text, b"these are not the samples you are looking for\n").unwrap();
    let e = wcc_err(&["transcribe", "--interpret", "--model", "tiny.en", p(&text)]);
    assert!(e.contains("not a valid WAV file"), "{e}");

    let silent = tmp.path().join("zero-samples.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    hound::WavWriter::create(&silent, spec).unwrap().finalize().unwrap();
    let e = wcc_err(&["transcribe", "--interpret", "--model", "tiny.en", p(&silent)]);
    assert!(e.contains("no audio samples"), "{e}");

    let e = wcc_err(&["transcribe", "--interpret", "--model", "tiny.en", p(&tmp.path().join("absent.wav"))]);
    assert!(e.contains("absent.wav"), "{e}");
}

#[test]
fn unknown_model_names_and_directories() {
    let e = wcc_err(&["ir", "--model", "tiny.nope"]);
    assert!(e.contains("model `tiny.nope` not found") && e.contains("fetch-models"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let e = wcc_err(&["ir", "--model", p(tmp.path())]);
    assert!(e.contains("not a Whisper checkpoint"), "{e}");
    let e = wcc_err(&["transcribe", "--interpret", "--model", "small", p(&jfk())]);
    assert!(e.contains("model `small` not found"), "{e}");
}

#[test]
fn writing_a_checkpoint_never_overwrites_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    random_tiny(&dir);
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let e = wcc_err(&["checkpoint", "random", "--size", "tiny", "--seed", "4", "-o", p(&dir)]);
    assert!(e.contains("refusing to overwrite"), "{e}");
    let e = wcc_err(&["checkpoint", "convert", "--model", "tiny.en", "-o", p(&dir)]);
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert!(std::fs::read(dir.join("model.safetensors")).unwrap() == before);
    let e = wcc_err(&["checkpoint", "random", "--size", "huge", "-o", p(&tmp.path().join("x"))]);
    assert!(e.contains("unknown model size `huge`"), "{e}");
}

/// Output piped into a reader that stops early (`wcc ir ... | head`) ends wcc quietly, as it
/// ends any Unix tool, not with a panic.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_wcc_without_a_panic() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wcc"))
        .args(["ir", "--model", "base"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The read end is closed here, with most of the IR (hundreds of KB) still to write.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "{:?}: {err}", out.status);
}

/// A `.wbin` path whose directory is a file: refused (before the compile work), naming the
/// path (an existing `.wbin` without `--force` is tested in tests/wbin.rs).
#[test]
fn compiling_to_a_path_that_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    let e = wcc_err(&["compile", "--model", "tiny.en", "--int8", "-o", p(&file.join("model.wbin"))]);
    assert!(e.contains("notes.txt/model.wbin") && e.contains("is not a directory"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}
