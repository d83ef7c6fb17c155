//! `quantize`: int8 linear layers with dynamic per-row activation scales (`--int8`).
//!
//! Every `linear` / `fused_linear` whose weight is a constant (a weight, or a value computed
//! from weights alone such as fold's merged QKV) and whose input is computed at run time
//! becomes
//!
//! ```text
//! %x.scale = row_scale(%x)                       f32[rows]   run time, per token
//! %x.q     = quantize{dtype=u8}(%x, %x.scale)    u8[.., K]   zero point 128
//! %w.scale = row_scale(%w)                       f32[N]      constant: one scale per output channel
//! %w.q     = quantize{dtype=i8}(%w, %w.scale)    i8[N, K]    constant, symmetric
//! %w.sum   = row_sum(%w.q)                       i32[N]      constant: the zero-point correction
//! %y       = qlinear{gelu,residual}(%x.q, %x.scale, %w.q, %w.scale, %w.sum, %b [, %r])
//! ```
//!
//! The weight-side nodes depend on weights alone, so the backend evaluates them at compile
//! time and stores only `%w.q` (int8), `%w.scale` and `%w.sum`; the f32 weight is no longer
//! read by any kernel and is not stored. Activations sharing one input (several layers
//! reading the same `%x`) are quantized once, and so are weights read by several layers.
//!
//! A `gather` from a constant table (the token embedding, which Whisper ties to the logits
//! projection) reads the same int8 rows and scales, dequantized on lookup:
//! `gather(%w.q, %ids, %w.scale)`. Sound for the same reason: each row is its int8
//! approximation.
//!
//! With `--int8-static`, the activations the encoder's linear layers read get one scale each,
//! calibrated on audio (`fill` constants stored in the artifact, no per-row scaling of them at
//! run time); the calibration build itself is this pass in observe mode, which quantizes
//! nothing and outputs each activation's row scales instead. Two kinds keep run-time scales,
//! because one scale for the whole tensor cost base its transcripts on the dev set (a clip
//! loops): attention's Q and P (one scale across heads and frames), and a decoder step's
//! single row (whose row scale is already one scale for the tensor).
//!
//! The encoder's attention products, `matmul` of two run-time values (Q·Kᵀ, and P·V with V
//! transposed so both operands are read along the reduction), become `qmatmul` the same
//! way, with the second operand quantized per row at run time (per key for K, per channel
//! for V) and its row sums computed by a `row_sum` kernel.
//!
//! A `conv1d` with constant weights is its product with `--int8`: `im2col` of the input
//! (one row of `C_in·K` values per output frame), quantized per row, times the kernel
//! flattened to `[C_out, C_in·K]` and quantized per output channel, as a `qlinear` with the
//! bias, transposed back to `[C_out, T_out]`. Sound because a 1-D convolution is exactly
//! that product (see `im2col`); the error is the same per-row / per-channel rounding as any
//! linear layer's. Static builds give its columns the calibrated scale of its input (the
//! columns hold the input's values and padding zeros, so they share its range).
//!
//! A product's first operand that is a softmax read by nothing else (attention's P) is
//! quantized from the scores, `%p.scale = softmax_scale(%s)`, `%p.q = softmax_quantize(%s)`,
//! and the softmax itself goes: the probabilities are never written as f32. Sound because
//! the pair equals `row_scale` and `quantize{dtype=u8}` of `softmax(%s)` in exact arithmetic
//! (see the ops); the scaled exponentials are rounded once instead of after a division.
//!
//! Why it is sound: `qlinear` computes `Σ_k (xq−128)·wq · xs·ws + b`, and `(xq−128)·xs` and
//! `wq·ws` are the round-to-nearest int8 approximations of `x` and `w` (relative error at
//! most half a step of 1/127 of the row's or channel's largest magnitude). So the result is
//! the same linear layer up to that quantization error, and the epilogue (bias, GELU,
//! residual) is unchanged. Which layers may carry that error is a policy: `--keep-float`
//! patterns name the layers (by the result's value name, or the weight's name) that stay in
//! f32.

use std::collections::HashSet;

use wcc_ir::{DType, Graph, Module, Op, ValueDef, ValueId};

use crate::{ActivationScales, PassError, PassOptions};

const NAME: &str = "quantize";

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed { pass: NAME, msg: msg.into() }
}

/// The layers `--int8` keeps in f32 unless `--keep-float` says otherwise, each with the
/// reason: `(pattern, why)`. Chosen from `wcc quantize-report` (README, int8 section).
pub const DEFAULT_KEEP_FLOAT: &[(&str, &str)] = &[];

/// Gathers from tables with at least this many rows (a vocabulary, not the 448 positional
/// embeddings, which are small and stay f32) read an int8 table.
const VOCAB_MIN_ROWS: usize = 4096;

/// Products of two run-time values (attention's Q·Kᵀ and P·V) become int8 when they have
/// at least this many rows (the encoder's: one row per audio frame), or when their second
/// operand is the same at every decoder step (cross-attention's K and V); not the decoder's
/// self-attention, where quantizing the whole cache per token would cost more than the
/// product.
const MATMUL_MIN_ROWS: usize = 16;

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Which values depend on weights alone.
fn constants(g: &Graph) -> Vec<bool> {
    let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, ValueDef::Weight(_))).collect();
    for n in &g.nodes {
        konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
    }
    konst
}

pub fn quantize(mut m: Module, options: &PassOptions) -> Result<Module, PassError> {
    if !options.int8 {
        return Ok(m);
    }
    // Values a decoder step reads from the encoder (by name: the graphs connect that way).
    let from_encoder: HashSet<String> = match m.graph("encoder") {
        Some(e) => e.outputs.iter().map(|&o| e.value(o).name.clone()).collect(),
        None => HashSet::new(),
    };
    for g in &mut m.graphs {
        let name = g.name.clone();
        let keep: Vec<String> = match &options.keep_float {
            Some(list) => list.clone(),
            None => DEFAULT_KEEP_FLOAT.iter().map(|(p, _)| p.to_string()).collect(),
        };
        let fed = if name == "encoder" { HashSet::new() } else { from_encoder.clone() };
        // Calibrated scales are the encoder's: a decoder step, of one token or of a beam's
        // few hypotheses, scales each row at run time (see `quantize_graph`).
        let scales = match &options.scales {
            ActivationScales::Static(_) if name != "encoder" => &ActivationScales::Dynamic,
            s => s,
        };
        *g = quantize_graph(g, &keep, scales, &fed).map_err(|e| fail(format!("graph `{name}`: {e}")))?;
    }
    // The int8 copies of the cross-attention K and V depend on the encoder's outputs alone:
    // computed once per window in the encoder, not once per token.
    if m.graph("encoder").is_some() && m.graph("decoder_step").is_some() {
        m = crate::hoist_cross_kv(m).map_err(|e| fail(e.to_string()))?;
    }
    Ok(m)
}

/// The names a `--keep-float` pattern is matched against: the layer's result, and its
/// weight when the weight is a checkpoint tensor.
fn layer_names(g: &Graph, output: ValueId, weight: ValueId) -> Vec<String> {
    let mut names = vec![g.value(output).name.clone()];
    if let ValueDef::Weight(w) = &g.value(weight).def {
        names.push(w.clone());
    }
    names
}

fn quantize_graph(
    g: &Graph,
    keep_float: &[String],
    scales: &ActivationScales,
    from_encoder: &HashSet<String>,
) -> Result<Graph, String> {
    let konst = constants(g);
    let uses = g.use_counts();
    // Values the same at every decoder step of a window (weights and encoder outputs only).
    let mut invariant: Vec<bool> = g
        .values
        .iter()
        .map(|v| {
            matches!(v.def, ValueDef::Weight(_))
                || (matches!(v.def, ValueDef::Input(_)) && from_encoder.contains(&v.name))
        })
        .collect();
    for n in &g.nodes {
        invariant[n.output.index()] = n.inputs.iter().all(|i| invariant[i.index()]);
    }
    // Rebuild the graph node by node, replacing the quantizable layers.
    let mut out = Graph::new(g.name.clone());
    let mut map: Vec<Option<ValueId>> = vec![None; g.values.len()];
    for &i in &g.inputs {
        let v = g.value(i);
        map[i.index()] = Some(out.add_input(v.name.clone(), v.ty.clone()));
    }
    let weight = |out: &mut Graph, map: &mut Vec<Option<ValueId>>, v: ValueId| -> ValueId {
        if let Some(id) = map[v.index()] {
            return id;
        }
        let val = g.value(v);
        let ValueDef::Weight(w) = &val.def else { unreachable!("only weights are unmapped") };
        let id = out.add_weight_value(w.clone(), val.ty.clone());
        map[v.index()] = Some(id);
        id
    };
    // Quantized activations, shared by the layers that read the same value; quantized
    // constants (scale, int8 values), shared by the layers that read the same weight (the
    // token embedding and the tied logits projection), so each is stored once.
    let mut quantized: Vec<Option<(ValueId, ValueId)>> = vec![None; g.values.len()];
    let mut weights_q: Vec<Option<(ValueId, ValueId)>> = vec![None; g.values.len()];
    let quantize_activation = |out: &mut Graph,
                               quantized: &mut Vec<Option<(ValueId, ValueId)>>,
                               x: ValueId,
                               mapped: ValueId,
                               may_be_static: bool|
     -> Result<(ValueId, ValueId), String> {
        if let Some(q) = quantized[x.index()] {
            return Ok(q);
        }
        let base = &g.value(x).name;
        // Static scales serve activations of many rows (the encoder's frames). A decoder
        // step's single row is scaled dynamically: its per-row scale is already one scale for
        // the tensor, and token-by-token ranges are what a few calibration windows cover worst
        // (measured: base loops on a dev clip with calibrated decoder scales).
        let many_rows = g.ty(x).numel() / g.ty(x).shape.last().copied().unwrap_or(1).max(1) > 1;
        let xs = match scales {
            ActivationScales::Static(s) if may_be_static && many_rows && s.contains_key(base) => {
                out.add_node(format!("{base}.scale"), Op::Fill { value: s[base] }, &[])?
            }
            _ => out.add_node(format!("{base}.scale"), Op::RowScale, &[mapped])?,
        };
        let xq = out.add_node(format!("{base}.q"), Op::Quantize { dtype: DType::U8 }, &[mapped, xs])?;
        quantized[x.index()] = Some((xq, xs));
        Ok((xq, xs))
    };
    // Observation (the calibration build of `--int8-static`): the row scales of every
    // activation that would be quantized, as graph outputs.
    let observing = *scales == ActivationScales::Observe;
    let mut observed: Vec<Option<ValueId>> = vec![None; g.values.len()];
    let observe = |out: &mut Graph, observed: &mut Vec<Option<ValueId>>, x: ValueId, mapped: ValueId| {
        if observed[x.index()].is_none() {
            let s = out.add_node(format!("{}.scale", g.value(x).name), Op::RowScale, &[mapped])?;
            observed[x.index()] = Some(s);
        }
        Ok::<(), String>(())
    };
    let mut quantize_weight = |out: &mut Graph, w: ValueId, mapped: ValueId| -> Result<(ValueId, ValueId), String> {
        if let Some(q) = weights_q[w.index()] {
            return Ok(q);
        }
        let base = &g.value(w).name;
        let ws = out.add_node(format!("{base}.w_scale"), Op::RowScale, &[mapped])?;
        let wq = out.add_node(format!("{base}.w_q"), Op::Quantize { dtype: DType::I8 }, &[mapped, ws])?;
        weights_q[w.index()] = Some((ws, wq));
        Ok((ws, wq))
    };
    for node in &g.nodes {
        let mut ins = Vec::with_capacity(node.inputs.len());
        for &i in &node.inputs {
            ins.push(weight(&mut out, &mut map, i));
        }
        let name = g.value(node.output).name.clone();
        let (gelu, residual) = match node.op {
            Op::Linear => (false, false),
            Op::FusedLinear { gelu, residual } => (gelu, residual),
            _ => (false, false),
        };
        if matches!(node.op, Op::Gather)
            && !observing
            && node.inputs.len() == 2
            && konst[node.inputs[0].index()]
            && !layer_names(g, node.output, node.inputs[0]).iter().any(|n| keep_float.iter().any(|p| glob_match(p, n)))
            && g.ty(node.inputs[0]).shape[0] >= VOCAB_MIN_ROWS
        {
            // A vocabulary's embedding table: int8 rows, dequantized on lookup.
            let (ws, wq) = quantize_weight(&mut out, node.inputs[0], ins[0])?;
            let id = out.add_node(name, Op::Gather, &[wq, ins[1], ws])?;
            map[node.output.index()] = Some(id);
            continue;
        }
        if let Op::MatMul { transpose_b } = node.op {
            let (a, b) = (node.inputs[0], node.inputs[1]);
            let rows = g.ty(a).shape[1];
            let keep = layer_names(g, node.output, b).iter().any(|n| keep_float.iter().any(|p| glob_match(p, n)));
            // The encoder's products, and the decoder's cross-attention, whose K and V are
            // quantized once per window (hoisted into the encoder below).
            let worth = rows >= MATMUL_MIN_ROWS || invariant[b.index()];
            let eligible = !konst[a.index()] && !konst[b.index()] && worth && !keep;
            if eligible && observing {
                observe(&mut out, &mut observed, a, ins[0])?;
            } else if eligible {
                // Attention's Q and P keep per-row scales even in static builds: one scale
                // for every head and frame costs base its transcripts (measured: loops).
                let (aq, asc) = match softmax_of(g, a) {
                    // P = softmax(S) read by this product alone: quantized from the scores.
                    Some(scores) if uses[a.index()] == 1 && quantized[a.index()].is_none() => {
                        let s = map[scores.index()].expect("defined before its uses");
                        let base = &g.value(a).name;
                        let asc = out.add_node(format!("{base}.scale"), Op::SoftmaxScale, &[s])?;
                        let aq = out.add_node(format!("{base}.q"), Op::SoftmaxQuantize, &[s])?;
                        quantized[a.index()] = Some((aq, asc));
                        (aq, asc)
                    }
                    _ => quantize_activation(&mut out, &mut quantized, a, ins[0], false)?,
                };
                // The int8 product reads its second operand as rows along the reduction.
                let bt = if transpose_b {
                    ins[1]
                } else {
                    out.add_node(format!("{name}.b_t"), Op::Transpose { perm: vec![0, 2, 1] }, &[ins[1]])?
                };
                let bs = out.add_node(format!("{name}.b_scale"), Op::RowScale, &[bt])?;
                let bq = out.add_node(format!("{name}.b_q"), Op::Quantize { dtype: DType::I8 }, &[bt, bs])?;
                let bsum = out.add_node(format!("{name}.b_sum"), Op::RowSum, &[bq])?;
                let id = out.add_node(name, Op::QMatMul, &[aq, asc, bq, bs, bsum])?;
                map[node.output.index()] = Some(id);
                continue;
            }
        }
        if let Op::Conv1d { stride, padding } = node.op {
            let (x, w) = (node.inputs[0], node.inputs[1]);
            // Named as the convolution, its weight, or its product (`NAME.frames`, the
            // qlinear the sensitivity report lists).
            let mut names = layer_names(g, node.output, w);
            names.push(format!("{name}.frames"));
            let keep = names.iter().any(|n| keep_float.iter().any(|p| glob_match(p, n)));
            let eligible = !konst[x.index()] && konst[w.index()] && !keep;
            if eligible && observing {
                // The columns hold the input's values (and padding zeros): the input's range
                // is theirs.
                observe(&mut out, &mut observed, x, ins[0])?;
            }
            if eligible && !observing {
                // The convolution as its product: columns (per output frame) quantized per
                // row at run time, the kernel flattened to [C_out, C_in·K] and quantized
                // per output channel, then back to [C_out, T_out].
                let (cout, cin, kw) = (g.ty(w).shape[0], g.ty(w).shape[1], g.ty(w).shape[2]);
                let im2col = Op::Im2col { kernel: kw, stride, padding };
                let cols = out.add_node(format!("{name}.cols"), im2col, &[ins[0]])?;
                let base = &g.value(x).name;
                let xs = match scales {
                    ActivationScales::Static(s) if s.contains_key(base) => {
                        out.add_node(format!("{name}.cols.scale"), Op::Fill { value: s[base] }, &[])?
                    }
                    _ => out.add_node(format!("{name}.cols.scale"), Op::RowScale, &[cols])?,
                };
                let xq = out.add_node(format!("{name}.cols.q"), Op::Quantize { dtype: DType::U8 }, &[cols, xs])?;
                let wr =
                    out.add_node(format!("{name}.w_flat"), Op::Reshape { shape: vec![cout, cin * kw] }, &[ins[1]])?;
                let (ws, wq) = quantize_weight(&mut out, w, wr)?;
                let wsum = out.add_node(format!("{name}.w_sum"), Op::RowSum, &[wq])?;
                let plain = Op::QLinear { gelu: false, residual: false };
                let yt = out.add_node(format!("{name}.frames"), plain, &[xq, xs, wq, ws, wsum, ins[2]])?;
                let id = out.add_node(name, Op::Transpose { perm: vec![1, 0] }, &[yt])?;
                map[node.output.index()] = Some(id);
                continue;
            }
        }
        let is_linear = matches!(node.op, Op::Linear | Op::FusedLinear { .. });
        let (x, w) = (node.inputs[0], *node.inputs.get(1).unwrap_or(&node.inputs[0]));
        let quantizable = is_linear
            && !konst[x.index()]
            && konst[w.index()]
            && !layer_names(g, node.output, w).iter().any(|n| keep_float.iter().any(|p| glob_match(p, n)));
        if quantizable && observing {
            observe(&mut out, &mut observed, x, ins[0])?;
        }
        if !quantizable || observing {
            let id = out.add_node(name, node.op.clone(), &ins)?;
            map[node.output.index()] = Some(id);
            continue;
        }
        let (xq, xs) = quantize_activation(&mut out, &mut quantized, x, ins[0], true)?;
        let (ws, wq) = quantize_weight(&mut out, w, ins[1])?;
        let wsum = out.add_node(format!("{name}.w_sum"), Op::RowSum, &[wq])?;
        let bias = match ins.get(2) {
            Some(&b) => b,
            // No bias: a zero vector, computed from the scales (a constant, like `fold`'s).
            None => out.add_node(format!("{name}.zero_bias"), Op::Scale { factor: 0.0 }, &[ws])?,
        };
        let mut operands = vec![xq, xs, wq, ws, wsum, bias];
        if residual {
            operands.push(ins[3]);
        }
        let id = out.add_node(name, Op::QLinear { gelu, residual }, &operands)?;
        map[node.output.index()] = Some(id);
    }
    out.outputs = g.outputs.iter().map(|o| map[o.index()].expect("outputs are computed")).collect();
    out.outputs.extend(observed.into_iter().flatten());
    // The softmaxes whose probabilities are now quantized from their scores.
    out.remove_dead_nodes();
    Ok(out)
}

/// The scores `s` when `v = softmax(s)`.
fn softmax_of(g: &Graph, v: ValueId) -> Option<ValueId> {
    match g.value(v).def {
        ValueDef::Node(n) if g.nodes[n].op == Op::Softmax => Some(g.nodes[n].inputs[0]),
        _ => None,
    }
}
