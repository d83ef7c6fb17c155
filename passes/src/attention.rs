//! `attention`: the decoder's self-attention over its key/value cache becomes one
//! `cache_attention` op.
//!
//! The frontend writes one decoding step's self-attention the way the model card does: the
//! cache `[S, D]` (one row per position, heads side by side) is reshaped to `[S, H, dh]` and
//! transposed to `[H, S, dh]` for K and for V, the scores `q·Kᵀ` get the causal mask of the
//! step added, a softmax, the product with V, and the result is transposed and reshaped back
//! to `[1, D]`:
//!
//! ```text
//! ctx = reshape[1,D](transpose[1,0,2](matmul(masked_softmax(matmul_t(
//!         transpose[1,0,2](reshape[1,H,dh](q)), transpose[1,0,2](reshape[S,H,dh](k))),
//!         causal_mask{len=S}(p)), transpose[1,0,2](reshape[S,H,dh](v)))))
//! ```
//!
//! (`add` + `softmax` in place of `masked_softmax` when `fuse` has not run). Run as kernels,
//! that copies both caches into head-major order at every step (twice `S·D` floats per layer,
//! whatever the step) and computes `S` scores per head of which only `p + 1` survive the mask.
//! The rewrite replaces the whole subgraph by `cache_attention{heads=H}(q, k, v, p)`, which
//! reads the caches in their stored layout and only rows `0..=p`.
//!
//! Sound because it is the op's definition: head `h` of `q` is columns `h·dh..(h+1)·dh`, the
//! same columns of cache row `t` are the head's key/value `t` (that is what the reshape and
//! transpose select), and a mask of `-inf` after column `p` gives those columns probability
//! exactly 0 (`exp(-inf) = 0`), so dropping them changes neither the softmax's sum nor the
//! weighted sum of V. Only a single query row is matched (the causal mask is one row, which
//! `cache_attention` assigns to position `p`). Nodes left without users are removed.

use wcc_ir::{Graph, Module, Node, Op, ValueId};

use crate::{producer, rewrite_sites, PassError};

pub fn attention(m: Module) -> Result<Module, PassError> {
    Ok(rewrite_sites(m, |g, node, _| match_site(g, node).map(|(heads, inputs)| (Op::CacheAttention { heads }, inputs))))
}

/// `transpose[1,0,2](reshape[rows,H,dh](x))` with `x` of shape `[rows, H·dh]`: `x` and
/// `(rows, H, dh)`.
fn split_heads(g: &Graph, v: ValueId) -> Option<(ValueId, [usize; 3])> {
    let t = producer(g, v)?;
    if !matches!(&t.op, Op::Transpose { perm } if perm == &[1, 0, 2]) {
        return None;
    }
    let r = producer(g, t.inputs[0])?;
    let Op::Reshape { shape } = &r.op else { return None };
    let x = r.inputs[0];
    let xs = &g.ty(x).shape;
    if shape.len() != 3 || xs.len() != 2 || xs[0] != shape[0] || xs[1] != shape[1] * shape[2] {
        return None;
    }
    Some((x, [shape[0], shape[1], shape[2]]))
}

/// The operands `(q, k, v, position)` and the head count if `node` ends a self-attention
/// site (see the module comment).
fn match_site(g: &Graph, node: &Node) -> Option<(usize, Vec<ValueId>)> {
    let Op::Reshape { shape } = &node.op else { return None };
    let t = producer(g, node.inputs[0])?;
    if !matches!(&t.op, Op::Transpose { perm } if perm == &[1, 0, 2]) {
        return None;
    }
    let pv = producer(g, t.inputs[0])?;
    if pv.op != (Op::MatMul { transpose_b: false }) {
        return None;
    }
    let probs = producer(g, pv.inputs[0])?;
    let (scores, mask) = match probs.op {
        Op::MaskedSoftmax => (probs.inputs[0], probs.inputs[1]),
        Op::Softmax => {
            let a = producer(g, probs.inputs[0])?;
            if a.op != Op::Add {
                return None;
            }
            (a.inputs[0], a.inputs[1])
        }
        _ => return None,
    };
    let mask = producer(g, mask)?;
    let Op::CausalMask { len } = mask.op else { return None };
    let position = mask.inputs[0];
    let qk = producer(g, scores)?;
    if qk.op != (Op::MatMul { transpose_b: true }) {
        return None;
    }
    let (q, [m, heads, dh]) = split_heads(g, qk.inputs[0])?;
    let (k, [s, kh, kdh]) = split_heads(g, qk.inputs[1])?;
    let (v, [vs, vh, vdh]) = split_heads(g, pv.inputs[1])?;
    let d = heads * dh;
    let ok = m == 1
        && shape == &[1, d]
        && (s, kh, kdh) == (len, heads, dh)
        && (vs, vh, vdh) == (len, heads, dh)
        && [q, k, v].iter().all(|&x| g.ty(x).dtype.is_float());
    ok.then(|| (heads, vec![q, k, v, position]))
}
