//! `fuse`: each rewrite rule on its own (input term → expected term, through saturation and
//! cost-based extraction), and the pass on small graphs against the interpreter.

mod common;

use std::collections::HashMap;

use common::{weight, Random};
use egg::{RecExpr, Symbol};
use wcc_ir::interp::{Interpreter, Tensor};
use wcc_ir::{Graph, Module, Op, TensorType};
use wcc_passes::fuse::{optimize, Info, Term};

fn leaves(shapes: &[(&str, &[usize])]) -> HashMap<Symbol, Info> {
    shapes.iter().map(|(n, s)| (Symbol::from(*n), Info { shape: s.to_vec(), constant: false })).collect()
}

fn best(term: &str, shapes: &[(&str, &[usize])]) -> String {
    let expr: RecExpr<Term> = term.parse().unwrap();
    optimize(&expr, leaves(shapes)).to_string()
}

const LINEAR: &[(&str, &[usize])] = &[("x", &[5, 8]), ("w", &[16, 8]), ("b", &[16]), ("r", &[5, 16]), ("row", &[16])];

#[test]
fn linear_gelu() {
    assert_eq!(best("(gelu (linear x w b))", LINEAR), "(linear_gelu x w b)");
}

#[test]
fn residual_on_either_side() {
    assert_eq!(best("(add r (linear x w b))", LINEAR), "(linear_add x w b r)");
    assert_eq!(best("(add (linear x w b) r)", LINEAR), "(linear_add x w b r)");
}

#[test]
fn a_broadcast_residual_is_not_fused() {
    // `row` broadcasts over the rows: not an element-wise residual of the same shape.
    assert_eq!(best("(add row (linear x w b))", LINEAR), "(add row (linear x w b))");
}

#[test]
fn mask_softmax() {
    let shapes: &[(&str, &[usize])] = &[("s", &[6, 1, 448]), ("m", &[1, 448]), ("big", &[6, 1, 448])];
    assert_eq!(best("(softmax (add s m))", shapes), "(masked_softmax s m)");
    // A mask that varies along other axes too is left alone.
    assert_eq!(best("(softmax (add s big))", shapes), "(softmax (add s big))");
}

#[test]
fn fused_graph_computes_the_same() {
    // out = x + linear(gelu(linear(x)))
    let mut m = Module::new("t");
    let mut g = Graph::new("main");
    let x = g.add_input("x", TensorType::f32([5, 8]));
    let (w1, b1) = (weight(&mut m, &mut g, "w1", &[16, 8]), weight(&mut m, &mut g, "b1", &[16]));
    let (w2, b2) = (weight(&mut m, &mut g, "w2", &[8, 16]), weight(&mut m, &mut g, "b2", &[8]));
    let h = g.add_node("h", Op::Linear, &[x, w1, b1]).unwrap();
    let a = g.add_node("a", Op::Gelu, &[h]).unwrap();
    let y = g.add_node("y", Op::Linear, &[a, w2, b2]).unwrap();
    let out = g.add_node("out", Op::Add, &[x, y]).unwrap();
    g.outputs = vec![out];
    g.canonicalize();
    m.graphs.push(g);
    let fused = wcc_passes::run(m.clone(), &["fuse"]).unwrap();
    let gf = fused.graph("main").unwrap();
    let ops: Vec<&Op> = gf.nodes.iter().map(|n| &n.op).collect();
    assert_eq!(
        ops,
        vec![&Op::FusedLinear { gelu: true, residual: false }, &Op::FusedLinear { gelu: false, residual: true }],
        "{}",
        wcc_ir::print_graph(gf)
    );
    let input = Tensor::f32([5, 8], (0..40).map(|i| (i as f32 - 20.0) / 7.0).collect());
    let run = |m: &Module| Interpreter::new(m, &Random).unwrap().run("main", std::slice::from_ref(&input)).unwrap();
    // The same arithmetic in the same order: bit-identical.
    assert_eq!(run(&m), run(&fused));
}

#[test]
fn a_producer_with_another_user_is_not_fused_away() {
    let mut m = Module::new("t");
    let mut g = Graph::new("main");
    let x = g.add_input("x", TensorType::f32([5, 8]));
    let (w1, b1) = (weight(&mut m, &mut g, "w1", &[16, 8]), weight(&mut m, &mut g, "b1", &[16]));
    let h = g.add_node("h", Op::Linear, &[x, w1, b1]).unwrap();
    let a = g.add_node("a", Op::Gelu, &[h]).unwrap();
    g.outputs = vec![a, h];
    g.canonicalize();
    m.graphs.push(g);
    let fused = wcc_passes::run(m.clone(), &["fuse"]).unwrap();
    assert_eq!(fused, m);
}
