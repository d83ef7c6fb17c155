//! The kernel IR's text form, and the kernel verifier: every kernel of tiny.en and base
//! (float and int8) and of odd shapes passes; hand-built bad kernels are rejected with the
//! right error.

use wcc_backend::kir::build::*;
use wcc_backend::kir::{Buffer, CmpOp, Elem, Expr, Kernel, Stmt, Ty, UnOp, END, START};
use wcc_backend::kir_verify::{verify, KernelError};
use wcc_ir::{DType, Op, TensorType};

fn kernel(name: &str, buffers: &[(&str, Elem, usize)], extent: u64, body: Vec<Stmt>) -> Kernel {
    Kernel {
        name: name.into(),
        buffers: buffers.iter().map(|&(n, elem, len)| Buffer { name: n.into(), elem, len }).collect(),
        parallel_extent: extent,
        flops: 0,
        body,
        vars: 32,
        launch: None,
        shared: vec![],
    }
}

fn par(body: Vec<Stmt>) -> Vec<Stmt> {
    vec![for_(2, var(START), var(END), 1, body)]
}

fn demo() -> Kernel {
    let body = par(vec![
        let_(3, mul(var(2), int(4))),
        let_(4, splat(f(0.0))),
        for_(
            5,
            int(0),
            int(8),
            4,
            vec![set(4, fma(load4(0, add(mul(var(2), int(8)), var(5))), splat(f(0.5)), var(4)))],
        ),
        let_(6, splat(int(0))),
        set(6, dot4(var(6), load_as(Ty::I8x16, 2, int(0)), load_as(Ty::U8x16, 1, int(0)))),
        let_(7, add(hsum(var(4)), lane(cvt(Ty::F32x4, pair_add(var(6), var(6))), 0))),
        let_(8, mul(un(UnOp::Neg, sub(var(7), f(1e-30))), un(UnOp::Exp, f(f32::NEG_INFINITY)))),
        let_(9, min(max(load_i(4, var(2)), int(0)), int(15))),
        let_(10, sub(var(3), div(sub(var(9), int(1)), int(2)))),
        let_(11, mul(add(var(3), var(9)), int(-3))),
        store(
            3,
            var(3),
            pack(vec![
                var(8),
                select(CmpOp::Lt, var(2), int(1), var(7), f(0.1)),
                un(UnOp::Erf, un(UnOp::Sqrt, un(UnOp::Abs, var(8)))),
                hmax(var(4)),
            ]),
        ),
        store(1, mul(var(2), int(16)), narrow(Ty::U8x16, vec![var(6), var(6), var(6), cvt(Ty::I32x4, var(4))])),
    ]);
    let mut k = kernel(
        "demo",
        &[("x", Elem::F32, 16), ("q", Elem::U8, 32), ("w", Elem::I8, 16), ("out", Elem::F32, 8), ("idx", Elem::I32, 2)],
        2,
        body,
    );
    k.vars = 12;
    k
}

#[test]
fn kernel_text_form() {
    let want = "\
kernel demo (parallel 0..2) {
  buf0 x: f32[16] read
  buf1 q: u8[32] readwrite
  buf2 w: i8[16] read
  buf3 out: f32[8] write
  buf4 idx: i32[2] read
  for v2 in start..end {
    let v3 = v2 * 4
    let v4 = splat.f32x4(0.0)
    for v5 in 0..8 step 4 {
      v4 = fma(load.f32x4 buf0[v2 * 8 + v5], splat.f32x4(0.5), v4)
    }
    let v6 = splat.i32x4(0)
    v6 = dot4(v6, load.i8x16 buf2[0], load.u8x16 buf1[0])
    let v7 = hsum(v4) + lane(cvt.f32x4(pair_add(v6, v6)), 0)
    let v8 = -(v7 - 1e-30) * exp(-inf)
    let v9 = min(max(load.i64 buf4[v2], 0), 15)
    let v10 = v3 - (v9 - 1) / 2
    let v11 = (v3 + v9) * -3
    buf3[v3] = pack(v8, select(v2 < 1, v7, 0.1), erf(sqrt(abs(v8))), hmax(v4))
    buf1[v2 * 16] = narrow.u8x16(v6, v6, v6, cvt.i32x4(v4))
  }
}
";
    assert_eq!(demo().to_string(), want);
    verify(&demo()).unwrap();
}

#[test]
fn expression_text_uses_minimal_parentheses() {
    let (a, b, c) = (var(2), var(3), var(4));
    let cases: Vec<(Expr, &str)> = vec![
        (sub(sub(a.clone(), b.clone()), c.clone()), "v2 - v3 - v4"),
        (sub(a.clone(), sub(b.clone(), c.clone())), "v2 - (v3 - v4)"),
        (add(a.clone(), mul(b.clone(), c.clone())), "v2 + v3 * v4"),
        (mul(add(a.clone(), b.clone()), c.clone()), "(v2 + v3) * v4"),
        (div(a.clone(), mul(b.clone(), c.clone())), "v2 / (v3 * v4)"),
        (div(mul(a.clone(), b.clone()), c.clone()), "v2 * v3 / v4"),
        (un(UnOp::Neg, add(a.clone(), b.clone())), "-(v2 + v3)"),
        (un(UnOp::Neg, int(-3)), "-(-3)"),
        (mul(a.clone(), int(-3)), "v2 * -3"),
        (sub(var(START), var(END)), "start - end"),
        (fma(f(0.1), f(1.0), f(f32::MIN_POSITIVE)), "fma(0.1, 1.0, 1.1754944e-38)"),
        (select(CmpOp::Le, add(a.clone(), int(1)), b.clone(), f(1.0), f(f32::NAN)), "select(v2 + 1 <= v3, 1.0, NaN)"),
        (select(CmpOp::Eq, a.clone(), b.clone(), int(1), int(2)), "select(v2 == v3, 1, 2)"),
        (splat(var(START)), "splat.i32x4(start)"),
        // Without variable types a splat's result type is unknown.
        (splat(a.clone()), "splat(v2)"),
        (load_as(Ty::F32x4, 1, add(a.clone(), int(4))), "load.f32x4 buf1[v2 + 4]"),
    ];
    for (e, want) in cases {
        assert_eq!(e.to_string(), want);
    }
    // Expression types follow the emitter's rules.
    let none = |_| None;
    assert_eq!(pack(vec![f(1.0); 4]).ty(&none), Some(Ty::F32x4));
    assert_eq!(pack(vec![int(1); 4]).ty(&none), Some(Ty::I32x4));
    assert_eq!(pack(vec![int(1), f(1.0), int(1), int(1)]).ty(&none), None);
    assert_eq!(lane(cvt(Ty::I32x4, splat(f(1.0))), 3).ty(&none), Some(Ty::I64));
    assert_eq!(add(var(2), int(1)).ty(&none), None);
    // f32 constants read back exactly.
    for v in [0.1f32, 1.0 / 3.0, 1e-30, f32::MAX, -0.0, 16777217.0] {
        let text = f(v).to_string();
        assert_eq!(text.parse::<f32>().unwrap().to_bits(), v.to_bits(), "{text}");
    }
}

#[test]
fn statement_lines() {
    let ty = |v| if v == 3 { Some(Ty::F32) } else { None };
    assert_eq!(set(4, splat(var(3))).line(&ty), "v4 = splat.f32x4(v3)");
    assert_eq!(for_(5, var(START), add(var(END), int(1)), 1, vec![]).line(&ty), "for v5 in start..end + 1 {");
    assert_eq!(for_(5, int(0), int(16), 16, vec![]).line(&ty), "for v5 in 0..16 step 16 {");
    assert_eq!(store(2, var(5), f(2.5)).line(&ty), "buf2[v5] = 2.5");
}

mod common;

#[test]
fn every_kernel_of_tiny_en_and_base_passes_the_verifier() {
    let target = wcc_targets::host().unwrap();
    let mut failures = Vec::new();
    let (mut checked, mut time) = (0, std::time::Duration::ZERO);
    let mut slowest = (String::new(), std::time::Duration::ZERO);
    for name in ["tiny.en", "base"] {
        for int8 in [false, true] {
            let loaded = common::load_default_build(name);
            let opts = wcc_passes::PassOptions { int8, ..Default::default() };
            let module =
                wcc_passes::run_observed(loaded.module, &wcc_passes::default_pipeline(), &opts, &mut |_, _, _| Ok(()))
                    .unwrap();
            let program = wcc_backend::program::build(&module, &loaded.checkpoint, &target).unwrap();
            let which = format!("{name}{}", if int8 { " (int8)" } else { "" });
            for k in &program.kernels {
                checked += 1;
                let t0 = std::time::Instant::now();
                if let Err(e) = verify(k) {
                    failures.push(format!("{which}: {e}"));
                }
                time += t0.elapsed();
                if t0.elapsed() > slowest.1 {
                    slowest = (k.name.clone(), t0.elapsed());
                }
                failures.extend(mutants_rejected(k).err().map(|e| format!("{which}: {e}")));
            }
        }
    }
    eprintln!("{checked} kernels verified in {time:.2?}; the slowest, {}, in {:.2?}", slowest.0, slowest.1);
    assert!(checked > 0);
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

/// The checks are tight on real kernels: a buffer one element shorter is out of bounds
/// (unless the kernel does not reach its end: the source of a slice, the cache a row is
/// written into in place), and with the parallel index halved (`p` and `p + 1` doing the
/// same work) the stores leave their slices.
fn mutants_rejected(k: &Kernel) -> Result<(), String> {
    for b in 0..k.buffers.len() {
        let partial = (k.name.starts_with("slice_") && k.buffers[b].name == "x")
            || (k.name.starts_with("scatter_row_in_place") && k.buffers[b].name == "cache")
            // A beam's cache rows are moved only before the position, which is at most the
            // last row: the last row itself is never read from the cache or kept in scratch.
            || (k.name.starts_with("beam_gather_rows") && matches!(k.buffers[b].name.as_str(), "cache" | "scratch"))
            || (k.name.starts_with("beam_scatter_rows") && k.buffers[b].name == "scratch")
            // The fused attention reads the packed copies of the query rows and keys; the
            // operands themselves only for the last `n % 4` keys (none at 1500).
            || (k.name.starts_with("qattention_")
                && !k.name.starts_with("qattention_pack")
                && matches!(k.buffers[b].name.as_str(), "qq" | "kq"));
        if partial || k.buffers[b].len == 0 {
            continue;
        }
        let mut m = k.clone();
        m.buffers[b].len -= 1;
        match verify(&m) {
            Err(KernelError::OutOfBounds { buf, .. }) if buf as usize == b => {}
            other => return Err(format!("{} with buf{b} one element shorter: {other:?}", k.name)),
        }
    }
    if k.parallel_extent >= 2 {
        let mut m = k.clone();
        let fresh = m.vars;
        m.vars += 1;
        let Some(Stmt::For { var: p, body, .. }) = m.body.iter_mut().find(|s| matches!(s, Stmt::For { .. })) else {
            return Err(format!("{}: no parallel loop", k.name));
        };
        body.insert(0, let_(*p, div(var(fresh), int(2))));
        *p = fresh;
        match verify(&m) {
            Err(KernelError::StoreOutsideSlice { p: 0, q: 1, .. }) => {}
            other => return Err(format!("{} with the parallel index halved: {other:?}", k.name)),
        }
    }
    Ok(())
}

/// The operand types of a `qattention`: `b` heads, `m` rows, `n` keys, head size `k`, `e`
/// output columns.
fn qattention(b: usize, m: usize, n: usize, k: usize, e: usize) -> Vec<TensorType> {
    let f = |s: &[usize]| TensorType::f32(s.to_vec());
    let t = |d: DType, s: &[usize]| TensorType::new(d, s.to_vec());
    vec![
        t(DType::U8, &[b, m, k]),
        f(&[b * m]),
        t(DType::I8, &[b, n, k]),
        f(&[b * n]),
        t(DType::I32, &[b * n]),
        t(DType::I8, &[b, e, n]),
        f(&[b * e]),
        t(DType::I32, &[b * e]),
    ]
}

#[test]
fn kernels_of_odd_shapes_pass_the_verifier() {
    // Widths and reductions that are not multiples of the vector, register and task
    // blocks take the remainder loops.
    let target = wcc_targets::host().unwrap();
    let f = |s: &[usize]| TensorType::f32(s.to_vec());
    let t = |d: DType, s: &[usize]| TensorType::new(d, s.to_vec());
    let cases: Vec<(Op, Vec<TensorType>, TensorType)> = vec![
        (Op::MatMul { transpose_b: false }, vec![f(&[2, 3, 5]), f(&[2, 5, 70])], f(&[2, 3, 70])),
        (Op::MatMul { transpose_b: false }, vec![f(&[1, 2, 7]), f(&[1, 7, 3])], f(&[1, 2, 3])),
        (Op::MatMul { transpose_b: true }, vec![f(&[2, 3, 7]), f(&[2, 37, 7])], f(&[2, 3, 37])),
        (Op::Linear, vec![f(&[5, 6]), f(&[19, 6]), f(&[19])], f(&[5, 19])),
        (Op::FusedLinear { gelu: true, residual: true }, vec![f(&[3, 9]), f(&[6, 9]), f(&[6]), f(&[3, 6])], f(&[3, 6])),
        (Op::Softmax, vec![f(&[3, 7])], f(&[3, 7])),
        (Op::MaskedSoftmax, vec![f(&[2, 3, 5]), f(&[5])], f(&[2, 3, 5])),
        (Op::LayerNorm { eps: 1e-5 }, vec![f(&[4, 6]), f(&[6]), f(&[6])], f(&[4, 6])),
        (Op::Gelu, vec![f(&[4099])], f(&[4099])),
        (Op::Add, vec![f(&[3, 1, 5]), f(&[4, 1])], f(&[3, 4, 5])),
        (Op::Mul, vec![f(&[2, 3, 6]), f(&[6])], f(&[2, 3, 6])),
        (Op::Transpose { perm: vec![1, 0, 2] }, vec![f(&[3, 5, 7])], f(&[5, 3, 7])),
        (Op::Transpose { perm: vec![0, 2, 1] }, vec![f(&[3, 5, 7])], f(&[3, 7, 5])),
        (Op::Slice { axis: 1, start: 2, end: 7 }, vec![f(&[3, 9])], f(&[3, 5])),
        (Op::Gather, vec![f(&[10, 6]), t(DType::I32, &[3])], f(&[3, 6])),
        (Op::ScatterRow, vec![f(&[5, 6]), t(DType::I32, &[1]), f(&[1, 6])], f(&[5, 6])),
        (Op::ScatterRow, vec![f(&[7, 6]), t(DType::I32, &[1]), f(&[3, 6])], f(&[7, 6])),
        (Op::ScatterRow, vec![f(&[3, 5, 6]), t(DType::I32, &[1]), f(&[3, 6]), t(DType::I32, &[3])], f(&[3, 5, 6])),
        (
            Op::CacheAttention { heads: 2 },
            vec![f(&[3, 8]), f(&[3, 5, 8]), f(&[3, 5, 8]), t(DType::I32, &[1])],
            f(&[3, 8]),
        ),
        (Op::CausalMask { len: 7 }, vec![t(DType::I32, &[1])], f(&[1, 7])),
        (Op::Conv1d { stride: 2, padding: 1 }, vec![f(&[3, 9]), f(&[5, 3, 3]), f(&[5])], f(&[5, 5])),
        (Op::RowScale, vec![f(&[3, 21])], f(&[3])),
        (Op::Quantize { dtype: DType::U8 }, vec![f(&[3, 37]), f(&[3])], t(DType::U8, &[3, 37])),
        (Op::Quantize { dtype: DType::I8 }, vec![f(&[3, 37]), f(&[1])], t(DType::I8, &[3, 37])),
        // The fused attention: rows off the 3-row blocks, keys off the 12- and 4-key blocks,
        // a head size off the 4-byte groups, columns off the fours; and its few-row schedule.
        (Op::QAttention, qattention(2, 17, 29, 6, 5), f(&[2, 17, 5])),
        (Op::QAttention, qattention(2, 3, 29, 20, 12), f(&[2, 3, 12])),
    ];
    let mut checked = 0;
    for (op, ins, out) in &cases {
        let refs: Vec<&TensorType> = ins.iter().collect();
        for in_place in [false, true] {
            let ks = wcc_backend::lower::lower_op(op, &refs, out, in_place, &target).unwrap();
            for (k, _) in &ks.launches {
                verify(k).unwrap_or_else(|e| panic!("{op:?}: {e}\n{k}"));
                checked += 1;
            }
        }
    }
    // The int8 product: row counts below, at and past the 3-row register block and the
    // 24-row task; columns not a multiple of 4 or of the 16-column task.
    for (m, n) in [(1, 16), (2, 5), (3, 20), (4, 37), (25, 18), (50, 64)] {
        for (gelu, residual) in [(false, false), (true, true)] {
            let k = 32;
            let mut ins =
                vec![t(DType::U8, &[m, k]), f(&[m]), t(DType::I8, &[n, k]), f(&[n]), t(DType::I32, &[n]), f(&[n])];
            if residual {
                ins.push(f(&[m, n]));
            }
            let refs: Vec<&TensorType> = ins.iter().collect();
            let ks = wcc_backend::lower::lower_op(&Op::QLinear { gelu, residual }, &refs, &f(&[m, n]), false, &target)
                .unwrap();
            for (k, _) in &ks.launches {
                verify(k).unwrap_or_else(|e| panic!("qlinear {m}x{n}: {e}\n{k}"));
                checked += 1;
            }
        }
    }
    eprintln!("{checked} kernels verified");
}

/// A map over blocks of 8 of a 10-element buffer: the vector loop ends at the last multiple
/// of 4 (`v5`), the scalar loop takes the rest.
fn blocked_copy(vector_end: Expr) -> Kernel {
    kernel(
        "blocked_copy",
        &[("x", Elem::F32, 10), ("out", Elem::F32, 10)],
        2,
        par(vec![
            let_(3, mul(var(2), int(8))),
            let_(4, min(add(var(3), int(8)), int(10))),
            let_(5, add(var(3), mul(div(sub(var(4), var(3)), int(4)), int(4)))),
            for_(6, var(3), vector_end, 4, vec![store(1, var(6), load4(0, var(6)))]),
            for_(7, var(5), var(4), 1, vec![store(1, var(7), load(0, var(7)))]),
        ]),
    )
}

#[test]
fn remainder_loops_are_in_bounds_and_a_vector_loop_past_them_is_not() {
    verify(&blocked_copy(var(5))).unwrap();
    match verify(&blocked_copy(var(4))) {
        Err(KernelError::OutOfBounds { buffer, lanes: 4, len: 10, index, .. }) => {
            assert_eq!(buffer, "x");
            assert!(index.1 + 3 >= 10, "{index:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tiled_kernel_with_remainders_passes() {
    // Rows in tasks of 2, columns in tasks of 4 (row fastest), as the matrix products do:
    // `rt = p - (p / 3) * 3` is a remainder, so the row stays inside the matrix.
    let (m, n) = (5i64, 6i64);
    let body = par(vec![
        let_(3, div(var(2), int(3))),
        let_(4, sub(var(2), mul(var(3), int(3)))),
        let_(5, mul(var(4), int(2))),
        let_(6, min(add(var(5), int(2)), int(m))),
        let_(7, mul(var(3), int(4))),
        let_(8, min(add(var(7), int(4)), int(n))),
        let_(9, add(var(7), mul(div(sub(var(8), var(7)), int(4)), int(4)))),
        for_(
            10,
            var(5),
            var(6),
            1,
            vec![
                for_(11, var(7), var(9), 4, vec![store(1, add(mul(var(10), int(n)), var(11)), load4(0, var(11)))]),
                for_(12, var(9), var(8), 1, vec![store(1, add(mul(var(10), int(n)), var(12)), load(0, var(12)))]),
            ],
        ),
    ]);
    let k = kernel("tiled", &[("row", Elem::F32, n as usize), ("out", Elem::F32, (m * n) as usize)], 6, body);
    verify(&k).unwrap_or_else(|e| panic!("{e}\n{k}"));
}

#[test]
fn a_load_one_past_the_end_is_rejected() {
    let k = kernel(
        "past_end",
        &[("x", Elem::F32, 8), ("out", Elem::F32, 9)],
        1,
        par(vec![for_(3, int(0), int(9), 1, vec![store(1, var(3), load(0, var(3)))])]),
    );
    match verify(&k) {
        Err(KernelError::OutOfBounds { kernel, buffer, buf: 0, index: (0, 8), lanes: 1, len: 8, at }) => {
            assert_eq!((kernel.as_str(), buffer.as_str(), at.as_str()), ("past_end", "x", "load.f32 buf0[v3]"));
        }
        other => panic!("{other:?}"),
    }
    let text = verify(&k).unwrap_err().to_string();
    assert_eq!(text, "kernel past_end: `load.f32 buf0[v3]` may touch elements 0..=8 of buf0 x, which has 8");
}

#[test]
fn a_vector_load_whose_last_lane_is_past_the_end_is_rejected() {
    let k = kernel(
        "last_lane",
        &[("x", Elem::F32, 8), ("out", Elem::F32, 8)],
        1,
        par(vec![for_(3, int(0), int(8), 4, vec![store(1, var(3), load4(0, add(var(3), int(1))))])]),
    );
    match verify(&k) {
        Err(KernelError::OutOfBounds { buffer, index: (1, 5), lanes: 4, len: 8, .. }) => assert_eq!(buffer, "x"),
        other => panic!("{other:?}"),
    }
    // A store too.
    let k = kernel(
        "last_lane_store",
        &[("out", Elem::U8, 20)],
        1,
        par(vec![for_(3, int(0), int(8), 1, vec![store(0, var(3), narrow(Ty::U8x16, vec![splat(int(0)); 4]))])]),
    );
    match verify(&k) {
        Err(KernelError::OutOfBounds { buffer, index: (0, 7), lanes: 16, len: 20, .. }) => assert_eq!(buffer, "out"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unbound_variables_are_rejected() {
    let k = kernel("unbound", &[("out", Elem::F32, 4)], 1, par(vec![store(0, int(0), load(0, var(7)))]));
    match verify(&k) {
        Err(KernelError::UnboundVar { var: 7, at, .. }) => assert_eq!(at, "buf0[0] = load.f32 buf0[v7]"),
        other => panic!("{other:?}"),
    }
    // Declared inside a loop, used after it.
    let k = kernel(
        "out_of_scope",
        &[("out", Elem::F32, 4)],
        1,
        par(vec![for_(3, int(0), int(4), 1, vec![let_(4, f(1.0))]), store(0, int(0), var(4))]),
    );
    assert!(matches!(verify(&k), Err(KernelError::UnboundVar { var: 4, .. })), "{:?}", verify(&k));
    // Used in its own declaration.
    let k = kernel("self", &[("out", Elem::F32, 4)], 1, par(vec![let_(4, add(var(4), f(1.0)))]));
    assert!(matches!(verify(&k), Err(KernelError::UnboundVar { var: 4, .. })), "{:?}", verify(&k));
}

#[test]
fn a_set_of_an_undeclared_variable_is_rejected() {
    let k = kernel("undeclared_set", &[("out", Elem::F32, 4)], 1, par(vec![set(5, f(1.0)), store(0, int(0), f(0.0))]));
    match verify(&k) {
        Err(KernelError::UndeclaredSet { kernel, var: 5, at }) => {
            assert_eq!((kernel.as_str(), at.as_str()), ("undeclared_set", "v5 = 1.0"))
        }
        other => panic!("{other:?}"),
    }
    // Loop variables and the parallel range cannot be assigned.
    let k = kernel("set_loop_var", &[("out", Elem::F32, 4)], 1, par(vec![set(2, int(0))]));
    assert!(matches!(verify(&k), Err(KernelError::AssignToLoopVar { var: 2, .. })), "{:?}", verify(&k));
    let k = kernel("set_end", &[("out", Elem::F32, 4)], 1, vec![set(END, int(0))]);
    assert!(matches!(verify(&k), Err(KernelError::AssignToLoopVar { var: END, .. })), "{:?}", verify(&k));
    // A Set keeps the variable's type.
    let k = kernel("set_type", &[("out", Elem::F32, 4)], 1, par(vec![let_(3, f(0.0)), set(3, int(1))]));
    match verify(&k) {
        Err(KernelError::TypeMismatch { what, .. }) => assert_eq!(what, "v3 is f32, assigned i64"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_add_of_f32_and_i64_is_rejected() {
    let k = kernel("mixed", &[("out", Elem::F32, 4)], 1, par(vec![let_(3, add(f(1.0), int(2)))]));
    match verify(&k) {
        Err(KernelError::TypeMismatch { kernel, what, at }) => {
            assert_eq!(
                (kernel.as_str(), what.as_str(), at.as_str()),
                ("mixed", "add of f32 and i64", "let v3 = 1.0 + 2")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        verify(&k).unwrap_err().to_string(),
        "kernel mixed: type mismatch: add of f32 and i64, in `let v3 = 1.0 + 2`"
    );
}

#[test]
fn a_store_of_f32x4_into_a_u8_buffer_is_rejected() {
    let k = kernel("f32_to_u8", &[("q", Elem::U8, 16)], 1, par(vec![store(0, int(0), splat(f(1.0)))]));
    match verify(&k) {
        Err(KernelError::TypeMismatch { what, at, .. }) => {
            assert_eq!(what, "a store of f32x4 to buf0 q of u8");
            assert_eq!(at, "buf0[0] = splat.f32x4(1.0)");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn other_ill_typed_kernels_are_rejected() {
    let bad: Vec<Expr> = vec![
        fma(int(1), int(2), int(3)),
        dot4(splat(int(0)), load_as(Ty::U8x16, 1, int(0)), load_as(Ty::U8x16, 1, int(0))),
        cvt(Ty::F32x4, f(1.0)),
        narrow(Ty::U8x16, vec![splat(int(0)); 3]),
        lane(splat(f(1.0)), 4),
        select(CmpOp::Lt, f(1.0), f(2.0), f(1.0), f(2.0)),
        select(CmpOp::Lt, int(1), int(2), f(1.0), int(2)),
        load_as(Ty::F32x4, 1, int(0)),
        load(0, f(0.0)),
        un(UnOp::Exp, int(1)),
        hsum(f(1.0)),
        pack(vec![f(1.0); 3]),
        pack(vec![f(1.0), int(1), f(1.0), f(1.0)]),
        pack(vec![splat(f(1.0)); 4]),
        div(splat(int(1)), splat(int(1))),
    ];
    for e in bad {
        let k = kernel("ill_typed", &[("out", Elem::F32, 4), ("q", Elem::U8, 16)], 1, par(vec![let_(3, e.clone())]));
        assert!(matches!(verify(&k), Err(KernelError::TypeMismatch { .. })), "{e}: {:?}", verify(&k));
    }
    let k = kernel("f32_bound", &[("out", Elem::F32, 4)], 1, par(vec![for_(3, int(0), f(4.0), 1, vec![])]));
    assert!(matches!(verify(&k), Err(KernelError::TypeMismatch { .. })), "{:?}", verify(&k));
}

#[test]
fn bad_buffers_and_steps_are_rejected() {
    let k = kernel("no_buffer", &[("out", Elem::F32, 4)], 1, par(vec![store(1, int(0), f(0.0))]));
    assert!(matches!(verify(&k), Err(KernelError::BadBuffer { buf: 1, buffers: 1, .. })), "{:?}", verify(&k));
    let k = kernel("zero_step", &[("out", Elem::F32, 4)], 1, par(vec![for_(3, int(0), int(4), 0, vec![])]));
    assert!(matches!(verify(&k), Err(KernelError::BadStep { var: 3, step: 0, .. })), "{:?}", verify(&k));
    let mut k = kernel("too_many_vars", &[("out", Elem::F32, 4)], 1, par(vec![let_(3, int(0))]));
    k.vars = 3;
    assert!(matches!(verify(&k), Err(KernelError::VarOutOfRange { var: 3, vars: 3, .. })), "{:?}", verify(&k));
}

#[test]
fn a_kernel_writing_the_same_element_from_every_parallel_index_is_rejected() {
    let k = kernel("same_element", &[("out", Elem::F32, 4)], 4, par(vec![store(0, int(0), f(1.0))]));
    match verify(&k) {
        Err(KernelError::StoreOutsideSlice { kernel, buffer, buf: 0, p: 0, q: 1, elements: (0, 0), at }) => {
            assert_eq!((kernel.as_str(), buffer.as_str(), at.as_str()), ("same_element", "out", "buf0[0] = 1.0"));
        }
        other => panic!("{other:?}"),
    }
    // Overlapping rows: each index writes 4 elements from 2p.
    let k = kernel(
        "overlapping_rows",
        &[("out", Elem::F32, 16)],
        6,
        par(vec![store(0, mul(var(2), int(2)), splat(f(1.0)))]),
    );
    assert!(matches!(verify(&k), Err(KernelError::StoreOutsideSlice { elements: (2, 3), .. })), "{:?}", verify(&k));
    // With one parallel index there is nothing to race with.
    let k = kernel("one_index", &[("out", Elem::F32, 4)], 1, par(vec![store(0, int(0), f(1.0))]));
    verify(&k).unwrap();
    // Stores outside the parallel loop run once per piece of the range.
    let k = kernel("unsliced", &[("out", Elem::F32, 4)], 4, vec![store(0, int(0), f(1.0))]);
    assert!(matches!(verify(&k), Err(KernelError::UnslicedStore { buf: 0, extent: 4, .. })), "{:?}", verify(&k));
    // A loop over the parallel range that is not the top-level one does not slice it.
    let k = kernel(
        "nested_range",
        &[("out", Elem::F32, 4)],
        4,
        vec![for_(3, int(0), int(1), 1, vec![for_(2, var(START), var(END), 1, vec![store(0, var(2), f(1.0))])])],
    );
    assert!(matches!(verify(&k), Err(KernelError::UnslicedStore { .. })), "{:?}", verify(&k));
}
