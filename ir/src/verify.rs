use std::collections::HashSet;

use crate::graph::{Graph, Module, ValueDef};
use crate::op::infer_type;

/// Why a module is malformed; the message names the graph and node.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerifyError(pub String);

/// Checks that the module is well formed: weight names unique and every weight use matches
/// its declaration; in each graph, values uniquely named, every operand defined before its
/// use (no dangling edges), every node's declared type equal to the type its op infers,
/// no tensor with a zero-sized dimension, and inputs/outputs well defined.
pub fn verify(module: &Module) -> Result<(), VerifyError> {
    let mut names = HashSet::new();
    for w in &module.weights {
        if !names.insert(w.name.as_str()) {
            return Err(VerifyError(format!("weight @{} is declared twice", w.name)));
        }
        if w.ty.shape.contains(&0) {
            return Err(VerifyError(format!("weight @{} has a zero-sized dimension: {}", w.name, w.ty)));
        }
        if let Some((a, b)) = w.source.rows {
            if a >= b || b - a != w.ty.shape.first().copied().unwrap_or(0) {
                return Err(VerifyError(format!(
                    "weight @{}: row range [{a}:{b}] does not match its type {}",
                    w.name, w.ty
                )));
            }
        }
    }
    let mut graph_names = HashSet::new();
    for g in &module.graphs {
        if !graph_names.insert(g.name.as_str()) {
            return Err(VerifyError(format!("graph `{}` is defined twice", g.name)));
        }
        verify_graph(module, g).map_err(|e| VerifyError(format!("graph `{}`: {e}", g.name)))?;
    }
    Ok(())
}

fn verify_graph(module: &Module, g: &Graph) -> Result<(), String> {
    let n = g.values.len();
    let mut names = HashSet::new();
    for v in &g.values {
        if !names.insert(v.name.as_str()) {
            return Err(format!("value %{} is defined twice", v.name));
        }
        // Every op divides by some extent (rows = elements / last axis, heads, windows):
        // an empty tensor has no meaning here and would reach those divisions.
        if v.ty.shape.contains(&0) {
            return Err(format!("%{} has a zero-sized dimension: {}", v.name, v.ty));
        }
    }
    // defined[i]: value i may be used from here on.
    let mut defined = vec![false; n];
    for (k, v) in g.values.iter().enumerate() {
        match &v.def {
            ValueDef::Weight(w) => {
                let decl = module.weight(w).ok_or_else(|| format!("@{w} is not a declared weight"))?;
                if decl.ty != v.ty {
                    return Err(format!("@{w} is used as {} but declared {}", v.ty, decl.ty));
                }
                defined[k] = true;
            }
            ValueDef::Input(i) => {
                if g.inputs.get(*i).map(|x| x.index()) != Some(k) {
                    return Err(format!("%{} claims to be input {i} but is not", v.name));
                }
            }
            ValueDef::Node(i) => {
                if g.nodes.get(*i).map(|x| x.output.index()) != Some(k) {
                    return Err(format!("%{} claims to be defined by node {i} but is not", v.name));
                }
            }
        }
    }
    for (i, &inp) in g.inputs.iter().enumerate() {
        if inp.index() >= n || g.values[inp.index()].def != ValueDef::Input(i) {
            return Err(format!("input {i} is not an input value"));
        }
        defined[inp.index()] = true;
    }
    for (i, node) in g.nodes.iter().enumerate() {
        let out = node.output.index();
        if out >= n {
            return Err(format!("node {i} ({}) defines a value that does not exist", node.op.name()));
        }
        let out_name = &g.values[out].name;
        for &x in &node.inputs {
            if x.index() >= n {
                return Err(format!("%{out_name}: operand {} does not exist (dangling edge)", x.0));
            }
            if !defined[x.index()] {
                return Err(format!("%{out_name}: operand %{} is used before it is defined", g.values[x.index()].name));
            }
        }
        let tys: Vec<_> = node.inputs.iter().map(|&x| g.ty(x)).collect();
        let inferred = infer_type(&node.op, &tys).map_err(|e| format!("%{out_name}: {e}"))?;
        if inferred != g.values[out].ty {
            return Err(format!("%{out_name}: declared {} but {} gives {inferred}", g.values[out].ty, node.op.name()));
        }
        if defined[out] {
            return Err(format!("%{out_name} is defined twice"));
        }
        defined[out] = true;
    }
    if g.outputs.is_empty() {
        return Err("the graph has no outputs".into());
    }
    for &o in &g.outputs {
        if o.index() >= n || !defined[o.index()] {
            return Err(format!("output {} is not a defined value", o.0));
        }
    }
    Ok(())
}
