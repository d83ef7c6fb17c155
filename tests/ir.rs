//! The IR of real checkpoints: it verifies, prints, parses back to the same module, and
//! its text is pinned by snapshots; `hoist-cross-kv` preserves what the graphs compute.

mod common;
use common::*;

use wcc_ir::interp::{Interpreter, Tensor};
use wcc_ir::{parse_module, print_graph, print_module, verify, ValueDef};

#[test]
fn tiny_en_and_base_round_trip_through_text() {
    for name in ["tiny.en", "base"] {
        let loaded = wcc_frontend::load(&model_dir(name)).unwrap();
        let full = wcc_passes::run(loaded.module.clone(), &wcc_passes::default_pipeline()).unwrap();
        for m in [loaded.module.clone(), wcc_passes::run(loaded.module, &["hoist-cross-kv"]).unwrap(), full] {
            verify(&m).unwrap();
            let text = print_module(&m);
            let back = parse_module(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(back == m, "{name}: parsed module differs");
            assert_eq!(print_module(&back), text);
        }
    }
}

#[test]
fn cli_ir_prints_text_that_parses_and_dot() {
    let text = wcc_ok(&["ir", "--model", "base"]);
    let m = parse_module(&text).unwrap();
    verify(&m).unwrap();
    assert_eq!(m.param("n_audio_layer"), Some(6));
    assert_eq!(m.param("n_vocab"), Some(51865));
    let dot = wcc_ok(&["ir", "--model", "tiny.en", "--graph", "encoder", "--format", "dot"]);
    assert!(dot.starts_with("digraph \"encoder\""));
    let e = wcc_err(&["ir", "--model", "tiny.en", "--graph", "nope"]);
    assert!(e.contains("no graph `nope`"), "{e}");
}

#[test]
fn tiny_en_graph_snapshots() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let m = &loaded.module;
    insta::assert_snapshot!("tiny_en_encoder", print_graph(m.graph("encoder").unwrap()));
    insta::assert_snapshot!("tiny_en_decoder_step", print_graph(m.graph("decoder_step").unwrap()));
    // The module after each pass of the default pipeline (timesteps is a no-op without
    // --timesteps; its snapshot is in tests/timesteps.rs).
    let hoisted = wcc_passes::run(m.clone(), &["hoist-cross-kv"]).unwrap();
    insta::assert_snapshot!("tiny_en_encoder_after_hoist_cross_kv", print_graph(hoisted.graph("encoder").unwrap()));
    insta::assert_snapshot!(
        "tiny_en_decoder_step_after_hoist_cross_kv",
        print_graph(hoisted.graph("decoder_step").unwrap())
    );
    let folded = wcc_passes::run(hoisted, &["fold"]).unwrap();
    insta::assert_snapshot!("tiny_en_encoder_after_fold", print_graph(folded.graph("encoder").unwrap()));
    insta::assert_snapshot!("tiny_en_decoder_step_after_fold", print_graph(folded.graph("decoder_step").unwrap()));
    let fused = wcc_passes::run(folded, &["fuse"]).unwrap();
    insta::assert_snapshot!("tiny_en_encoder_after_fuse", print_graph(fused.graph("encoder").unwrap()));
    insta::assert_snapshot!("tiny_en_decoder_step_after_fuse", print_graph(fused.graph("decoder_step").unwrap()));
    // What the passes are for, visible in the text: no cross K/V projection in the step, and
    // after fuse no separate GELU or residual add left there.
    let step = print_graph(fused.graph("decoder_step").unwrap());
    assert!(!step.contains("xattn.k:") && !step.contains("gelu(") && step.contains("masked_softmax("));
    let fused_encoder = fused.graph("encoder").cloned();
    let attended = wcc_passes::run(fused, &["attention"]).unwrap();
    let step = print_graph(attended.graph("decoder_step").unwrap());
    insta::assert_snapshot!("tiny_en_decoder_step_after_attention", step);
    // The self-attention sites are gone: one cache_attention per layer, no mask, and no
    // transpose of a whole cache left in the step.
    let layers = attended.param("n_text_layer").unwrap() as usize;
    assert_eq!(step.matches("cache_attention{heads=6}(").count(), layers);
    assert!(!step.contains("causal_mask") && !step.contains("masked_softmax") && !step.contains("f32[6,448,64]"));
    assert_eq!(attended.graph("encoder"), fused_encoder.as_ref(), "attention changed the encoder");
}

#[test]
fn attention_preserves_what_tiny_en_computes_at_every_kind_of_position() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let fused = wcc_passes::run(loaded.module, &["hoist-cross-kv", "fold", "fuse"]).unwrap();
    let attended = wcc_passes::run(fused.clone(), &["attention"]).unwrap();
    let n_ctx = fused.param("n_text_ctx").unwrap() as i32;
    let (a, b) = (
        Interpreter::new(&fused, &loaded.checkpoint).unwrap(),
        Interpreter::new(&attended, &loaded.checkpoint).unwrap(),
    );
    let enc = fused.graph("encoder").unwrap();
    let mel_ty = enc.ty(enc.inputs[0]);
    let enc_out = a.run("encoder", &[Tensor::f32(mel_ty.shape.clone(), noise(mel_ty.numel(), 1))]).unwrap();
    // The first position (one visible row), one inside, the last one; random caches, so
    // rows after the position hold values the mask must hide.
    for pos in [0, 17, n_ctx - 1] {
        let inputs = decoder_step_inputs(&fused, &enc_out, 50257, pos, &|ty| {
            Tensor::f32(ty.shape.clone(), noise(ty.numel(), 7))
        });
        let (x, y) = (a.run("decoder_step", &inputs).unwrap(), b.run("decoder_step", &inputs).unwrap());
        assert_eq!(x.len(), y.len());
        for (x, y) in x.iter().zip(&y) {
            let (l2, maxrel) = relative_errors(x.as_f32().unwrap(), y.as_f32().unwrap());
            eprintln!("position {pos}: attention changes an output by {l2:.1e} (L2) / {maxrel:.1e} (max)");
            // Same arithmetic, the dot products summed in another order.
            assert!(l2 < 1e-5 && maxrel < 1e-4, "position {pos}: {l2} / {maxrel}");
        }
    }
    // A position past the cache is refused, as the unrewritten step refuses it.
    let inputs =
        decoder_step_inputs(&fused, &enc_out, 50257, n_ctx, &|ty| Tensor::f32(ty.shape.clone(), noise(ty.numel(), 7)));
    assert!(a.run("decoder_step", &inputs).is_err() && b.run("decoder_step", &inputs).is_err());
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs the encoder on random features, then one decoder step (a token at position 3 with
/// random caches) fed from the encoder's outputs by name: `(encoder outputs, step outputs)`.
fn run_encoder_and_step(m: &wcc_ir::Module, weights: &dyn wcc_ir::interp::WeightLoader) -> (Vec<Tensor>, Vec<Tensor>) {
    let interp = Interpreter::new(m, weights).unwrap();
    let enc = m.graph("encoder").unwrap();
    let mel_ty = enc.ty(enc.inputs[0]);
    let enc_out = interp.run("encoder", &[Tensor::f32(mel_ty.shape.clone(), noise(mel_ty.numel(), 1))]).unwrap();
    let inputs = decoder_step_inputs(m, &enc_out, 50257, 3, &|ty| Tensor::f32(ty.shape.clone(), noise(ty.numel(), 7)));
    let step = interp.run("decoder_step", &inputs).unwrap();
    (enc_out, step)
}

#[test]
fn hoist_cross_kv_moves_audio_work_out_of_the_step_and_preserves_outputs() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let before = loaded.module.clone();
    let after = wcc_passes::run(loaded.module, &["hoist-cross-kv"]).unwrap();
    let dec = after.graph("decoder_step").unwrap();
    let n_ctx = before.param("n_audio_ctx").unwrap() as usize;
    // No node of the step touches a tensor as long as the audio, except attention itself
    // (the score and context matmuls and the softmax).
    for n in &dec.nodes {
        let long = n
            .inputs
            .iter()
            .any(|&i| !matches!(dec.value(i).def, ValueDef::Weight(_)) && dec.ty(i).shape.contains(&n_ctx));
        if long {
            assert!(
                matches!(n.op, wcc_ir::Op::MatMul { .. } | wcc_ir::Op::Softmax),
                "{} still works on audio-length data in the step",
                dec.value(n.output).name
            );
        }
    }
    assert!(dec.find_value("audio_features").is_none());
    let enc = after.graph("encoder").unwrap();
    assert_eq!(enc.outputs.len(), 1 + 2 * before.param("n_text_layer").unwrap() as usize);

    // Differential: the same random audio features and caches give the same logits and caches.
    let run = |m: &wcc_ir::Module| run_encoder_and_step(m, &loaded.checkpoint).1;
    let (a, b) = (run(&before), run(&after));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        // The same ops on the same values in the same order: bit-identical.
        assert_eq!(x, y);
    }
}

#[test]
fn fold_and_fuse_preserve_what_tiny_en_computes() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    let hoisted = wcc_passes::run(loaded.module, &["hoist-cross-kv"]).unwrap();
    let folded = wcc_passes::run(hoisted.clone(), &["fold"]).unwrap();
    let fused = wcc_passes::run(folded.clone(), &["fuse"]).unwrap();
    // Nodes that run at run time (not computed from weights alone).
    let count = |m: &wcc_ir::Module| -> Vec<usize> {
        m.graphs
            .iter()
            .map(|g| {
                let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, ValueDef::Weight(_))).collect();
                g.nodes
                    .iter()
                    .filter(|n| {
                        konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
                        !konst[n.output.index()]
                    })
                    .count()
            })
            .collect()
    };
    eprintln!(
        "run-time nodes (encoder, decoder_step): before fold {:?}, after fold {:?}, after fuse {:?}",
        count(&hoisted),
        count(&folded),
        count(&fused)
    );
    let run = |m: &wcc_ir::Module| run_encoder_and_step(m, &loaded.checkpoint);
    let ((ea, da), (eb, db), (ec, dc)) = (run(&hoisted), run(&folded), run(&fused));
    // fuse does the same arithmetic in the same order as the ops it replaces: bit-identical.
    assert!(eb == ec && db == dc, "fuse changed the results");
    for (name, a, b) in [("encoder", ea, eb), ("decoder_step", da, db)] {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let (l2, maxrel) = relative_errors(x.as_f32().unwrap(), y.as_f32().unwrap());
            eprintln!("{name}: fold changes outputs by {l2:.1e} (L2) / {maxrel:.1e} (max)");
            // Folding reorders float arithmetic only: agreement to float rounding.
            assert!(l2 < 1e-5 && maxrel < 1e-4, "{name}: {l2} / {maxrel}");
        }
    }
}

#[test]
fn zero_sized_dimensions_are_refused_by_the_verifier_naming_the_tensor() {
    // Rows are elements / last extent, heads divide widths: an empty tensor would reach a
    // division by zero in the interpreter and the lowering, so the verifier refuses it.
    let value = "module \"t\" {\n  graph main(%x: f32[0,8]) {\n    %y: f32[0,8] = gelu(%x)\n    return (%y)\n  }\n}\n";
    let e = verify(&parse_module(value).unwrap()).unwrap_err().to_string();
    assert!(e.contains("%x") && e.contains("zero-sized"), "{e}");
    let weight = "module \"t\" {\n  weight @w: f32[4,0] = \"w\"\n  graph main(%x: f32[2,0]) {\n    %y: f32[2,4] = linear(%x, @w)\n    return (%y)\n  }\n}\n";
    let e = verify(&parse_module(weight).unwrap()).unwrap_err().to_string();
    assert!(e.contains("@w") && e.contains("zero-sized"), "{e}");
    // The CLI says so and exits non-zero, without a panic.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.ir");
    std::fs::write(&f, value).unwrap();
    let out = wcc(&["opt", p(&f), "--passes", "fuse"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("zero-sized") && !err.contains("panicked"), "{err}");
}
