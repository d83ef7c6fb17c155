//! Lowering of one IR op to kernels of the kernel IR.
//!
//! An op becomes one or more kernel launches over *slots*: the op's operands, its result,
//! and scratch buffers it needs in between (a convolution is im2col → matrix product →
//! transpose). `Reshape` needs no kernel (its result aliases its operand); a `ScatterRow`
//! whose cache may be updated in place writes just the one row.
//!
//! Loop structure, chosen for clarity first and speed second (the speed issue revisits it):
//! matrix products keep four output columns in four `f32x4` accumulators and walk the
//! reduction four elements at a time; the parallel loop runs over (column block, row) with
//! the row fastest, so a block of weight rows stays in L1 while the rows of `x` stream by.

use wcc_ir::{DType, Op, TensorType};
use wcc_targets::Target;

use crate::kir::build::*;
use crate::kir::{BinOp, Buffer, CmpOp, Elem, Expr, Kernel, Stmt, Ty, UnOp, Var, END, START};
use crate::BackendError;

/// Where a kernel buffer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Input(usize),
    Output,
    Scratch(usize),
}

/// The kernels of one op, in launch order, each with its buffers' slots.
#[derive(Debug, Default)]
pub struct OpKernels {
    pub launches: Vec<(Kernel, Vec<Slot>)>,
    /// Sizes in bytes of the scratch buffers.
    pub scratch: Vec<usize>,
}

/// Whether the op's result is stored in its first operand's buffer: `Reshape` always,
/// `ScatterRow` when the caller allows it (`in_place`).
pub fn aliases_first_operand(op: &Op, in_place: bool) -> bool {
    matches!(op, Op::Reshape { .. }) || (matches!(op, Op::ScatterRow) && in_place)
}

/// Allocates kernel variables (0 and 1 are the parallel range); `.0` is how many are used.
pub(crate) struct Vars(pub(crate) Var);

impl Vars {
    pub(crate) fn new() -> Self {
        Vars(2)
    }
    pub(crate) fn next(&mut self) -> Var {
        self.0 += 1;
        self.0 - 1
    }
}

fn buf(name: &str, len: usize) -> Buffer {
    Buffer { name: name.into(), elem: Elem::F32, len }
}

fn ibuf(name: &str, len: usize) -> Buffer {
    Buffer { name: name.into(), elem: Elem::I32, len }
}

fn tbuf(name: &str, elem: Elem, len: usize) -> Buffer {
    Buffer { name: name.into(), elem, len }
}

/// How the int8 matrix product is blocked, chosen from the target: rows of the register
/// block (`mr`; 3 rows × 4 columns of `i32x4` accumulators plus the three rows of
/// activations fill the 16 vector registers of x86-64 and leave aarch64's 32 half free),
/// columns per parallel task, and rows per parallel task.
struct QSchedule {
    mr: usize,
    cols_per_task: usize,
    rows_per_task: usize,
}

impl QSchedule {
    fn for_target(target: &Target, m: usize) -> QSchedule {
        let _ = target; // Both architectures have at least 16 128-bit registers.
        let mr = if m >= 3 { 3 } else { 1 };
        QSchedule { mr, cols_per_task: 16, rows_per_task: mr * 8 }
    }
}

/// The parallel task decomposition the matrix-product kernels share: task `p` is (batch `bi`,
/// a tile of `cols` columns, a tile of `rows` rows), row tiles fastest, so consecutive tasks
/// reuse one tile of weight rows. Its variables, and the statements that set them: columns
/// `j0..jend` (`j0..j4end` in fours), rows `i_lo..i_hi` (`i_lo..i_full` in blocks of `mr`).
struct Tile {
    p: Var,
    bi: Var,
    j0: Var,
    jend: Var,
    j4end: Var,
    i_lo: Var,
    i_hi: Var,
    i_full: Var,
}

impl Tile {
    fn new(vars: &mut Vars) -> Tile {
        Tile {
            p: vars.next(),
            bi: vars.next(),
            j0: vars.next(),
            jend: vars.next(),
            j4end: vars.next(),
            i_lo: vars.next(),
            i_hi: vars.next(),
            i_full: vars.next(),
        }
    }

    /// `m × n` per batch item, tiles of `cols × rows`, register blocks of `mr` rows.
    fn prologue(&self, vars: &mut Vars, m: usize, n: usize, cols: usize, rows: usize, mr: usize) -> Vec<Stmt> {
        let (rem, ct, rt) = (vars.next(), vars.next(), vars.next());
        let n_rt = m.div_ceil(rows) as i64;
        let per_batch = n.div_ceil(cols) as i64 * n_rt;
        let (cols, rows, mr) = (cols as i64, rows as i64, mr as i64);
        vec![
            let_(self.bi, div(var(self.p), int(per_batch))),
            let_(rem, sub(var(self.p), mul(var(self.bi), int(per_batch)))),
            let_(ct, div(var(rem), int(n_rt))),
            let_(rt, sub(var(rem), mul(var(ct), int(n_rt)))),
            let_(self.j0, mul(var(ct), int(cols))),
            let_(self.jend, min(add(var(self.j0), int(cols)), int(n as i64))),
            let_(self.j4end, add(var(self.j0), mul(div(sub(var(self.jend), var(self.j0)), int(4)), int(4)))),
            let_(self.i_lo, mul(var(rt), int(rows))),
            let_(self.i_hi, min(add(var(self.i_lo), int(rows)), int(m as i64))),
            let_(self.i_full, add(var(self.i_lo), mul(div(sub(var(self.i_hi), var(self.i_lo)), int(mr)), int(mr)))),
        ]
    }

    /// GELU (then the residual) over the tile's outputs, once its products are stored:
    /// `out[at] = gelu(out[at]) (+ residual[at])`, `at = row0 + i·n + j`. Run as a pass of
    /// its own after the tile, not in the register block's epilogue: there the constants and
    /// temporaries of `erf` compete with the accumulators for the vector registers, and
    /// Cranelift's allocator then spilled accumulators inside the reduction loop (GELU
    /// doubled the time of the product it followed). The tile is still in L1 here.
    fn gelu_pass(&self, vars: &mut Vars, row0: Expr, n: usize, out: u32, residual: Option<u32>) -> Vec<Stmt> {
        let (i, at) = (vars.next(), vars.next());
        let rowv = vars.next();
        let body = vec_loop(vars, var(self.j0), var(self.jend), &|j, vector, vars: &mut Vars| {
            let t = vars.next();
            let ld = if vector { load4 } else { load };
            let mut v = gelu(var(t), vector);
            if let Some(rb) = residual {
                v = add(v, ld(rb, var(at)));
            }
            vec![let_(at, add(var(rowv), j)), let_(t, ld(out, var(at))), store(out, var(at), v)]
        });
        vec![for_(
            i,
            var(self.i_lo),
            var(self.i_hi),
            1,
            [vec![let_(rowv, add(row0.clone(), mul(var(i), int(n as i64))))], body].concat(),
        )]
    }
}

/// The shape and epilogue of an int8 product `out[b, i, j] = float(Σ_k xq[b,i,k]·wq[b,j,k] −
/// 128·wsum[b,j]) · (xs[b,i]·ws[b,j]) (+ bias[j]) (GELU) (+ residual[b,i,j])`.
struct QDot {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    /// One activation scale per row (else one for all: a static scale).
    row_scales: bool,
    bias: bool,
    epilogue: Epilogue,
}

/// `qlinear` (batch 1, with bias) and `qmatmul` (batched, no bias). Buffers: xq u8, xs f32,
/// wq i8, ws f32, wsum i32, [bias f32], [residual], out. The reduction runs 16 bytes at a
/// time through `dot4` (one `vpdpbusd` on VNNI targets) into an `mr`×4 block of `i32x4`
/// accumulators, and the last `k % 16` elements as scalars; two levels of pairwise adds turn
/// four column accumulators into the four column totals, and the dequantization, bias, GELU
/// and residual run on those four adjacent results at once.
fn qdot_kernel(name: String, q: QDot, target: &Target) -> Kernel {
    let QDot { batch, m, n, k, row_scales, bias, epilogue } = q;
    let sch = QSchedule::for_target(target, m);
    let (xq, xs, wq, ws, wsum, bb) = (0u32, 1u32, 2u32, 3u32, 4u32, 5u32);
    let rb = 5 + bias as u32;
    let ob = rb + epilogue.residual as u32;
    let n_rt = m.div_ceil(sch.rows_per_task);
    let n_ct = n.div_ceil(sch.cols_per_task);
    let mut vars = Vars::new();
    let tile = Tile::new(&mut vars);
    let Tile { p, bi, j0, jend, j4end, i_lo, i_hi, i_full } = tile;
    let (xb, wb) = (vars.next(), vars.next());
    let (k_, n_) = (k as i64, n as i64);
    let k16 = (k / 16 * 16) as i64;
    // Rows of x and of w, counted over the whole batch.
    let xrow = |i: Expr| add(var(xb), i);
    let wrow = |j: Expr| add(var(wb), j);
    let row_scale = |i: Expr| if row_scales { load(xs, xrow(i)) } else { load(xs, int(0)) };
    // `rows` rows from `i`, `cols` (4 or 1) columns from `j`.
    let block = |vars: &mut Vars, i: Expr, j: Expr, rows: usize, cols: usize| -> Vec<Stmt> {
        let accs: Vec<Vec<Var>> = (0..rows).map(|_| (0..cols).map(|_| vars.next()).collect()).collect();
        let tails: Vec<Vec<Var>> = (0..rows).map(|_| (0..cols).map(|_| vars.next()).collect()).collect();
        let xv: Vec<Var> = (0..rows).map(|_| vars.next()).collect();
        let (kk, wv, kt) = (vars.next(), vars.next(), vars.next());
        // Addressing: the first row's offset once per block; each load's index is that
        // offset + k + the row's constant distance (`r·K`), which the emitter turns into a
        // loop-invariant pointer plus k plus a displacement (one x86 address operand).
        // The two scalar loads of the offsets (`ax`, `aw`, unused) make Cranelift compute
        // the offsets before the loop: left to be computed at their first use, inside it,
        // they stayed there (with the constant factors rematerialised in the loop, the
        // products were not seen as loop-invariant).
        let (xo, wo) = (vars.next(), vars.next());
        let xat = |r: usize, k: Var| add(add(var(xo), var(k)), int(r as i64 * k_));
        let wat = |c: usize, k: Var| add(add(var(wo), var(k)), int(c as i64 * k_));
        let mut s: Vec<Stmt> = accs.iter().flatten().map(|&a| let_(a, splat(int(0)))).collect();
        s.push(let_(xo, mul(xrow(i.clone()), int(k_))));
        s.push(let_(wo, mul(wrow(j.clone()), int(k_))));
        let (ax, aw) = (vars.next(), vars.next());
        s.push(let_(ax, load_i(xq, var(xo))));
        s.push(let_(aw, load_i(wq, var(wo))));
        let mut inner: Vec<Stmt> = vec![];
        inner.extend(xv.iter().enumerate().map(|(r, &x)| let_(x, load_as(Ty::U8x16, xq, xat(r, kk)))));
        for c in 0..cols {
            inner.push(let_(wv, load_as(Ty::I8x16, wq, wat(c, kk))));
            for r in 0..rows {
                inner.push(set(accs[r][c], dot4(var(accs[r][c]), var(wv), var(xv[r]))));
            }
        }
        s.push(for_(kk, int(0), int(k16), 16, inner));
        if k16 < k_ {
            // The reduction's last k % 16 elements, one at a time.
            s.extend(tails.iter().flatten().map(|&t| let_(t, int(0))));
            let mut tail = vec![];
            for r in 0..rows {
                for c in 0..cols {
                    let prod = mul(load_i(xq, xat(r, kt)), load_i(wq, wat(c, kt)));
                    tail.push(set(tails[r][c], add(var(tails[r][c]), prod)));
                }
            }
            s.push(for_(kt, int(k16), int(k_), 1, tail));
        }
        for r in 0..rows {
            let ii = add(i.clone(), int(r as i64));
            let at = add(mul(xrow(ii.clone()), int(n_)), j.clone());
            let vector = cols == 4;
            let mut v = if vector {
                let a = &accs[r];
                let mut total = pair_add(pair_add(var(a[0]), var(a[1])), pair_add(var(a[2]), var(a[3])));
                if k16 < k_ {
                    total = add(total, pack(tails[r].iter().map(|&t| var(t)).collect()));
                }
                let c = sub(total, mul(load_as(Ty::I32x4, wsum, wrow(j.clone())), splat(int(128))));
                let sc = mul(splat(row_scale(ii.clone())), load4(ws, wrow(j.clone())));
                mul(cvt(Ty::F32x4, c), sc)
            } else {
                let a = var(accs[r][0]);
                let half = pair_add(a.clone(), a);
                let mut total = lane(pair_add(half.clone(), half), 0);
                if k16 < k_ {
                    total = add(total, var(tails[r][0]));
                }
                let c = sub(total, mul(load_i(wsum, wrow(j.clone())), int(128)));
                let sc = mul(row_scale(ii.clone()), load(ws, wrow(j.clone())));
                mul(cvt(Ty::F32, c), sc)
            };
            if bias {
                v = add(v, if vector { load4(bb, j.clone()) } else { load(bb, j.clone()) });
            }
            // With GELU, it and the residual come in `Tile::gelu_pass`.
            if epilogue.residual && !epilogue.gelu {
                v = add(v, if vector { load4(rb, at.clone()) } else { load(rb, at.clone()) });
            }
            s.push(store(ob, at, v));
        }
        s
    };
    let (j, jt, i, it, it2) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let mr = sch.mr;
    let group = [
        vec![for_(i, var(i_lo), var(i_full), mr as i64, block(&mut vars, var(i), var(j), mr, 4))],
        vec![for_(it, var(i_full), var(i_hi), 1, block(&mut vars, var(it), var(j), 1, 4))],
    ]
    .concat();
    let single = vec![for_(it2, var(i_lo), var(i_hi), 1, block(&mut vars, var(it2), var(jt), 1, 1))];
    let prologue = tile.prologue(&mut vars, m, n, sch.cols_per_task, sch.rows_per_task, mr);
    let body = vec![for_(
        p,
        var(START),
        var(END),
        1,
        [
            prologue,
            vec![
                let_(xb, mul(var(bi), int(m as i64))),
                let_(wb, mul(var(bi), int(n_))),
                for_(j, var(j0), var(j4end), 4, group),
                for_(jt, var(j4end), var(jend), 1, single),
            ],
            if epilogue.gelu {
                let residual = epilogue.residual.then_some(rb);
                tile.gelu_pass(&mut vars, mul(var(xb), int(n_)), n, ob, residual)
            } else {
                vec![]
            },
        ]
        .concat(),
    )];
    let (bm, bn) = (batch * m, batch * n);
    let mut buffers = vec![
        tbuf("xq", Elem::U8, bm * k),
        buf("xs", if row_scales { bm } else { 1 }),
        tbuf("wq", Elem::I8, bn * k),
        buf("ws", bn),
        ibuf("wsum", bn),
    ];
    if bias {
        buffers.push(buf("bias", n));
    }
    if epilogue.residual {
        buffers.push(buf("residual", bm * n));
    }
    buffers.push(buf("out", bm * n));
    kernel(name, buffers, batch * n_ct * n_rt, 2 * batch * m * n * k, body, vars)
}

/// The shape of a `qattention` (see the op): `batch` heads, `m` query rows, `n` keys, `k`
/// the head size of the scores' reduction, `e` output columns (rows of V transposed).
struct QAttn {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    e: usize,
    row_scales: bool,
}

/// Query rows per register block of `qattention` (the `qdot` block: 3 rows × 4 columns).
const QATTN_MR: usize = 3;

/// Groups of four keys per register block of `qattention`'s scores: 3 rows × 3 groups of
/// accumulators, three rows of the query and one of keys leave x86-64 a few of its sixteen
/// vector registers (with four groups, two accumulators spilled every step).
const QATTN_KG: usize = 3;

/// `qattention` over fewer query rows than this (a decoder step's cross-attention) runs as
/// its products and softmax apart (see `lower_op`).
const QATTN_MIN_ROWS: usize = 16;

/// `qattention`: one task per (head, block of three query rows), everything between the
/// operands and the output in the call's local buffers (`scores f32[3·N]`, `p u8[3·N]`,
/// 22 KB at N = 1500, in L1), never in memory:
///
/// 1. the rows' scores against every key, `qdot`'s register block (3 rows × 4 keys of `i32x4`
///    accumulators, `dot4` over the head's bytes, pairwise adds to four totals), dequantized
///    exactly as `qmatmul` does, stored with their running maximum;
/// 2. per row, `exp(s − max)` (`exp_low`, as the `softmax_*` kernels), summed in four lanes,
///    rounded to `127·e` + 128 and narrowed to bytes, sixteen at a time, then the tail;
///    the row's probability scale `1 / (127 · sum)`;
/// 3. the bytes times V transposed (`qdot`'s block again, the reduction over the keys), the
///    zero-point correction and both scales, into the output rows.
///
/// A head's K and V (`N·K` bytes each, 96 KB for base) stay in L2 across its tasks, which
/// are consecutive. Ragged shapes: keys past the last four and columns past the last four one
/// at a time, reductions past the last sixteen as scalars, the last (up to two) query rows
/// as single-row blocks.
fn qattention_kernel(name: String, a: QAttn) -> Kernel {
    let QAttn { batch, m, n, k, e, row_scales } = a;
    let (qq, qs, kq, ks, ksum, vq, vs, vsum, qb, kp, out, sc, pb, psc) =
        (0u32, 1u32, 2u32, 3u32, 4u32, 5u32, 6u32, 7u32, 8u32, 9u32, 10u32, 11u32, 12u32, 13u32);
    // The packed operands (see `qattention_pack_*`): four-byte groups of the head size.
    let (k4, groups) = (k.div_ceil(4) as i64, n.div_ceil(4) as i64);
    let mr = QATTN_MR;
    let n_rb = m.div_ceil(mr);
    let (m_, n_, k_, e_) = (m as i64, n as i64, k as i64, e as i64);
    let n_g = (n / (4 * QATTN_KG) * (4 * QATTN_KG)) as i64;
    let (n16, n4, e4) = ((n / 16 * 16) as i64, (n / 4 * 4) as i64, (e / 4 * 4) as i64);
    let mut vars = Vars::new();
    let (p, bi, i0, ihi, ifull) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let (kb, vb) = (vars.next(), vars.next());

    // An `rows` × `cols` int8 block: `Σ x[r]·w[c]` over `len` bytes, x rows at `xo + r·xs`
    // (u8) in buffer `xbuf`, w rows at `wo + c·len` (i8) in `wbuf`; returns the statements and
    // the totals of each row (an `i32x4` of the four columns, or an `i64` for one).
    let block = |vars: &mut Vars,
                 xbuf: u32,
                 xo: Expr,
                 xs: i64,
                 wbuf: u32,
                 wo: Expr,
                 len: i64,
                 rows: usize,
                 cols: usize|
     -> (Vec<Stmt>, Vec<Expr>) {
        let l16 = len / 16 * 16;
        let accs: Vec<Vec<Var>> = (0..rows).map(|_| (0..cols).map(|_| vars.next()).collect()).collect();
        let tails: Vec<Vec<Var>> = (0..rows).map(|_| (0..cols).map(|_| vars.next()).collect()).collect();
        let xv: Vec<Var> = (0..rows).map(|_| vars.next()).collect();
        let (kk, wv, kt, xo_, wo_) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
        let xat = |r: usize, k: Var| add(add(var(xo_), var(k)), int(r as i64 * xs));
        let wat = |c: usize, k: Var| add(add(var(wo_), var(k)), int(c as i64 * len));
        let mut s: Vec<Stmt> = accs.iter().flatten().map(|&a| let_(a, splat(int(0)))).collect();
        s.push(let_(xo_, xo));
        s.push(let_(wo_, wo));
        // Unused loads that make Cranelift compute the offsets before the loop (see
        // `qdot_kernel`).
        let (ax, aw) = (vars.next(), vars.next());
        s.push(let_(ax, load_i(xbuf, var(xo_))));
        s.push(let_(aw, load_i(wbuf, var(wo_))));
        let mut inner: Vec<Stmt> =
            xv.iter().enumerate().map(|(r, &x)| let_(x, load_as(Ty::U8x16, xbuf, xat(r, kk)))).collect();
        for c in 0..cols {
            inner.push(let_(wv, load_as(Ty::I8x16, wbuf, wat(c, kk))));
            for r in 0..rows {
                inner.push(set(accs[r][c], dot4(var(accs[r][c]), var(wv), var(xv[r]))));
            }
        }
        s.push(for_(kk, int(0), int(l16), 16, inner));
        if l16 < len {
            s.extend(tails.iter().flatten().map(|&t| let_(t, int(0))));
            let mut tail = vec![];
            for r in 0..rows {
                for c in 0..cols {
                    let prod = mul(load_i(xbuf, xat(r, kt)), load_i(wbuf, wat(c, kt)));
                    tail.push(set(tails[r][c], add(var(tails[r][c]), prod)));
                }
            }
            s.push(for_(kt, int(l16), int(len), 1, tail));
        }
        let totals = (0..rows)
            .map(|r| {
                let a = &accs[r];
                if cols == 4 {
                    let t = pair_add(pair_add(var(a[0]), var(a[1])), pair_add(var(a[2]), var(a[3])));
                    if l16 < len {
                        add(t, pack(tails[r].iter().map(|&t| var(t)).collect()))
                    } else {
                        t
                    }
                } else {
                    let half = pair_add(var(a[0]), var(a[0]));
                    let t = lane(pair_add(half.clone(), half), 0);
                    if l16 < len {
                        add(t, var(tails[r][0]))
                    } else {
                        t
                    }
                }
            })
            .collect();
        (s, totals)
    };

    // The attention of `rows` query rows from row `i` of head `bi`. Nothing but the block's
    // accumulators, operands and addresses is live across an inner loop (the row maxima and
    // probability scales go through memory): 12 accumulators, three rows and one operand
    // fill x86-64's sixteen vector registers, and one more value spills every iteration.
    let rows_block = |vars: &mut Vars, i: Expr, rows: usize| -> Vec<Stmt> {
        let qrow = |r: usize| add(add(mul(var(bi), int(m_)), i.clone()), int(r as i64));
        let qscale = |r: usize| if row_scales { load(qs, qrow(r)) } else { load(qs, int(0)) };
        let (t, t4, tt, qo) = (vars.next(), vars.next(), vars.next(), vars.next());
        let mut s = vec![let_(qo, mul(qrow(0), int(k_)))];
        // 1. Scores, twelve keys at a time (`QATTN_KG` groups) in outer-product form: lane `l` of accumulator
        // (r, g) is key `t + 4g + l` of row r, the packed keys' four bytes times the row's
        // same four bytes repeated in every lane, so no horizontal sums. Then groups of
        // four keys, then the last `n % 4` keys one at a time from the unpacked rows.
        let keys = |vars: &mut Vars, t: Var, ng: usize| -> Vec<Stmt> {
            let accs: Vec<Vec<Var>> = (0..rows).map(|_| (0..ng).map(|_| vars.next()).collect()).collect();
            let xv: Vec<Var> = (0..rows).map(|_| vars.next()).collect();
            let (jj, wv, ko, xo, ax, aw) =
                (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
            let mut st: Vec<Stmt> = accs.iter().flatten().map(|&a| let_(a, splat(int(0)))).collect();
            st.push(let_(ko, mul(add(mul(var(bi), int(groups)), div(var(t), int(4))), int(k4 * 16))));
            st.push(let_(xo, mul(qrow(0), int(k4 * 16))));
            // Unused loads that make Cranelift compute the offsets before the loop (see
            // `qdot_kernel`).
            st.push(let_(ax, load_i(kp, var(ko))));
            st.push(let_(aw, load_i(qb, var(xo))));
            let mut inner: Vec<Stmt> = (0..rows)
                .map(|r| let_(xv[r], load_as(Ty::U8x16, qb, add(add(var(xo), var(jj)), int(r as i64 * k4 * 16)))))
                .collect();
            for g in 0..ng {
                inner.push(let_(wv, load_as(Ty::I8x16, kp, add(add(var(ko), var(jj)), int(g as i64 * k4 * 16)))));
                for r in 0..rows {
                    inner.push(set(accs[r][g], dot4(var(accs[r][g]), var(wv), var(xv[r]))));
                }
            }
            st.push(for_(jj, int(0), int(k4 * 16), 16, inner));
            for r in 0..rows {
                for g in 0..ng {
                    let at = add(add(var(kb), var(t)), int(4 * g as i64));
                    let c = sub(var(accs[r][g]), mul(load_as(Ty::I32x4, ksum, at.clone()), splat(int(128))));
                    let v = mul(cvt(Ty::F32x4, c), mul(splat(qscale(r)), load4(ks, at)));
                    st.push(store(sc, add(add(var(t), int(4 * g as i64)), int(r as i64 * n_)), v));
                }
            }
            st
        };
        s.push(for_(t, int(0), int(n_g), 4 * QATTN_KG as i64, keys(vars, t, QATTN_KG)));
        s.push(for_(t4, int(n_g), int(n4), 4, keys(vars, t4, 1)));
        let (mut one, totals) = block(vars, qq, var(qo), k_, kq, mul(add(var(kb), var(tt)), int(k_)), k_, rows, 1);
        for (r, tot) in totals.into_iter().enumerate() {
            let c = sub(tot, mul(load_i(ksum, add(var(kb), var(tt))), int(128)));
            let v = mul(cvt(Ty::F32, c), mul(qscale(r), load(ks, add(var(kb), var(tt)))));
            one.push(store(sc, add(var(tt), int(r as i64 * n_)), v));
        }
        s.push(for_(tt, int(n4), int(n_), 1, one));
        // 2. Per row: the maximum, the quantized exponentials and the probability scale.
        for r in 0..rows {
            let (mxr, sum4, sum, j, jt) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
            let row = int(r as i64 * n_);
            let es: Vec<Var> = (0..4).map(|_| vars.next()).collect();
            // `softmax_quantize`'s rounding and zero point. The vector form needs no clamp: the
            // exponentials lie in [0, 1] (never NaN: a NaN score converts to 0 anyway), so
            // the rounded value is in [0, 127], and the narrowing saturates regardless.
            let q = |e: Expr, v: bool| {
                let x = mul(e, if v { splat(f(127.0)) } else { f(127.0) });
                if v {
                    add(cvt(Ty::I32x4, x), splat(int(128)))
                } else {
                    add(max(min(cvt(Ty::I64, x), int(127)), int(-127)), int(128))
                }
            };
            let mut sixteen = vec![];
            for (l, &ev) in es.iter().enumerate() {
                let x = load4(sc, add(add(row.clone(), var(j)), int(4 * l as i64)));
                sixteen.push(let_(ev, un(UnOp::ExpLow, sub(x, splat(var(mxr))))));
                sixteen.push(set(sum4, add(var(sum4), var(ev))));
            }
            sixteen.push(store(
                pb,
                add(row.clone(), var(j)),
                narrow(Ty::U8x16, es.iter().map(|&ev| q(var(ev), true)).collect()),
            ));
            let (e1, j4, e4, q4) = (vars.next(), vars.next(), vars.next(), vars.next());
            let (row4, row1) = (row.clone(), row.clone());
            s.extend(row_max_of(vars, n, mxr, &|j| load4(sc, add(row4.clone(), j)), &|j| {
                load(sc, add(row1.clone(), j))
            }));
            // The sum in `softmax_scale`'s order (four lanes over every whole four, then the
            // scalar tail), so the scale, and with it every output, is the unfused chain's
            // to the bit: the bytes past the last sixteen four at a time, stored lane by lane.
            let mut fours = vec![
                let_(e4, un(UnOp::ExpLow, sub(load4(sc, add(row.clone(), var(j4))), splat(var(mxr))))),
                set(sum4, add(var(sum4), var(e4))),
                let_(q4, q(var(e4), true)),
            ];
            for l in 0..4u8 {
                fours.push(store(pb, add(add(row.clone(), var(j4)), int(l as i64)), lane(var(q4), l)));
            }
            s.extend([
                let_(sum4, splat(f(0.0))),
                for_(j, int(0), int(n16), 16, sixteen),
                for_(j4, int(n16), int(n4), 4, fours),
                let_(sum, hsum(var(sum4))),
                for_(
                    jt,
                    int(n4),
                    int(n_),
                    1,
                    vec![
                        let_(e1, un(UnOp::ExpLow, sub(load(sc, add(row.clone(), var(jt))), var(mxr)))),
                        set(sum, add(var(sum), var(e1))),
                        store(pb, add(row, var(jt)), q(var(e1), false)),
                    ],
                ),
                store(psc, int(r as i64), div(f(1.0), mul(var(sum), f(127.0)))),
            ]);
        }
        // 3. The probabilities times V transposed, four columns at a time, then one.
        let (j, jt) = (vars.next(), vars.next());
        let orow = |r: usize| mul(qrow(r), int(e_));
        let (mut four, totals) = block(vars, pb, int(0), n_, vq, mul(add(var(vb), var(j)), int(n_)), n_, rows, 4);
        for (r, tot) in totals.into_iter().enumerate() {
            let c = sub(tot, mul(load_as(Ty::I32x4, vsum, add(var(vb), var(j))), splat(int(128))));
            let v = mul(cvt(Ty::F32x4, c), mul(splat(load(psc, int(r as i64))), load4(vs, add(var(vb), var(j)))));
            four.push(store(out, add(orow(r), var(j)), v));
        }
        s.push(for_(j, int(0), int(e4), 4, four));
        let (mut one, totals) = block(vars, pb, int(0), n_, vq, mul(add(var(vb), var(jt)), int(n_)), n_, rows, 1);
        for (r, tot) in totals.into_iter().enumerate() {
            let c = sub(tot, mul(load_i(vsum, add(var(vb), var(jt))), int(128)));
            let v = mul(cvt(Ty::F32, c), mul(load(psc, int(r as i64)), load(vs, add(var(vb), var(jt)))));
            one.push(store(out, add(orow(r), var(jt)), v));
        }
        s.push(for_(jt, int(e4), int(e_), 1, one));
        s
    };
    let (i, it) = (vars.next(), vars.next());
    let full = rows_block(&mut vars, var(i), mr);
    let single = rows_block(&mut vars, var(it), 1);
    let rb = vars.next();
    let body = vec![for_(
        p,
        var(START),
        var(END),
        1,
        vec![
            let_(bi, div(var(p), int(n_rb as i64))),
            let_(rb, sub(var(p), mul(var(bi), int(n_rb as i64)))),
            let_(i0, mul(var(rb), int(mr as i64))),
            let_(ihi, min(add(var(i0), int(mr as i64)), int(m_))),
            let_(ifull, add(var(i0), mul(div(sub(var(ihi), var(i0)), int(mr as i64)), int(mr as i64)))),
            let_(kb, mul(var(bi), int(n_))),
            let_(vb, mul(var(bi), int(e_))),
            for_(i, var(i0), var(ifull), mr as i64, full),
            for_(it, var(ifull), var(ihi), 1, single),
        ],
    )];
    let (bm, bn, be) = (batch * m, batch * n, batch * e);
    let buffers = vec![
        tbuf("qq", Elem::U8, bm * k),
        buf("qs", if row_scales { bm } else { 1 }),
        tbuf("kq", Elem::I8, bn * k),
        buf("ks", bn),
        ibuf("ksum", bn),
        tbuf("vq", Elem::I8, be * n),
        buf("vs", be),
        ibuf("vsum", be),
        tbuf("qb", Elem::U8, bm * k4 as usize * 16),
        tbuf("kp", Elem::I8, batch * groups as usize * k4 as usize * 16),
        buf("out", bm * e),
    ];
    let flops = 2 * batch * m * n * (k + e) + 6 * batch * m * n;
    let mut kern = kernel(name, buffers, batch * n_rb, flops, body, vars);
    kern.shared = vec![buf("scores", mr * n), tbuf("p", Elem::U8, mr * n), buf("p_scale", mr)];
    kern
}

/// `qattention`'s query rows for the outer-product scores: each four bytes of a row
/// repeated four times (`qb[(i·K4 + j)·16 + 4l + q] = qq[i·K + 4j + q]` for every lane `l`),
/// so one 16-byte load is the row's group in every lane. Bytes past `K` are the zero point.
fn qattention_pack_q(rows: usize, k: usize) -> Kernel {
    let k4 = k.div_ceil(4) as i64;
    let mut vars = Vars::new();
    let (i, j) = (vars.next(), vars.next());
    let mut body = vec![];
    for l in 0..4i64 {
        for q in 0..4i64 {
            let c = add(mul(var(j), int(4)), int(q));
            let v = if k % 4 == 0 {
                load_i(0, add(mul(var(i), int(k as i64)), c))
            } else {
                let at = add(mul(var(i), int(k as i64)), min(c.clone(), int(k as i64 - 1)));
                select(CmpOp::Lt, c, int(k as i64), load_i(0, at), int(128))
            };
            body.push(store(1, add(mul(add(mul(var(i), int(k4)), var(j)), int(16)), int(4 * l + q)), v));
        }
    }
    let body = vec![for_(i, var(START), var(END), 1, vec![for_(j, int(0), int(k4), 1, body)])];
    let buffers = vec![tbuf("qq", Elem::U8, rows * k), tbuf("qb", Elem::U8, rows * k4 as usize * 16)];
    kernel(format!("qattention_pack_q_{rows}x{k}"), buffers, rows, 0, body, vars)
}

/// `qattention`'s keys for the outer-product scores: four keys' four-byte groups side by
/// side (`kp[((b·G + g)·K4 + j)·16 + 4l + q] = kq[b, 4g + l, 4j + q]`, `G = ⌈N/4⌉`), so lane
/// `l` of a `dot4` is key `4g + l`. Keys past `N` and bytes past `K` are 0 (no product).
fn qattention_pack_k(batch: usize, n: usize, k: usize) -> Kernel {
    let (k4, groups) = (k.div_ceil(4) as i64, n.div_ceil(4) as i64);
    let (n_, k_) = (n as i64, k as i64);
    let mut vars = Vars::new();
    let (p, b, g, j) = (vars.next(), vars.next(), vars.next(), vars.next());
    let mut inner = vec![];
    for l in 0..4i64 {
        for q in 0..4i64 {
            let t = add(mul(var(g), int(4)), int(l));
            let c = add(mul(var(j), int(4)), int(q));
            let v = if n % 4 == 0 && k % 4 == 0 {
                load_i(0, add(mul(add(mul(var(b), int(n_)), t), int(k_)), c))
            } else {
                let at = add(
                    mul(add(mul(var(b), int(n_)), min(t.clone(), int(n_ - 1))), int(k_)),
                    min(c.clone(), int(k_ - 1)),
                );
                let inside = select(CmpOp::Lt, c, int(k_), load_i(0, at), int(0));
                select(CmpOp::Lt, t, int(n_), inside, int(0))
            };
            inner.push(store(1, add(mul(add(mul(var(p), int(k4)), var(j)), int(16)), int(4 * l + q)), v));
        }
    }
    let body = vec![for_(
        p,
        var(START),
        var(END),
        1,
        vec![
            let_(b, div(var(p), int(groups))),
            let_(g, sub(var(p), mul(var(b), int(groups)))),
            for_(j, int(0), int(k4), 1, inner),
        ],
    )];
    let buffers =
        vec![tbuf("kq", Elem::I8, batch * n * k), tbuf("kp", Elem::I8, batch * groups as usize * k4 as usize * 16)];
    kernel(format!("qattention_pack_k_{batch}x{n}x{k}"), buffers, batch * groups as usize, 0, body, vars)
}

/// `row_sum`: the sum of each row of an i8 tensor, as i32 (the zero-point correction of a
/// product whose int8 operand is computed at run time: attention's K and V).
fn row_sum_kernel(rows: usize, k: usize) -> Kernel {
    let mut vars = Vars::new();
    let (r, acc, j) = (vars.next(), vars.next(), vars.next());
    let body = vec![for_(
        r,
        var(START),
        var(END),
        1,
        vec![
            let_(acc, int(0)),
            for_(
                j,
                int(0),
                int(k as i64),
                1,
                vec![set(acc, add(var(acc), load_i(0, add(mul(var(r), int(k as i64)), var(j)))))],
            ),
            store(1, var(r), var(acc)),
        ],
    )];
    kernel(
        format!("row_sum_{rows}x{k}"),
        vec![tbuf("x", Elem::I8, rows * k), ibuf("sum", rows)],
        rows,
        rows * k,
        body,
        vars,
    )
}

/// `row_scale`: one f32 per row of `k`: `max(max |x|, 1e-30) / 127`.
fn row_scale_kernel(rows: usize, k: usize) -> Kernel {
    let mut vars = Vars::new();
    let (r, base, m) = (vars.next(), vars.next(), vars.next());
    let body = vec![for_(
        r,
        var(START),
        var(END),
        1,
        [
            vec![let_(base, mul(var(r), int(k as i64)))],
            row_max_of(&mut vars, k, m, &|j| un(UnOp::Abs, load4(0, add(var(base), j))), &|j| {
                un(UnOp::Abs, load(0, add(var(base), j)))
            }),
            vec![store(1, var(r), div(max(var(m), f(wcc_ir::interp::ROW_SCALE_FLOOR)), f(127.0)))],
        ]
        .concat(),
    )];
    kernel(
        format!("row_scale_{rows}x{k}"),
        vec![buf("x", rows * k), buf("scale", rows)],
        rows,
        2 * rows * k,
        body,
        vars,
    )
}

/// `quantize`: `round_ties_even(x / s)` clamped to ±127, plus the zero point, 16 elements
/// at a time (four `f32x4` → one byte vector), one row per task.
fn quantize_kernel(rows: usize, k: usize, row_scales: bool, dtype: DType) -> Kernel {
    let (ty, elem, zp) = match dtype {
        DType::U8 => (Ty::U8x16, Elem::U8, 128),
        _ => (Ty::I8x16, Elem::I8, 0),
    };
    let mut vars = Vars::new();
    let (r, base, sv, j, jt) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let k16 = (k / 16 * 16) as i64;
    let lanes = |j: Var| -> Vec<Expr> {
        (0..4)
            .map(|q| {
                let x = load4(0, add(add(var(base), var(j)), int(4 * q)));
                let v = cvt(Ty::I32x4, div(x, splat(var(sv))));
                add(max(min(v, splat(int(127))), splat(int(-127))), splat(int(zp)))
            })
            .collect()
    };
    let scalar =
        add(max(min(cvt(Ty::I64, div(load(0, add(var(base), var(jt))), var(sv))), int(127)), int(-127)), int(zp));
    let body = vec![for_(
        r,
        var(START),
        var(END),
        1,
        vec![
            let_(base, mul(var(r), int(k as i64))),
            let_(sv, load(1, if row_scales { var(r) } else { int(0) })),
            for_(j, int(0), int(k16), 16, vec![store(2, add(var(base), var(j)), narrow(ty, lanes(j)))]),
            for_(jt, int(k16), int(k as i64), 1, vec![store(2, add(var(base), var(jt)), scalar)]),
        ],
    )];
    kernel(
        format!("quantize_{}_{rows}x{k}{}", dtype.name(), if row_scales { "" } else { "_static" }),
        vec![buf("x", rows * k), buf("scale", if row_scales { rows } else { 1 }), tbuf("q", elem, rows * k)],
        rows,
        2 * rows * k,
        body,
        vars,
    )
}

fn kernel(name: String, buffers: Vec<Buffer>, extent: usize, flops: usize, body: Vec<Stmt>, vars: Vars) -> Kernel {
    Kernel {
        name,
        buffers,
        parallel_extent: extent as u64,
        flops: flops as u64,
        body,
        vars: vars.0,
        launch: None,
        shared: vec![],
    }
}

fn shape_name(s: &[usize]) -> String {
    s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// A constant of the given width.
fn cf(v: f32, vector: bool) -> Expr {
    if vector {
        splat(f(v))
    } else {
        f(v)
    }
}

/// `x * 0.5 * (1 + erf(x / √2))`.
fn gelu(x: Expr, v: bool) -> Expr {
    let e = un(UnOp::Erf, mul(x.clone(), cf(std::f32::consts::FRAC_1_SQRT_2, v)));
    mul(mul(x, cf(0.5, v)), add(cf(1.0, v), e))
}

/// A vectorised loop over `[lo, hi)`: `body(index, vector?)` produces the statements for
/// four elements at a time, then for the scalar tail.
fn vec_loop(vars: &mut Vars, lo: Expr, hi: Expr, body: &dyn Fn(Expr, bool, &mut Vars) -> Vec<Stmt>) -> Vec<Stmt> {
    let (vhi, j, t) = (vars.next(), vars.next(), vars.next());
    let len = sub(hi.clone(), lo.clone());
    vec![
        let_(vhi, add(lo.clone(), mul(div(len, int(4)), int(4)))),
        for_(j, lo, var(vhi), 4, body(var(j), true, vars)),
        for_(t, var(vhi), hi, 1, body(var(t), false, vars)),
    ]
}

/// Element-wise map of `n` elements of `inputs` operands (same shape) to one result,
/// `f(operands, vector?)`; parallel over blocks of 4096. Buffers: the operands, then out.
fn map_kernel(name: String, n: usize, inputs: usize, flops_per: usize, f: &dyn Fn(Vec<Expr>, bool) -> Expr) -> Kernel {
    const BLOCK: usize = 4096;
    let mut vars = Vars::new();
    let (b, lo, hi) = (vars.next(), vars.next(), vars.next());
    let inner = vec_loop(&mut vars, var(lo), var(hi), &|i, v, vars| {
        let xs: Vec<Var> = (0..inputs).map(|_| vars.next()).collect();
        let mut body: Vec<Stmt> = xs
            .iter()
            .enumerate()
            .map(|(k, &x)| let_(x, if v { load4(k as u32, i.clone()) } else { load(k as u32, i.clone()) }))
            .collect();
        body.push(store(inputs as u32, i, f(xs.iter().map(|&x| var(x)).collect(), v)));
        body
    });
    let body = vec![for_(
        b,
        var(START),
        var(END),
        1,
        [
            vec![
                let_(lo, mul(var(b), int(BLOCK as i64))),
                let_(hi, min(add(var(lo), int(BLOCK as i64)), int(n as i64))),
            ],
            inner,
        ]
        .concat(),
    )];
    let names = ["x", "y"];
    let mut buffers: Vec<Buffer> = (0..inputs).map(|k| buf(names.get(k).unwrap_or(&"z"), n)).collect();
    buffers.push(buf("out", n));
    kernel(name, buffers, n.div_ceil(BLOCK), n * flops_per, body, vars)
}

/// Batched `out[b, i, j] = Σ_k x[b, i, k] · w[b, j, k] (+ bias[j])`. Batch strides of 0
/// share one operand across the batch (a linear layer).
///
/// A parallel task is (batch, a tile of 16 columns, a tile of rows), the row tiles fastest,
/// so consecutive tasks reuse the same 16 weight rows from cache while rows of `x` stream by.
/// Inside, blocks of `mr` rows × 4 columns keep `mr·4` `f32x4` accumulators over the
/// reduction (four elements of `k` per step, `mr` loads of `x` and 4 of `w` for `4·mr`
/// FMAs), reduced by horizontal sums once at the end; then the epilogue (bias, GELU,
/// residual) on the four adjacent results at once. Loads are one index per step plus
/// constant row distances (folded into the address).
#[allow(clippy::too_many_arguments)]
fn dot_kernel(
    name: String,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    x_bstride: usize,
    w_bstride: usize,
    bias: bool,
    epilogue: Epilogue,
    target: &Target,
) -> Kernel {
    const NB: usize = 16;
    // Rows per register block: with 4 columns, `4·mr` accumulators, `mr` rows of `x`, the 4
    // weight vectors (Cranelift loads them all at the top of the step) and a product must
    // fit x86-64's 16 vector registers: 2 rows (15). aarch64 has 32: 3 rows.
    let mr = match (target.arch.as_str(), m) {
        (_, 0..=1) => 1,
        ("aarch64", 3..) => 3,
        _ => 2,
    };
    // How to accumulate `acc += x·w`: aarch64's `fmla` accumulates into its destination, so
    // one FMA; Cranelift's x64 FMA ties a multiplicand to the destination (vfmadd213/132
    // only), which costs a register copy per FMA when the multiplicand is reused across the
    // block, so there a multiply and an add (three-operand AVX, and separate pipes on
    // current cores) are cheaper.
    // One row (a matrix-vector product, bound by reading the weights): the FMA, its
    // load folded in, measured slightly faster.
    let fused = target.arch == "aarch64" || m == 1;
    let mac = |x: Expr, w: Expr, acc: Expr| if fused { fma(x, w, acc) } else { add(acc, mul(x, w)) };
    let rpt = mr * 8;
    // Buffers: x, w, [bias], [residual], out.
    let (xb, wb, bb) = (0u32, 1u32, 2u32);
    let rb = 2 + bias as u32;
    let ob = 2 + bias as u32 + epilogue.residual as u32;
    let (n_ct, n_rt) = (n.div_ceil(NB), m.div_ceil(rpt));
    let (k_, n_) = (k as i64, n as i64);
    let k4 = (k / 4 * 4) as i64;
    let mut vars = Vars::new();
    let tile = Tile::new(&mut vars);
    let Tile { p, bi, j0, jend, j4end, i_lo, i_hi, i_full } = tile;
    let (xbase, obase, wbase) = (vars.next(), vars.next(), vars.next());
    // `rows` rows from `i`, `cols` (4 or 1) columns from `j`.
    let block = |vars: &mut Vars, i: Expr, j: Expr, rows: usize, cols: usize| -> Vec<Stmt> {
        let accs: Vec<Vec<Var>> = (0..rows).map(|_| (0..cols).map(|_| vars.next()).collect()).collect();
        let sums: Vec<Vec<Var>> = (0..rows).map(|_| (0..cols).map(|_| vars.next()).collect()).collect();
        let xv: Vec<Var> = (0..rows).map(|_| vars.next()).collect();
        let (kk, wv, kt, xo, wo, xk, wk, xt, wt) = (
            vars.next(),
            vars.next(),
            vars.next(),
            vars.next(),
            vars.next(),
            vars.next(),
            vars.next(),
            vars.next(),
            vars.next(),
        );
        // Addressing as in `qdot_kernel`: offsets computed before the loop (the unused
        // anchor loads `xk`, `wk` make Cranelift place them there), each load at offset + k
        // + a constant distance.
        let _ = (xt, wt);
        let xat = |r: usize, k: Var| add(add(var(xo), var(k)), int(r as i64 * k_));
        let wat = |c: usize, k: Var| add(add(var(wo), var(k)), int(c as i64 * k_));
        let mut s: Vec<Stmt> = accs.iter().flatten().map(|&a| let_(a, splat(f(0.0)))).collect();
        s.push(let_(xo, add(var(xbase), mul(i.clone(), int(k_)))));
        s.push(let_(wo, add(var(wbase), mul(j.clone(), int(k_)))));
        s.push(let_(xk, load(xb, var(xo))));
        s.push(let_(wk, load(wb, var(wo))));
        let mut inner = vec![];
        inner.extend(xv.iter().enumerate().map(|(r, &x)| let_(x, load4(xb, xat(r, kk)))));
        for c in 0..cols {
            inner.push(let_(wv, load4(wb, wat(c, kk))));
            for r in 0..rows {
                inner.push(set(accs[r][c], mac(var(xv[r]), var(wv), var(accs[r][c]))));
            }
        }
        s.push(for_(kk, int(0), int(k4), 4, inner));
        for r in 0..rows {
            for c in 0..cols {
                s.push(let_(sums[r][c], hsum(var(accs[r][c]))));
            }
        }
        if k4 < k_ {
            let mut tail = vec![];
            for r in 0..rows {
                for c in 0..cols {
                    let prod = load(wb, wat(c, kt));
                    tail.push(set(sums[r][c], fma(load(xb, xat(r, kt)), prod, var(sums[r][c]))));
                }
            }
            s.push(for_(kt, int(k4), int(k_), 1, tail));
        }
        for r in 0..rows {
            let at = add(add(var(obase), mul(add(i.clone(), int(r as i64)), int(n_))), j.clone());
            // The epilogue (bias, GELU, residual) runs on the four columns at once when there
            // are four: they are adjacent in the output row.
            let vector = cols == 4;
            let results: Vec<Expr> = sums[r].iter().map(|&sm| var(sm)).collect();
            let mut v = if vector { pack(results) } else { results[0].clone() };
            let ld = if vector { load4 } else { load };
            if bias {
                v = add(v, ld(bb, j.clone()));
            }
            // With GELU, it and the residual come in `Tile::gelu_pass`.
            if epilogue.residual && !epilogue.gelu {
                v = add(v, ld(rb, at.clone()));
            }
            s.push(store(ob, at, v));
        }
        s
    };
    let (j, jt, i, it, it2) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let group = [
        vec![for_(i, var(i_lo), var(i_full), mr as i64, block(&mut vars, var(i), var(j), mr, 4))],
        vec![for_(it, var(i_full), var(i_hi), 1, block(&mut vars, var(it), var(j), 1, 4))],
    ]
    .concat();
    let single = vec![for_(it2, var(i_lo), var(i_hi), 1, block(&mut vars, var(it2), var(jt), 1, 1))];
    let prologue = tile.prologue(&mut vars, m, n, NB, rpt, mr);
    let body = vec![for_(
        p,
        var(START),
        var(END),
        1,
        [
            prologue,
            vec![
                let_(xbase, mul(var(bi), int(x_bstride as i64))),
                let_(wbase, mul(var(bi), int(w_bstride as i64))),
                let_(obase, mul(var(bi), int((m * n) as i64))),
                for_(j, var(j0), var(j4end), 4, group),
                for_(jt, var(j4end), var(jend), 1, single),
            ],
            if epilogue.gelu {
                tile.gelu_pass(&mut vars, var(obase), n, ob, epilogue.residual.then_some(rb))
            } else {
                vec![]
            },
        ]
        .concat(),
    )];
    let x_len = if x_bstride == 0 { m * k } else { batch * m * k };
    let w_len = if w_bstride == 0 { n * k } else { batch * n * k };
    let mut buffers = vec![buf("x", x_len), buf("w", w_len)];
    if bias {
        buffers.push(buf("bias", n));
    }
    if epilogue.residual {
        buffers.push(buf("residual", batch * m * n));
    }
    buffers.push(buf("out", batch * m * n));
    kernel(name, buffers, batch * n_ct * n_rt, 2 * batch * m * n * k, body, vars)
}

/// What a matrix product does to each result before storing it.
#[derive(Clone, Copy, Debug, Default)]
struct Epilogue {
    gelu: bool,
    residual: bool,
}

/// `out[b, i, :] = Σ_k a[b, i, k] · v[b, k, :]` (the attention context product).
fn axpy_matmul_kernel(name: String, batch: usize, m: usize, k: usize, n: usize) -> Kernel {
    // Blocks of 32 output columns are accumulated in eight f32x4 registers over the whole
    // reduction and stored once; the columns left over (n % 32) are updated in memory.
    const BLOCK: usize = 32;
    let nv = n / BLOCK * BLOCK;
    let mut vars = Vars::new();
    let (p, bi, orow, arow, vbase, jb, kk, s) =
        (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let accs: Vec<Var> = (0..BLOCK / 4).map(|_| vars.next()).collect();
    let vrow = |kk: Expr| add(var(vbase), mul(kk, int(n as i64)));
    let mut block: Vec<Stmt> = accs.iter().map(|&a| let_(a, splat(f(0.0)))).collect();
    let mut step = vec![let_(s, splat(load(0, add(var(arow), var(kk)))))];
    for (q, &a) in accs.iter().enumerate() {
        let col = add(var(jb), int(4 * q as i64));
        step.push(set(a, fma(var(s), load4(1, add(vrow(var(kk)), col)), var(a))));
    }
    block.push(for_(kk, int(0), int(k as i64), 1, step));
    for (q, &a) in accs.iter().enumerate() {
        block.push(store(2, add(var(orow), add(var(jb), int(4 * q as i64))), var(a)));
    }
    let (kt, st) = (vars.next(), vars.next());
    let zero =
        vec_loop(&mut vars, int(nv as i64), int(n as i64), &|j, v, _| vec![store(2, add(var(orow), j), cf(0.0, v))]);
    let update = vec_loop(&mut vars, int(nv as i64), int(n as i64), &|j, v, _| {
        let (bv, ov, sv) = if v {
            (load4(1, add(vrow(var(kt)), j.clone())), load4(2, add(var(orow), j.clone())), splat(var(st)))
        } else {
            (load(1, add(vrow(var(kt)), j.clone())), load(2, add(var(orow), j.clone())), var(st))
        };
        vec![store(2, add(var(orow), j), fma(sv, bv, ov))]
    });
    let mut row = vec![
        let_(bi, div(var(p), int(m as i64))),
        let_(orow, mul(var(p), int(n as i64))),
        let_(arow, mul(var(p), int(k as i64))),
        let_(vbase, mul(var(bi), int((k * n) as i64))),
        for_(jb, int(0), int(nv as i64), BLOCK as i64, block),
    ];
    if nv < n {
        row.extend(zero);
        row.push(for_(
            kt,
            int(0),
            int(k as i64),
            1,
            [vec![let_(st, load(0, add(var(arow), var(kt))))], update].concat(),
        ));
    }
    let body = vec![for_(p, var(START), var(END), 1, row)];
    kernel(
        name,
        vec![buf("a", batch * m * k), buf("v", batch * k * n), buf("out", batch * m * n)],
        batch * m,
        2 * batch * m * n * k,
        body,
        vars,
    )
}

/// Row statistics kernels: softmax and layer norm over the last axis, one row per task.
/// Softmax over rows of `d`; with `masked`, buffers are (x, mask[d], out) and the mask is
/// added to every row first, else (x, out).
fn softmax_kernel(rows: usize, d: usize, masked: bool) -> Kernel {
    let ob = 1 + masked as u32;
    let mut vars = Vars::new();
    let (r, base, mx, s4, s, inv) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let d4 = (d / 4 * 4) as i64;
    let (j2, jt2, j3, jt3, e4, e1) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let idx = |j: Var| add(var(base), var(j));
    let x4e = |j: Expr| {
        if masked {
            add(load4(0, add(var(base), j.clone())), load4(1, j))
        } else {
            load4(0, add(var(base), j))
        }
    };
    let x1e =
        |j: Expr| if masked { add(load(0, add(var(base), j.clone())), load(1, j)) } else { load(0, add(var(base), j)) };
    let x4 = |j: Var| x4e(var(j));
    let x1 = |j: Var| x1e(var(j));
    let body = vec![for_(
        r,
        var(START),
        var(END),
        1,
        [
            vec![let_(base, mul(var(r), int(d as i64)))],
            row_max_of(&mut vars, d, mx, &x4e, &x1e),
            vec![
                let_(s4, splat(f(0.0))),
                for_(
                    j2,
                    int(0),
                    int(d4),
                    4,
                    vec![
                        let_(e4, un(UnOp::Exp, sub(x4(j2), splat(var(mx))))),
                        store(ob, idx(j2), var(e4)),
                        set(s4, add(var(s4), var(e4))),
                    ],
                ),
                let_(s, hsum(var(s4))),
                for_(
                    jt2,
                    int(d4),
                    int(d as i64),
                    1,
                    vec![
                        let_(e1, un(UnOp::Exp, sub(x1(jt2), var(mx)))),
                        store(ob, idx(jt2), var(e1)),
                        set(s, add(var(s), var(e1))),
                    ],
                ),
                let_(inv, div(f(1.0), var(s))),
                for_(j3, int(0), int(d4), 4, vec![store(ob, idx(j3), mul(load4(ob, idx(j3)), splat(var(inv))))]),
                for_(jt3, int(d4), int(d as i64), 1, vec![store(ob, idx(jt3), mul(load(ob, idx(jt3)), var(inv)))]),
            ],
        ]
        .concat(),
    )];
    kernel(
        format!("{}softmax_{rows}x{d}", if masked { "masked_" } else { "" }),
        if masked {
            vec![buf("x", rows * d), buf("mask", d), buf("out", rows * d)]
        } else {
            vec![buf("x", rows * d), buf("out", rows * d)]
        },
        rows,
        5 * rows * d,
        body,
        vars,
    )
}

/// A row's maximum into `mx`, of `x4(j)` (four elements from column `j`) and `x1(j)`: sixteen
/// elements per step into four accumulators (one would chain every step's compare-and-blend
/// on the last), then fours, then the scalar tail. The maximum does not depend on the order.
fn row_max_of(vars: &mut Vars, d: usize, mx: Var, x4: &dyn Fn(Expr) -> Expr, x1: &dyn Fn(Expr) -> Expr) -> Vec<Stmt> {
    let accs: Vec<Var> = (0..4).map(|_| vars.next()).collect();
    let (mx4, j, j4, jt) = (vars.next(), vars.next(), vars.next(), vars.next());
    let (d16, d4) = ((d / 16 * 16) as i64, (d / 4 * 4) as i64);
    let mut s: Vec<Stmt> = accs.iter().map(|&a| let_(a, splat(f(f32::NEG_INFINITY)))).collect();
    s.push(for_(
        j,
        int(0),
        int(d16),
        16,
        (0..4).map(|q| set(accs[q], max(var(accs[q]), x4(add(var(j), int(4 * q as i64)))))).collect(),
    ));
    s.extend([
        let_(mx4, max(max(var(accs[0]), var(accs[1])), max(var(accs[2]), var(accs[3])))),
        for_(j4, int(d16), int(d4), 4, vec![set(mx4, max(var(mx4), x4(var(j4))))]),
        let_(mx, hmax(var(mx4))),
        for_(jt, int(d4), int(d as i64), 1, vec![set(mx, max(var(mx), x1(var(jt))))]),
    ]);
    s
}

/// [`row_max_of`] the row of `d` at `base` in buffer 0.
fn row_max(vars: &mut Vars, base: Var, d: usize, mx: Var) -> Vec<Stmt> {
    row_max_of(vars, d, mx, &|j| load4(0, add(var(base), j)), &|j| load(0, add(var(base), j)))
}

/// `softmax_scale` (see the op): per row, the maximum, then `Σ exp(x − max)` in four lanes
/// plus the tail, then `1 / (127 · sum)`. One row per task; nothing but the scale is written.
/// The exponentials are `exp_low`'s: the scale needs no more precision than the 8-bit values
/// it multiplies (its relative error stays under 5e-5, against their 1/254).
fn softmax_scale_kernel(rows: usize, d: usize) -> Kernel {
    let mut vars = Vars::new();
    let (r, base, mx, s4, s, j, jt) =
        (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let d4 = (d / 4 * 4) as i64;
    let mut row = vec![let_(base, mul(var(r), int(d as i64)))];
    row.extend(row_max(&mut vars, base, d, mx));
    row.extend([
        let_(s4, splat(f(0.0))),
        for_(
            j,
            int(0),
            int(d4),
            4,
            vec![set(s4, add(var(s4), un(UnOp::ExpLow, sub(load4(0, add(var(base), var(j))), splat(var(mx))))))],
        ),
        let_(s, hsum(var(s4))),
        for_(
            jt,
            int(d4),
            int(d as i64),
            1,
            vec![set(s, add(var(s), un(UnOp::ExpLow, sub(load(0, add(var(base), var(jt))), var(mx)))))],
        ),
        store(1, var(r), div(f(1.0), mul(var(s), f(127.0)))),
    ]);
    let body = vec![for_(r, var(START), var(END), 1, row)];
    kernel(
        format!("softmax_scale_{rows}x{d}"),
        vec![buf("x", rows * d), buf("scale", rows)],
        rows,
        3 * rows * d,
        body,
        vars,
    )
}

/// `softmax_quantize` (see the op): per row, the maximum, then `127 · exp(x − max)` rounded,
/// clamped and offset by 128, sixteen at a time (four `f32x4` narrowed to one `u8x16`), then
/// the tail. The probabilities are never stored as f32: the scores are read twice (here and
/// by `softmax_scale`) and one byte per probability is written. `exp_low` suffices: its
/// error (< 5e-5 relative, so < 0.007 of the 127 steps) moves a rounding only where the
/// scaled value lies that close to a half.
fn softmax_quantize_kernel(rows: usize, d: usize) -> Kernel {
    let mut vars = Vars::new();
    let (r, base, mx, j, jt) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let d16 = (d / 16 * 16) as i64;
    let lanes = |j: Var| -> Vec<Expr> {
        (0..4)
            .map(|q| {
                let x = load4(0, add(add(var(base), var(j)), int(4 * q)));
                let e = mul(un(UnOp::ExpLow, sub(x, splat(var(mx)))), splat(f(127.0)));
                add(max(min(cvt(Ty::I32x4, e), splat(int(127))), splat(int(-127))), splat(int(128)))
            })
            .collect()
    };
    let e1 = mul(un(UnOp::ExpLow, sub(load(0, add(var(base), var(jt))), var(mx))), f(127.0));
    let scalar = add(max(min(cvt(Ty::I64, e1), int(127)), int(-127)), int(128));
    let mut row = vec![let_(base, mul(var(r), int(d as i64)))];
    row.extend(row_max(&mut vars, base, d, mx));
    row.extend([
        for_(j, int(0), int(d16), 16, vec![store(1, add(var(base), var(j)), narrow(Ty::U8x16, lanes(j)))]),
        for_(jt, int(d16), int(d as i64), 1, vec![store(1, add(var(base), var(jt)), scalar)]),
    ]);
    let body = vec![for_(r, var(START), var(END), 1, row)];
    kernel(
        format!("softmax_quantize_{rows}x{d}"),
        vec![buf("x", rows * d), tbuf("q", Elem::U8, rows * d)],
        rows,
        4 * rows * d,
        body,
        vars,
    )
}

/// `im2col` (see the op): `col[t, ci·K + k] = x[ci, t·stride + k − padding]`, 0 outside;
/// one output row per task.
fn im2col_kernel(cin: usize, t: usize, kw: usize, stride: usize, padding: usize, tout: usize) -> Kernel {
    let ck = cin * kw;
    let mut vars = Vars::new();
    let (to, ci, kk, src) = (vars.next(), vars.next(), vars.next(), vars.next());
    let clamped = min(max(var(src), int(0)), int(t as i64 - 1));
    let val = select(
        CmpOp::Lt,
        var(src),
        int(0),
        f(0.0),
        select(CmpOp::Lt, var(src), int(t as i64), load(0, add(mul(var(ci), int(t as i64)), clamped)), f(0.0)),
    );
    let body = vec![for_(
        to,
        var(START),
        var(END),
        1,
        vec![for_(
            ci,
            int(0),
            int(cin as i64),
            1,
            vec![for_(
                kk,
                int(0),
                int(kw as i64),
                1,
                vec![
                    let_(src, sub(add(mul(var(to), int(stride as i64)), var(kk)), int(padding as i64))),
                    store(
                        1,
                        add(mul(var(to), int(ck as i64)), add(mul(var(ci), int(kw as i64)), var(kk))),
                        val.clone(),
                    ),
                ],
            )],
        )],
    )];
    kernel(
        format!("im2col_{cin}x{t}_k{kw}_s{stride}_p{padding}"),
        vec![buf("x", cin * t), buf("col", tout * ck)],
        tout,
        0,
        body,
        vars,
    )
}

/// `cache_attention` (see the op): one task per head, the query rows inside. For each row,
/// three passes over the visible cache rows `0..len`: the scores (`q·k`, four `f32x4`
/// partial sums over the head's columns) into the scratch row of the head with their
/// maximum, then `exp(score - max)` in place with their sum, then the weighted sum of the
/// value rows, a block of (up to) sixteen columns at a time held in registers across all
/// rows, scaled by `1/sum` once at the end. The caches are read in their stored layout
/// (row `t`, the head's columns), and rows after the query's position are never touched.
/// Buffers: q, k, v, position, out, scratch `f32[H·S]`.
///
/// With `batch > 1` (a beam, `m` = 1): q and out `[B, D]`, the caches and the scratch have
/// one block per hypothesis, and the parallel loop runs over hypotheses, each one's heads
/// in turn.
fn cache_attention_kernel(batch: usize, m: usize, s: usize, heads: usize, dh: usize) -> Result<Kernel, BackendError> {
    if batch > 1 && m != 1 {
        return Err(BackendError(format!("cache_attention: a batch of {batch} takes one query row, not {m}")));
    }
    if dh % 4 != 0 {
        return Err(BackendError(format!("cache_attention: the head size {dh} is not a multiple of 4")));
    }
    let d = (heads * dh) as i64;
    let (s_, dh_) = (s as i64, dh as i64);
    // Vectors per block: four when the head size allows it (independent accumulators).
    let w: i64 = if dh % 16 == 0 { 4 } else { 1 };
    let mut vars = Vars::new();
    let (h, p0, i, len, qb, sb, mx, t, kb, c, sc, sum, t2, e, inv, c2, t3, pt) = (
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
        vars.next(),
    );
    let acc: Vec<Var> = (0..w).map(|_| vars.next()).collect();
    // The hypothesis (batch > 1) and its blocks' offsets in q/out, the caches, the scratch.
    let (bb, qo, ko, so) = (vars.next(), vars.next(), vars.next(), vars.next());
    let (qoff, koff, soff) = if batch > 1 { (var(qo), var(ko), var(so)) } else { (int(0), int(0), int(0)) };
    let (q_, k_, v_, pos_, out_, scr) = (0u32, 1u32, 2u32, 3u32, 4u32, 5u32);
    // Scores: q·k over the head's columns, `w` partial sums.
    let mut dot = vec![];
    for (j, &a) in acc.iter().enumerate() {
        let off = |base: Var| add(add(var(base), var(c)), int(4 * j as i64));
        dot.push(set(a, fma(load4(q_, off(qb)), load4(k_, off(kb)), var(a))));
    }
    let total = acc.iter().skip(1).fold(var(acc[0]), |x, &a| add(x, var(a)));
    let zero_acc: Vec<Stmt> = acc.iter().map(|&a| let_(a, splat(f(0.0)))).collect();
    let scores = for_(
        t,
        int(0),
        var(len),
        1,
        [
            vec![let_(kb, add(add(mul(var(t), int(d)), mul(var(h), int(dh_))), koff.clone()))],
            zero_acc.clone(),
            vec![
                for_(c, int(0), int(dh_), 4 * w, dot),
                let_(sc, hsum(total)),
                store(scr, add(var(sb), var(t)), var(sc)),
                set(mx, max(var(mx), var(sc))),
            ],
        ]
        .concat(),
    );
    let exps = for_(
        t2,
        int(0),
        var(len),
        1,
        vec![
            let_(e, un(UnOp::Exp, sub(load(scr, add(var(sb), var(t2))), var(mx)))),
            store(scr, add(var(sb), var(t2)), var(e)),
            set(sum, add(var(sum), var(e))),
        ],
    );
    // P·V: a block of `4w` columns accumulated over every visible row.
    let mut axpy = vec![let_(pt, splat(load(scr, add(var(sb), var(t3)))))];
    for (j, &a) in acc.iter().enumerate() {
        let at =
            add(add(add(add(mul(var(t3), int(d)), mul(var(h), int(dh_))), koff.clone()), var(c2)), int(4 * j as i64));
        axpy.push(set(a, fma(var(pt), load4(v_, at), var(a))));
    }
    let mut pv = zero_acc;
    pv.push(for_(t3, int(0), var(len), 1, axpy));
    for (j, &a) in acc.iter().enumerate() {
        pv.push(store(out_, add(add(var(qb), var(c2)), int(4 * j as i64)), mul(var(a), splat(var(inv)))));
    }
    let row = vec![
        // Rows after the cache's end are never visible (the interpreter refuses such a
        // position; the kernel clamps so that it cannot read past the cache).
        let_(len, add(min(add(var(p0), var(i)), int(s_ - 1)), int(1))),
        let_(qb, add(add(mul(var(i), int(d)), mul(var(h), int(dh_))), qoff)),
        let_(sb, add(mul(var(h), int(s_)), soff)),
        let_(mx, f(f32::NEG_INFINITY)),
        scores,
        let_(sum, f(0.0)),
        exps,
        let_(inv, div(f(1.0), var(sum))),
        for_(c2, int(0), int(dh_), 4 * w, pv),
    ];
    let heads_body = vec![let_(p0, max(load_i(pos_, int(0)), int(0))), for_(i, int(0), int(m as i64), 1, row)];
    let body = if batch > 1 {
        vec![for_(
            bb,
            var(START),
            var(END),
            1,
            vec![
                let_(qo, mul(var(bb), int(d))),
                let_(ko, mul(var(bb), int(s_ * d))),
                let_(so, mul(var(bb), int(heads as i64 * s_))),
                for_(h, int(0), int(heads as i64), 1, heads_body),
            ],
        )]
    } else {
        vec![for_(h, var(START), var(END), 1, heads_body)]
    };
    let (b_, name) = if batch > 1 {
        (batch, format!("beam_cache_attention_{batch}x{s}x{heads}x{dh}"))
    } else {
        (1, format!("cache_attention_{m}x{s}x{heads}x{dh}"))
    };
    Ok(kernel(
        name,
        vec![
            buf("q", b_ * m * heads * dh),
            buf("k", b_ * s * heads * dh),
            buf("v", b_ * s * heads * dh),
            ibuf("position", 1),
            buf("out", b_ * m * heads * dh),
            buf("scores", b_ * heads * s),
        ],
        if batch > 1 { batch } else { heads },
        // An upper bound (every row visible): what the runtime weighs to split the launch.
        4 * b_ * m * heads * s * dh,
        body,
        vars,
    ))
}

/// The batched `scatter_row` of a beam step (`cache [B, S, D]`, index, rows `[B, D]`,
/// origin `i32[B]`). In place: a first launch copies the filled rows (before the index) of
/// each hypothesis whose origin is another into scratch, from that origin; a second copies
/// them back and writes every hypothesis's new row. Hypotheses that continue themselves
/// (most, in a settled beam) copy nothing. Not in place: one launch writes the whole result.
/// The rows after the index are never read by a step (`cache_attention` stops at the
/// position), and the op keeps them as they were.
fn beam_scatter_row(shape: &[usize], in_place: bool) -> Result<OpKernels, BackendError> {
    let (b, s, d) = (shape[0], shape[1], shape[2]);
    let (s_, d_, sd) = (s as i64, d as i64, (s * d) as i64);
    // Clamped: an index or origin out of range must not read or write outside the cache.
    let origin_of = |origin_buf: u32, h: Var| min(max(load_i(origin_buf, var(h)), int(0)), int(b as i64 - 1));
    let position = || min(max(load_i(1, int(0)), int(0)), int(s_ - 1));
    if !in_place {
        // out[h] = origin's rows before p, rows[h] at p, its own rows after.
        let mut vars = Vars::new();
        let (h, o, p, t, j) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
        let at = |hyp: Var| add(add(mul(var(hyp), int(sd)), mul(var(t), int(d_))), var(j));
        let kept = select(CmpOp::Lt, var(t), var(p), load(0, at(o)), load(0, at(h)));
        let val = select(CmpOp::Eq, var(t), var(p), load(2, add(mul(var(h), int(d_)), var(j))), kept);
        let body = vec![for_(
            h,
            var(START),
            var(END),
            1,
            vec![
                let_(o, origin_of(3, h)),
                let_(p, position()),
                for_(t, int(0), int(s_), 1, vec![for_(j, int(0), int(d_), 1, vec![store(4, at(h), val)])]),
            ],
        )];
        let bufs = vec![
            buf("cache", b * s * d),
            ibuf("index", 1),
            buf("rows", b * d),
            ibuf("origin", b),
            buf("out", b * s * d),
        ];
        let k = kernel(format!("beam_scatter_row_{b}x{s}x{d}"), bufs, b, 0, body, vars);
        let slots = vec![Slot::Input(0), Slot::Input(1), Slot::Input(2), Slot::Input(3), Slot::Output];
        return Ok(OpKernels { launches: vec![(k, slots)], scratch: vec![] });
    }
    // One launch's loop over hypotheses: for each `h` whose origin `o` is another, copy rows
    // `0..p` of block `src(h, o)` of buffer `from` to block `dst(h)` of buffer `to`, then
    // `tail` (statements over `h` and `p`). Each launch numbers its own variables.
    let rows_loop = |origin_buf: u32,
                     (from, src): (u32, &dyn Fn(Var, Var) -> Expr),
                     (to, dst): (u32, &dyn Fn(Var) -> Expr),
                     tail: &dyn Fn(&mut Vars, Var, Var) -> Vec<Stmt>|
     -> (Vec<Stmt>, Vars) {
        let mut vars = Vars::new();
        let (h, o, p, len, t) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
        let (from_at, to_at) = (src(h, o), dst(h));
        let row = vec_loop(&mut vars, int(0), int(d_), &|j, vv, _| {
            let at = |base: &Expr| add(add(base.clone(), mul(var(t), int(d_))), j.clone());
            let x = if vv { load4(from, at(&from_at)) } else { load(from, at(&from_at)) };
            vec![store(to, at(&to_at), x)]
        });
        let mut body = vec![
            let_(o, origin_of(origin_buf, h)),
            let_(p, position()),
            let_(len, select(CmpOp::Eq, var(o), var(h), int(0), var(p))),
            for_(t, int(0), var(len), 1, row),
        ];
        body.extend(tail(&mut vars, h, p));
        (vec![for_(h, var(START), var(END), 1, body)], vars)
    };
    let block = |x: Var| mul(var(x), int(sd));
    // Launch 1: scratch[h] = cache[origin[h]], rows before p, where origin[h] != h.
    let (body, vars) = rows_loop(2, (0, &|_, o| block(o)), (3, &block), &|_, _, _| vec![]);
    let gather = kernel(
        format!("beam_gather_rows_{b}x{s}x{d}"),
        vec![buf("cache", b * s * d), ibuf("index", 1), ibuf("origin", b), buf("scratch", b * s * d)],
        b,
        0,
        body,
        vars,
    );
    // Launch 2: cache[h] = scratch[h] where origin[h] != h, then row p = rows[h].
    let new_row = |vars: &mut Vars, h: Var, p: Var| {
        vec_loop(vars, int(0), int(d_), &|j, vv, _| {
            let src = add(mul(var(h), int(d_)), j.clone());
            let x = if vv { load4(2, src) } else { load(2, src) };
            vec![store(4, add(add(block(h), mul(var(p), int(d_))), j), x)]
        })
    };
    let (body, vars) = rows_loop(3, (0, &|h, _| block(h)), (4, &block), &new_row);
    let scatter = kernel(
        format!("beam_scatter_rows_{b}x{s}x{d}"),
        vec![buf("scratch", b * s * d), ibuf("index", 1), buf("rows", b * d), ibuf("origin", b), buf("out", b * s * d)],
        b,
        0,
        body,
        vars,
    );
    Ok(OpKernels {
        launches: vec![
            (gather, vec![Slot::Input(0), Slot::Input(1), Slot::Input(3), Slot::Scratch(0)]),
            (scatter, vec![Slot::Scratch(0), Slot::Input(1), Slot::Input(2), Slot::Input(3), Slot::Output]),
        ],
        scratch: vec![b * s * d * 4],
    })
}

/// Layer norm over rows of `d`; with `affine`, buffers are (x, gamma, beta, out), else (x, out).
fn layer_norm_kernel(rows: usize, d: usize, eps: f32, affine: bool) -> Kernel {
    let ob = if affine { 3 } else { 1 };
    let mut vars = Vars::new();
    let (r, base, s4, mean, q4, var_, inv) =
        (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let d4 = (d / 4 * 4) as i64;
    let (j, jt, j2, jt2, c4, c1) = (vars.next(), vars.next(), vars.next(), vars.next(), vars.next(), vars.next());
    let idx = |j: Var| add(var(base), var(j));
    let norm = vec_loop(&mut vars, int(0), int(d as i64), &|jj, v, _| {
        let (x, g, b, m, iv) = if v {
            (
                load4(0, add(var(base), jj.clone())),
                load4(1, jj.clone()),
                load4(2, jj.clone()),
                splat(var(mean)),
                splat(var(inv)),
            )
        } else {
            (load(0, add(var(base), jj.clone())), load(1, jj.clone()), load(2, jj.clone()), var(mean), var(inv))
        };
        let normed = mul(sub(x, m), iv);
        vec![store(ob, add(var(base), jj), if affine { fma(normed, g, b) } else { normed })]
    });
    let body = vec![for_(
        r,
        var(START),
        var(END),
        1,
        [
            vec![
                let_(base, mul(var(r), int(d as i64))),
                let_(s4, splat(f(0.0))),
                for_(j, int(0), int(d4), 4, vec![set(s4, add(var(s4), load4(0, idx(j))))]),
                let_(mean, hsum(var(s4))),
                for_(jt, int(d4), int(d as i64), 1, vec![set(mean, add(var(mean), load(0, idx(jt))))]),
                set(mean, div(var(mean), f(d as f32))),
                let_(q4, splat(f(0.0))),
                for_(
                    j2,
                    int(0),
                    int(d4),
                    4,
                    vec![let_(c4, sub(load4(0, idx(j2)), splat(var(mean)))), set(q4, fma(var(c4), var(c4), var(q4)))],
                ),
                let_(var_, hsum(var(q4))),
                for_(
                    jt2,
                    int(d4),
                    int(d as i64),
                    1,
                    vec![let_(c1, sub(load(0, idx(jt2)), var(mean))), set(var_, fma(var(c1), var(c1), var(var_)))],
                ),
                let_(inv, div(f(1.0), un(UnOp::Sqrt, add(div(var(var_), f(d as f32)), f(eps))))),
            ],
            norm,
        ]
        .concat(),
    )];
    let buffers = if affine {
        vec![buf("x", rows * d), buf("gamma", d), buf("beta", d), buf("out", rows * d)]
    } else {
        vec![buf("x", rows * d), buf("out", rows * d)]
    };
    kernel(
        format!("layer_norm{}_{rows}x{d}", if affine { "" } else { "_plain" }),
        buffers,
        rows,
        8 * rows * d,
        body,
        vars,
    )
}

/// `out[idx] = x[base + Σ idx_d · strides[d]]` over `out_shape`: transpose and slice.
fn strided_copy_kernel(name: String, in_len: usize, out_shape: &[usize], strides: &[usize], base: usize) -> Kernel {
    let mut vars = Vars::new();
    // Treat rank < 2 as [1, n].
    let (shape, strides): (Vec<usize>, Vec<usize>) = if out_shape.len() < 2 {
        ([&[1][..], out_shape].concat(), [&[0][..], strides].concat())
    } else {
        (out_shape.to_vec(), strides.to_vec())
    };
    let r = shape.len();
    let idx: Vec<Var> = (0..r).map(|_| vars.next()).collect();
    let out_strides: Vec<usize> = (0..r).map(|d| shape[d + 1..].iter().product()).collect();
    let src_of = |upto: usize| -> Expr {
        let mut e = int(base as i64);
        for d in 0..upto {
            e = add(e, mul(var(idx[d]), int(strides[d] as i64)));
        }
        e
    };
    let dst_of = |upto: usize| -> Expr {
        let mut e = int(0);
        for d in 0..upto {
            e = add(e, mul(var(idx[d]), int(out_strides[d] as i64)));
        }
        e
    };
    let (src_row, dst_row) = (vars.next(), vars.next());
    let last = r - 1;
    let contiguous = strides[last] == 1;
    let inner: Vec<Stmt> = if contiguous {
        [
            vec![let_(src_row, src_of(last)), let_(dst_row, dst_of(last))],
            vec_loop(&mut vars, int(0), int(shape[last] as i64), &|j, v, _| {
                let val =
                    if v { load4(0, add(var(src_row), j.clone())) } else { load(0, add(var(src_row), j.clone())) };
                vec![store(1, add(var(dst_row), j), val)]
            }),
        ]
        .concat()
    } else {
        vec![
            let_(src_row, src_of(last)),
            let_(dst_row, dst_of(last)),
            for_(
                idx[last],
                int(0),
                int(shape[last] as i64),
                1,
                vec![store(
                    1,
                    add(var(dst_row), var(idx[last])),
                    load(0, add(var(src_row), mul(var(idx[last]), int(strides[last] as i64)))),
                )],
            ),
        ]
    };
    let mut body = inner;
    for d in (1..last).rev() {
        body = vec![for_(idx[d], int(0), int(shape[d] as i64), 1, body)];
    }
    let body = vec![for_(idx[0], var(START), var(END), 1, body)];
    let n: usize = shape.iter().product();
    // No arithmetic, but `n` elements moved: enough work to be worth splitting across threads
    // (the runtime splits by this figure).
    kernel(name, vec![buf("x", in_len), buf("out", n)], shape[0], n, body, vars)
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    (0..shape.len()).map(|d| shape[d + 1..].iter().product()).collect()
}

/// `out = a ⊕ b` with numpy broadcasting; parallel over the output's first axis.
fn broadcast_kernel(name: &str, a: &[usize], b: &[usize], out: &[usize], op: crate::kir::BinOp) -> Kernel {
    let n: usize = out.iter().product();
    if a == b {
        // Same shapes: a flat element-wise loop.
        let f = move |xs: Vec<Expr>, _: bool| bin(op, xs[0].clone(), xs[1].clone());
        return map_kernel(format!("{name}_{}", shape_name(out)), n, 2, 1, &f);
    }
    let r = out.len().max(2);
    let pad = |s: &[usize]| -> Vec<usize> { [vec![1; r - s.len()], s.to_vec()].concat() };
    let (sa_shape, sb_shape, so) = (pad(a), pad(b), pad(out));
    let bstr = |s: &[usize]| -> Vec<usize> {
        let st = strides(s);
        (0..r).map(|d| if s[d] == 1 { 0 } else { st[d] }).collect()
    };
    let (sa, sb, st_o) = (bstr(&sa_shape), bstr(&sb_shape), strides(&so));
    let mut vars = Vars::new();
    let idx: Vec<Var> = (0..r).map(|_| vars.next()).collect();
    let off = |st: &[usize], upto: usize| -> Expr {
        let mut e = int(0);
        for d in 0..upto {
            e = add(e, mul(var(idx[d]), int(st[d] as i64)));
        }
        e
    };
    let (oa, ob, oo) = (vars.next(), vars.next(), vars.next());
    let last = r - 1;
    let vectorisable = sa[last] <= 1 && sb[last] <= 1;
    let operand = |buf: u32, o: Var, s: usize, j: Expr, v: bool| -> Expr {
        match (s, v) {
            (0, true) => splat(load(buf, var(o))),
            (0, false) => load(buf, var(o)),
            (_, true) => load4(buf, add(var(o), mul(j, int(s as i64)))),
            (_, false) => load(buf, add(var(o), mul(j, int(s as i64)))),
        }
    };
    let row: Vec<Stmt> = {
        let head = vec![let_(oa, off(&sa, last)), let_(ob, off(&sb, last)), let_(oo, off(&st_o, last))];
        let lp = if vectorisable {
            vec_loop(&mut vars, int(0), int(so[last] as i64), &|j, v, _| {
                vec![store(
                    2,
                    add(var(oo), j.clone()),
                    bin(op, operand(0, oa, sa[last], j.clone(), v), operand(1, ob, sb[last], j, v)),
                )]
            })
        } else {
            let j = idx[last];
            vec![for_(
                j,
                int(0),
                int(so[last] as i64),
                1,
                vec![store(
                    2,
                    add(var(oo), var(j)),
                    bin(op, operand(0, oa, sa[last], var(j), false), operand(1, ob, sb[last], var(j), false)),
                )],
            )]
        };
        [head, lp].concat()
    };
    let mut body = row;
    for d in (1..last).rev() {
        body = vec![for_(idx[d], int(0), int(so[d] as i64), 1, body)];
    }
    let body = vec![for_(idx[0], var(START), var(END), 1, body)];
    kernel(
        format!("{name}_{}_{}", shape_name(a), shape_name(b)),
        vec![buf("a", a.iter().product()), buf("b", b.iter().product()), buf("out", n)],
        so[0],
        n,
        body,
        vars,
    )
}

/// Lowers `op` applied to operands of types `inputs` with result type `out`.
/// `in_place`: a `ScatterRow` may update its cache operand's buffer (the caller has made
/// the result share it).
pub fn lower_op(
    op: &Op,
    inputs: &[&TensorType],
    out: &TensorType,
    in_place: bool,
    target: &Target,
) -> Result<OpKernels, BackendError> {
    let n_out = out.numel();
    let ins = |k: usize| -> Vec<Slot> { (0..k).map(Slot::Input).chain([Slot::Output]).collect() };
    let one = |k: Kernel, slots: Vec<Slot>| Ok(OpKernels { launches: vec![(k, slots)], scratch: vec![] });
    match op {
        Op::Reshape { .. } => Ok(OpKernels::default()),
        Op::Scale { factor } => {
            let fac = *factor;
            one(
                map_kernel(format!("scale_{}", shape_name(&out.shape)), n_out, 1, 1, &move |x, v| {
                    mul(x[0].clone(), cf(fac, v))
                }),
                ins(1),
            )
        }
        Op::Gelu => one(
            map_kernel(format!("gelu_{}", shape_name(&out.shape)), n_out, 1, 20, &|x, v| gelu(x[0].clone(), v)),
            ins(1),
        ),
        Op::Add => one(broadcast_kernel("add", &inputs[0].shape, &inputs[1].shape, &out.shape, BinOp::Add), ins(2)),
        Op::Mul => one(broadcast_kernel("mul", &inputs[0].shape, &inputs[1].shape, &out.shape, BinOp::Mul), ins(2)),
        Op::Linear => {
            let k = inputs[1].shape[1];
            let n = inputs[1].shape[0];
            let m = inputs[0].numel() / k;
            let bias = inputs.len() == 3;
            let name = format!("linear_{m}x{n}x{k}{}", if bias { "_bias" } else { "" });
            one(dot_kernel(name, 1, m, n, k, 0, 0, bias, Epilogue::default(), target), ins(inputs.len()))
        }
        Op::MatMul { transpose_b: true } => {
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let n = inputs[1].shape[1];
            one(
                dot_kernel(
                    format!("matmul_nt_{b}x{m}x{n}x{k}"),
                    b,
                    m,
                    n,
                    k,
                    m * k,
                    n * k,
                    false,
                    Epilogue::default(),
                    target,
                ),
                ins(2),
            )
        }
        Op::MatMul { transpose_b: false } => {
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let n = inputs[1].shape[2];
            one(axpy_matmul_kernel(format!("matmul_nn_{b}x{m}x{k}x{n}"), b, m, k, n), ins(2))
        }
        Op::Softmax => {
            let d = *out.shape.last().unwrap();
            one(softmax_kernel(n_out / d, d, false), ins(1))
        }
        Op::LayerNorm { eps } => {
            let d = *out.shape.last().unwrap();
            one(layer_norm_kernel(n_out / d, d, *eps, inputs.len() == 3), ins(inputs.len()))
        }
        Op::FusedLinear { gelu, residual } => {
            let (n, k) = (inputs[1].shape[0], inputs[1].shape[1]);
            let m = inputs[0].numel() / k;
            let name = format!(
                "linear_{m}x{n}x{k}_bias{}{}",
                if *gelu { "_gelu" } else { "" },
                if *residual { "_residual" } else { "" }
            );
            let ep = Epilogue { gelu: *gelu, residual: *residual };
            one(dot_kernel(name, 1, m, n, k, 0, 0, true, ep, target), ins(inputs.len()))
        }
        Op::MaskedSoftmax => {
            let d = *out.shape.last().unwrap();
            let m = &inputs[1].shape;
            if m.last() != Some(&d) || m[..m.len() - 1].iter().any(|&e| e != 1) {
                return Err(BackendError(format!(
                    "masked softmax: the mask {:?} must vary along the last axis only",
                    inputs[1].shape
                )));
            }
            one(softmax_kernel(n_out / d, d, true), ins(2))
        }
        Op::RowScale => {
            let k = *inputs[0].shape.last().unwrap();
            one(row_scale_kernel(n_out, k), ins(1))
        }
        Op::Im2col { kernel: kw, stride, padding } => {
            let (cin, t) = (inputs[0].shape[0], inputs[0].shape[1]);
            one(im2col_kernel(cin, t, *kw, *stride, *padding, out.shape[0]), ins(1))
        }
        Op::SoftmaxScale => {
            let k = *inputs[0].shape.last().unwrap();
            one(softmax_scale_kernel(n_out, k), ins(1))
        }
        Op::SoftmaxQuantize => {
            let k = *inputs[0].shape.last().unwrap();
            one(softmax_quantize_kernel(n_out / k, k), ins(1))
        }
        Op::Quantize { dtype } => {
            let k = *inputs[0].shape.last().unwrap();
            one(quantize_kernel(n_out / k, k, inputs[1].numel() != 1, *dtype), ins(2))
        }
        Op::QLinear { gelu, residual } => {
            let (n, k) = (inputs[2].shape[0], inputs[2].shape[1]);
            let m = inputs[0].numel() / k;
            let name = format!(
                "qlinear_{m}x{n}x{k}{}{}{}",
                if inputs[1].numel() == 1 && m > 1 { "_static" } else { "" },
                if *gelu { "_gelu" } else { "" },
                if *residual { "_residual" } else { "" }
            );
            let epilogue = Epilogue { gelu: *gelu, residual: *residual };
            let q = QDot { batch: 1, m, n, k, row_scales: inputs[1].numel() != 1, bias: true, epilogue };
            one(qdot_kernel(name, q, target), ins(inputs.len()))
        }
        Op::QMatMul => {
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let n = inputs[2].shape[1];
            let row_scales = inputs[1].numel() != 1;
            let q = QDot { batch: b, m, n, k, row_scales, bias: false, epilogue: Epilogue::default() };
            let name = format!("qmatmul_{b}x{m}x{n}x{k}{}", if row_scales { "" } else { "_static" });
            one(qdot_kernel(name, q, target), ins(5))
        }
        Op::QAttention => {
            let (b, m, k) = (inputs[0].shape[0], inputs[0].shape[1], inputs[0].shape[2]);
            let (n, e) = (inputs[2].shape[1], inputs[5].shape[1]);
            let row_scales = inputs[1].numel() != 1;
            let name = format!("qattention_{b}x{m}x{n}x{k}x{e}{}", if row_scales { "" } else { "_static" });
            if m < QATTN_MIN_ROWS {
                // A decoder step's few rows: the products and the softmax apart, through
                // scratch. Their cost is reading K and V once, which the products split
                // over keys and columns (more tasks than heads × row blocks), and the keys
                // are not worth packing for so few rows.
                let q = |m, n, k, row_scales| QDot {
                    batch: b,
                    m,
                    n,
                    k,
                    row_scales,
                    bias: false,
                    epilogue: Epilogue::default(),
                };
                let rows = b * m;
                let (scores, scale, p) = (Slot::Scratch(0), Slot::Scratch(1), Slot::Scratch(2));
                let launches = vec![
                    (
                        qdot_kernel(format!("qmatmul_{b}x{m}x{n}x{k}"), q(m, n, k, row_scales), target),
                        [(0..5).map(Slot::Input).collect(), vec![scores]].concat(),
                    ),
                    (softmax_scale_kernel(rows, n), vec![scores, scale]),
                    (softmax_quantize_kernel(rows, n), vec![scores, p]),
                    (
                        qdot_kernel(format!("qmatmul_{b}x{m}x{e}x{n}"), q(m, e, n, true), target),
                        vec![p, scale, Slot::Input(5), Slot::Input(6), Slot::Input(7), Slot::Output],
                    ),
                ];
                return Ok(OpKernels { launches, scratch: vec![rows * n * 4, rows * 4, rows * n] });
            }
            // Pack Q and K into scratch for the outer-product scores, then the attention.
            let (qb, kp) = (Slot::Scratch(0), Slot::Scratch(1));
            let k4 = k.div_ceil(4);
            let attn = qattention_kernel(name, QAttn { batch: b, m, n, k, e, row_scales });
            let slots = [(0..8).map(Slot::Input).collect(), vec![qb, kp, Slot::Output]].concat();
            Ok(OpKernels {
                launches: vec![
                    (qattention_pack_q(b * m, k), vec![Slot::Input(0), qb]),
                    (qattention_pack_k(b, n, k), vec![Slot::Input(2), kp]),
                    (attn, slots),
                ],
                scratch: vec![b * m * k4 * 16, b * n.div_ceil(4) * k4 * 16],
            })
        }
        Op::RowSum => {
            let k = *inputs[0].shape.last().unwrap();
            one(row_sum_kernel(n_out, k), ins(1))
        }
        Op::Fill { .. } => Err(BackendError("fill is a constant: it is evaluated at compile time, not run".into())),
        Op::Concat { .. } => Err(BackendError(
            "concat of activations is not lowered (only weights are concatenated, at compile time)".into(),
        )),
        Op::Transpose { perm } => {
            let st = strides(&inputs[0].shape);
            let s: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            let name = format!("transpose_{}_{}", shape_name(&inputs[0].shape), shape_name(perm));
            one(strided_copy_kernel(name, inputs[0].numel(), &out.shape, &s, 0), ins(1))
        }
        Op::Slice { axis, start, .. } => {
            let st = strides(&inputs[0].shape);
            let name = format!("slice_{}_{axis}_{start}_{}", shape_name(&inputs[0].shape), shape_name(&out.shape));
            one(strided_copy_kernel(name, inputs[0].numel(), &out.shape, &st, start * st[*axis]), ins(1))
        }
        Op::Gather if inputs.len() == 3 => {
            // From an int8 table: each element widened, converted and scaled by its row's scale.
            let (v, d) = (inputs[0].shape[0], inputs[0].shape[1]);
            let n = inputs[1].shape[0];
            let mut vars = Vars::new();
            let (r, id, sc, j) = (vars.next(), vars.next(), vars.next(), vars.next());
            let body = vec![for_(
                r,
                var(START),
                var(END),
                1,
                vec![
                    // Clamped: an out-of-range id must not read outside the table.
                    let_(id, min(max(load_i(1, var(r)), int(0)), int(v as i64 - 1))),
                    let_(sc, load(2, var(id))),
                    for_(
                        j,
                        int(0),
                        int(d as i64),
                        1,
                        vec![store(
                            3,
                            add(mul(var(r), int(d as i64)), var(j)),
                            mul(cvt(Ty::F32, load_i(0, add(mul(var(id), int(d as i64)), var(j)))), var(sc)),
                        )],
                    ),
                ],
            )];
            one(
                kernel(
                    format!("gather_i8_{v}x{d}_{n}"),
                    vec![tbuf("table", Elem::I8, v * d), ibuf("ids", n), buf("scales", v), buf("out", n * d)],
                    n,
                    0,
                    body,
                    vars,
                ),
                ins(3),
            )
        }
        Op::Gather => {
            let (v, d) = (inputs[0].shape[0], inputs[0].shape[1]);
            let n = inputs[1].shape[0];
            let mut vars = Vars::new();
            let (r, id, src, dst) = (vars.next(), vars.next(), vars.next(), vars.next());
            let copy = vec_loop(&mut vars, int(0), int(d as i64), &|j, vv, _| {
                let x = if vv { load4(0, add(var(src), j.clone())) } else { load(0, add(var(src), j.clone())) };
                vec![store(2, add(var(dst), j), x)]
            });
            let body = vec![for_(
                r,
                var(START),
                var(END),
                1,
                [
                    // Clamped: an out-of-range id must not read outside the table.
                    vec![
                        let_(id, min(max(load_i(1, var(r)), int(0)), int(v as i64 - 1))),
                        let_(src, mul(var(id), int(d as i64))),
                        let_(dst, mul(var(r), int(d as i64))),
                    ],
                    copy,
                ]
                .concat(),
            )];
            one(
                kernel(
                    format!("gather_{v}x{d}_{n}"),
                    vec![buf("table", v * d), ibuf("ids", n), buf("out", n * d)],
                    n,
                    0,
                    body,
                    vars,
                ),
                ins(2),
            )
        }
        Op::ScatterRow if inputs.len() == 4 => beam_scatter_row(&inputs[0].shape, in_place),
        Op::ScatterRow => {
            // Rows `pos..pos + m` of the cache become `rows` (m = 1 for a step, more for a
            // prefilled prompt); the index is clamped so the rows always fit.
            let (s, d) = (inputs[0].shape[0], inputs[0].shape[1]);
            let m = inputs[2].shape[0];
            let (m_, d_) = (m as i64, d as i64);
            let name = |what: &str| if m == 1 { format!("{what}_{s}x{d}") } else { format!("{what}_{m}x{s}x{d}") };
            let buffers = vec![buf("cache", s * d), ibuf("index", 1), buf("row", m * d), buf("out", s * d)];
            let mut vars = Vars::new();
            let (r, pos) = (vars.next(), vars.next());
            let pos_e = min(max(load_i(1, int(0)), int(0)), int((s - m) as i64));
            if in_place {
                let i = vars.next();
                let row = vec_loop(&mut vars, int(0), int(d_), &|j, vv, _| {
                    let from = add(mul(var(i), int(d_)), j.clone());
                    let x = if vv { load4(2, from) } else { load(2, from) };
                    vec![store(3, add(mul(add(var(pos), var(i)), int(d_)), j), x)]
                });
                let rows = vec![for_(i, int(0), int(m_), 1, row)];
                let body = vec![for_(r, var(START), var(END), 1, [vec![let_(pos, pos_e)], rows].concat())];
                let k = kernel(name("scatter_row_in_place"), buffers, 1, 0, body, vars);
                return one(k, ins(3));
            }
            // Row r of the result: rows[r - pos] if that is a row of `rows` (its index clamped
            // into them equals it), else the cache's own row r.
            let (off, idx) = (vars.next(), vars.next());
            let copy = vec_loop(&mut vars, int(0), int(d_), &|j, vv, _| {
                let new_at = add(mul(var(idx), int(d_)), j.clone());
                let old_at = add(mul(var(r), int(d_)), j.clone());
                let (new, old) =
                    if vv { (load4(2, new_at), load4(0, old_at)) } else { (load(2, new_at), load(0, old_at)) };
                vec![store(3, add(mul(var(r), int(d_)), j), select(CmpOp::Eq, var(off), var(idx), new, old))]
            });
            let head = vec![
                let_(pos, pos_e),
                let_(off, sub(var(r), var(pos))),
                let_(idx, min(max(var(off), int(0)), int(m_ - 1))),
            ];
            let body = vec![for_(r, var(START), var(END), 1, [head, copy].concat())];
            let k = kernel(name("scatter_row"), buffers, s, 0, body, vars);
            one(k, ins(3))
        }
        Op::CacheAttention { heads } if inputs[1].rank() == 3 => {
            let (b, s) = (inputs[1].shape[0], inputs[1].shape[1]);
            let dh = inputs[0].shape[1] / heads;
            let k = cache_attention_kernel(b, 1, s, *heads, dh)?;
            let slots = [ins(4), vec![Slot::Scratch(0)]].concat();
            Ok(OpKernels { launches: vec![(k, slots)], scratch: vec![b * heads * s * 4] })
        }
        Op::CacheAttention { heads } => {
            let (m, s) = (inputs[0].shape[0], inputs[1].shape[0]);
            let dh = inputs[0].shape[1] / heads;
            let k = cache_attention_kernel(1, m, s, *heads, dh)?;
            let slots = [ins(4), vec![Slot::Scratch(0)]].concat();
            Ok(OpKernels { launches: vec![(k, slots)], scratch: vec![heads * s * 4] })
        }
        Op::CausalMask { len } => {
            let mut vars = Vars::new();
            let (r, pos, j) = (vars.next(), vars.next(), vars.next());
            let body = vec![for_(
                r,
                var(START),
                var(END),
                1,
                vec![
                    let_(pos, load_i(0, int(0))),
                    for_(
                        j,
                        int(0),
                        int(*len as i64),
                        1,
                        vec![store(1, var(j), select(CmpOp::Le, var(j), var(pos), f(0.0), f(f32::NEG_INFINITY)))],
                    ),
                ],
            )];
            one(
                kernel(format!("causal_mask_{len}"), vec![ibuf("position", 1), buf("out", *len)], 1, 0, body, vars),
                ins(1),
            )
        }
        Op::Conv1d { stride, padding } => {
            let (cin, t) = (inputs[0].shape[0], inputs[0].shape[1]);
            let (cout, kw) = (inputs[1].shape[0], inputs[1].shape[2]);
            let tout = out.shape[1];
            let ck = cin * kw;
            let im2col = im2col_kernel(cin, t, kw, *stride, *padding, tout);
            let mm = dot_kernel(
                format!("linear_{tout}x{cout}x{ck}_bias"),
                1,
                tout,
                cout,
                ck,
                0,
                0,
                true,
                Epilogue::default(),
                target,
            );
            let tr =
                strided_copy_kernel(format!("transpose_{tout}x{cout}_1x0"), tout * cout, &[cout, tout], &[1, cout], 0);
            Ok(OpKernels {
                launches: vec![
                    (im2col, vec![Slot::Input(0), Slot::Scratch(0)]),
                    (mm, vec![Slot::Scratch(0), Slot::Input(1), Slot::Input(2), Slot::Scratch(1)]),
                    (tr, vec![Slot::Scratch(1), Slot::Output]),
                ],
                scratch: vec![4 * tout * ck, 4 * tout * cout],
            })
        }
    }
}
