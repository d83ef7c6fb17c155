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
//! - **Row statistics** (softmax, masked softmax, layer norm, `row_scale`, the int8
//!   attention's `softmax_quantize` and `softmax_scale`): one row per block of
//!   [`ROW_BLOCK`] threads. Each thread walks the row with a stride of the block; partial
//!   results are combined in the warp by butterfly shuffles, then across warps through a
//!   shared array between two barriers.
//! - **int8 products** (`qlinear`, `qmatmul`): the same tiling with bytes, `QK` bytes of the
//!   reduction staged per step, four `dot4`s (`dp4a`) per thread and step, exact integer
//!   sums, the CPU kernels' dequantizing epilogue.
//! - **Cache attention** (the decoder's self-attention over its K/V cache): a block per
//!   (query row or hypothesis, head), the scores in shared memory, block reductions for the
//!   softmax, then the weighted sum of the value rows, threads over the head's columns.
//! - **Element-wise** (transposes, slices, broadcast add and multiply, quantize, gathers,
//!   the cache updates of `scatter_row`, a beam's too): a thread per element of the result;
//!   `row_scale` a block per row.
//! - **Everything else** (GELU and scaling maps, im2col, row sums, the causal mask): the CPU
//!   schedule's parallel loop mapped onto the grid, one iteration per thread
//!   ([`map_threads`]), with any plain matrix product among its launches (the f32
//!   convolution's) swapped for the tiled one. The CPU kernels already write only the elements of their own
//!   parallel index (checked by the kernel verifier), which is what makes one index per
//!   thread race-free.
//!
//! Not built yet: tensor-core (`mma.sync`) products and flash-style encoder attention (the
//! encoder's attention is its products and softmax, each its own launch).

use wcc_ir::{Op, TensorType};
use wcc_targets::{GpuSpec, Target};

use crate::kir::build::*;
use crate::kir::{BinOp, Buffer, CmpOp, Elem, Expr, GpuLaunch, Kernel, Stmt, UnOp, Var, END, START, WARP};
use crate::lower::{lower_op, OpKernels, Slot, Vars};
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
        Op::QLinear { gelu, residual } => {
            let (n, k) = (inputs[2].shape[0], inputs[2].shape[1]);
            let m = inputs[0].numel() / k;
            let q = QGemm {
                batch: 1,
                m,
                n,
                k,
                row_scales: inputs[1].numel() != 1,
                bias: true,
                gelu: *gelu,
                residual: *residual,
            };
            one(qgemm_kernel(&q), ins(inputs.len()))
        }
        Op::QMatMul => {
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let n = inputs[2].shape[1];
            let q = QGemm {
                batch: b,
                m,
                n,
                k,
                row_scales: inputs[1].numel() != 1,
                bias: false,
                gelu: false,
                residual: false,
            };
            one(qgemm_kernel(&q), ins(5))
        }
        Op::QAttention => {
            // The unfused chain through scratch (scores, probability scales, quantized
            // probabilities): the CPU kernel's call-private buffers would be one block's
            // shared memory here, and its rows-per-call schedule is not a GPU one.
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let (n, e) = (inputs[2].shape[1], inputs[5].shape[1]);
            let row_scales = inputs[1].numel() != 1;
            let q = |m, n, k, row_scales| QGemm {
                batch: b,
                m,
                n,
                k,
                row_scales,
                bias: false,
                gelu: false,
                residual: false,
            };
            let rows = b * m;
            let (scores, scale, p) = (Slot::Scratch(0), Slot::Scratch(1), Slot::Scratch(2));
            let launches = vec![
                (qgemm_kernel(&q(m, n, k, row_scales)), [ins(5)[..5].to_vec(), vec![scores]].concat()),
                (softmax_scale_rows(rows, n), vec![scores, scale]),
                (softmax_quantize_rows(rows, n), vec![scores, p]),
                (
                    qgemm_kernel(&q(m, e, n, true)),
                    vec![p, scale, Slot::Input(5), Slot::Input(6), Slot::Input(7), Slot::Output],
                ),
            ];
            Ok(OpKernels { launches, scratch: vec![rows * n * 4, rows * 4, rows * n] })
        }
        Op::CacheAttention { heads } => {
            let (b, m, s) = if inputs[1].rank() == 3 {
                (inputs[1].shape[0], 1, inputs[1].shape[1])
            } else {
                (1, inputs[0].shape[0], inputs[1].shape[0])
            };
            let dh = inputs[0].shape[1] / heads;
            let k = cache_attention_rows(b, m, s, *heads, dh);
            let slots = [ins(4), vec![Slot::Scratch(0)]].concat();
            Ok(OpKernels { launches: vec![(k, slots)], scratch: vec![4] })
        }
        Op::Transpose { perm } => {
            let st = row_major(&inputs[0].shape);
            let src: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            let name = format!("transpose_{}_{}", dims(&inputs[0].shape), dims(perm));
            one(strided_copy(name, inputs[0].numel(), &out.shape, &src, 0), ins(1))
        }
        Op::Slice { axis, start, .. } => {
            let st = row_major(&inputs[0].shape);
            let name = format!("slice_{}_{axis}_{start}_{}", dims(&inputs[0].shape), dims(&out.shape));
            one(strided_copy(name, inputs[0].numel(), &out.shape, &st, start * st[*axis]), ins(1))
        }
        Op::Add | Op::Mul => {
            let op = if matches!(op, Op::Add) { BinOp::Add } else { BinOp::Mul };
            one(broadcast(op, &inputs[0].shape, &inputs[1].shape, &out.shape), ins(2))
        }
        Op::Quantize { dtype } => {
            let k = *inputs[0].shape.last().unwrap_or(&1);
            one(quantize(n_out / k.max(1), k, inputs[1].numel() != 1, *dtype), ins(2))
        }
        Op::RowScale => {
            let k = *inputs[0].shape.last().unwrap_or(&1);
            one(row_scale_rows(n_out, k), ins(1))
        }
        Op::Gather => {
            let (v, d) = (inputs[0].shape[0], inputs[0].shape[1]);
            let n = inputs[1].shape[0];
            one(gather(v, d, n, inputs.len() == 3), ins(inputs.len()))
        }
        Op::ScatterRow if inputs.len() == 4 => Ok(beam_scatter_rows(&inputs[0].shape, in_place)),
        Op::ScatterRow => {
            let (s, d, m) = (inputs[0].shape[0], inputs[0].shape[1], inputs[2].shape[0]);
            one(scatter_rows(s, d, m, in_place), ins(3))
        }
        Op::SoftmaxQuantize => {
            let k = *inputs[0].shape.last().unwrap_or(&1);
            one(softmax_quantize_rows(n_out / k.max(1), k), ins(1))
        }
        Op::SoftmaxScale => {
            let k = *inputs[0].shape.last().unwrap_or(&1);
            one(softmax_scale_rows(n_out, k), ins(1))
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
            let launches = cpu
                .launches
                .into_iter()
                .map(|(k, s)| Ok((as_gemm(&k, gpu).map_or_else(|| map_threads(k, MAP_BLOCK), Ok)?, s)))
                .collect::<Result<_, _>>()?;
            Ok(OpKernels { launches, scratch: cpu.scratch })
        }
    }
}

/// The tiled product in place of a CPU matrix product inside another op's launches (the
/// convolution's, after its im2col): a CPU `linear_*` kernel over buffers x, w, bias, out
/// becomes the GPU `gemm` of the same shape (read off the buffer lengths), same buffers.
fn as_gemm(k: &Kernel, gpu: &GpuSpec) -> Option<Kernel> {
    let names: Vec<&str> = k.buffers.iter().map(|b| b.name.as_str()).collect();
    if !k.name.starts_with("linear_") || names != ["x", "w", "bias", "out"] {
        return None;
    }
    let out_len = k.buffers[3].len;
    let n = k.buffers[2].len;
    let kk = k.buffers[1].len / n.max(1);
    let m = k.buffers[0].len / kk.max(1);
    if n * kk != k.buffers[1].len || m * kk != k.buffers[0].len || m * n != out_len {
        return None;
    }
    let g = Gemm { batch: 1, m, n, k: kk, b_transposed: true, bias: true, gelu: false, residual: false };
    Some(gemm_kernel(&g, gpu))
}

/// Maps a CPU kernel's parallel loop onto a grid: thread `g = block · B + thread` runs the
/// iteration `g` (threads past the extent run none). The body is otherwise the CPU one.
pub fn map_threads(mut k: Kernel, block_size: u32) -> Result<Kernel, BackendError> {
    let [Stmt::For { var: v, start: Expr::Var(START), end: Expr::Var(END), step: 1, body }] = k.body.as_slice() else {
        return Err(BackendError(format!("kernel {}: its body is not one parallel loop of step 1", k.name)));
    };
    if !k.shared.is_empty() {
        // A CPU call's private scratch would be one block's, shared by its threads.
        return Err(BackendError(format!("kernel {}: its local buffers have no GPU mapping", k.name)));
    }
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
    // Which thread coordinate walks the columns and which the reduction while loading, and
    // where element (column `c`, index `q`) of the weight operand lies.
    let (c_lane, q_lane) = if g.b_transposed { (ty, tx) } else { (tx, ty) };
    let w_at = |c: Expr, q: Expr| if g.b_transposed { add(mul(c, int(k)), q) } else { add(mul(q, int(n)), c) };
    let w_load = vec![
        let_(wrow, add(mul(var(tj), int(t)), var(c_lane))),
        let_(wk, add(var(k0), var(q_lane))),
        let_(
            val,
            inside(
                var(wrow),
                n,
                inside(var(wk), k, load(1, add(var(wb), w_at(clamp(var(wrow), n), clamp(var(wk), k))))),
            ),
        ),
    ];
    let w_slot = add(mul(var(c_lane), int(t)), var(q_lane));
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

/// Threads per block of the element-wise kernels.
const ELEMENT_BLOCK: u32 = 256;

/// A kernel of one thread per element `e` of `0..n`: `body(e)` (a grid of `n / 256` blocks).
fn elementwise(
    name: String,
    buffers: Vec<Buffer>,
    n: usize,
    flops: usize,
    mut v: Vars,
    body: &dyn Fn(Var, &mut Vars) -> Vec<Stmt>,
) -> Kernel {
    let (g, e) = (v.next(), v.next());
    let inner = body(e, &mut v);
    let mut k = gpu_kernel(name, buffers, vec![], n, flops);
    k.body = vec![
        let_(g, add(mul(block(), int(ELEMENT_BLOCK as i64)), thread())),
        for_(e, var(g), min(add(var(g), int(1)), int(n as i64)), 1, inner),
    ];
    k.vars = v.0;
    k.launch = Some(GpuLaunch { grid: n.div_ceil(ELEMENT_BLOCK as usize).max(1) as u32, block: ELEMENT_BLOCK });
    k
}

fn row_major(shape: &[usize]) -> Vec<usize> {
    (0..shape.len()).map(|d| shape[d + 1..].iter().product()).collect()
}

fn dims(s: &[usize]) -> String {
    s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// The offset `Σ_d coord_d · strides_d` of element `e` of a row-major `shape`, its
/// coordinates peeled off by division from the last axis.
fn offset_of(v: &mut Vars, e: Var, shape: &[usize], strides: &[usize], base: usize) -> (Vec<Stmt>, Expr) {
    let mut stmts = vec![];
    let mut rest = var(e);
    let mut off = int(base as i64);
    for d in (0..shape.len()).rev() {
        let (q, c) = (v.next(), v.next());
        stmts.push(let_(q, div(rest.clone(), int(shape[d].max(1) as i64))));
        stmts.push(let_(c, sub(rest, mul(var(q), int(shape[d].max(1) as i64)))));
        if strides[d] != 0 {
            off = add(off, mul(var(c), int(strides[d] as i64)));
        }
        rest = var(q);
    }
    (stmts, off)
}

/// `out[e] = x[base + Σ_d coord_d(e) · strides_d]` (transposes and slices): a thread per
/// element of the result.
fn strided_copy(name: String, in_len: usize, out_shape: &[usize], strides: &[usize], base: usize) -> Kernel {
    let n: usize = out_shape.iter().product();
    elementwise(name, vec![fbuf("x", in_len), fbuf("out", n)], n, n, Vars::new(), &|e, v| {
        let (mut s, src) = offset_of(v, e, out_shape, strides, base);
        s.push(store(1, var(e), load(0, src)));
        s
    })
}

/// `out = a ⊕ b` with numpy broadcasting, a thread per element of the result.
fn broadcast(op: BinOp, a: &[usize], b: &[usize], out: &[usize]) -> Kernel {
    let n: usize = out.iter().product();
    let r = out.len();
    let pad = |s: &[usize]| -> Vec<usize> { [vec![1; r - s.len()], s.to_vec()].concat() };
    let bstr = |s: &[usize]| -> Vec<usize> {
        let p = pad(s);
        let st = row_major(&p);
        (0..r).map(|d| if p[d] == 1 { 0 } else { st[d] }).collect()
    };
    let (sa, sb) = (bstr(a), bstr(b));
    let name = format!("{}_{}_{}_{}", op.name(), dims(a), dims(b), dims(out));
    let bufs = vec![fbuf("a", a.iter().product()), fbuf("b", b.iter().product()), fbuf("out", n)];
    elementwise(name, bufs, n, n, Vars::new(), &|e, v| {
        let (mut s, oa) = offset_of(v, e, out, &sa, 0);
        let (s2, ob) = offset_of(v, e, out, &sb, 0);
        s.extend(s2);
        s.push(store(2, var(e), bin(op, load(0, oa), load(1, ob))));
        s
    })
}

/// `quantize`: `round_ties_even(x / scale)` clamped to ±127 plus the zero point (128 for
/// `u8`), the scale of the element's row (or the one static scale); a thread per element.
fn quantize(rows: usize, k: usize, row_scales: bool, dtype: wcc_ir::DType) -> Kernel {
    use crate::kir::Ty;
    let (elem, zp) = if dtype == wcc_ir::DType::U8 { (Elem::U8, 128) } else { (Elem::I8, 0) };
    let bufs = vec![
        fbuf("x", rows * k),
        fbuf("scale", if row_scales { rows } else { 1 }),
        Buffer { name: "q".into(), elem, len: rows * k },
    ];
    let name = format!("quantize_{}_{rows}x{k}{}", dtype.name(), if row_scales { "" } else { "_static" });
    elementwise(name, bufs, rows * k, 2 * rows * k, Vars::new(), &|e, _| {
        let scale = if row_scales { load(1, div(var(e), int(k as i64))) } else { load(1, int(0)) };
        let q = cvt(Ty::I64, div(load(0, var(e)), scale));
        vec![store(2, var(e), add(max(min(q, int(127)), int(-127)), int(zp)))]
    })
}

/// `row_scale`: `max(max_j |x[r, j]|, floor) / 127` per row, a block per row.
fn row_scale_rows(rows: usize, k: usize) -> Kernel {
    let red = 2;
    let mut v = Vars::new();
    let (base, m, j) = (v.next(), v.next(), v.next());
    let body = [
        vec![
            let_(base, mul(block(), int(k as i64))),
            let_(m, f(0.0)),
            for_(
                j,
                thread(),
                int(k as i64),
                ROW_BLOCK as i64,
                vec![set(m, max(var(m), un(UnOp::Abs, load(0, add(var(base), var(j))))))],
            ),
        ],
        block_reduce(&mut v, m, BinOp::Max, red, false),
        vec![if_(
            CmpOp::Eq,
            thread(),
            int(0),
            vec![store(1, block(), div(max(var(m), f(wcc_ir::interp::ROW_SCALE_FLOOR)), f(127.0)))],
        )],
    ]
    .concat();
    row_kernel(
        format!("row_scale_rows_{rows}x{k}"),
        vec![fbuf("x", rows * k), fbuf("scale", rows)],
        rows,
        2 * rows * k,
        body,
        v,
    )
}

/// `gather`: row `ids[r]` (clamped into the table) of the table for each `r`, a thread per
/// element; from an int8 table (`int8`: buffers table i8, ids, scales), each element
/// widened and scaled by its row's scale.
fn gather(v: usize, d: usize, n: usize, int8: bool) -> Kernel {
    use crate::kir::Ty;
    let mut bufs = vec![
        Buffer { name: "table".into(), elem: if int8 { Elem::I8 } else { Elem::F32 }, len: v * d },
        Buffer { name: "ids".into(), elem: Elem::I32, len: n },
    ];
    if int8 {
        bufs.push(fbuf("scales", v));
    }
    let ob = bufs.len() as u32;
    bufs.push(fbuf("out", n * d));
    let name = format!("gather{}_{v}x{d}_{n}", if int8 { "_i8" } else { "" });
    elementwise(name, bufs, n * d, 0, Vars::new(), &|e, vs| {
        let (r, j, id) = (vs.next(), vs.next(), vs.next());
        let at = add(mul(var(id), int(d as i64)), var(j));
        let value = if int8 { mul(cvt(Ty::F32, load_as(Ty::I64, 0, at)), load(2, var(id))) } else { load(0, at) };
        vec![
            let_(r, div(var(e), int(d as i64))),
            let_(j, sub(var(e), mul(var(r), int(d as i64)))),
            let_(id, min(max(load_i(1, var(r)), int(0)), int(v as i64 - 1))),
            store(ob, var(e), value),
        ]
    })
}

/// `scatter_row`: rows `p..p + m` of the cache `[s, d]` become `rows` (`p` clamped so they
/// fit). In place: a thread per element of `rows`, writing only those. Else a thread per
/// element of the result: the new row's element where it lies in `p..p + m`, else the
/// cache's. Buffers: cache, index, rows, out.
fn scatter_rows(s: usize, d: usize, m: usize, in_place: bool) -> Kernel {
    let bufs = vec![
        fbuf("cache", s * d),
        Buffer { name: "index".into(), elem: Elem::I32, len: 1 },
        fbuf("rows", m * d),
        fbuf("out", s * d),
    ];
    let pos = || min(max(load_i(1, int(0)), int(0)), int((s - m) as i64));
    if in_place {
        let name = format!("scatter_rows_in_place_{m}x{s}x{d}");
        return elementwise(name, bufs, m * d, 0, Vars::new(), &|e, _| {
            vec![store(3, add(mul(pos(), int(d as i64)), var(e)), load(2, var(e)))]
        });
    }
    elementwise(format!("scatter_rows_{m}x{s}x{d}"), bufs, s * d, 0, Vars::new(), &|e, vs| {
        let (r, j, off, idx) = (vs.next(), vs.next(), vs.next(), vs.next());
        vec![
            let_(r, div(var(e), int(d as i64))),
            let_(j, sub(var(e), mul(var(r), int(d as i64)))),
            let_(off, sub(var(r), pos())),
            let_(idx, min(max(var(off), int(0)), int(m as i64 - 1))),
            store(
                3,
                var(e),
                select(
                    CmpOp::Eq,
                    var(off),
                    var(idx),
                    load(2, add(mul(var(idx), int(d as i64)), var(j))),
                    load(0, var(e)),
                ),
            ),
        ]
    })
}

/// A beam's cache update (`scatter_row` with origins), a thread per cache element
/// `[h, t, j]` of `[b, s, d]`, `o` the hypothesis's origin (clamped) and `p` the position:
/// not in place, `out = rows[h, j]` at `t = p`, `cache[o, t, j]` before it, `cache[h, t, j]`
/// after. In place, as on the CPU, two launches through scratch: `scratch[h] = cache[o]` for
/// `t < p` where `o ≠ h`, then `cache[h] = scratch[h]` there and row `p = rows[h]`.
fn beam_scatter_rows(shape: &[usize], in_place: bool) -> OpKernels {
    let (b, s, d) = (shape[0], shape[1], shape[2]);
    let (sd, d_) = ((s * d) as i64, d as i64);
    let n = b * s * d;
    let index = || Buffer { name: "index".into(), elem: Elem::I32, len: 1 };
    let origin = || Buffer { name: "origin".into(), elem: Elem::I32, len: b };
    // Coordinates of element `e` and the hypothesis's origin and position.
    let coords = |vs: &mut Vars, e: Var, origin_buf: u32| {
        let (h, rest, t, j, o, p) = (vs.next(), vs.next(), vs.next(), vs.next(), vs.next(), vs.next());
        let stmts = vec![
            let_(h, div(var(e), int(sd))),
            let_(rest, sub(var(e), mul(var(h), int(sd)))),
            let_(t, div(var(rest), int(d_))),
            let_(j, sub(var(rest), mul(var(t), int(d_)))),
            let_(o, min(max(load_i(origin_buf, var(h)), int(0)), int(b as i64 - 1))),
            let_(p, min(max(load_i(1, int(0)), int(0)), int(s as i64 - 1))),
        ];
        (stmts, h, t, j, o, p)
    };
    if !in_place {
        let bufs = vec![fbuf("cache", n), index(), fbuf("rows", b * d), origin(), fbuf("out", n)];
        let k = elementwise(format!("beam_scatter_rows_{b}x{s}x{d}"), bufs, n, 0, Vars::new(), &|e, vs| {
            let (mut st, h, t, j, o, p) = coords(vs, e, 3);
            let at = |hyp: Var| add(add(mul(var(hyp), int(sd)), mul(var(t), int(d_))), var(j));
            let kept = select(CmpOp::Lt, var(t), var(p), load(0, at(o)), load(0, at(h)));
            st.push(store(
                4,
                var(e),
                select(CmpOp::Eq, var(t), var(p), load(2, add(mul(var(h), int(d_)), var(j))), kept),
            ));
            st
        });
        let slots = vec![Slot::Input(0), Slot::Input(1), Slot::Input(2), Slot::Input(3), Slot::Output];
        return OpKernels { launches: vec![(k, slots)], scratch: vec![] };
    }
    let moved = |st: &mut Vec<Stmt>, h: Var, t: Var, o: Var, p: Var, then: Vec<Stmt>| {
        // `t < p` and `o != h`: `t < len` with `len = 0` for a hypothesis that continues itself.
        st.push(if_(CmpOp::Lt, var(t), select(CmpOp::Eq, var(o), var(h), int(0), var(p)), then));
    };
    let gather_bufs = vec![fbuf("cache", n), index(), origin(), fbuf("scratch", n)];
    let gather = elementwise(format!("beam_gather_rows_{b}x{s}x{d}"), gather_bufs, n, 0, Vars::new(), &|e, vs| {
        let (mut st, h, t, j, o, p) = coords(vs, e, 2);
        let from = add(add(mul(var(o), int(sd)), mul(var(t), int(d_))), var(j));
        moved(&mut st, h, t, o, p, vec![store(3, var(e), load(0, from))]);
        st
    });
    let scatter_bufs = vec![fbuf("scratch", n), index(), fbuf("rows", b * d), origin(), fbuf("out", n)];
    let scatter =
        elementwise(format!("beam_scatter_rows_in_place_{b}x{s}x{d}"), scatter_bufs, n, 0, Vars::new(), &|e, vs| {
            let (mut st, h, t, j, o, p) = coords(vs, e, 3);
            moved(&mut st, h, t, o, p, vec![store(4, var(e), load(0, var(e)))]);
            st.push(if_(CmpOp::Eq, var(t), var(p), vec![store(4, var(e), load(2, add(mul(var(h), int(d_)), var(j))))]));
            st
        });
    OpKernels {
        launches: vec![
            (gather, vec![Slot::Input(0), Slot::Input(1), Slot::Input(3), Slot::Scratch(0)]),
            (scatter, vec![Slot::Scratch(0), Slot::Input(1), Slot::Input(2), Slot::Input(3), Slot::Output]),
        ],
        scratch: vec![n * 4],
    }
}

/// A block's row `block()` of `d` elements: `base` set to its start, then the row's maximum
/// of `x(j)` (loop variable `j`, threads strided by the block, then [`block_reduce`] into
/// shared buffer `red`) in `mx` for every thread.
fn block_row_max(
    v: &mut Vars,
    (base, mx, j): (Var, Var, Var),
    d: usize,
    x: &dyn Fn(Var) -> Expr,
    red: u32,
    again: bool,
) -> Vec<Stmt> {
    [
        vec![
            let_(base, mul(block(), int(d as i64))),
            let_(mx, f(f32::NEG_INFINITY)),
            for_(j, thread(), int(d as i64), ROW_BLOCK as i64, vec![set(mx, max(var(mx), x(j)))]),
        ],
        block_reduce(v, mx, BinOp::Max, red, again),
    ]
    .concat()
}

/// `softmax_quantize`: per row (a block), the maximum, then `127 · exp(x − max)` (the
/// low-precision exp, as the CPU kernel) rounded, clamped to ±127 and offset by 128, a byte
/// per element.
fn softmax_quantize_rows(rows: usize, d: usize) -> Kernel {
    use crate::kir::Ty;
    let red = 2;
    let mut v = Vars::new();
    let (base, mx, j1, j2) = (v.next(), v.next(), v.next(), v.next());
    let x = |j: Var| load(0, add(var(base), var(j)));
    let e = mul(un(UnOp::ExpLow, sub(x(j2), var(mx))), f(127.0));
    let body = [
        block_row_max(&mut v, (base, mx, j1), d, &x, red, false),
        vec![for_(
            j2,
            thread(),
            int(d as i64),
            ROW_BLOCK as i64,
            vec![store(1, add(var(base), var(j2)), add(max(min(cvt(Ty::I64, e), int(127)), int(-127)), int(128)))],
        )],
    ]
    .concat();
    let bufs = vec![fbuf("x", rows * d), Buffer { name: "q".into(), elem: Elem::U8, len: rows * d }];
    row_kernel(format!("softmax_quantize_rows_{rows}x{d}"), bufs, rows, 4 * rows * d, body, v)
}

/// `softmax_scale`: per row (a block), the maximum, `Σ exp(x − max)` (the low-precision exp),
/// and `1 / (127 · sum)`.
fn softmax_scale_rows(rows: usize, d: usize) -> Kernel {
    let red = 2;
    let mut v = Vars::new();
    let (base, mx, s, j1, j2) = (v.next(), v.next(), v.next(), v.next(), v.next());
    let x = |j: Var| load(0, add(var(base), var(j)));
    let body = [
        block_row_max(&mut v, (base, mx, j1), d, &x, red, true),
        vec![
            let_(s, f(0.0)),
            for_(
                j2,
                thread(),
                int(d as i64),
                ROW_BLOCK as i64,
                vec![set(s, add(var(s), un(UnOp::ExpLow, sub(x(j2), var(mx)))))],
            ),
        ],
        block_reduce(&mut v, s, BinOp::Add, red, false),
        vec![if_(CmpOp::Eq, thread(), int(0), vec![store(1, block(), div(f(1.0), mul(var(s), f(127.0))))])],
    ]
    .concat();
    row_kernel(
        format!("softmax_scale_rows_{rows}x{d}"),
        vec![fbuf("x", rows * d), fbuf("scale", rows)],
        rows,
        3 * rows * d,
        body,
        v,
    )
}

/// Attention of query rows over a key/value cache (`cache_attention`): a block per (row or
/// hypothesis, head). Buffers as the CPU kernel's: q f32[rows, D], k and v f32[(B,) S, D],
/// position i32[1], and a scratch buffer it does not use (the scores live in shared memory,
/// `S` floats). Row `i` at position `p + i` sees cache rows `t ≤ p + i`: threads stride over
/// them for the scores and their maximum, then the exponentials and their sum (block
/// reductions), then over the head's columns for the probability-weighted sum of values.
fn cache_attention_rows(batch: usize, m: usize, s: usize, heads: usize, dh: usize) -> Kernel {
    let d = (heads * dh) as i64;
    let (s_, dh_, b) = (s as i64, dh as i64, ROW_BLOCK as i64);
    let rows = batch * m;
    let bufs = vec![
        fbuf("q", rows * heads * dh),
        fbuf("k", batch * s * heads * dh),
        fbuf("v", batch * s * heads * dh),
        Buffer { name: "position".into(), elem: Elem::I32, len: 1 },
        fbuf("out", rows * heads * dh),
        fbuf("unused", 1),
    ];
    let (ob, red, sc) = (4u32, 6u32, 7u32);
    let shared = vec![fbuf("partials", (ROW_BLOCK / WARP) as usize), fbuf("scores", s)];
    let mut v = Vars::new();
    let (r, h, i, qo, kvo, len, mx, t1, c1, dot, sum, t2, e, inv, j, acc, t3) = (
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
        v.next(),
        v.next(),
    );
    let row_of = |e: Expr| if batch > 1 { int(0) } else { e };
    let body = [
        vec![
            let_(r, div(block(), int(heads as i64))),
            let_(h, sub(block(), mul(var(r), int(heads as i64)))),
            let_(i, row_of(var(r))),
            let_(qo, add(mul(var(r), int(d)), mul(var(h), int(dh_)))),
            let_(kvo, add(mul(if batch > 1 { var(r) } else { int(0) }, int(s_ * d)), mul(var(h), int(dh_)))),
            // The rows this query sees, clamped to the cache (the runtime refuses positions
            // past it; the clamp keeps every index inside whatever it is given).
            let_(len, min(add(add(load_i(3, int(0)), var(i)), int(1)), int(s_))),
            let_(mx, f(f32::NEG_INFINITY)),
            for_(
                t1,
                thread(),
                var(len),
                b,
                vec![
                    let_(dot, f(0.0)),
                    for_(
                        c1,
                        int(0),
                        int(dh_),
                        1,
                        vec![set(
                            dot,
                            fma(
                                load(0, add(var(qo), var(c1))),
                                load(1, add(add(var(kvo), mul(var(t1), int(d))), var(c1))),
                                var(dot),
                            ),
                        )],
                    ),
                    store(sc, var(t1), var(dot)),
                    set(mx, max(var(mx), var(dot))),
                ],
            ),
        ],
        block_reduce(&mut v, mx, BinOp::Max, red, true),
        vec![
            let_(sum, f(0.0)),
            for_(
                t2,
                thread(),
                var(len),
                b,
                vec![
                    let_(e, un(UnOp::Exp, sub(load(sc, var(t2)), var(mx)))),
                    store(sc, var(t2), var(e)),
                    set(sum, add(var(sum), var(e))),
                ],
            ),
        ],
        block_reduce(&mut v, sum, BinOp::Add, red, false),
        vec![
            let_(inv, div(f(1.0), var(sum))),
            for_(
                j,
                thread(),
                int(dh_),
                b,
                vec![
                    let_(acc, f(0.0)),
                    for_(
                        t3,
                        int(0),
                        var(len),
                        1,
                        vec![set(
                            acc,
                            add(
                                var(acc),
                                mul(
                                    mul(load(sc, var(t3)), var(inv)),
                                    load(2, add(add(var(kvo), mul(var(t3), int(d))), var(j))),
                                ),
                            ),
                        )],
                    ),
                    store(ob, add(var(qo), var(j)), var(acc)),
                ],
            ),
        ],
    ]
    .concat();
    let grid = rows * heads;
    let mut k = gpu_kernel(
        format!("cache_attention_rows_{batch}x{m}x{s}x{heads}x{dh}"),
        bufs,
        shared,
        grid,
        4 * rows * s * heads * dh,
    );
    k.body = body;
    k.vars = v.0;
    k.launch = Some(GpuLaunch { grid: grid.max(1) as u32, block: ROW_BLOCK });
    k
}

/// Bytes of the reduction one step of the int8 product stages in shared memory.
const QK: usize = 64;

/// The int8 product of `qlinear` (batch 1, bias) and `qmatmul` (batched):
/// `y[b, i, j] = float(Σ_q xq[b,i,q]·wq[b,j,q] − 128·wsum[b·N+j]) · (xs[b·M+i]·ws[b·N+j])`
/// (`+ bias[j]`, GELU, `+ residual`), the sum exact in integers. Buffers as the CPU kernel's:
/// xq u8, xs f32 (rows, or one static scale), wq i8, ws f32, wsum i32, [bias], [residual],
/// out. A block of `TILE²` threads computes a `TILE × TILE` tile, one output per thread;
/// each step stages `QK` bytes of the reduction of `TILE` rows of each operand in shared
/// memory (four bytes per thread and operand), then every thread takes four `dot4`s of 16
/// bytes (`dp4a` on the GPU). Bytes past the matrix are staged as zeros, which add nothing.
struct QGemm {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    row_scales: bool,
    bias: bool,
    gelu: bool,
    residual: bool,
}

fn qgemm_kernel(g: &QGemm) -> Kernel {
    use crate::kir::Ty;
    let t = TILE as i64;
    let qk = QK as i64;
    let (m, n, k) = (g.m as i64, g.n as i64, g.k as i64);
    let (tm, tn) = (g.m.div_ceil(TILE), g.n.div_ceil(TILE));
    let tiles = tm * tn;
    let (bm, bn) = (g.batch * g.m, g.batch * g.n);
    let mut bufs = vec![
        Buffer { name: "xq".into(), elem: Elem::U8, len: bm * g.k },
        fbuf("xs", if g.row_scales { bm } else { 1 }),
        Buffer { name: "wq".into(), elem: Elem::I8, len: bn * g.k },
        fbuf("ws", bn),
        Buffer { name: "wsum".into(), elem: Elem::I32, len: bn },
    ];
    if g.bias {
        bufs.push(fbuf("bias", g.n));
    }
    let rb = bufs.len() as u32;
    if g.residual {
        bufs.push(fbuf("residual", bm * g.n));
    }
    let ob = bufs.len() as u32;
    bufs.push(fbuf("out", bm * g.n));
    let (sa, sb) = (ob + 1, ob + 2);
    let shared = vec![
        Buffer { name: "x_tile".into(), elem: Elem::U8, len: TILE * QK },
        Buffer { name: "w_tile".into(), elem: Elem::I8, len: TILE * QK },
    ];
    let mut v = Vars::new();
    let (bi, rem, ti, tj, ty, tx, row, col, acc, k0, q, xb, wb) = (
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
    let (sr, sq, grow, gcol, sum, c, scale, res) =
        (v.next(), v.next(), v.next(), v.next(), v.next(), v.next(), v.next(), v.next());
    // Staging: thread (sr, sq) copies bytes `4·sq .. 4·sq + 4` of the step's slice of row
    // `sr` of each operand's tile.
    let mut stage =
        vec![let_(grow, add(mul(var(ti), int(t)), var(sr))), let_(gcol, add(mul(var(tj), int(t)), var(sr)))];
    for b in 0..4i64 {
        let kb = add(add(var(k0), mul(var(sq), int(4))), int(b));
        let slot = add(add(mul(var(sr), int(qk)), mul(var(sq), int(4))), int(b));
        let inside = |r: Var, hi: i64, base: Var, buf: u32| {
            let at = add(var(base), add(mul(min(var(r), int(hi - 1)), int(k)), min(kb.clone(), int(k - 1))));
            select(
                CmpOp::Lt,
                var(r),
                int(hi),
                select(CmpOp::Lt, kb.clone(), int(k), load_as(Ty::I64, buf, at), int(0)),
                int(0),
            )
        };
        stage.push(store(sa, slot.clone(), inside(grow, m, xb, 0)));
        stage.push(store(sb, slot, inside(gcol, n, wb, 2)));
    }
    let xrow = add(mul(var(bi), int(m)), var(row));
    let wcol = add(mul(var(bi), int(n)), var(col));
    let sx = if g.row_scales { load(1, xrow.clone()) } else { load(1, int(0)) };
    let mut y = mul(cvt(Ty::F32, var(c)), var(scale));
    if g.bias {
        y = add(y, load(5, var(col)));
    }
    if g.gelu {
        y = gelu(y);
    }
    let out_at = add(mul(xrow, int(n)), var(col));
    if g.residual {
        y = add(y, load(rb, out_at.clone()));
    }
    let epilogue = vec![
        let_(sum, add(add(lane(var(acc), 0), lane(var(acc), 1)), add(lane(var(acc), 2), lane(var(acc), 3)))),
        let_(c, sub(var(sum), mul(int(128), load_as(Ty::I64, 4, wcol.clone())))),
        let_(scale, mul(sx, load(3, wcol))),
        let_(res, y),
        store(ob, out_at, var(res)),
    ];
    let body = vec![
        let_(bi, div(block(), int(tiles as i64))),
        let_(rem, sub(block(), mul(var(bi), int(tiles as i64)))),
        let_(ti, div(var(rem), int(tn as i64))),
        let_(tj, sub(var(rem), mul(var(ti), int(tn as i64)))),
        let_(ty, div(thread(), int(t))),
        let_(tx, sub(thread(), mul(var(ty), int(t)))),
        let_(sr, div(thread(), int(qk / 4))),
        let_(sq, sub(thread(), mul(var(sr), int(qk / 4)))),
        let_(row, add(mul(var(ti), int(t)), var(ty))),
        let_(col, add(mul(var(tj), int(t)), var(tx))),
        let_(xb, mul(var(bi), int(m * k))),
        let_(wb, mul(var(bi), int(n * k))),
        let_(acc, splat(int(0))),
        for_(
            k0,
            int(0),
            int(k),
            qk,
            [
                stage,
                vec![
                    Stmt::Barrier,
                    for_(
                        q,
                        int(0),
                        int(qk),
                        16,
                        vec![set(
                            acc,
                            dot4(
                                var(acc),
                                load_as(Ty::I8x16, sb, add(mul(var(tx), int(qk)), var(q))),
                                load_as(Ty::U8x16, sa, add(mul(var(ty), int(qk)), var(q))),
                            ),
                        )],
                    ),
                    Stmt::Barrier,
                ],
            ]
            .concat(),
        ),
        if_(CmpOp::Lt, var(row), int(m), vec![if_(CmpOp::Lt, var(col), int(n), epilogue)]),
    ];
    let name = format!(
        "qgemm_{}x{}x{}x{}{}{}{}{}",
        g.batch,
        g.m,
        g.n,
        g.k,
        if g.row_scales { "" } else { "_static" },
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
        block_row_max(&mut v, (base, mx, j1), d, &x, red, true),
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
