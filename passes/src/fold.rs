//! `fold`: algebra on weights, so that less work is left for run time.
//!
//! Three rewrites, in this order, each exact in real arithmetic (results differ from the
//! unfolded graph only by floating-point rounding):
//! 1. **Layer-norm affine into the next linear layers.** `linear(ln(x)·γ + β, W, b)` =
//!    `linear(ln(x), W·diag(γ), b + W·β)`, when every user of the layer norm is a linear
//!    layer reading it as input and owning its weight (a weight that is also used elsewhere,
//!    like the tied token embedding, is left alone so it is not stored twice). The layer norm
//!    keeps no affine part.
//! 2. **Scaling into the projection.** `scale(linear(x, W, b), s)` = `linear(x, s·W, s·b)`,
//!    when the scale is the linear's only user: Whisper's `d_head^-0.25` on q and k.
//! 3. **Merged projections.** Linear layers with constant weights that read the same input —
//!    Q, K and V of self-attention, the hoisted cross-attention K and V of every decoder layer
//!    — become one linear over the concatenated weights, and each former result a slice of
//!    its columns. A member without bias gets zeros (`scale(b, 0)` of a bias of the same
//!    length) in the concatenated bias; if there is none, the group is left as it is.
//!
//! New weights are written as nodes over weights (`mul`, `linear`, `concat`, …): the
//! backend evaluates them once at compile time and the interpreter once at load.

use std::collections::HashMap;

use wcc_ir::{Graph, Module, Op, ValueDef, ValueId};

use crate::PassError;

const NAME: &str = "fold";

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed { pass: NAME, msg: msg.into() }
}

pub fn fold(mut m: Module) -> Result<Module, PassError> {
    for gi in 0..m.graphs.len() {
        let g = fold_layer_norms(&m.graphs[gi])?;
        let g = fold_scales(&g)?;
        let mut g = merge_projections(&constants_first(&g))?;
        g.canonicalize();
        m.graphs[gi] = g;
    }
    Ok(m)
}

/// Which values are computed from weights alone.
fn constants(g: &Graph) -> Vec<bool> {
    let mut c: Vec<bool> = g.values.iter().map(|v| matches!(v.def, ValueDef::Weight(_))).collect();
    for n in &g.nodes {
        c[n.output.index()] = n.inputs.iter().all(|i| c[i.index()]);
    }
    c
}

/// The same graph with every node computed from weights alone moved to the front (in their
/// order): they depend on nothing else, so every later node can use any of them.
fn constants_first(g: &Graph) -> Graph {
    let konst = constants(g);
    let mut out = g.clone();
    let (mut front, back): (Vec<_>, Vec<_>) = g.nodes.iter().cloned().partition(|n| konst[n.output.index()]);
    front.extend(back);
    out.nodes = front;
    for (k, n) in out.nodes.iter().enumerate() {
        out.values[n.output.index()].def = ValueDef::Node(k);
    }
    out
}

/// For each value, the nodes (indices) that read it.
fn users(g: &Graph) -> Vec<Vec<usize>> {
    let mut u = vec![vec![]; g.values.len()];
    for (k, n) in g.nodes.iter().enumerate() {
        for &i in &n.inputs {
            if !u[i.index()].contains(&k) {
                u[i.index()].push(k);
            }
        }
    }
    u
}

/// Copies `g` node by node; `rewrite(k, new graph, map)` may emit replacement nodes for node
/// `k` and return the value that stands for its result (`None`: copy the node as it is).
fn rebuild(
    g: &Graph,
    mut rewrite: impl FnMut(usize, &mut Graph, &[Option<ValueId>]) -> Result<Option<ValueId>, PassError>,
) -> Result<Graph, PassError> {
    let mut out = Graph::new(g.name.clone());
    let mut map: Vec<Option<ValueId>> = vec![None; g.values.len()];
    for &i in &g.inputs {
        let v = g.value(i);
        map[i.index()] = Some(out.add_input(v.name.clone(), v.ty.clone()));
    }
    for (k, v) in g.values.iter().enumerate() {
        if let ValueDef::Weight(_) = v.def {
            map[k] = Some(out.add_weight_value(v.name.clone(), v.ty.clone()));
        }
    }
    for (k, node) in g.nodes.iter().enumerate() {
        let replaced = rewrite(k, &mut out, &map)?;
        let new = match replaced {
            Some(v) => v,
            None => {
                let args: Vec<ValueId> =
                    node.inputs.iter().map(|i| map[i.index()].expect("defined before use")).collect();
                let o = g.value(node.output);
                out.add_node_typed(o.name.clone(), node.op.clone(), &args, o.ty.clone())
            }
        };
        map[node.output.index()] = Some(new);
    }
    out.outputs = g.outputs.iter().map(|o| map[o.index()].expect("outputs defined")).collect();
    Ok(out)
}

fn add(g: &mut Graph, name: String, op: Op, args: &[ValueId]) -> Result<ValueId, PassError> {
    g.add_node(name, op, args).map_err(fail)
}

fn fold_layer_norms(g: &Graph) -> Result<Graph, PassError> {
    let (konst, users) = (constants(g), users(g));
    // Layer norms whose affine part can move into their users: node index → users.
    let mut foldable: HashMap<usize, Vec<usize>> = HashMap::new();
    for (k, n) in g.nodes.iter().enumerate() {
        if !matches!(n.op, Op::LayerNorm { .. }) || n.inputs.len() != 3 || !konst[n.inputs[1].index()] {
            continue;
        }
        if !konst[n.inputs[2].index()] || g.outputs.contains(&n.output) {
            continue;
        }
        let us = &users[n.output.index()];
        let ok = !us.is_empty()
            && us.iter().all(|&u| {
                let l = &g.nodes[u];
                matches!(l.op, Op::Linear)
                    && l.inputs[0] == n.output
                    && l.inputs[1..].iter().all(|w| konst[w.index()] && users[w.index()].len() == 1)
            });
        if ok {
            foldable.insert(k, us.clone());
        }
    }
    let user_of: HashMap<usize, usize> =
        foldable.iter().flat_map(|(&ln, us)| us.iter().map(move |&u| (u, ln))).collect();
    let mut normalized: HashMap<usize, ValueId> = HashMap::new();
    rebuild(g, |k, out, map| {
        let node = &g.nodes[k];
        let name = g.value(node.output).name.clone();
        if foldable.contains_key(&k) {
            let x = map[node.inputs[0].index()].unwrap();
            let v = out.add_node_typed(name, node.op.clone(), &[x], g.ty(node.output).clone());
            normalized.insert(k, v);
            return Ok(Some(v));
        }
        let Some(&ln) = user_of.get(&k) else { return Ok(None) };
        let ln_node = &g.nodes[ln];
        let (gamma, beta) = (map[ln_node.inputs[1].index()].unwrap(), map[ln_node.inputs[2].index()].unwrap());
        let w = map[node.inputs[1].index()].unwrap();
        let (n_out, k_in) = (out.ty(w).shape[0], out.ty(w).shape[1]);
        // W·diag(γ): scale each column of W by γ.
        let w2 = add(out, format!("{name}.w_ln"), Op::Mul, &[w, gamma])?;
        // b + W·β
        let beta_row = add(out, format!("{name}.beta_row"), Op::Reshape { shape: vec![1, k_in] }, &[beta])?;
        let wb = add(out, format!("{name}.w_beta"), Op::Linear, &[beta_row, w])?;
        let wb = add(out, format!("{name}.w_beta_flat"), Op::Reshape { shape: vec![n_out] }, &[wb])?;
        let b2 = match node.inputs.get(2) {
            Some(b) => add(out, format!("{name}.b_ln"), Op::Add, &[map[b.index()].unwrap(), wb])?,
            None => wb,
        };
        Ok(Some(out.add_node_typed(name, Op::Linear, &[normalized[&ln], w2, b2], g.ty(node.output).clone())))
    })
}

fn fold_scales(g: &Graph) -> Result<Graph, PassError> {
    let (konst, users) = (constants(g), users(g));
    // scale node index → the linear it folds into
    let mut folds: HashMap<usize, usize> = HashMap::new();
    for (k, n) in g.nodes.iter().enumerate() {
        let Op::Scale { .. } = n.op else { continue };
        let Some(ValueDef::Node(l)) = Some(g.value(n.inputs[0]).def.clone()) else { continue };
        let lin = &g.nodes[l];
        if matches!(lin.op, Op::Linear)
            && users[lin.output.index()] == [k]
            && !g.outputs.contains(&lin.output)
            && lin.inputs[1..].iter().all(|w| konst[w.index()])
        {
            folds.insert(l, k);
        }
    }
    let scale_of: HashMap<usize, usize> = folds.iter().map(|(&l, &s)| (s, l)).collect();
    let mut folded: HashMap<usize, ValueId> = HashMap::new();
    rebuild(g, |k, out, map| {
        if let Some(&s) = folds.get(&k) {
            let (lin, sc) = (&g.nodes[k], &g.nodes[s]);
            let Op::Scale { factor } = sc.op else { unreachable!() };
            let name = g.value(lin.output).name.clone();
            let mut args = vec![map[lin.inputs[0].index()].unwrap()];
            for (j, w) in lin.inputs[1..].iter().enumerate() {
                let part = if j == 0 { "w" } else { "b" };
                args.push(add(out, format!("{name}.{part}_scaled"), Op::Scale { factor }, &[map[w.index()].unwrap()])?);
            }
            let v = out.add_node_typed(g.value(sc.output).name.clone(), Op::Linear, &args, g.ty(sc.output).clone());
            folded.insert(k, v);
            return Ok(Some(v));
        }
        // The scale itself is now the linear emitted above.
        Ok(scale_of.get(&k).map(|l| folded[l]))
    })
}

fn merge_projections(g: &Graph) -> Result<Graph, PassError> {
    let konst = constants(g);
    // input value → linear nodes reading it with constant weights, in graph order.
    let mut groups: Vec<(ValueId, Vec<usize>)> = Vec::new();
    for (k, n) in g.nodes.iter().enumerate() {
        if !matches!(n.op, Op::Linear) || konst[n.inputs[0].index()] || !n.inputs[1..].iter().all(|w| konst[w.index()])
        {
            continue;
        }
        match groups.iter_mut().find(|(x, _)| *x == n.inputs[0]) {
            Some((_, v)) => v.push(k),
            None => groups.push((n.inputs[0], vec![k])),
        }
    }
    groups.retain(|(_, members)| members.len() > 1);
    // A member without bias needs zeros of its width: any bias of that width, scaled by 0.
    let mut plan: HashMap<usize, (usize, Vec<usize>)> = HashMap::new(); // first member → (group, members)
    let mut member_of: HashMap<usize, usize> = HashMap::new();
    for (gi, (_, members)) in groups.iter().enumerate() {
        let any_bias = members.iter().any(|&k| g.nodes[k].inputs.len() == 3);
        let width = |k: usize| g.ty(g.nodes[k].inputs[1]).shape[0];
        let bias_of_width = |w: usize| members.iter().find(|&&k| g.nodes[k].inputs.len() == 3 && width(k) == w);
        if any_bias && members.iter().any(|&k| g.nodes[k].inputs.len() == 2 && bias_of_width(width(k)).is_none()) {
            continue;
        }
        plan.insert(members[0], (gi, members.clone()));
        for &k in members {
            member_of.insert(k, members[0]);
        }
    }
    let mut slices: HashMap<usize, ValueId> = HashMap::new();
    rebuild(g, |k, out, map| {
        if let Some((_, members)) = plan.get(&k) {
            let first = g.value(g.nodes[k].output).name.clone();
            let weights: Vec<ValueId> = members.iter().map(|&m| map[g.nodes[m].inputs[1].index()].unwrap()).collect();
            let w = add(out, format!("{first}.merged_w"), Op::Concat { axis: 0 }, &weights)?;
            let mut args = vec![map[g.nodes[k].inputs[0].index()].unwrap(), w];
            if members.iter().any(|&m| g.nodes[m].inputs.len() == 3) {
                let mut biases = Vec::new();
                for &m in members {
                    let node = &g.nodes[m];
                    let b = match node.inputs.get(2) {
                        Some(b) => map[b.index()].unwrap(),
                        None => {
                            let width = g.ty(node.inputs[1]).shape[0];
                            let donor = members
                                .iter()
                                .map(|&o| &g.nodes[o])
                                .find(|o| o.inputs.len() == 3 && g.ty(o.inputs[1]).shape[0] == width)
                                .ok_or_else(|| fail("no bias to make zeros from"))?;
                            let name = format!("{}.zero_bias", g.value(node.output).name);
                            add(out, name, Op::Scale { factor: 0.0 }, &[map[donor.inputs[2].index()].unwrap()])?
                        }
                    };
                    biases.push(b);
                }
                args.push(add(out, format!("{first}.merged_b"), Op::Concat { axis: 0 }, &biases)?);
            }
            let merged = add(out, format!("{first}.merged"), Op::Linear, &args)?;
            let axis = out.ty(merged).rank() - 1;
            let mut at = 0;
            for &m in members {
                let node = &g.nodes[m];
                let width = g.ty(node.inputs[1]).shape[0];
                let o = g.value(node.output);
                let s = out.add_node_typed(
                    o.name.clone(),
                    Op::Slice { axis, start: at, end: at + width },
                    &[merged],
                    o.ty.clone(),
                );
                slices.insert(m, s);
                at += width;
            }
            return Ok(Some(slices[&k]));
        }
        Ok(member_of.get(&k).map(|_| slices[&k]))
    })
}
