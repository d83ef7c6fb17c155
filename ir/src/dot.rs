use petgraph::graph::{DiGraph, NodeIndex};

use crate::graph::{Graph, ValueDef};

/// Graphviz DOT of one graph: inputs and nodes as boxes, edges labelled with the type that
/// flows along them. Weights are left out (they would drown the dataflow); a node lists how
/// many weights it reads.
pub fn to_dot(g: &Graph) -> String {
    let mut s = format!("digraph \"{}\" {{\n  node [shape=box, fontname=monospace];\n", g.name);
    s.push_str(&body(g, "n", "  "));
    s.push_str("}\n");
    s
}

/// DOT of every graph of a module, one cluster per graph.
pub fn module_to_dot(m: &crate::Module) -> String {
    let mut s = format!("digraph \"{}\" {{\n  node [shape=box, fontname=monospace];\n", m.name);
    for (gi, g) in m.graphs.iter().enumerate() {
        s.push_str(&format!("  subgraph cluster_{gi} {{\n    label=\"{}\";\n", g.name));
        s.push_str(&body(g, &format!("g{gi}n"), "    "));
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// The node and edge lines of one graph, node ids prefixed with `id`.
fn body(g: &Graph, id: &str, indent: &str) -> String {
    let mut dg: DiGraph<String, String> = DiGraph::new();
    let mut index: Vec<Option<NodeIndex>> = vec![None; g.values.len()];
    for &i in &g.inputs {
        let v = g.value(i);
        index[i.index()] = Some(dg.add_node(format!("input %{}\\n{}", v.name, v.ty)));
    }
    for node in &g.nodes {
        let out = g.value(node.output);
        let weights = node.inputs.iter().filter(|&&i| matches!(g.value(i).def, ValueDef::Weight(_))).count();
        let mut label = format!("%{}\\n{}", out.name, node.op.name());
        for (k, v) in node.op.attrs() {
            label.push_str(&format!(" {k}={v}"));
        }
        if weights > 0 {
            label.push_str(&format!("\\n+{weights} weight(s)"));
        }
        let n = dg.add_node(label);
        index[node.output.index()] = Some(n);
        for &i in &node.inputs {
            if let Some(src) = index[i.index()] {
                dg.add_edge(src, n, g.ty(i).to_string());
            }
        }
    }
    for (k, &o) in g.outputs.iter().enumerate() {
        let n = dg.add_node(format!("output {k}\\n{}", g.ty(o)));
        if let Some(src) = index[o.index()] {
            dg.add_edge(src, n, g.ty(o).to_string());
        }
    }
    let mut s = String::new();
    for n in dg.node_indices() {
        let label = dg[n].replace('"', "\\\"");
        s.push_str(&format!("{indent}{id}{} [label=\"{label}\"];\n", n.index()));
    }
    for e in dg.edge_indices() {
        let (a, b) = dg.edge_endpoints(e).unwrap();
        s.push_str(&format!("{indent}{id}{} -> {id}{} [label=\"{}\"];\n", a.index(), b.index(), dg[e]));
    }
    s
}
