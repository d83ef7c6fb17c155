//! `flash`: an int8 attention (`--int8`) becomes one `qattention` op, so the backend can run
//! it block by block without ever storing the score matrix.
//!
//! After `quantize`, the encoder's self-attention of every head is
//!
//! ```text
//! %s       = qmatmul(%q.q, %q.scale, %k.q, %k.scale, %k.sum)      f32[H, T, T]
//! %p.scale = softmax_scale(%s)                                    f32[H·T]
//! %p.q     = softmax_quantize(%s)                                 u8[H, T, T]
//! %ctx     = qmatmul(%p.q, %p.scale, %vt.q, %vt.scale, %vt.sum)   f32[H, T, dh]
//! ```
//!
//! Run as four kernels, the `T×T` scores go to memory once and are read back four times
//! (a row's maximum by each softmax kernel, the exponentials by each), and the quantized
//! probabilities are written and read again: at 30 s that is 72 MB of scores per layer of
//! base, more than the layer's weights and activations together. The rewrite replaces the
//! four nodes by `qattention(%q.q, %q.scale, %k.q, %k.scale, %k.sum, %vt.q, %vt.scale,
//! %vt.sum)`, whose kernel computes a few query rows' scores, their softmax and their
//! product with V while the rows are still in L1.
//!
//! Sound because it is the op's definition (see `Op::QAttention`): the same two products and
//! the same quantized softmax between them. Matched only when nothing else reads the scores
//! or the quantized probabilities (then no intermediate is lost) and none of them is a
//! graph output. Nodes left without users are removed.

use wcc_ir::{Graph, Module, Node, Op, ValueId};

use crate::{producer, rewrite_sites, PassError};

pub fn flash(m: Module) -> Result<Module, PassError> {
    Ok(rewrite_sites(m, |g, node, uses| match_site(g, node, uses).map(|inputs| (Op::QAttention, inputs))))
}

/// The eight operands of `qattention` if `node` is the second product of an int8 attention
/// whose intermediates nothing else reads (see the module comment).
fn match_site(g: &Graph, node: &Node, uses: &[usize]) -> Option<Vec<ValueId>> {
    if node.op != Op::QMatMul {
        return None;
    }
    let (p, ps) = (node.inputs[0], node.inputs[1]);
    let pq = producer(g, p)?;
    let psc = producer(g, ps)?;
    if pq.op != Op::SoftmaxQuantize || psc.op != Op::SoftmaxScale || pq.inputs[0] != psc.inputs[0] {
        return None;
    }
    let s = pq.inputs[0];
    let qk = producer(g, s)?;
    if qk.op != Op::QMatMul {
        return None;
    }
    // Graph outputs count as uses: an intermediate that is returned is not private.
    let private = |v: ValueId, n: usize| uses[v.index()] == n;
    if !(private(s, 2) && private(p, 1) && private(ps, 1)) {
        return None;
    }
    Some([&qk.inputs[..], &node.inputs[2..]].concat())
}
