//! IR → IR transformations. Each pass is a function `Module -> Result<Module>` in a file of
//! its own, whose doc comment says what it rewrites and why that is sound. The pass manager
//! ([`run_observed`]) applies passes by name, verifies the module after each one (a failure
//! names the pass), and lets the caller look at the module after every pass (`--dump-ir`).

mod attention;
mod flash;
mod fold;
pub mod fuse;
mod hoist_cross_kv;
pub mod quantize;
mod timesteps;

pub use attention::attention;
pub use flash::flash;
pub use fold::fold;
pub use fuse::fuse;
pub use hoist_cross_kv::hoist_cross_kv;
pub use quantize::quantize;
pub use timesteps::{auto_timesteps, check_timesteps, timesteps, MAX_TIMESTEPS};

use wcc_ir::{Graph, Module, Node, Op, ValueDef, ValueId};

/// The node that defines `v`, if a node does (not a graph input or a weight).
pub(crate) fn producer<'g>(g: &'g Graph, v: ValueId) -> Option<&'g Node> {
    match g.value(v).def {
        ValueDef::Node(k) => Some(&g.nodes[k]),
        _ => None,
    }
}

/// Replaces every node that `site(graph, node, use counts)` matches by the op and operands
/// it returns, then drops the nodes left without users. For passes that collapse a subgraph
/// into its last node: the subgraph's operands are defined before that node (the graph is in
/// topological order), so the node keeps its place.
pub(crate) fn rewrite_sites(
    mut m: Module,
    site: impl Fn(&Graph, &Node, &[usize]) -> Option<(Op, Vec<ValueId>)>,
) -> Module {
    for g in &mut m.graphs {
        let uses = g.use_counts();
        let rewrites: Vec<(usize, (Op, Vec<ValueId>))> =
            g.nodes.iter().enumerate().filter_map(|(k, node)| Some((k, site(g, node, &uses)?))).collect();
        if rewrites.is_empty() {
            continue;
        }
        for (k, (op, inputs)) in rewrites {
            g.nodes[k].op = op;
            g.nodes[k].inputs = inputs;
        }
        g.remove_dead_nodes();
    }
    m
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass `{pass}`: {msg}")]
    Failed { pass: &'static str, msg: String },
    #[error("unknown pass `{0}` (passes: {list})", list = PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
}

/// What the user chose for the passes that take a parameter.
#[derive(Clone, Debug, Default)]
pub struct PassOptions {
    /// Mel frames of the encoder's static input; `None` keeps the model's 30 s (3000).
    pub timesteps: Option<usize>,
    /// `--int8`: the `quantize` pass makes the linear layers int8 (dynamic per-row
    /// activation scales); without it the pass changes nothing.
    pub int8: bool,
    /// `--keep-float`: layers (value or weight names, `*` wildcards) `quantize` leaves in
    /// f32; `None` keeps the default list ([`quantize::DEFAULT_KEEP_FLOAT`]).
    pub keep_float: Option<Vec<String>>,
    /// Where activation scales come from (with `int8`).
    pub scales: ActivationScales,
}

/// How `quantize` scales activations.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ActivationScales {
    /// Per row, at run time (`--int8`).
    #[default]
    Dynamic,
    /// Nothing is quantized; every activation that would be is observed instead: its
    /// `row_scale` becomes a graph output named `<value>.scale` (the calibration build of
    /// `--int8-static`).
    Observe,
    /// One calibrated scale per activation, by value name (`--int8-static`); activations
    /// without one are scaled per row.
    Static(std::collections::BTreeMap<String, f32>),
}

pub struct Pass {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(Module, &PassOptions) -> Result<Module, PassError>,
}

/// Every pass, in the default order.
pub const PASSES: &[Pass] = &[
    Pass {
        name: "timesteps",
        about: "fix the encoder's mel frame count (--timesteps N); every shape is static afterwards",
        run: timesteps,
    },
    Pass {
        name: "hoist-cross-kv",
        about: "move the decoder's cross-attention K/V projections into the encoder",
        run: |m, _| hoist_cross_kv(m),
    },
    Pass {
        name: "fold",
        about: "layer-norm affine and q/k scaling into the projections; Q,K,V (and cross K,V) merged",
        run: |m, _| fold(m),
    },
    Pass {
        name: "fuse",
        about: "equality saturation (egg) picks fused kernels: linear+GELU, linear+residual, mask+softmax",
        run: |m, _| fuse(m),
    },
    Pass {
        name: "attention",
        about: "the decoder's self-attention over the KV cache as one op: no per-step cache transposes, only the filled rows",
        run: |m, _| attention(m),
    },
    Pass {
        name: "quantize",
        about: "with --int8: int8 linear layers (per-channel weight scales, per-row activation scales), dequantized in the epilogue",
        run: quantize,
    },
    Pass {
        name: "flash",
        about: "with --int8: an attention's two int8 products and the quantized softmax between them as one qattention op (no score matrix in memory)",
        run: |m, _| flash(m),
    },
];

/// The default pipeline: every pass, in order.
pub fn default_pipeline() -> Vec<&'static str> {
    PASSES.iter().map(|p| p.name).collect()
}

/// The passes of the default pipeline up to and including `last`.
pub fn pipeline_until(last: &str) -> Result<Vec<&'static str>, PassError> {
    let all = default_pipeline();
    let end = all.iter().position(|&p| p == last).ok_or_else(|| PassError::Unknown(last.to_string()))?;
    Ok(all[..=end].to_vec())
}

/// Runs the named passes in order with default options, verifying after each.
pub fn run(module: Module, names: &[&str]) -> Result<Module, PassError> {
    run_observed(module, names, &PassOptions::default(), &mut |_, _, _| Ok(()))
}

/// [`run`], calling `after(index, pass name, module)` after each pass (index from 1).
pub fn run_observed(
    mut module: Module,
    names: &[&str],
    options: &PassOptions,
    after: &mut dyn FnMut(usize, &str, &Module) -> Result<(), PassError>,
) -> Result<Module, PassError> {
    // Resolve every name first: a typo fails before any work.
    let passes: Vec<&Pass> = names
        .iter()
        .map(|&n| PASSES.iter().find(|p| p.name == n).ok_or_else(|| PassError::Unknown(n.to_string())))
        .collect::<Result<_, _>>()?;
    for (i, pass) in passes.into_iter().enumerate() {
        module = (pass.run)(module, options)?;
        wcc_ir::verify(&module)
            .map_err(|e| PassError::Failed { pass: pass.name, msg: format!("left the module malformed: {e}") })?;
        after(i + 1, pass.name, &module)?;
    }
    Ok(module)
}
