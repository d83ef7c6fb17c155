//! The text form round-trips, and the verifier and parser reject malformed modules with a
//! message that says what is wrong.

use wcc_ir::{parse_module, print_module, verify, DType, Graph, Module, Op, TensorType, WeightSource};

/// A small module using every op.
fn sample() -> Module {
    let mut m = Module::new("sample");
    m.params.insert("d".into(), 4);
    let w = m.add_weight(
        "w",
        TensorType::new(DType::F16, [4, 4]),
        WeightSource { tensor: "fused/w".into(), rows: Some((4, 8)) },
    );
    let b = m.add_weight("b", TensorType::new(DType::BF16, [4]), WeightSource { tensor: "b".into(), rows: None });
    let cw = m.add_weight("cw", TensorType::f32([4, 2, 3]), WeightSource { tensor: "cw".into(), rows: None });
    let table = m.add_weight("table", TensorType::f32([10, 4]), WeightSource { tensor: "t".into(), rows: None });
    let mut g = Graph::new("main");
    let x = g.add_input("x", TensorType::f32([2, 8]));
    let ids = g.add_input("ids", TensorType::new(DType::I32, [1]));
    let cache = g.add_input("cache", TensorType::f32([6, 4]));
    let (cw, w, b, table) = (g.use_weight(&cw), g.use_weight(&w), g.use_weight(&b), g.use_weight(&table));
    let c = g.add_node("conv", Op::Conv1d { stride: 2, padding: 1 }, &[x, cw, b]).unwrap();
    let c = g.add_node("act", Op::Gelu, &[c]).unwrap();
    let t = g.add_node("t", Op::Transpose { perm: vec![1, 0] }, &[c]).unwrap();
    let l = g.add_node("lin", Op::Linear, &[t, w, b]).unwrap();
    let n = g.add_node("norm", Op::LayerNorm { eps: 1e-5 }, &[l, b, b]).unwrap();
    let s = g.add_node("scaled", Op::Scale { factor: 0.125 }, &[n]).unwrap();
    let e = g.add_node("emb", Op::Gather, &[table, ids]).unwrap();
    let a = g.add_node("sum", Op::Add, &[s, e]).unwrap();
    let prod = g.add_node("prod", Op::Mul, &[a, a]).unwrap();
    let row = g.add_node("row", Op::Slice { axis: 0, start: 1, end: 2 }, &[prod]).unwrap();
    let upd = g.add_node("cache.next", Op::ScatterRow, &[cache, ids, row]).unwrap();
    let mask = g.add_node("mask", Op::CausalMask { len: 6 }, &[ids]).unwrap();
    let q = g.add_node("q", Op::Reshape { shape: vec![1, 1, 4] }, &[row]).unwrap();
    let k = g.add_node("k", Op::Reshape { shape: vec![1, 6, 4] }, &[upd]).unwrap();
    let sc = g.add_node("scores", Op::MatMul { transpose_b: true }, &[q, k]).unwrap();
    let sc = g.add_node("masked", Op::Add, &[sc, mask]).unwrap();
    let p = g.add_node("probs", Op::Softmax, &[sc]).unwrap();
    let o = g.add_node("out", Op::MatMul { transpose_b: false }, &[p, k]).unwrap();
    g.outputs = vec![o, upd];
    g.canonicalize();
    m.graphs.push(g);
    m
}

#[test]
fn sample_module_verifies_and_round_trips() {
    let m = sample();
    verify(&m).unwrap();
    let text = print_module(&m);
    let back = parse_module(&text).unwrap();
    assert_eq!(back, m);
    assert_eq!(print_module(&back), text);
    verify(&back).unwrap();
}

#[test]
fn sample_module_text() {
    insta::assert_snapshot!(print_module(&sample()));
}

fn rejects(text: &str, needle: &str) {
    let err = match parse_module(text) {
        Err(e) => e.to_string(),
        Ok(m) => match verify(&m) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted:\n{text}"),
        },
    };
    assert!(err.contains(needle), "error `{err}` does not mention `{needle}`");
}

fn edit(from: &str, to: &str) -> String {
    let text = print_module(&sample());
    assert!(text.contains(from), "sample text has no `{from}`");
    text.replacen(from, to, 1)
}

#[test]
fn verifier_and_parser_reject_malformed_modules() {
    rejects(&edit("%lin: f32[4,4]", "%lin: f32[4,5]"), "declared f32[4,5] but linear gives f32[4,4]");
    rejects(&edit("linear(%t, @w, @b)", "linear(%t, @w, @nope)"), "@nope is not a declared weight");
    rejects(&edit("linear(%t, @w, @b)", "linear(%ghost, @w, @b)"), "%ghost is not defined");
    rejects(&edit("softmax(%masked)", "softmax(%out)"), "%out is not defined");
    rejects(&edit("%act: f32[4,4] = gelu(%conv)", "%act: f32[4,4] = gelu(%conv, %conv)"), "takes 1 operand(s), got 2");
    rejects(&edit("reshape{shape=[1,1,4]}", "reshape{shape=[1,2,4]}"), "changes the element count");
    rejects(&edit("transpose{perm=[1,0]}", "transpose{perm=[0,0]}"), "not a permutation");
    rejects(&edit("gelu(", "swish("), "unknown op `swish`");
    rejects(&edit("{stride=2, padding=1}", "{stride=2}"), "needs attribute `padding`");
    rejects(&edit("{len=6}", "{len=6, wide=1}"), "has no attribute `wide`");
    rejects(&edit("%emb: f32[1,4]", "%act: f32[1,4]"), "%act is defined twice");
    rejects(&edit("[4:8]", "[4:9]"), "row range [4:9] does not match");
    rejects(&edit("f16[4,4]", "f99[4,4]"), "unknown dtype `f99`");
    rejects(&edit("gather(@table, %ids)", "gather(@table, %x)"), "gather cannot take operands");
    rejects(&edit("  return (%out, %cache.next)\n", ""), "expected a node");
    rejects("module \"m\" { graph g() { return () } }", "no outputs");
    rejects("module \"m\" {", "unexpected end of input");
}

#[test]
fn verifier_rejects_dangling_edges_built_in_memory() {
    let mut m = sample();
    let g = &mut m.graphs[0];
    g.nodes[3].inputs[0] = wcc_ir::ValueId(999);
    let e = verify(&m).unwrap_err().to_string();
    assert!(e.contains("does not exist (dangling edge)"), "{e}");

    let mut m = sample();
    let g = &mut m.graphs[0];
    // Make node 2 read the result of node 5: a use before its definition.
    let later = g.nodes[5].output;
    g.nodes[2].inputs[0] = later;
    let e = verify(&m).unwrap_err().to_string();
    assert!(e.contains("used before it is defined"), "{e}");
}

#[test]
fn dot_output_has_every_node_and_edge() {
    let m = sample();
    let dot = wcc_ir::to_dot(&m.graphs[0]);
    assert!(dot.starts_with("digraph \"main\""));
    for n in &m.graphs[0].nodes {
        assert!(dot.contains(&format!("%{}\\n{}", m.graphs[0].value(n.output).name, n.op.name())));
    }
    // One edge per non-weight operand plus one per output.
    let g = &m.graphs[0];
    let edges = g
        .nodes
        .iter()
        .flat_map(|n| &n.inputs)
        .filter(|&&i| !matches!(g.value(i).def, wcc_ir::ValueDef::Weight(_)))
        .count()
        + g.outputs.len();
    assert_eq!(dot.matches(" -> ").count(), edges);
}

/// Found by the `ir_text` fuzz target (fuzz/regressions/ir_text/string-escapes): names with
/// control characters were printed with Rust's escapes (`\0`, `\u{11}`), which the lexer
/// refuses, so a printed module did not parse back.
#[test]
fn strings_with_any_characters_print_and_parse_back() {
    let mut m = Module::new("a \"quoted\"\\name\nover two lines");
    m.weights.push(wcc_ir::WeightDecl {
        name: "w".into(),
        ty: TensorType::new(DType::F32, vec![2]),
        source: WeightSource { tensor: "\0\u{11}\u{1}w2 \u{7f}é".into(), rows: None },
    });
    let text = print_module(&m);
    let back = parse_module(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(back.name, m.name);
    assert_eq!(back.weights[0].source.tensor, m.weights[0].source.tensor);
    assert_eq!(print_module(&back), text);
}
