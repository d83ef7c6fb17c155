//! `fold` on small modules: each rewrite, input → expected IR, and the numbers computed
//! before and after agree (reference interpreter, random weights and inputs).

mod common;

use common::{weight, Random};
use wcc_ir::interp::{Interpreter, Tensor};
use wcc_ir::{print_graph, DType, Graph, Module, Op, TensorType, ValueDef};

/// x → layer_norm(γ, β) → {q: scale(linear), k: scale(linear, no bias), v: linear} → outputs.
fn attention_inputs() -> Module {
    let mut m = Module::new("t");
    let mut g = Graph::new("main");
    let x = g.add_input("x", TensorType::f32([5, 8]));
    let (gam, bet) = (weight(&mut m, &mut g, "ln.w", &[8]), weight(&mut m, &mut g, "ln.b", &[8]));
    let h = g.add_node("h", Op::LayerNorm { eps: 1e-5 }, &[x, gam, bet]).unwrap();
    let (wq, bq) = (weight(&mut m, &mut g, "q.w", &[8, 8]), weight(&mut m, &mut g, "q.b", &[8]));
    let wk = weight(&mut m, &mut g, "k.w", &[8, 8]);
    let (wv, bv) = (weight(&mut m, &mut g, "v.w", &[8, 8]), weight(&mut m, &mut g, "v.b", &[8]));
    let q = g.add_node("q", Op::Linear, &[h, wq, bq]).unwrap();
    let q = g.add_node("q_scaled", Op::Scale { factor: 0.5 }, &[q]).unwrap();
    let k = g.add_node("k", Op::Linear, &[h, wk]).unwrap();
    let k = g.add_node("k_scaled", Op::Scale { factor: 0.5 }, &[k]).unwrap();
    let v = g.add_node("v", Op::Linear, &[h, wv, bv]).unwrap();
    g.outputs = vec![q, k, v];
    g.canonicalize();
    m.graphs.push(g);
    wcc_ir::verify(&m).unwrap();
    m
}

fn run(m: &Module) -> Vec<Tensor> {
    let x: Vec<f32> = (0..40).map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0).collect();
    Interpreter::new(m, &Random).unwrap().run("main", &[Tensor::f32([5, 8], x)]).unwrap()
}

fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            x.as_f32().unwrap().iter().zip(y.as_f32().unwrap()).map(|(p, q)| (p - q).abs() / (1.0 + q.abs()))
        })
        .fold(0.0, f32::max)
}

/// Nodes that compute on activations (not on weights alone).
fn activation_nodes(g: &Graph) -> Vec<&wcc_ir::Node> {
    let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, ValueDef::Weight(_))).collect();
    let mut out = vec![];
    for n in &g.nodes {
        konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
        if !konst[n.output.index()] {
            out.push(n);
        }
    }
    out
}

#[test]
fn layer_norm_affine_and_scales_fold_into_one_merged_projection() {
    let before = attention_inputs();
    let after = wcc_passes::run(before.clone(), &["fold"]).unwrap();
    let g = after.graph("main").unwrap();
    // On activations: a layer norm without affine part, one merged linear, three slices.
    let ops: Vec<(&str, usize)> = activation_nodes(g).iter().map(|n| (n.op.name(), n.inputs.len())).collect();
    assert_eq!(
        ops,
        vec![("layer_norm", 1), ("linear", 3), ("slice", 1), ("slice", 1), ("slice", 1)],
        "{}",
        print_graph(g)
    );
    insta::assert_snapshot!(print_graph(g));
    let e = max_rel_diff(&run(&before), &run(&after));
    assert!(e < 1e-5, "fold changed the results by {e}");
}

#[test]
fn a_weight_used_elsewhere_is_not_duplicated() {
    // The tied embedding: the same table feeds a gather and the logits projection.
    let mut m = Module::new("t");
    let mut g = Graph::new("main");
    let x = g.add_input("x", TensorType::f32([1, 8]));
    let ids = g.add_input("ids", TensorType::new(DType::I32, [1]));
    let (gam, bet) = (weight(&mut m, &mut g, "ln.w", &[8]), weight(&mut m, &mut g, "ln.b", &[8]));
    let table = weight(&mut m, &mut g, "emb", &[10, 8]);
    let e = g.add_node("e", Op::Gather, &[table, ids]).unwrap();
    let s = g.add_node("s", Op::Add, &[x, e]).unwrap();
    let h = g.add_node("h", Op::LayerNorm { eps: 1e-5 }, &[s, gam, bet]).unwrap();
    let logits = g.add_node("logits", Op::Linear, &[h, table]).unwrap();
    g.outputs = vec![logits];
    g.canonicalize();
    m.graphs.push(g);
    let after = wcc_passes::run(m.clone(), &["fold"]).unwrap();
    assert_eq!(wcc_ir::print_module(&after), wcc_ir::print_module(&m));
}
