//! `--int8` end to end: the quantize pass on tiny.en (snapshot, interpreter before vs after on
//! real features, `--keep-float`), and compiled int8 builds of base transcribing jfk.wav with
//! the right words from a file under 0.3x the f32 one.

mod common;
use common::*;

use wcc_ir::interp::{Interpreter, Tensor};
use wcc_ir::{print_graph, Op};

fn int8_module(name: &str, keep_float: &[&str]) -> (wcc_frontend::LoadedModel, wcc_ir::Module) {
    let loaded = wcc_frontend::load(&model_dir(name)).unwrap();
    let opts = wcc_passes::PassOptions {
        int8: true,
        keep_float: Some(keep_float.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    let passes = wcc_passes::pipeline_until("quantize").unwrap();
    let m = wcc_passes::run_observed(loaded.module.clone(), &passes, &opts, &mut |_, _, _| Ok(())).unwrap();
    (loaded, m)
}

#[test]
fn tiny_en_after_quantize_snapshots() {
    let (_, m) = int8_module("tiny.en", &[]);
    let enc = print_graph(m.graph("encoder").unwrap());
    let step = print_graph(m.graph("decoder_step").unwrap());
    insta::assert_snapshot!("tiny_en_encoder_after_quantize", enc);
    insta::assert_snapshot!("tiny_en_decoder_step_after_quantize", step);
    // Every run-time linear layer is int8 (only weight-only linears, folded at compile time,
    // remain), the logits projection and the token embedding read the same int8 table, and
    // the encoder's attention products are int8.
    for g in &m.graphs {
        let konst = constness(g);
        for n in &g.nodes {
            if matches!(n.op, Op::Linear | Op::FusedLinear { .. }) {
                assert!(konst[n.output.index()], "%{} is still f32", g.value(n.output).name);
            }
        }
    }
    assert!(step.contains("%logits: f32[1,51864] = qlinear"), "the logits projection is int8");
    assert_eq!(step.matches("decoder.embed_tokens.weight.w_q: i8[51864,384] = quantize").count(), 1);
    assert!(enc.contains("%enc.l0.attn.scores: f32[6,1500,1500] = qmatmul"));
    assert!(enc.contains("%enc.l0.attn.ctx_heads: f32[6,1500,64] = qmatmul"));
    // Cross-attention is int8 too, its K and V quantized once per window in the encoder.
    assert!(step.contains("%dec.l0.xattn.scores: f32[6,1,1500] = qmatmul"));
    assert!(enc.contains("%dec.l0.xattn.scores.b_q: i8[6,1500,64] = quantize{dtype=i8}(%dec.l0.xattn.k_heads"));
    assert!(!step.contains("%dec.l0.xattn.k_heads:"), "the f32 cross K is no longer a step input");
    // Self-attention over the growing cache stays f32 (one cache_attention per layer).
    assert!(step.contains("%dec.l0.attn.ctx: f32[1,384] = cache_attention{heads=6}"));
}

#[test]
fn tiny_en_after_flash_snapshot() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let opts = wcc_passes::PassOptions { int8: true, ..Default::default() };
    let m =
        wcc_passes::run_observed(loaded.module, &wcc_passes::default_pipeline(), &opts, &mut |_, _, _| Ok(())).unwrap();
    let enc = print_graph(m.graph("encoder").unwrap());
    let step = print_graph(m.graph("decoder_step").unwrap());
    insta::assert_snapshot!("tiny_en_encoder_after_flash", enc);
    // Every int8 attention is one op: the encoder's self-attention (4 layers) and the
    // decoder's cross-attention; no score matrix or quantized probabilities remain.
    assert_eq!(enc.matches("= qattention(").count(), 4);
    assert!(enc.contains("%enc.l0.attn.ctx_heads: f32[6,1500,64] = qattention(%enc.l0.attn.q_heads.q, %enc.l0.attn.q_heads.scale, %enc.l0.attn.scores.b_q,"));
    assert_eq!(step.matches("= qattention(").count(), 4);
    for text in [&enc, &step] {
        assert!(!text.contains("softmax_quantize") && !text.contains("softmax_scale") && !text.contains("qmatmul"));
    }
}

fn constness(g: &wcc_ir::Graph) -> Vec<bool> {
    let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, wcc_ir::ValueDef::Weight(_))).collect();
    for n in &g.nodes {
        konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
    }
    konst
}

#[test]
fn keep_float_leaves_the_named_layers_in_f32() {
    let (_, m) = int8_module("tiny.en", &["logits", "enc.l1.*", "*.scores"]);
    let step = m.graph("decoder_step").unwrap();
    let logits = step.nodes.iter().find(|n| step.value(n.output).name == "logits").unwrap();
    assert_eq!(logits.op, Op::Linear, "logits kept in f32");
    let enc = m.graph("encoder").unwrap();
    let op_of = |name: &str| enc.nodes.iter().find(|n| enc.value(n.output).name == name).unwrap().op.clone();
    assert!(matches!(op_of("enc.l1.gelu"), Op::FusedLinear { .. }));
    assert!(matches!(op_of("enc.l1.attn.scores"), Op::MatMul { .. }));
    assert!(matches!(op_of("enc.l0.gelu"), Op::QLinear { .. }));
    assert!(matches!(op_of("enc.l0.attn.ctx_heads"), Op::QMatMul));
    // The embedding still shares int8 rows with nothing: the gather reads them alone.
    assert!(print_graph(step).contains("gather(%decoder.embed_tokens.weight.w_q"));
}

#[test]
fn int8_encoder_on_real_features_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let mel_path = dir.path().join("mel.npy");
    wcc_ok(&["features", p(&jfk()), "-o", p(&mel_path)]);
    let (shape, mel) = read_npy(&mel_path);
    let (loaded, q) = int8_module("tiny.en", &[]);
    let f = wcc_passes::run(loaded.module.clone(), &wcc_passes::default_pipeline()).unwrap();
    let run = |m: &wcc_ir::Module| {
        let it = Interpreter::new(m, &loaded.checkpoint).unwrap();
        it.run("encoder", &[Tensor::f32(shape.clone(), mel.clone())]).unwrap()
    };
    let (a, b) = (run(&q), run(&f));
    // `flash` changes the ops, not the arithmetic: the interpreter defines `qattention` as
    // the chain it replaces, so its encoder output is the same bits.
    let opts = wcc_passes::PassOptions { int8: true, ..Default::default() };
    let fused =
        wcc_passes::run_observed(loaded.module.clone(), &wcc_passes::default_pipeline(), &opts, &mut |_, _, _| Ok(()))
            .unwrap();
    assert!(a[0].as_f32().unwrap() == run(&fused)[0].as_f32().unwrap(), "flash changed the encoder's output");
    let (l2, maxrel) = relative_errors(a[0].as_f32().unwrap(), b[0].as_f32().unwrap());
    eprintln!("int8 vs f32 encoder output (audio features): relative L2 {l2:.3e}, max {maxrel:.3e}");
    // The independent yardstick: CTranslate2's own int8 encoder against its float32 one on
    // jfk.wav (../shared/data/golden). wcc's int8 (attention products included) must not
    // lose much more than that.
    let golden = shared_data().join("golden");
    let (_, ct2_int8) = read_npy(&golden.join("tiny.en_jfk_encoder_out_ct2_int8.npy"));
    let (_, ct2_f32) = read_npy(&golden.join("tiny.en_jfk_encoder_out_ct2_f32.npy"));
    let (ct2_l2, _) = relative_errors(&ct2_int8, &ct2_f32);
    eprintln!("CTranslate2 int8 vs float32 on the same clip: relative L2 {ct2_l2:.3e}");
    assert!(l2 < 1.5 * ct2_l2, "relative L2 {l2} vs CTranslate2's {ct2_l2}");
    assert!(l2 > 1e-5, "suspiciously exact: is anything quantized?");
    // The decoder's first step from the int8 encoder's outputs: the same next token.
    let step = |m: &wcc_ir::Module, enc: &[Tensor]| -> Vec<f32> {
        let it = Interpreter::new(m, &loaded.checkpoint).unwrap();
        let inputs = decoder_step_inputs(m, enc, 50257, 0, &|ty| Tensor::zeros(ty.shape.clone()));
        it.run("decoder_step", &inputs).unwrap().swap_remove(0).into_f32().unwrap()
    };
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
    let (lq, lf) = (step(&q, &a), step(&f, &b));
    assert_eq!(argmax(&lq), argmax(&lf), "first token differs");
}

#[test]
fn base_int8_transcribes_jfk_from_a_quarter_of_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (f32_path, int8_path) = (dir.path().join("f32.wbin"), dir.path().join("int8.wbin"));
    wcc_ok(&["compile", "--model", "base", "-o", p(&f32_path)]);
    wcc_ok(&["compile", "--model", "base", "--int8", "-o", p(&int8_path)]);
    let text = wcc_ok(&["run", p(&int8_path), p(&jfk())]);
    let words: Vec<String> = text
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(
        words.join(" "),
        "and so my fellow americans ask not what your country can do for you ask what you can do for your country",
        "{text}"
    );
    let (a, b) = (std::fs::metadata(&int8_path).unwrap().len(), std::fs::metadata(&f32_path).unwrap().len());
    eprintln!("base .wbin: int8 {a} bytes, f32 {b} bytes ({:.3}x)", a as f64 / b as f64);
    assert!((a as f64) < 0.3 * b as f64, "int8 {a} vs f32 {b} bytes");
    let info = wcc_ok(&["info", p(&int8_path)]);
    assert!(info.contains("int8"), "{info}");
}

#[test]
fn int8_static_calibrates_fixed_scales_into_the_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dumps) = (dir.path().join("static.wbin"), dir.path().join("ir"));
    let calib = shared_data().join("audio/multilingual");
    wcc_ok(&[
        "compile",
        "--model",
        "tiny.en",
        "--int8-static",
        "--calibrate",
        p(&calib),
        "--calibration-clips",
        "3",
        "-o",
        p(&out),
        "--dump-dir",
        p(&dumps),
    ]);
    let ir = std::fs::read_to_string(dumps.join("06-quantize.ir")).unwrap();
    // Every activation an encoder linear layer reads has one calibrated scale, a constant; a
    // decoder step's single row keeps its run-time scale (see quantize.rs for why).
    let m = wcc_ir::parse_module(&ir).unwrap();
    let mut fills = 0;
    for g in &m.graphs {
        for n in &g.nodes {
            if let Op::QLinear { .. } = n.op {
                let xs = g.value(n.inputs[1]);
                let def = match xs.def {
                    wcc_ir::ValueDef::Node(i) => &g.nodes[i].op,
                    _ => panic!("%{} is not computed", xs.name),
                };
                if g.name == "encoder" {
                    assert!(matches!(def, Op::Fill { value } if *value > 0.0), "%{}: {def:?}", xs.name);
                    assert_eq!(xs.ty.shape, vec![1]);
                    fills += 1;
                } else {
                    assert_eq!(def, &Op::RowScale, "%{}", xs.name);
                }
            }
        }
    }
    assert_eq!(fills, 19, "tiny.en's encoder: 4 layers x 4 linear layers, the cross K/V and the 2 convolutions");
    let text = wcc_ok(&["run", p(&out), p(&jfk())]).to_lowercase();
    assert!(text.contains("ask not what your country can do for you"), "{text}");
    // Bad combinations are refused before any work.
    let e = wcc_err(&["compile", "--model", "tiny.en", "--keep-float", "logits", "-o", p(&dir.path().join("x.wbin"))]);
    assert!(e.contains("--keep-float needs --int8"), "{e}");
    // (A usage error: clap's exit code 2.)
    let out = wcc(&["compile", "--model", "tiny.en", "--int8-static", "-o", p(&dir.path().join("x.wbin"))]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--calibrate"), "{e}");
}
