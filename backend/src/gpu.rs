//! GPU schedules: one IR op → kernels with a grid and block ([`Kernel::launch`]), chosen per
//! op class from the GPU's description ([`GpuSpec`]).
//!
//! - **Matrix products** (`linear`, the fused linears, both `matmul`s): tiled through shared
//!   memory. A block of `TILE²` threads computes a `TILE × TILE` tile of the result, one
//!   element per thread; the reduction walks `TILE` columns at a time, each step loading a
//!   tile of each operand into shared memory (one element per thread, coalesced along the
//!   reduction), a barrier, `TILE` FMAs from shared memory, and a barrier before the tiles
//!   are overwritten. Edges are handled by clamped loads multiplied in as zeros, so no
//!   thread leaves the loop early (the barriers are reached by all).
//! - **Row statistics** (softmax, masked softmax, layer norm): one row per block of
//!   [`ROW_BLOCK`] threads. Each thread walks the row with a stride of the block; partial
//!   results are combined in the warp by butterfly shuffles, then across warps through a
//!   shared array between two barriers.
//! - **Everything else** (element-wise maps, copies, im2col, the int8 products, the cache
//!   attention, gathers, scatters): the CPU schedule's parallel loop is mapped onto the grid,
//!   one iteration per thread ([`map_threads`]). The CPU kernels already write only the
//!   elements of their own parallel index (checked by the kernel verifier), which is what
//!   makes one index per thread race-free; this is the correct-first schedule of those
//!   classes, not a fast one (the note of this change says which classes it leaves slow).
//!
//! Tensor-core (`mma.sync`) products and flash-style attention are not built yet.

use wcc_ir::{Op, TensorType};
use wcc_targets::{GpuSpec, Target};

use crate::kir::build::*;
use crate::kir::{BinOp, Buffer, CmpOp, Elem, Expr, GpuLaunch, Kernel, Stmt, UnOp, Var, END, START, WARP};
use crate::lower::{lower_op, OpKernels, Slot};
use crate::BackendError;

/// Threads per block of the mapped CPU schedules.
pub const MAP_BLOCK: u32 = 128;
/// Threads per block of the row kernels: four warps.
pub const ROW_BLOCK: u32 = 128;
/// Side of a matrix-product tile (a block has `TILE²` threads).
pub const TILE: usize = 16;

/// Lowers `op` for the GPU `target` (see the module documentation).
pub fn lower_op_gpu(
    op: &Op,
    inputs: &[&TensorType],
    out: &TensorType,
    in_place: bool,
    target: &Target,
) -> Result<OpKernels, BackendError> {
    let gpu = target.gpu().ok_or_else(|| BackendError(format!("target {} is not a GPU", target.arch)))?;
    let ins = |k: usize| -> Vec<Slot> { (0..k).map(Slot::Input).chain([Slot::Output]).collect() };
    let one = |k: Kernel, slots: Vec<Slot>| Ok(OpKernels { launches: vec![(k, slots)], scratch: vec![] });
    let n_out = out.numel();
    match op {
        Op::Linear | Op::FusedLinear { .. } => {
            let (n, k) = (inputs[1].shape[0], inputs[1].shape[1]);
            let m = inputs[0].numel() / k;
            let (gelu_, residual) = match op {
                Op::FusedLinear { gelu, residual } => (*gelu, *residual),
                _ => (false, false),
            };
            let g = Gemm { batch: 1, m, n, k, b_transposed: true, bias: inputs.len() >= 3, gelu: gelu_, residual };
            one(gemm_kernel(&g, gpu), ins(inputs.len()))
        }
        Op::MatMul { transpose_b } => {
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let n = if *transpose_b { inputs[1].shape[1] } else { inputs[1].shape[2] };
            let g = Gemm { batch: b, m, n, k, b_transposed: *transpose_b, bias: false, gelu: false, residual: false };
            one(gemm_kernel(&g, gpu), ins(2))
        }
        Op::Softmax | Op::MaskedSoftmax => {
            let d = *out.shape.last().unwrap_or(&1);
            let masked = matches!(op, Op::MaskedSoftmax);
            if masked {
                let m = &inputs[1].shape;
                if m.last() != Some(&d) || m[..m.len() - 1].iter().any(|&e| e != 1) {
                    return Err(BackendError(format!(
                        "masked softmax: the mask {:?} must vary along the last axis only",
                        inputs[1].shape
                    )));
                }
            }
            one(softmax_rows(n_out / d.max(1), d, masked), ins(inputs.len()))
        }
        Op::LayerNorm { eps } => {
            let d = *out.shape.last().unwrap_or(&1);
            one(layer_norm_rows(n_out / d.max(1), d, *eps, inputs.len() == 3), ins(inputs.len()))
        }
        _ => {
            let cpu = lower_op(op, inputs, out, in_place, target)?;
            let launches =
                cpu.launches.into_iter().map(|(k, s)| Ok((map_threads(k, MAP_BLOCK)?, s))).collect::<Result<_, _>>()?;
            Ok(OpKernels { launches, scratch: cpu.scratch })
        }
    }
}

/// Maps a CPU kernel's parallel loop onto a grid: thread `g = block · B + thread` runs the
/// iteration `g` (threads past the extent run none). The body is otherwise the CPU one.
pub fn map_threads(mut k: Kernel, block_size: u32) -> Result<Kernel, BackendError> {
    let [Stmt::For { var: v, start: Expr::Var(START), end: Expr::Var(END), step: 1, body }] = k.body.as_slice() else {
        return Err(BackendError(format!("kernel {}: its body is not one parallel loop of step 1", k.name)));
    };
    let g = k.vars;
    let extent = k.parallel_extent as i64;
    let body = vec![
        let_(g, add(mul(block(), int(block_size as i64)), thread())),
        for_(*v, var(g), min(add(var(g), int(1)), int(extent)), 1, body.clone()),
    ];
    k.vars += 1;
    k.body = body;
    k.launch =
        Some(GpuLaunch { grid: (k.parallel_extent.div_ceil(block_size as u64)).max(1) as u32, block: block_size });
    Ok(k)
}

/// Allocates kernel variables after the parallel range's two.
struct Vars(Var);

impl Vars {
    fn new() -> Vars {
        Vars(2)
    }
    fn next(&mut self) -> Var {
        self.0 += 1;
        self.0 - 1
    }
}

fn fbuf(name: &str, len: usize) -> Buffer {
    Buffer { name: name.into(), elem: Elem::F32, len }
}

fn gpu_kernel(name: String, buffers: Vec<Buffer>, shared: Vec<Buffer>, extent: usize, flops: usize) -> Kernel {
    Kernel {
        name,
        buffers,
        parallel_extent: extent as u64,
        flops: flops as u64,
        body: vec![],
        vars: 0,
        launch: None,
        shared,
    }
}

/// `x · 0.5 · (1 + erf(x / √2))`, as the CPU kernels compute it.
fn gelu(x: Expr) -> Expr {
    let e = un(UnOp::Erf, mul(x.clone(), f(std::f32::consts::FRAC_1_SQRT_2)));
    mul(mul(x, f(0.5)), add(f(1.0), e))
}

/// A matrix product `out[b, i, j] = Σ_q x[b, i, q] · w[b, j, q]` (`b_transposed`, the
/// weights' layout of `linear`) or `Σ_q x[b, i, q] · v[b, q, j]`, then `+ bias[j]`, GELU,
/// `+ residual[b, i, j]` as asked. Buffers: x, w, [bias], [residual], out.
struct Gemm {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
    bias: bool,
    gelu: bool,
    residual: bool,
}

fn gemm_kernel(g: &Gemm, gpu: &GpuSpec) -> Kernel {
    let t = TILE as i64;
    let (m, n, k) = (g.m as i64, g.n as i64, g.k as i64);
    let (tm, tn) = (g.m.div_ceil(TILE), g.n.div_ceil(TILE));
    let tiles = tm * tn;
    let mut bufs = vec![fbuf("x", g.batch * g.m * g.k), fbuf("w", g.batch * g.n * g.k)];
    if g.bias {
        bufs.push(fbuf("bias", g.n));
    }
    let rb = bufs.len() as u32;
    if g.residual {
        bufs.push(fbuf("residual", g.batch * g.m * g.n));
    }
    let ob = bufs.len() as u32;
    bufs.push(fbuf("out", g.batch * g.m * g.n));
    let (sa, sb) = (ob + 1, ob + 2);
    let shared = vec![fbuf("x_tile", TILE * TILE), fbuf("w_tile", TILE * TILE)];
    debug_assert!(2 * TILE * TILE * 4 <= gpu.shared_bytes as usize);
    let mut v = Vars::new();
    let (bi, rem, ti, tj, ty, tx, row, col, acc, k0, q, kk, xb, wb, ob_) = (
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
        v.next(),
    );
    let (wrow, wk, val) = (v.next(), v.next(), v.next());
    // Clamped to the last valid index: every load is in bounds; what lies outside the
    // matrix is multiplied in as zero by the select.
    let clamp = |e: Expr, hi: i64| min(e, int(hi - 1));
    let inside = |a: Expr, hi: i64, then: Expr| select(CmpOp::Lt, a, int(hi), then, f(0.0));
    let x_at = add(var(xb), add(mul(clamp(var(row), m), int(k)), clamp(var(kk), k)));
    // The weight element the thread loads: for `w[j, q]` (transposed) thread (ty, tx) loads
    // column `tj·T + ty` at reduction index `k0 + tx` (consecutive threads, consecutive
    // addresses) into `w_tile[ty·T + tx]`; for `v[q, j]` it loads `v[k0 + ty, tj·T + tx]`
    // into `w_tile[tx·T + ty]`. Either way `w_tile[c·T + r]` holds column `c`, index `r`.
    let (w_load, w_slot) = if g.b_transposed {
        (
            vec![
                let_(wrow, add(mul(var(tj), int(t)), var(ty))),
                let_(wk, add(var(k0), var(tx))),
                let_(
                    val,
                    inside(
                        var(wrow),
                        n,
                        inside(
                            var(wk),
                            k,
                            load(1, add(var(wb), add(mul(clamp(var(wrow), n), int(k)), clamp(var(wk), k)))),
                        ),
                    ),
                ),
            ],
            add(mul(var(ty), int(t)), var(tx)),
        )
    } else {
        (
            vec![
                let_(wrow, add(mul(var(tj), int(t)), var(tx))),
                let_(wk, add(var(k0), var(ty))),
                let_(
                    val,
                    inside(
                        var(wrow),
                        n,
                        inside(
                            var(wk),
                            k,
                            load(1, add(var(wb), add(mul(clamp(var(wk), k), int(n)), clamp(var(wrow), n)))),
                        ),
                    ),
                ),
            ],
            add(mul(var(tx), int(t)), var(ty)),
        )
    };
    let mut result = var(acc);
    if g.bias {
        result = add(result, load(2, var(col)));
    }
    if g.gelu {
        result = gelu(result);
    }
    let out_at = add(var(ob_), add(mul(var(row), int(n)), var(col)));
    if g.residual {
        result = add(result, load(rb, out_at.clone()));
    }
    let body = vec![
        let_(bi, div(block(), int(tiles as i64))),
        let_(rem, sub(block(), mul(var(bi), int(tiles as i64)))),
        let_(ti, div(var(rem), int(tn as i64))),
        let_(tj, sub(var(rem), mul(var(ti), int(tn as i64)))),
        let_(ty, div(thread(), int(t))),
        let_(tx, sub(thread(), mul(var(ty), int(t)))),
        let_(row, add(mul(var(ti), int(t)), var(ty))),
        let_(col, add(mul(var(tj), int(t)), var(tx))),
        let_(xb, mul(var(bi), int(m * k))),
        let_(wb, mul(var(bi), int(n * k))),
        let_(ob_, mul(var(bi), int(m * n))),
        let_(acc, f(0.0)),
        for_(
            k0,
            int(0),
            int(k),
            t,
            [
                vec![let_(kk, add(var(k0), var(tx)))],
                vec![store(
                    sa,
                    add(mul(var(ty), int(t)), var(tx)),
                    inside(var(row), m, inside(var(kk), k, load(0, x_at))),
                )],
                w_load,
                vec![
                    store(sb, w_slot, var(val)),
                    Stmt::Barrier,
                    for_(
                        q,
                        int(0),
                        int(t),
                        1,
                        vec![set(
                            acc,
                            fma(
                                load(sa, add(mul(var(ty), int(t)), var(q))),
                                load(sb, add(mul(var(tx), int(t)), var(q))),
                                var(acc),
                            ),
                        )],
                    ),
                    Stmt::Barrier,
                ],
            ]
            .concat(),
        ),
        if_(CmpOp::Lt, var(row), int(m), vec![if_(CmpOp::Lt, var(col), int(n), vec![store(ob, out_at, result)])]),
    ];
    let name = format!(
        "gemm_{}{}x{}x{}x{}{}{}{}",
        if g.b_transposed { "nt_" } else { "nn_" },
        g.batch,
        g.m,
        g.n,
        g.k,
        if g.bias { "_bias" } else { "" },
        if g.gelu { "_gelu" } else { "" },
        if g.residual { "_residual" } else { "" }
    );
    let grid = g.batch * tiles;
    let mut kern = gpu_kernel(name, bufs, shared, grid, 2 * g.batch * g.m * g.n * g.k);
    kern.body = body;
    kern.vars = v.0;
    kern.launch = Some(GpuLaunch { grid: grid.max(1) as u32, block: (TILE * TILE) as u32 });
    kern
}

/// Combines `acc` (an `f32` variable holding each thread's partial result) over the block
/// with `op` (`Max` or `Add`): butterfly shuffles in the warp, each warp's lane 0 writes
/// `red[warp]`, a barrier, every thread combines the warps' values, and (`again`: another
/// reduction follows) a barrier so `red` may be reused. `red` is a shared buffer of
/// `ROW_BLOCK / WARP` floats. Every barrier is needed: the simulator test removes each.
fn block_reduce(v: &mut Vars, acc: Var, op: BinOp, red: u32, again: bool) -> Vec<Stmt> {
    let (lane, warp) = (v.next(), v.next());
    let warps = (ROW_BLOCK / WARP) as i64;
    let mut s = vec![];
    let mut mask = WARP / 2;
    while mask > 0 {
        s.push(set(acc, bin(op, var(acc), shfl_xor(var(acc), mask))));
        mask /= 2;
    }
    s.extend([
        let_(warp, div(thread(), int(WARP as i64))),
        let_(lane, sub(thread(), mul(var(warp), int(WARP as i64)))),
        if_(CmpOp::Eq, var(lane), int(0), vec![store(red, var(warp), var(acc))]),
        Stmt::Barrier,
        set(acc, load(red, int(0))),
    ]);
    for w in 1..warps {
        s.push(set(acc, bin(op, var(acc), load(red, int(w)))));
    }
    if again {
        s.push(Stmt::Barrier);
    }
    s
}

fn row_kernel(name: String, buffers: Vec<Buffer>, rows: usize, flops: usize, body: Vec<Stmt>, v: Vars) -> Kernel {
    let shared = vec![fbuf("partials", (ROW_BLOCK / WARP) as usize)];
    let mut k = gpu_kernel(name, buffers, shared, rows, flops);
    k.body = body;
    k.vars = v.0;
    k.launch = Some(GpuLaunch { grid: rows.max(1) as u32, block: ROW_BLOCK });
    k
}

/// Softmax of each row of `d` (block `r` takes row `r`); with `masked`, buffers are
/// (x, mask[d], out) and the mask is added first, else (x, out).
fn softmax_rows(rows: usize, d: usize, masked: bool) -> Kernel {
    let ob = 1 + masked as u32;
    let red = ob + 1;
    let mut v = Vars::new();
    let (base, mx, s, inv, j1, j2, j3, e) =
        (v.next(), v.next(), v.next(), v.next(), v.next(), v.next(), v.next(), v.next());
    let x = |j: Var| {
        let xv = load(0, add(var(base), var(j)));
        if masked {
            add(xv, load(1, var(j)))
        } else {
            xv
        }
    };
    let (dd, b) = (d as i64, ROW_BLOCK as i64);
    let body = [
        vec![
            let_(base, mul(block(), int(dd))),
            let_(mx, f(f32::NEG_INFINITY)),
            for_(j1, thread(), int(dd), b, vec![set(mx, max(var(mx), x(j1)))]),
        ],
        block_reduce(&mut v, mx, BinOp::Max, red, true),
        vec![
            let_(s, f(0.0)),
            for_(
                j2,
                thread(),
                int(dd),
                b,
                vec![
                    let_(e, un(UnOp::Exp, sub(x(j2), var(mx)))),
                    store(ob, add(var(base), var(j2)), var(e)),
                    set(s, add(var(s), var(e))),
                ],
            ),
        ],
        block_reduce(&mut v, s, BinOp::Add, red, false),
        vec![
            let_(inv, div(f(1.0), var(s))),
            for_(
                j3,
                thread(),
                int(dd),
                b,
                vec![store(ob, add(var(base), var(j3)), mul(load(ob, add(var(base), var(j3))), var(inv)))],
            ),
        ],
    ]
    .concat();
    let buffers = if masked {
        vec![fbuf("x", rows * d), fbuf("mask", d), fbuf("out", rows * d)]
    } else {
        vec![fbuf("x", rows * d), fbuf("out", rows * d)]
    };
    row_kernel(
        format!("{}softmax_rows_{rows}x{d}", if masked { "masked_" } else { "" }),
        buffers,
        rows,
        5 * rows * d,
        body,
        v,
    )
}

/// Layer norm of each row of `d`: the mean, then the mean square deviation from it (two
/// passes, as the CPU kernel), then `(x - mean) / √(var + eps)`, times gamma plus beta with
/// `affine`. Buffers: (x, gamma, beta, out) or (x, out).
fn layer_norm_rows(rows: usize, d: usize, eps: f32, affine: bool) -> Kernel {
    let ob = if affine { 3 } else { 1 };
    let red = ob + 1;
    let mut v = Vars::new();
    let (base, mean, q, inv, j1, j2, j3, c) =
        (v.next(), v.next(), v.next(), v.next(), v.next(), v.next(), v.next(), v.next());
    let (dd, b) = (d as i64, ROW_BLOCK as i64);
    let x = |j: Var| load(0, add(var(base), var(j)));
    let normed = mul(sub(x(j3), var(mean)), var(inv));
    let value = if affine { fma(normed, load(1, var(j3)), load(2, var(j3))) } else { normed };
    let body = [
        vec![
            let_(base, mul(block(), int(dd))),
            let_(mean, f(0.0)),
            for_(j1, thread(), int(dd), b, vec![set(mean, add(var(mean), x(j1)))]),
        ],
        block_reduce(&mut v, mean, BinOp::Add, red, true),
        vec![
            set(mean, div(var(mean), f(d as f32))),
            let_(q, f(0.0)),
            for_(j2, thread(), int(dd), b, vec![let_(c, sub(x(j2), var(mean))), set(q, fma(var(c), var(c), var(q)))]),
        ],
        block_reduce(&mut v, q, BinOp::Add, red, false),
        vec![
            let_(inv, div(f(1.0), un(UnOp::Sqrt, add(div(var(q), f(d as f32)), f(eps))))),
            for_(j3, thread(), int(dd), b, vec![store(ob, add(var(base), var(j3)), value)]),
        ],
    ]
    .concat();
    let buffers = if affine {
        vec![fbuf("x", rows * d), fbuf("gamma", d), fbuf("beta", d), fbuf("out", rows * d)]
    } else {
        vec![fbuf("x", rows * d), fbuf("out", rows * d)]
    };
    row_kernel(
        format!("layer_norm{}_rows_{rows}x{d}", if affine { "" } else { "_plain" }),
        buffers,
        rows,
        8 * rows * d,
        body,
        v,
    )
}
