//! `fuse`: equality saturation with `egg` picks the ops to run as one kernel.
//!
//! Each fusion site — a GELU, an addition or a softmax whose operand is produced by a
//! single-use linear layer (or addition) — is written as a small term over the term
//! language [`Term`] (the site's operands are opaque [`Term::Value`] leaves), saturated with
//! the rewrite rules of [`rules`], and the cheapest equivalent term is extracted with a cost
//! model of bytes moved plus flops ([`KernelCost`]). When the cheapest term is a fused op,
//! the IR node and its producer become one node of that op.
//!
//! Sound because every rule states an identity (written next to it), the producer being
//! fused away has no other user, and shapes (an e-class analysis, [`Facts`]) guard the
//! rules whose identity needs them (a residual must have the result's shape; a mask must
//! vary along the last axis only).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use egg::{
    define_language, rewrite, Analysis, CostFunction, DidMerge, EGraph, Extractor, Id, Language, RecExpr, Rewrite,
    Runner, Subst, Symbol, Var,
};
use wcc_ir::{Graph, Module, Op, ValueDef, ValueId};

use crate::PassError;

define_language! {
    /// The ops fusion looks at, and the fused ops it can produce.
    pub enum Term {
        "linear" = Linear([Id; 3]),
        "gelu" = Gelu(Id),
        "add" = Add([Id; 2]),
        "softmax" = Softmax(Id),
        "linear_gelu" = LinearGelu([Id; 3]),
        "linear_add" = LinearAdd([Id; 4]),
        "masked_softmax" = MaskedSoftmax([Id; 2]),
        Value(Symbol),
    }
}

/// What is known of an e-class: its shape, and whether it depends only on weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub shape: Vec<usize>,
    pub constant: bool,
}

/// The e-class analysis: shapes and constness, from the leaves' facts.
#[derive(Default)]
pub struct Facts {
    pub leaves: HashMap<Symbol, Info>,
}

fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let x = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let y = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            match (x, y) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

impl Analysis<Term> for Facts {
    type Data = Option<Info>;

    fn make(egraph: &mut EGraph<Term, Self>, enode: &Term) -> Self::Data {
        let get = |i: &Id| egraph[*i].data.clone();
        let all_const = |ids: &[Id]| ids.iter().all(|i| get(i).is_some_and(|d| d.constant));
        match enode {
            Term::Value(s) => egraph.analysis.leaves.get(s).cloned(),
            Term::Linear(ids) | Term::LinearGelu(ids) => {
                let (x, w) = (get(&ids[0])?, get(&ids[1])?);
                let mut shape = x.shape.clone();
                *shape.last_mut()? = *w.shape.first()?;
                Some(Info { shape, constant: all_const(ids) })
            }
            Term::LinearAdd(ids) => {
                let (x, w) = (get(&ids[0])?, get(&ids[1])?);
                let mut shape = x.shape.clone();
                *shape.last_mut()? = *w.shape.first()?;
                Some(Info { shape, constant: all_const(ids) })
            }
            Term::Gelu(x) | Term::Softmax(x) => get(x),
            Term::Add(ids) | Term::MaskedSoftmax(ids) => {
                let (a, b) = (get(&ids[0])?, get(&ids[1])?);
                Some(Info { shape: broadcast(&a.shape, &b.shape)?, constant: a.constant && b.constant })
            }
        }
    }

    fn merge(&mut self, a: &mut Self::Data, b: Self::Data) -> DidMerge {
        // Equal terms have equal facts; only fill in what one side lacks.
        if a.is_none() && b.is_some() {
            *a = b;
            DidMerge(true, false)
        } else {
            DidMerge(false, a.is_some() && b.is_none())
        }
    }
}

fn shape_of(egraph: &EGraph<Term, Facts>, subst: &Subst, v: &str) -> Option<Vec<usize>> {
    let var: Var = v.parse().ok()?;
    egraph[subst[var]].data.as_ref().map(|d| d.shape.clone())
}

/// The residual `?r` has exactly the shape of the sum (no broadcasting in the epilogue).
fn residual_fits(egraph: &mut EGraph<Term, Facts>, root: Id, subst: &Subst) -> bool {
    let out = egraph[root].data.as_ref().map(|d| d.shape.clone());
    out.is_some() && shape_of(egraph, subst, "?r") == out
}

/// The mask `?m` varies along the last axis only (one mask row for every row of scores).
fn mask_is_a_row(egraph: &mut EGraph<Term, Facts>, _root: Id, subst: &Subst) -> bool {
    match (shape_of(egraph, subst, "?s"), shape_of(egraph, subst, "?m")) {
        // Same last extent, every other extent 1: a `[len, 1]` column has the right element
        // count but adds one value per row, not per column.
        (Some(s), Some(m)) => s.last().is_some() && m.last() == s.last() && m[..m.len() - 1].iter().all(|&e| e == 1),
        _ => false,
    }
}

/// The rewrite rules, by topic. Each states an identity.
pub fn rules() -> Vec<Rewrite<Term, Facts>> {
    vec![
        // Matrix-product epilogues: applied to each result as it is stored.
        // gelu(x·wᵀ + b) = linear_gelu(x, w, b)
        rewrite!("linear-gelu"; "(gelu (linear ?x ?w ?b))" => "(linear_gelu ?x ?w ?b)"),
        // r + (x·wᵀ + b) = linear_add(x, w, b, r)   (shapes equal)
        rewrite!("residual-linear"; "(add ?r (linear ?x ?w ?b))" => "(linear_add ?x ?w ?b ?r)" if residual_fits),
        // (x·wᵀ + b) + r = linear_add(x, w, b, r)   (addition commutes exactly in IEEE arithmetic)
        rewrite!("linear-residual"; "(add (linear ?x ?w ?b) ?r)" => "(linear_add ?x ?w ?b ?r)" if residual_fits),
        // Attention: softmax(s + m) = masked_softmax(s, m)   (m one row, added to every row)
        rewrite!("mask-softmax"; "(softmax (add ?s ?m))" => "(masked_softmax ?s ?m)" if mask_is_a_row),
    ]
}

/// Cost of a term: bytes moved (f32, each operand read once, each result written once) plus
/// floating-point operations, summed over its kernels.
pub struct KernelCost<'a> {
    pub egraph: &'a EGraph<Term, Facts>,
}

impl CostFunction<Term> for KernelCost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &Term, mut costs: C) -> f64 {
        let n = |id: &Id| -> f64 {
            self.egraph[*id].data.as_ref().map(|d| d.shape.iter().product::<usize>() as f64).unwrap_or(1e12)
        };
        let children: f64 = enode.children().iter().map(|&c| costs(c)).sum();
        // (cost, result elements) of x·wᵀ + b
        let matmul = |ids: &[Id]| -> (f64, f64) {
            let (x, w) = (n(&ids[0]), n(&ids[1]));
            let k = self.egraph[ids[1]].data.as_ref().and_then(|d| d.shape.last().copied()).unwrap_or(1) as f64;
            let out = x / k * (w / k);
            (4.0 * (x + w + n(&ids[2]) + out) + 2.0 * out * k, out)
        };
        let own = match enode {
            Term::Value(_) => 0.0,
            Term::Linear(ids) => matmul(ids).0,
            Term::LinearGelu(ids) => {
                let (c, out) = matmul(ids);
                c + 20.0 * out
            }
            Term::LinearAdd(ids) => matmul(ids).0 + 4.0 * n(&ids[3]) + n(&ids[3]),
            Term::Gelu(x) => 8.0 * n(x) + 20.0 * n(x),
            Term::Add(ids) => 4.0 * (n(&ids[0]) + n(&ids[1])) + 5.0 * n(&ids[0]).max(n(&ids[1])),
            Term::Softmax(x) => 8.0 * n(x) + 5.0 * n(x),
            Term::MaskedSoftmax(ids) => 4.0 * (n(&ids[0]) + n(&ids[1])) + 4.0 * n(&ids[0]) + 6.0 * n(&ids[0]),
        };
        own + children
    }
}

/// Saturates `expr` with [`rules`] under explicit limits and extracts the cheapest term.
pub fn optimize(expr: &RecExpr<Term>, leaves: HashMap<Symbol, Info>) -> RecExpr<Term> {
    let runner = Runner::<Term, Facts>::new(Facts { leaves })
        .with_iter_limit(8)
        .with_node_limit(500)
        .with_time_limit(Duration::from_millis(200))
        .with_expr(expr)
        .run(&rules());
    let root = runner.roots[0];
    let extractor = Extractor::new(&runner.egraph, KernelCost { egraph: &runner.egraph });
    extractor.find_best(root).1
}

fn fail(msg: impl Into<String>) -> PassError {
    PassError::Failed { pass: "fuse", msg: msg.into() }
}

pub fn fuse(mut m: Module) -> Result<Module, PassError> {
    for gi in 0..m.graphs.len() {
        let mut g = fuse_graph(&m.graphs[gi])?;
        g.canonicalize();
        m.graphs[gi] = g;
    }
    Ok(m)
}

/// A fusion decided for a site: node `root` becomes `op` over `inputs`; node `producer`
/// disappears.
struct Fusion {
    producer: usize,
    op: Op,
    inputs: Vec<ValueId>,
}

fn fuse_graph(g: &Graph) -> Result<Graph, PassError> {
    let uses = g.use_counts();
    let producer_of = |v: ValueId| match g.value(v).def {
        ValueDef::Node(p) => Some(p),
        _ => None,
    };
    let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, ValueDef::Weight(_))).collect();
    for n in &g.nodes {
        konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
    }
    let mut fusions: HashMap<usize, Fusion> = HashMap::new();
    let mut taken: HashSet<usize> = HashSet::new();
    for (k, node) in g.nodes.iter().enumerate() {
        if !matches!(node.op, Op::Gelu | Op::Add | Op::Softmax) || konst[node.output.index()] || taken.contains(&k) {
            continue;
        }
        // The site: the node, with each operand produced by a single-use linear (with bias)
        // or addition expanded one level; everything else is a leaf.
        let mut expr = RecExpr::default();
        let mut leaves: HashMap<Symbol, Info> = HashMap::new();
        let mut leaf_values: HashMap<Symbol, ValueId> = HashMap::new();
        let mut leaf = |expr: &mut RecExpr<Term>, v: ValueId| -> Id {
            let sym = Symbol::from(format!("%{}", g.value(v).name));
            leaves.insert(sym, Info { shape: g.ty(v).shape.clone(), constant: konst[v.index()] });
            leaf_values.insert(sym, v);
            expr.add(Term::Value(sym))
        };
        let mut expanded = None;
        let mut operands = Vec::new();
        for &i in &node.inputs {
            let p = producer_of(i).filter(|&p| {
                let pn = &g.nodes[p];
                let expandable = matches!(pn.op, Op::Linear if pn.inputs.len() == 3) || matches!(pn.op, Op::Add);
                expanded.is_none() && expandable && uses[i.index()] == 1 && !taken.contains(&p) && !konst[i.index()]
            });
            match p {
                Some(p) => {
                    let pn = &g.nodes[p];
                    let ids: Vec<Id> = pn.inputs.iter().map(|&x| leaf(&mut expr, x)).collect();
                    let t = match pn.op {
                        Op::Linear => Term::Linear([ids[0], ids[1], ids[2]]),
                        _ => Term::Add([ids[0], ids[1]]),
                    };
                    operands.push(expr.add(t));
                    expanded = Some(p);
                }
                None => operands.push(leaf(&mut expr, i)),
            }
        }
        let Some(producer) = expanded else { continue };
        match node.op {
            Op::Gelu => expr.add(Term::Gelu(operands[0])),
            Op::Softmax => expr.add(Term::Softmax(operands[0])),
            _ => expr.add(Term::Add([operands[0], operands[1]])),
        };
        let best = optimize(&expr, leaves);
        let nodes = best.as_ref();
        let value = |id: Id| -> Result<ValueId, PassError> {
            match &nodes[usize::from(id)] {
                Term::Value(s) => leaf_values.get(s).copied().ok_or_else(|| fail(format!("unknown leaf {s}"))),
                other => Err(fail(format!("fused operand is not a value: {other:?}"))),
            }
        };
        let (op, args) = match nodes.last() {
            Some(Term::LinearGelu(ids)) => (Op::FusedLinear { gelu: true, residual: false }, ids.to_vec()),
            Some(Term::LinearAdd(ids)) => (Op::FusedLinear { gelu: false, residual: true }, ids.to_vec()),
            Some(Term::MaskedSoftmax(ids)) => (Op::MaskedSoftmax, ids.to_vec()),
            _ => continue,
        };
        let inputs = args.into_iter().map(value).collect::<Result<Vec<_>, _>>()?;
        taken.insert(k);
        taken.insert(producer);
        fusions.insert(k, Fusion { producer, op, inputs });
    }
    let dropped: HashSet<usize> = fusions.values().map(|f| f.producer).collect();
    let mut out = Graph::new(g.name.clone());
    let mut map: Vec<Option<ValueId>> = vec![None; g.values.len()];
    for &i in &g.inputs {
        map[i.index()] = Some(out.add_input(g.value(i).name.clone(), g.ty(i).clone()));
    }
    for (k, v) in g.values.iter().enumerate() {
        if let ValueDef::Weight(_) = v.def {
            map[k] = Some(out.add_weight_value(v.name.clone(), v.ty.clone()));
        }
    }
    for (k, node) in g.nodes.iter().enumerate() {
        if dropped.contains(&k) {
            continue;
        }
        let (op, inputs) = match fusions.get(&k) {
            Some(f) => (f.op.clone(), f.inputs.clone()),
            None => (node.op.clone(), node.inputs.clone()),
        };
        let args: Vec<ValueId> = inputs
            .iter()
            .map(|i| map[i.index()].ok_or_else(|| fail("operand used before definition")))
            .collect::<Result<_, _>>()?;
        let o = g.value(node.output);
        map[node.output.index()] = Some(out.add_node(o.name.clone(), op, &args).map_err(fail)?);
    }
    out.outputs = g.outputs.iter().map(|o| map[o.index()].expect("outputs kept")).collect();
    Ok(out)
}
