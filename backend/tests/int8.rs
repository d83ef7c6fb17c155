//! The int8 kernels (`row_scale`, `quantize`, `row_sum`, `qlinear`, `qmatmul`, `gather` from
//! an int8 table) of tiny.en and base built with
//! `--int8`, compiled with cranelift-jit for every target level this host can run, against
//! the reference interpreter's integer semantics: results exactly equal (the GELU epilogue,
//! whose `erf` is a polynomial in the kernels and libm's in the interpreter, within 2e-5).
//! And the machine code: on a VNNI target the reduction is one `vpdpbusd`.

mod common;

use std::collections::BTreeMap;

use common::noise;

use wcc_ir::interp::{eval, Data, Tensor};
use wcc_ir::{DType, Op, TensorType};

/// Random operands of the right types: bytes over their whole range, positive scales.
fn operand(t: &TensorType, k: usize) -> Tensor {
    let n = t.numel();
    let z = noise(n, k as u64 + 11);
    match t.dtype {
        DType::U8 => Tensor::new(t.shape.clone(), Data::U8(z.iter().map(|v| ((v + 1.0) * 127.99) as u8).collect())),
        DType::I8 => Tensor::new(t.shape.clone(), Data::I8(z.iter().map(|v| (v * 127.99) as i8).collect())),
        DType::I32 => Tensor::i32(t.shape.clone(), z.iter().map(|v| (v * 40000.0) as i32).collect()),
        _ if k == 1 || k == 3 => Tensor::f32(t.shape.clone(), z.iter().map(|v| (v + 1.5) * 1e-3).collect()),
        _ => Tensor::f32(t.shape.clone(), z.iter().map(|v| v * 3.0).collect()),
    }
}

/// The operand types of a `qlinear` of `m` rows, `n` columns, reduction `k`, without residual.
fn qlinear_types(m: usize, n: usize, k: usize) -> Vec<TensorType> {
    vec![
        TensorType::new(DType::U8, [m, k]),
        TensorType::f32([m]),
        TensorType::new(DType::I8, [n, k]),
        TensorType::f32([n]),
        TensorType::new(DType::I32, [n]),
        TensorType::f32([n]),
    ]
}

fn levels() -> Vec<wcc_targets::Target> {
    let mut out = vec![wcc_targets::host().unwrap()];
    if cfg!(target_arch = "x86_64") {
        for level in ["x86_64-v2", "x86_64-v3", "x86_64-v4"] {
            let t = wcc_targets::Target::named(level).unwrap();
            if t.features.iter().all(|f| wcc_targets::host_has(f)) {
                out.push(t);
            } else {
                eprintln!("{level}: this host lacks some of its features; not run");
            }
        }
    }
    out
}

#[test]
fn every_int8_kernel_of_tiny_en_and_base_matches_the_interpreter_exactly() {
    let mut cases: BTreeMap<String, (Op, Vec<TensorType>, TensorType)> = BTreeMap::new();
    for name in ["tiny.en", "base"] {
        let loaded = common::load_default_build(name);
        let opts = wcc_passes::PassOptions { int8: true, ..Default::default() };
        // Up to `quantize`: its ops, before `flash` fuses the attentions (tested below).
        let passes = wcc_passes::pipeline_until("quantize").unwrap();
        let m = wcc_passes::run_observed(loaded.module, &passes, &opts, &mut |_, _, _| Ok(())).unwrap();
        for g in &m.graphs {
            let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, wcc_ir::ValueDef::Weight(_))).collect();
            for n in &g.nodes {
                konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
                let int8_op =
                    matches!(n.op, Op::RowScale | Op::Quantize { .. } | Op::QLinear { .. } | Op::QMatMul | Op::RowSum)
                        || (n.op == Op::Gather && n.inputs.len() == 3);
                if konst[n.output.index()] || !int8_op {
                    continue;
                }
                let tys: Vec<TensorType> = n.inputs.iter().map(|&i| g.ty(i).clone()).collect();
                let key = format!(
                    "{} {:?} {:?}",
                    n.op.name(),
                    n.op.attrs(),
                    tys.iter().map(|t| &t.shape).collect::<Vec<_>>()
                );
                cases.entry(key).or_insert((n.op.clone(), tys, g.ty(n.output).clone()));
            }
        }
    }
    // Odd shapes: a reduction with a tail for quantize, rows and columns off the blocks.
    cases.insert(
        "quantize odd".into(),
        (
            Op::Quantize { dtype: DType::U8 },
            vec![TensorType::f32([5, 37]), TensorType::f32([5])],
            TensorType::new(DType::U8, [5, 37]),
        ),
    );
    cases.insert(
        "quantize static i8".into(),
        (
            Op::Quantize { dtype: DType::I8 },
            vec![TensorType::f32([3, 48]), TensorType::f32([1])],
            TensorType::new(DType::I8, [3, 48]),
        ),
    );
    cases.insert(
        "qlinear odd".into(),
        (
            Op::QLinear { gelu: false, residual: true },
            [qlinear_types(7, 23, 32), vec![TensorType::f32([7, 23])]].concat(),
            TensorType::f32([7, 23]),
        ),
    );
    assert!(cases.keys().filter(|k| k.starts_with("qlinear")).count() >= 8, "{:?}", cases.keys());
    assert!(cases.keys().filter(|k| k.starts_with("qmatmul")).count() >= 4, "{:?}", cases.keys());
    let targets = levels();
    for (key, (op, tys, out)) in &cases {
        let mut inputs: Vec<Tensor> = tys.iter().enumerate().map(|(k, t)| operand(t, k)).collect();
        if matches!(op, Op::Quantize { .. }) {
            // Scales that put some values past ±127 (clamped) and exact halves (ties).
            let x = inputs[0].as_f32().unwrap().iter().map(|v| (v * 300.0).round() / 2.0).collect();
            inputs[0] = Tensor::f32(tys[0].shape.clone(), x);
            let s = vec![1.0f32; tys[1].numel()];
            inputs[1] = Tensor::f32(tys[1].shape.clone(), s);
        }
        if *op == Op::Gather {
            // Token ids inside the table.
            inputs[1] = Tensor::i32(tys[1].shape.clone(), vec![7; tys[1].numel()]);
        }
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let want = eval(op, &refs).unwrap();
        for t in &targets {
            let got = wcc_backend::jit::run_op_for(op, &refs, out, false, Some(t)).unwrap();
            let exact = !matches!(op, Op::QLinear { gelu: true, .. });
            match (&got.data, &want.data) {
                (Data::F32(g), Data::F32(w)) if !exact => {
                    let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let e = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
                    assert!(e < 2e-5, "{key} on {:?}: relative error {e}", t.features.len());
                }
                (g, w) => {
                    let same = g == w;
                    if !same {
                        if let (Data::F32(g), Data::F32(w)) = (g, w) {
                            let bad = g.iter().zip(w).position(|(a, b)| a.to_bits() != b.to_bits()).unwrap();
                            panic!("{key}: element {bad}: kernel {} vs interpreter {}", g[bad], w[bad]);
                        }
                    }
                    assert!(same, "{key}: kernel and interpreter differ ({} target features)", t.features.len());
                }
            }
        }
        eprintln!("{key}: equal on {} target levels", targets.len());
    }
}

/// `objdump -d` of raw x86-64 code.
fn disassemble(code: &[u8]) -> Option<String> {
    let path = std::env::temp_dir().join(format!("wcc-kernel-{}.bin", std::process::id()));
    std::fs::write(&path, code).ok()?;
    let out = std::process::Command::new("objdump")
        .args(["-D", "-b", "binary", "-m", "i386:x86-64"])
        .arg(&path)
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&path);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_int8_reduction_is_one_vpdpbusd_on_vnni_targets() {
    let tys = qlinear_types(12, 16, 64);
    let refs: Vec<&TensorType> = tys.iter().collect();
    let op = Op::QLinear { gelu: false, residual: false };
    let mut vnni = wcc_targets::Target::named("x86_64-v4").unwrap();
    vnni.features.push("avx512vnni".into());
    let plain = wcc_targets::Target::named("x86_64-v3").unwrap();
    let count = |t: &wcc_targets::Target| -> Option<usize> {
        let lowered = wcc_backend::lower::lower_op(&op, &refs, &TensorType::f32([12, 16]), false, t).unwrap();
        let isa = wcc_backend::cranelift::isa(t).unwrap();
        let code = wcc_backend::cranelift::compile(&lowered.launches[0].0, &*isa).unwrap();
        disassemble(&code).map(|d| d.matches("vpdpbusd").count())
    };
    let Some(with) = count(&vnni) else {
        eprintln!("objdump is not available: machine code not checked");
        return;
    };
    // 3 rows x 4 columns, 1 row x 4 columns, 1 row x 1 column: 17 dot products per step.
    assert_eq!(with, 17, "one vpdpbusd per dot4 on an AVX512-VNNI target");
    assert_eq!(count(&plain), Some(0), "no VNNI on x86-64-v3: the widening tree instead");
}

#[test]
fn the_int8_reduction_is_one_usdot_on_aarch64_with_i8mm() {
    // Checked on Cranelift's listing of the final instructions, so it holds on any host.
    let tys = qlinear_types(12, 16, 64);
    let refs: Vec<&TensorType> = tys.iter().collect();
    let op = Op::QLinear { gelu: false, residual: false };
    let count = |level: &str, insn: &str| -> usize {
        let t = wcc_targets::Target::named(level).unwrap();
        let lowered = wcc_backend::lower::lower_op(&op, &refs, &TensorType::f32([12, 16]), false, &t).unwrap();
        let isa = wcc_backend::cranelift::isa(&t).unwrap();
        let text = wcc_backend::cranelift::listing(&lowered.launches[0].0, &*isa).unwrap();
        text.lines().filter(|l| l.split_whitespace().next() == Some(insn)).count()
    };
    // 3 rows x 4 columns, 1 row x 4 columns, 1 row x 1 column: 17 dot products per step.
    assert_eq!(count("aarch64-i8mm", "usdot"), 17, "one usdot per dot4 with FEAT_I8MM");
    assert_eq!(count("aarch64", "usdot"), 0, "plain NEON: the widening tree");
    assert!(count("aarch64", "smull") + count("aarch64", "umull") + count("aarch64", "mul") > 0);
}

#[test]
fn the_int8_register_block_is_not_spilled() {
    // 3x4 accumulators, three activation rows and one weight vector are exactly x86-64's 16
    // vector registers: that holds only if each weight vector is loaded right before the dot
    // products that use it (the emitter gives Cranelift such loads as pure). A vector register
    // moved to or from the stack anywhere in the kernel fails this.
    // With GELU too: erf's constants and temporaries must not crowd the accumulators out.
    let tys = qlinear_types(1500, 512, 512);
    let refs: Vec<&TensorType> = tys.iter().collect();
    let mut t = wcc_targets::Target::named("x86_64-v4").unwrap();
    t.features.push("avx512vnni".into());
    for gelu in [false, true] {
        let op = Op::QLinear { gelu, residual: false };
        let lowered = wcc_backend::lower::lower_op(&op, &refs, &TensorType::f32([1500, 512]), false, &t).unwrap();
        let isa = wcc_backend::cranelift::isa(&t).unwrap();
        let text = wcc_backend::cranelift::listing(&lowered.launches[0].0, &*isa).unwrap();
        assert_eq!(text.lines().filter(|l| l.trim_start().starts_with("vpdpbusd")).count(), 17);
        let spills: Vec<&str> = text.lines().filter(|l| l.contains("%xmm") && l.contains("rsp")).collect();
        assert!(spills.is_empty(), "gelu {gelu}: vector registers spilled:\n{}", spills.join("\n"));
    }
}

#[test]
fn softmax_scale_and_softmax_quantize_kernels_match_the_interpreter() {
    // Attention-like scores (a spread of about ±12 around each row's own level), rows with a
    // tail off the 16-wide steps, one row of equal scores and one with -inf entries (masked).
    let targets = levels();
    for (rows, d) in [(3usize, 1500usize), (5, 37), (2, 16), (4, 3)] {
        let z = noise(rows * d, (rows * d) as u64);
        let mut x: Vec<f32> = z.iter().enumerate().map(|(i, v)| v * 12.0 + (i / d) as f32 * 3.0).collect();
        x[..d].iter_mut().for_each(|v| *v = 0.25);
        if rows > 2 {
            x[d] = f32::NEG_INFINITY;
            x[2 * d - 1] = f32::NEG_INFINITY;
        }
        let scores = Tensor::f32([rows, d], x);
        let want_s = eval(&Op::SoftmaxScale, &[&scores]).unwrap();
        let want_q = eval(&Op::SoftmaxQuantize, &[&scores]).unwrap();
        // The pair is what the quantize pass replaces: quantize(softmax) with its row scale.
        let p = eval(&Op::Softmax, &[&scores]).unwrap();
        let ps = eval(&Op::RowScale, &[&p]).unwrap();
        let pq = eval(&Op::Quantize { dtype: DType::U8 }, &[&p, &ps]).unwrap();
        let (ws, pss) = (want_s.as_f32().unwrap(), ps.as_f32().unwrap());
        for (a, b) in ws.iter().zip(pss) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{rows}x{d}: softmax_scale {a} vs row_scale of softmax {b}");
        }
        let (wq, pqq) = (want_q.as_u8().unwrap(), pq.as_u8().unwrap());
        let moved = wq.iter().zip(pqq).filter(|(a, b)| a != b).count();
        assert!(wq.iter().zip(pqq).all(|(a, b)| a.abs_diff(*b) <= 1), "{rows}x{d}: more than one step apart");
        assert!(moved * 100 <= wq.len(), "{rows}x{d}: {moved} of {} roundings moved", wq.len());
        for t in &targets {
            let got_s =
                wcc_backend::jit::run_op_for(&Op::SoftmaxScale, &[&scores], &TensorType::f32([rows]), false, Some(t))
                    .unwrap();
            for (a, b) in got_s.as_f32().unwrap().iter().zip(ws) {
                assert!((a - b).abs() <= 1e-4 * b.abs(), "{rows}x{d}: scale kernel {a} vs interpreter {b}");
            }
            let got_q = wcc_backend::jit::run_op_for(
                &Op::SoftmaxQuantize,
                &[&scores],
                &TensorType::new(DType::U8, [rows, d]),
                false,
                Some(t),
            )
            .unwrap();
            let gq = got_q.as_u8().unwrap();
            // exp_low's error moves a rounding only for values within 0.007 of a half step.
            let moved = gq.iter().zip(wq).filter(|(a, b)| a != b).count();
            assert!(gq.iter().zip(wq).all(|(a, b)| a.abs_diff(*b) <= 1), "{rows}x{d}: kernel more than one step off");
            assert!(moved * 50 <= gq.len(), "{rows}x{d}: {moved} of {} differ", gq.len());
            // The row's largest probability is exactly 127 steps (+128).
            for r in 0..rows {
                assert_eq!(gq[r * d..(r + 1) * d].iter().max(), Some(&255), "{rows}x{d}: row {r}");
            }
        }
    }
}

/// The operand types of a `qattention` of `b` heads, `m` query rows, `n` keys, head size `k`
/// and `e` output columns.
fn qattention_types(b: usize, m: usize, n: usize, k: usize, e: usize) -> Vec<TensorType> {
    vec![
        TensorType::new(DType::U8, [b, m, k]),
        TensorType::f32([b * m]),
        TensorType::new(DType::I8, [b, n, k]),
        TensorType::f32([b * n]),
        TensorType::new(DType::I32, [b * n]),
        TensorType::new(DType::I8, [b, e, n]),
        TensorType::f32([b * e]),
        TensorType::new(DType::I32, [b * e]),
    ]
}

#[test]
fn the_fused_int8_attention_matches_the_unfused_kernels_and_the_interpreter() {
    // The encoder's attentions of tiny.en (6 heads) and base (8), a decoder step's
    // cross-attention (1 and 5 rows: the unfused schedule), and odd shapes: query rows off
    // the 3-row blocks, keys off the 12- and 4-key blocks (29 = 2·12 + 4 + 1), head sizes off
    // the 16-byte steps (20) and off the 4-byte groups (6), output columns off the fours.
    let shapes = [
        (6usize, 1500usize, 1500usize, 64usize, 64usize),
        (8, 1500, 1500, 64, 64),
        (8, 1, 1500, 64, 64),
        (8, 5, 1500, 64, 64),
        (2, 17, 29, 20, 12),
        (1, 19, 13, 6, 5),
        (3, 16, 4, 64, 7),
    ];
    let targets = levels();
    for (b, m, n, k, e) in shapes {
        let tys = qattention_types(b, m, n, k, e);
        let inputs: Vec<Tensor> = tys.iter().enumerate().map(|(i, t)| operand(t, i)).collect();
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let out = TensorType::f32([b, m, e]);
        let want = eval(&Op::QAttention, &refs).unwrap();
        let w = want.as_f32().unwrap();
        let scale = w.iter().fold(1e-30f32, |a, v| a.max(v.abs()));
        for t in &targets {
            let run = |op: &Op, ins: &[&Tensor], out: &TensorType| {
                wcc_backend::jit::run_op_for(op, ins, out, false, Some(t)).unwrap()
            };
            let got = run(&Op::QAttention, &refs, &out);
            let g = got.as_f32().unwrap();
            // The plain attention through the backend's own kernels: the scores' product,
            // the softmax pair, the second product. The same operations in the same order
            // (the probability sum included), so the same bits.
            let rows = b * m;
            let s = run(&Op::QMatMul, &refs[..5], &TensorType::f32([b, m, n]));
            let ps = run(&Op::SoftmaxScale, &[&s], &TensorType::f32([rows]));
            let p = run(&Op::SoftmaxQuantize, &[&s], &TensorType::new(DType::U8, [b, m, n]));
            let plain = run(&Op::QMatMul, &[&p, &ps, refs[5], refs[6], refs[7]], &out);
            let pl = plain.as_f32().unwrap();
            let pscale = pl.iter().fold(1e-30f32, |a, v| a.max(v.abs()));
            let e_plain = g.iter().zip(pl).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / pscale;
            assert!(g == pl, "{b}x{m}x{n}x{k}x{e} on {:?}: fused vs unfused kernels, relative {e_plain}", t.features);
            // Against the definition (libm's exp): a probability byte may round one step
            // the other way where 127·e lies within exp_low's error of a half.
            let e_def = g.iter().zip(w).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
            assert!(e_def < 1e-3, "{b}x{m}x{n}x{k}x{e} on {:?}: vs the interpreter, relative {e_def}", t.features);
            eprintln!(
                "qattention {b}x{m}x{n}x{k}x{e} on {} features: vs unfused {e_plain:.1e}, vs interpreter {e_def:.1e}",
                t.features.len()
            );
        }
    }
}
