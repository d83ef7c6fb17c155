//! The interpreter's encoder output against CTranslate2's float32 encoder on the same
//! features.

mod common;
use common::*;

use wcc_ir::interp::{Interpreter, Tensor};

#[test]
fn tiny_en_encoder_matches_ctranslate2_float32() {
    let dir = tempfile::tempdir().unwrap();
    let mel_path = dir.path().join("mel.npy");
    wcc_ok(&["features", p(&jfk()), "-o", p(&mel_path)]);
    let ct2_out = dir.path().join("ct2.npy");
    let model = model_dir("tiny.en");
    reference(&["encode", p(&model), p(&mel_path), "-o", p(&ct2_out)]);

    let loaded = wcc_frontend::load(&model).unwrap();
    let interp = Interpreter::new(&loaded.module, &loaded.checkpoint).unwrap();
    let (shape, mel) = read_npy(&mel_path);
    let t0 = std::time::Instant::now();
    let out = interp.run("encoder", &[Tensor::f32(shape, mel)]).unwrap();
    eprintln!("interpreter encoder: {:.2} s", t0.elapsed().as_secs_f64());
    let ours = out.into_iter().next().unwrap();
    let (ref_shape, theirs) = read_npy(&ct2_out);
    assert_eq!(ours.shape, ref_shape);
    let (l2, maxrel) = relative_errors(ours.as_f32().unwrap(), &theirs);
    eprintln!("encoder vs CTranslate2 f32: relative L2 {l2:e}, max |diff| / max |ref| {maxrel:e}");
    assert!(l2 < 1e-3 && maxrel < 1e-3, "relative error {l2:e} / {maxrel:e}");
}
