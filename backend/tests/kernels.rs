//! Every kernel the real models use, compiled with cranelift-jit and run on random inputs
//! of the real shapes, against the reference interpreter.

mod common;

use common::{model_dir, noise};

use wcc_ir::interp::{eval, Data, Tensor};
use wcc_ir::Op;

/// Max |a-b| / max(1, max|b|).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
    a.iter().zip(b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0f32, f32::max) / scale
}

#[test]
fn every_kernel_of_tiny_en_and_base_matches_the_interpreter() {
    // One representative node per (op, operand shapes): the same kernel serves the others.
    let mut modules = vec![];
    for name in ["tiny.en", "base"] {
        let loaded = common::load_default_build(name);
        // Unfused ops, and the folded and fused ones of the default pipeline.
        modules.push(wcc_passes::run(loaded.module.clone(), &["hoist-cross-kv"]).unwrap());
        modules.push(wcc_passes::run(loaded.module, &wcc_passes::default_pipeline()).unwrap());
    }
    let cases = common::op_cases(&modules.iter().collect::<Vec<_>>());
    let mut worst = 0f32;
    for (key, (op, tys, out)) in &cases {
        let inputs = common::case_inputs(op, tys);
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let want = eval(op, &refs).unwrap();
        let variants: &[bool] = if matches!(op, Op::ScatterRow) { &[false, true] } else { &[false] };
        for &in_place in variants {
            let got = wcc_backend::jit::run_op(op, &refs, out, in_place).unwrap();
            assert_eq!(got.shape, want.shape, "{key}");
            let (Data::F32(g), Data::F32(w)) = (&got.data, &want.data) else { panic!("{key}: not f32") };
            let e = rel_err(g, w);
            eprintln!("{key}{}: max rel err {e:.2e}", if in_place { " (in place)" } else { "" });
            worst = worst.max(e);
            assert!(e < 2e-5, "{key}: relative error {e}");
            for (x, y) in g.iter().zip(w) {
                assert!(x.is_finite() == y.is_finite() && (x.is_finite() || x == y), "{key}: {x} vs {y}");
            }
        }
    }
    eprintln!("{} kernels checked, worst relative error {worst:.2e}", cases.len());
}

#[test]
fn every_kernel_compiles_for_every_target_level() {
    let loaded = wcc_frontend::load(&model_dir("tiny.en")).unwrap();
    // The f32 build and the int8 one (integer kernels: `vpdpbusd` on VNNI levels, the
    // exact widening tree elsewhere, aarch64 included).
    for int8 in [false, true] {
        let opts = wcc_passes::PassOptions { int8, ..Default::default() };
        let module =
            wcc_passes::run_observed(loaded.module.clone(), &wcc_passes::default_pipeline(), &opts, &mut |_, _, _| {
                Ok(())
            })
            .unwrap();
        let program = wcc_backend::program::build(&module, &loaded.checkpoint, &wcc_targets::host().unwrap()).unwrap();
        for level in ["x86_64-v2", "x86_64-v3", "x86_64-v4", "aarch64", "aarch64-i8mm"] {
            let target = wcc_targets::Target::named(level).unwrap();
            let isa = wcc_backend::cranelift::isa(&target).unwrap();
            let mut bytes = 0;
            for k in &program.kernels {
                bytes += wcc_backend::cranelift::compile(k, &*isa).unwrap_or_else(|e| panic!("{level}: {e}")).len();
            }
            eprintln!(
                "{level}{}: {} kernels, {bytes} bytes of code",
                if int8 { " int8" } else { "" },
                program.kernels.len()
            );
            assert!(bytes > 0);
        }
    }
}

#[test]
fn odd_shapes_take_the_remainder_paths() {
    // Widths that are not multiples of the register blocks (32 columns, 4 lanes, 16-column
    // tasks) and a reduction that is not a multiple of 4.
    for (op, a, b) in [
        (Op::MatMul { transpose_b: false }, vec![2, 3, 5], vec![2, 5, 70]),
        (Op::MatMul { transpose_b: false }, vec![1, 2, 7], vec![1, 7, 3]),
        (Op::MatMul { transpose_b: true }, vec![2, 3, 7], vec![2, 37, 7]),
    ] {
        let x = Tensor::f32(a.clone(), noise(a.iter().product(), 3));
        let y = Tensor::f32(b.clone(), noise(b.iter().product(), 4));
        let want = eval(&op, &[&x, &y]).unwrap();
        let out = wcc_ir::TensorType::f32(want.shape.clone());
        let got = wcc_backend::jit::run_op(&op, &[&x, &y], &out, false).unwrap();
        let e = rel_err(got.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(e < 1e-5, "{op:?} {a:?} x {b:?}: {e}");
    }
    // A linear layer with every epilogue, rows not a multiple of the 3-row block or of the
    // row tile (7, 31), columns not a multiple of 4 or 16, a reduction not a multiple of 4.
    for (m, n, k) in [(7, 37, 13), (31, 21, 6), (1, 5, 3), (2, 18, 9)] {
        let x = Tensor::f32([m, k], noise(m * k, 5));
        let w = Tensor::f32([n, k], noise(n * k, 6));
        let b = Tensor::f32([n], noise(n, 7));
        let r = Tensor::f32([m, n], noise(m * n, 8));
        for (gelu, residual) in [(false, false), (true, false), (false, true), (true, true)] {
            let op = Op::FusedLinear { gelu, residual };
            let args: Vec<&Tensor> = if residual { vec![&x, &w, &b, &r] } else { vec![&x, &w, &b] };
            let want = eval(&op, &args).unwrap();
            let got = wcc_backend::jit::run_op(&op, &args, &wcc_ir::TensorType::f32([m, n]), false).unwrap();
            let e = rel_err(got.as_f32().unwrap(), want.as_f32().unwrap());
            assert!(e < 1e-5, "{op:?} {m}x{n}x{k}: {e}");
        }
    }
}

#[test]
fn cache_attention_sees_exactly_the_rows_up_to_each_query_position() {
    // Head sizes on both block paths (16-column blocks, and 4), several query rows, and the
    // first and last positions; the cache rows after the last visible one hold huge values,
    // which any read past the position would show.
    for (m, s, heads, dh, pos) in
        [(1, 9, 2, 4, 0), (1, 9, 2, 4, 8), (3, 10, 3, 20, 4), (2, 7, 2, 64, 5), (1, 448, 8, 64, 30)]
    {
        let d = heads * dh;
        let q = Tensor::f32([m, d], noise(m * d, 11));
        let mut kv = [noise(s * d, 12), noise(s * d, 13)];
        for c in &mut kv {
            for x in &mut c[(pos + m) * d..] {
                *x = 1e30;
            }
        }
        let (k, v) = (Tensor::f32([s, d], kv[0].clone()), Tensor::f32([s, d], kv[1].clone()));
        let p = Tensor::i32([1], vec![pos as i32]);
        let op = Op::CacheAttention { heads };
        let args = [&q, &k, &v, &p];
        let want = eval(&op, &args).unwrap();
        let got = wcc_backend::jit::run_op(&op, &args, &wcc_ir::TensorType::f32([m, d]), false).unwrap();
        let e = rel_err(got.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(e < 1e-5, "m={m} s={s} heads={heads} dh={dh} pos={pos}: {e}");
    }
}

#[test]
fn a_beam_step_reorders_its_caches_and_attends_to_its_own_rows_only() {
    // The batched `scatter_row` and `cache_attention` of a beam, both kernels of the
    // scatter (in place: a gather into scratch and a copy back; not in place: one pass),
    // on head sizes of both block paths, at the first and last positions, with origins that
    // swap, repeat and keep hypotheses. Cache rows after the position hold huge values: a
    // read past it would show.
    for (b, s, heads, dh, pos, origin) in [
        (3, 9, 2, 4, 0, vec![2, 0, 0]),
        (3, 9, 2, 4, 8, vec![1, 0, 2]),
        (2, 10, 3, 20, 4, vec![1, 1]),
        (5, 7, 2, 64, 6, vec![0, 1, 2, 3, 4]),
        (5, 448, 6, 64, 30, vec![4, 4, 0, 1, 2]),
    ] {
        let d = heads * dh;
        let mut caches = [noise(b * s * d, 21), noise(b * s * d, 22)];
        for c in &mut caches {
            for h in 0..b {
                for x in &mut c[(h * s + pos + 1) * d..(h + 1) * s * d] {
                    *x = 1e30;
                }
            }
        }
        let p = Tensor::i32([1], vec![pos as i32]);
        let o = Tensor::i32([b], origin.clone());
        let mut next = vec![];
        for (c, cache) in caches.iter().enumerate() {
            let cache = Tensor::f32([b, s, d], cache.clone());
            let rows = Tensor::f32([b, d], noise(b * d, 30 + c as u64));
            let args = [&cache, &p, &rows, &o];
            let want = eval(&Op::ScatterRow, &args).unwrap();
            for in_place in [false, true] {
                let got =
                    wcc_backend::jit::run_op(&Op::ScatterRow, &args, &wcc_ir::TensorType::f32([b, s, d]), in_place)
                        .unwrap();
                assert_eq!(got, want, "scatter b={b} s={s} d={d} pos={pos} origin={origin:?} in_place={in_place}");
            }
            // Independent of the interpreter: row `pos` is the new one, rows before are the
            // origin's, rows after the hypothesis's own.
            let (w, old) = (want.as_f32().unwrap(), cache.as_f32().unwrap());
            for h in 0..b {
                for t in 0..s {
                    let src = if t < pos { origin[h] as usize } else { h };
                    let row = &w[(h * s + t) * d..(h * s + t + 1) * d];
                    if t == pos {
                        assert_eq!(row, &rows.as_f32().unwrap()[h * d..(h + 1) * d]);
                    } else {
                        assert_eq!(row, &old[(src * s + t) * d..(src * s + t + 1) * d]);
                    }
                }
            }
            next.push(want);
        }
        let q = Tensor::f32([b, d], noise(b * d, 23));
        let op = Op::CacheAttention { heads };
        let args = [&q, &next[0], &next[1], &p];
        let want = eval(&op, &args).unwrap();
        let got = wcc_backend::jit::run_op(&op, &args, &wcc_ir::TensorType::f32([b, d]), false).unwrap();
        let e = rel_err(got.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(e < 1e-5, "attention b={b} s={s} heads={heads} dh={dh} pos={pos}: {e}");
        // Each hypothesis's row is the single-query attention over its own cache.
        for h in 0..b {
            let slice = |t: &Tensor| Tensor::f32([s, d], t.as_f32().unwrap()[h * s * d..(h + 1) * s * d].to_vec());
            let qh = Tensor::f32([1, d], q.as_f32().unwrap()[h * d..(h + 1) * d].to_vec());
            let one = eval(&op, &[&qh, &slice(&next[0]), &slice(&next[1]), &p]).unwrap();
            let e = rel_err(&got.as_f32().unwrap()[h * d..(h + 1) * d], one.as_f32().unwrap());
            assert!(e < 1e-5, "hypothesis {h} of b={b}: {e}");
        }
    }
}

#[test]
fn a_column_mask_is_not_lowered_as_a_row_mask() {
    // `[8, 1]` has as many elements as a row of the scores but is a column: refused with the
    // reason, where it used to be read as a row (a wrong result).
    let (x, m) = (wcc_ir::TensorType::f32([2, 8, 8]), wcc_ir::TensorType::f32([8, 1]));
    let t = wcc_targets::host().unwrap();
    let e = wcc_backend::lower::lower_op(&Op::MaskedSoftmax, &[&x, &m], &x, false, &t).unwrap_err();
    assert!(e.to_string().contains("must vary along the last axis only"), "{e}");
    let row = wcc_ir::TensorType::f32([1, 8]);
    assert!(wcc_backend::lower::lower_op(&Op::MaskedSoftmax, &[&x, &row], &x, false, &t).is_ok());
}

#[test]
fn im2col_gives_the_convolution_columns_exactly() {
    // The shapes of tiny.en's and base's convolutions (stride 1 and 2, padding 1) and odd
    // ones: a copy with zero padding, so the kernel equals the interpreter bit for bit; and
    // the columns times the flattened kernel are the convolution (the quantize pass's
    // rewrite of conv1d), up to the order of the sums.
    for (cin, t, k, stride, pad) in
        [(80, 3000, 3, 1, 1), (384, 3000, 3, 2, 1), (3, 10, 3, 1, 1), (5, 9, 3, 2, 1), (2, 7, 4, 3, 2)]
    {
        let op = Op::Im2col { kernel: k, stride, padding: pad };
        let x = Tensor::f32([cin, t], noise(cin * t, 7));
        let want = eval(&op, &[&x]).unwrap();
        let tout = (t + 2 * pad - k) / stride + 1;
        assert_eq!(want.shape, [tout, cin * k]);
        let got = wcc_backend::jit::run_op(&op, &[&x], &wcc_ir::TensorType::f32([tout, cin * k]), false).unwrap();
        assert_eq!(got.data, want.data, "im2col {cin}x{t} k{k} s{stride} p{pad}");
        if cin * t > 10_000 {
            continue;
        }
        let cout = 4;
        let w = Tensor::f32([cout, cin, k], noise(cout * cin * k, 8));
        let b = Tensor::f32([cout], noise(cout, 9));
        let conv = eval(&Op::Conv1d { stride, padding: pad }, &[&x, &w, &b]).unwrap();
        let wf = eval(&Op::Reshape { shape: vec![cout, cin * k] }, &[&w]).unwrap();
        let y = eval(&Op::Linear, &[&want, &wf, &b]).unwrap();
        let yt = eval(&Op::Transpose { perm: vec![1, 0] }, &[&y]).unwrap();
        let (Data::F32(a), Data::F32(c)) = (&yt.data, &conv.data) else { panic!() };
        assert!(rel_err(a, c) < 1e-5, "im2col·w vs conv1d: {}", rel_err(a, c));
    }
}

#[test]
fn a_prefilled_prompt_writes_its_rows_and_nothing_else() {
    // `scatter_row` of several rows (a prompt block): at the first and last positions that
    // fit and between, a block as long as the cache included, in place and not, against the
    // interpreter and against a copy made here.
    for (s, d, m, pos) in [(9, 6, 3, 0), (9, 6, 3, 6), (9, 5, 4, 2), (448, 384, 64, 100), (10, 8, 10, 0)] {
        let cache = Tensor::f32([s, d], noise(s * d, 40));
        let rows = Tensor::f32([m, d], noise(m * d, 41));
        let p = Tensor::i32([1], vec![pos as i32]);
        let args = [&cache, &p, &rows];
        let want = eval(&Op::ScatterRow, &args).unwrap();
        let (w, old, new) = (want.as_f32().unwrap(), cache.as_f32().unwrap(), rows.as_f32().unwrap());
        for t in 0..s {
            let row = &w[t * d..(t + 1) * d];
            if (pos..pos + m).contains(&t) {
                assert_eq!(row, &new[(t - pos) * d..(t - pos + 1) * d]);
            } else {
                assert_eq!(row, &old[t * d..(t + 1) * d]);
            }
        }
        for in_place in [false, true] {
            let got =
                wcc_backend::jit::run_op(&Op::ScatterRow, &args, &wcc_ir::TensorType::f32([s, d]), in_place).unwrap();
            assert_eq!(got, want, "scatter of {m} rows into {s}x{d} at {pos}, in place: {in_place}");
        }
    }
}
