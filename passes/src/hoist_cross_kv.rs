//! `hoist-cross-kv`: moves the decoder's cross-attention K and V projections into the
//! encoder.
//!
//! In `decoder_step`, every node whose operands are all weights, decoder inputs fed from an
//! encoder output of the same name (`audio_features`), or other such nodes, computes the
//! same value at every step of a window: it is a function of the encoder's output alone.
//! Those nodes move to the end of `encoder`, reading the encoder's output value directly.
//! Each moved value still needed by the decoder becomes an encoder output and a decoder
//! input of the same name (the runtime binds graphs by name), and decoder inputs no longer
//! used are dropped. The values computed are unchanged, only where and how often: once per
//! window instead of once per token. Nodes that depend on weights alone are left where
//! they are (they are constants, the `fold` pass's business).
//!
//! Every decoder graph (each beam width's step besides `decoder_step`) is hoisted in turn.
//! Their cross-attention nodes carry the same names: a node hoisted by an earlier graph is
//! reused when the later one's is the same computation (same op, same operands, same type),
//! so the encoder computes it once; a same-named node that differs is an error.

use wcc_ir::{Graph, Module, ValueDef, ValueId};

use crate::PassError;

const NAME: &str = "hoist-cross-kv";

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed { pass: NAME, msg: msg.into() }
}

pub fn hoist_cross_kv(mut m: Module) -> Result<Module, PassError> {
    let enc_i = m.graphs.iter().position(|g| g.name == "encoder").ok_or_else(|| fail("no `encoder` graph"))?;
    if !m.graphs.iter().any(|g| g.name == "decoder_step") {
        return Err(fail("no `decoder_step` graph"));
    }
    for dec_i in 0..m.graphs.len() {
        if dec_i != enc_i {
            m = hoist_from(m, enc_i, dec_i)?;
        }
    }
    Ok(m)
}

/// Hoists what graph `dec_i` computes from the encoder's outputs alone into graph `enc_i`.
fn hoist_from(mut m: Module, enc_i: usize, dec_i: usize) -> Result<Module, PassError> {
    let (enc, dec) = (&m.graphs[enc_i], &m.graphs[dec_i]);

    // Decoder inputs that are encoder outputs, and the encoder value each one is.
    let mut from_encoder: Vec<Option<ValueId>> = vec![None; dec.values.len()];
    for &i in &dec.inputs {
        let name = &dec.value(i).name;
        if let Some(&o) = enc.outputs.iter().find(|&&o| &enc.value(o).name == name) {
            from_encoder[i.index()] = Some(o);
        }
    }
    // invariant: same value at every step; audio: depends on an encoder output.
    let mut invariant = vec![false; dec.values.len()];
    let mut audio = vec![false; dec.values.len()];
    for (k, v) in dec.values.iter().enumerate() {
        invariant[k] = matches!(v.def, ValueDef::Weight(_)) || from_encoder[k].is_some();
        audio[k] = from_encoder[k].is_some();
    }
    let mut hoisted = vec![false; dec.nodes.len()];
    for (n, node) in dec.nodes.iter().enumerate() {
        let o = node.output.index();
        invariant[o] = node.inputs.iter().all(|i| invariant[i.index()]);
        audio[o] = node.inputs.iter().any(|i| audio[i.index()]);
        hoisted[n] = invariant[o] && audio[o];
    }
    if !hoisted.iter().any(|&h| h) {
        return Ok(m);
    }

    // Copy the hoisted nodes into the encoder.
    let mut new_enc = enc.clone();
    let mut in_enc: Vec<Option<ValueId>> = from_encoder.clone();
    for (n, node) in dec.nodes.iter().enumerate() {
        if !hoisted[n] {
            continue;
        }
        let mut args = Vec::new();
        for &i in &node.inputs {
            let v = dec.value(i);
            let a = match (&v.def, in_enc[i.index()]) {
                (_, Some(a)) => a,
                (ValueDef::Weight(w), None) => {
                    let decl = m.weight(w).ok_or_else(|| fail(format!("@{w} is not declared")))?;
                    new_enc.use_weight(decl)
                }
                _ => {
                    return Err(fail(format!("operand %{} of a hoisted node is not available in the encoder", v.name)))
                }
            };
            args.push(a);
        }
        let out = dec.value(node.output);
        if let Some(existing) = new_enc.find_value(&out.name) {
            // Hoisted already from another decoder graph: the same computation is reused.
            let same = match new_enc.value(existing).def {
                ValueDef::Node(k) => {
                    let e = &new_enc.nodes[k];
                    e.op == node.op && e.inputs == args && new_enc.ty(existing) == &out.ty
                }
                _ => false,
            };
            if !same {
                return Err(fail(format!("the encoder already has a different value named %{}", out.name)));
            }
            in_enc[node.output.index()] = Some(existing);
            continue;
        }
        in_enc[node.output.index()] =
            Some(new_enc.add_node_typed(out.name.clone(), node.op.clone(), &args, out.ty.clone()));
    }

    // Rebuild the decoder: the boundary values become inputs where the old encoder-fed
    // inputs were.
    let uses_outside = |v: ValueId| -> bool {
        dec.nodes.iter().enumerate().any(|(n, node)| !hoisted[n] && node.inputs.contains(&v))
            || dec.outputs.contains(&v)
    };
    let boundary: Vec<ValueId> = dec
        .nodes
        .iter()
        .enumerate()
        .filter(|&(n, node)| hoisted[n] && uses_outside(node.output))
        .map(|(_, node)| node.output)
        .collect();
    let mut new_dec = Graph::new(dec.name.clone());
    let mut map: Vec<Option<ValueId>> = vec![None; dec.values.len()];
    let mut boundary_added = false;
    for &i in &dec.inputs {
        if from_encoder[i.index()].is_some() && !uses_outside(i) {
            if !boundary_added {
                for &b in &boundary {
                    let v = dec.value(b);
                    map[b.index()] = Some(new_dec.add_input(v.name.clone(), v.ty.clone()));
                    push_output(&mut new_enc, in_enc[b.index()].expect("hoisted"));
                }
                boundary_added = true;
            }
            continue;
        }
        let v = dec.value(i);
        map[i.index()] = Some(new_dec.add_input(v.name.clone(), v.ty.clone()));
    }
    if !boundary_added {
        for &b in &boundary {
            let v = dec.value(b);
            map[b.index()] = Some(new_dec.add_input(v.name.clone(), v.ty.clone()));
            push_output(&mut new_enc, in_enc[b.index()].expect("hoisted"));
        }
    }
    for (n, node) in dec.nodes.iter().enumerate() {
        if hoisted[n] {
            continue;
        }
        let mut args = Vec::new();
        for &i in &node.inputs {
            let a = match (&dec.value(i).def, map[i.index()]) {
                (_, Some(a)) => a,
                (ValueDef::Weight(w), None) => new_dec.use_weight(m.weight(w).expect("declared")),
                _ => return Err(fail(format!("operand %{} lost in the rewrite", dec.value(i).name))),
            };
            args.push(a);
        }
        let out = dec.value(node.output);
        map[node.output.index()] =
            Some(new_dec.add_node_typed(out.name.clone(), node.op.clone(), &args, out.ty.clone()));
    }
    new_dec.outputs = dec.outputs.iter().map(|o| map[o.index()].expect("outputs are not hoisted")).collect();
    new_enc.canonicalize();
    new_dec.canonicalize();
    m.graphs[enc_i] = new_enc;
    m.graphs[dec_i] = new_dec;
    Ok(m)
}

fn push_output(g: &mut Graph, v: ValueId) {
    if !g.outputs.contains(&v) {
        g.outputs.push(v);
    }
}
