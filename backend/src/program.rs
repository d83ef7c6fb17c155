//! A whole module → a program: deduplicated kernels, per-graph launch lists over one arena,
//! and the weights blob.
//!
//! Buffers:
//! - weights (and every value computed from weights alone, folded here with the reference
//!   interpreter) live in the weights blob, f32, 64-byte aligned;
//! - graph inputs and outputs are *persistent*: each has its own arena range for the whole
//!   run. A decoder input named like an encoder output is the same range (that is how the
//!   encoder hands the decoder its results), and a decoder cache updated in place by
//!   `scatter_row` shares its range with the output `X.next`;
//! - every other value, and each kernel's scratch, is *temporary*: it gets an offset in the
//!   region after the persistent ones by first-fit over its live range (definition to last
//!   use, aliases included). The encoder and the decoder step never run at the same time,
//!   so they share that region.

use std::collections::HashMap;

use wcc_format::{BufRef, GraphProgram, IoSlot, Launch, Quantization, WeightEntry};
use wcc_ir::interp::{self, Tensor, WeightLoader};
use wcc_ir::{Graph, Module, Op, ValueDef, ValueId};
use wcc_targets::Target;

use crate::kir::Kernel;
use crate::lower::{aliases_first_operand, lower_op, Slot};
use crate::BackendError;

const ALIGN: usize = 64;

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

pub struct Program {
    pub kernels: Vec<Kernel>,
    pub graphs: Vec<GraphProgram>,
    /// The constants kernels read, little-endian, each 64-byte aligned.
    pub weights: Vec<u8>,
    /// What `weights` holds: one entry per stored constant (a weight `@w`, or a value
    /// computed from weights alone, `graph:%value`, such as an int8 weight and its scales).
    pub constants: Vec<WeightEntry>,
    pub arena_bytes: u64,
    /// Bytes of the persistent part of the arena.
    pub persistent_bytes: u64,
    /// The temporaries of each graph, as placed (for checking and reporting the plan).
    pub temporaries: Vec<Vec<Placed>>,
}

/// One temporary buffer of the arena plan: live from node `first` to node `last`
/// (inclusive), at `offset` bytes into the temporary region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub first: usize,
    pub last: usize,
    pub offset: usize,
    pub bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    /// Index into the constant pool (stored in the weights blob on first use by a launch).
    Weight(usize),
    Persistent(usize),
    /// Index into the graph's temporaries.
    Temp(usize),
}

struct Temp {
    bytes: usize,
    first: usize,
    last: usize,
    offset: usize,
}

fn bytes_of(g: &Graph, v: ValueId) -> usize {
    g.ty(v).size_bytes()
}

/// Builds the program of `module` for `target`, reading weights through `loader`.
pub fn build(module: &Module, loader: &dyn WeightLoader, target: &Target) -> Result<Program, BackendError> {
    let mut weights: Vec<u8> = Vec::new();
    // Every constant (weight, or value computed from weights alone): its data, and where it
    // is stored in `weights` once a launch reads it. Constants only used to compute other
    // constants (a weight before folding, or its f32 copy once quantized) are never stored.
    let mut pool: Vec<Tensor> = Vec::new();
    // Per constant: its name in the weight table, and for int8 values where their scales are.
    let mut pool_names: Vec<String> = Vec::new();
    let mut pool_scales: Vec<Option<String>> = Vec::new();
    let mut pool_at: Vec<Option<usize>> = Vec::new();
    let mut weight_pool: HashMap<String, usize> = HashMap::new();
    // Folded constants by a hash of their type and bytes, and by the op and pool entries
    // they were computed from.
    let mut folded: HashMap<u64, usize> = HashMap::new();
    let mut evaluated: HashMap<(String, Vec<usize>), usize> = HashMap::new();
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut kernel_index: HashMap<String, usize> = HashMap::new();
    let mut persistent = 0usize;
    let mut named: HashMap<String, usize> = HashMap::new();
    let mut graphs = Vec::new();
    let mut temp_peak = 0usize;
    let mut plans = Vec::new();

    let push_weight = |weights: &mut Vec<u8>, t: &Tensor| -> usize {
        let at = align(weights.len());
        weights.resize(at, 0);
        weights.extend_from_slice(&t.data.to_le_bytes());
        at
    };

    for g in &module.graphs {
        let mut place: Vec<Option<Place>> = vec![None; g.values.len()];
        // The constants of this graph, by value: their pool entries (not copies: a model's
        // weights are held once however many graphs read them).
        let mut consts: HashMap<usize, usize> = HashMap::new();
        let uses = g.use_counts();
        let is_output = |v: ValueId| g.outputs.contains(&v);
        // Weights and weight-only subgraphs.
        for (k, v) in g.values.iter().enumerate() {
            if let ValueDef::Weight(w) = &v.def {
                let decl = module.weight(w).ok_or_else(|| BackendError(format!("@{w} is not declared")))?;
                let id = match weight_pool.get(w) {
                    Some(&id) => id,
                    None => {
                        let data = loader.load_f32(decl).map_err(|e| BackendError(format!("@{w}: {e}")))?;
                        pool.push(Tensor::f32(v.ty.shape.clone(), data));
                        pool_names.push(format!("@{w}"));
                        pool_scales.push(None);
                        pool_at.push(None);
                        weight_pool.insert(w.clone(), pool.len() - 1);
                        pool.len() - 1
                    }
                };
                place[k] = Some(Place::Weight(id));
                consts.insert(k, id);
            }
        }
        for node in &g.nodes {
            if !node.inputs.iter().all(|i| consts.contains_key(&i.index())) || is_output(node.output) {
                continue;
            }
            // The same op on the same constants (every decoder graph folds the same weights)
            // is evaluated once.
            let ids: Vec<usize> = node.inputs.iter().map(|i| consts[&i.index()]).collect();
            let op_key = (format!("{}{:?}", node.op.name(), node.op.attrs()), ids);
            if let Some(&id) = evaluated.get(&op_key) {
                place[node.output.index()] = Some(Place::Weight(id));
                consts.insert(node.output.index(), id);
                continue;
            }
            let args: Vec<&Tensor> = op_key.1.iter().map(|&id| &pool[id]).collect();
            let t = interp::eval(&node.op, &args)
                .map_err(|e| BackendError(format!("folding %{}: {e}", g.value(node.output).name)))?;
            // A constant another graph computed already (the beam steps fold the same weights
            // as `decoder_step`) is stored once: equal type and bytes, the same constant.
            let bytes = t.data.to_le_bytes();
            let key = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (&t.shape, t.dtype().name(), &bytes).hash(&mut h);
                h.finish()
            };
            let same = folded.get(&key).copied().filter(|&id: &usize| pool[id] == t);
            let id = match same {
                Some(id) => id,
                None => {
                    pool_names.push(format!("{}:%{}", g.name, g.value(node.output).name));
                    pool_scales.push(match node.op {
                        Op::Quantize { .. } => Some(format!("{}:%{}", g.name, g.value(node.inputs[1]).name)),
                        _ => None,
                    });
                    pool.push(t);
                    pool_at.push(None);
                    folded.insert(key, pool.len() - 1);
                    pool.len() - 1
                }
            };
            place[node.output.index()] = Some(Place::Weight(id));
            consts.insert(node.output.index(), id);
            evaluated.insert(op_key, id);
        }
        // Persistent: inputs and outputs, bound by name across graphs.
        let mut persist = |name: &str, bytes: usize, persistent: &mut usize| -> usize {
            *named.entry(name.to_string()).or_insert_with(|| {
                let at = *persistent;
                *persistent = align(at + bytes);
                at
            })
        };
        for &i in &g.inputs {
            place[i.index()] = Some(Place::Persistent(persist(&g.value(i).name, bytes_of(g, i), &mut persistent)));
        }
        // Aliases: reshape results and in-place cache updates share their operand's place.
        let mut alias_of: Vec<Option<ValueId>> = vec![None; g.values.len()];
        let mut in_place = vec![false; g.nodes.len()];
        for (n, node) in g.nodes.iter().enumerate() {
            if place[node.output.index()].is_some() {
                continue;
            }
            let src = node.inputs[0];
            let cache_in_place = matches!(node.op, Op::ScatterRow)
                && matches!(g.value(src).def, ValueDef::Input(_))
                && uses[src.index()] == 1
                && is_output(node.output);
            in_place[n] = cache_in_place;
            if aliases_first_operand(&node.op, cache_in_place) {
                alias_of[node.output.index()] = Some(src);
            }
        }
        let root = |mut v: ValueId| {
            while let Some(a) = alias_of[v.index()] {
                v = a;
            }
            v
        };
        for &o in &g.outputs {
            let r = root(o);
            if place[r.index()].is_none() {
                let name = &g.value(o).name;
                place[r.index()] = Some(Place::Persistent(persist(name, bytes_of(g, r), &mut persistent)));
            }
        }
        // Temporaries: live ranges over node indices, per alias root.
        let mut temps: Vec<Temp> = Vec::new();
        let mut temp_of: HashMap<usize, usize> = HashMap::new();
        for (n, node) in g.nodes.iter().enumerate() {
            let r = root(node.output);
            if place[r.index()].is_none() && !temp_of.contains_key(&r.index()) {
                temp_of.insert(r.index(), temps.len());
                temps.push(Temp { bytes: bytes_of(g, r), first: n, last: n, offset: 0 });
            }
            for &i in &node.inputs {
                if let Some(&t) = temp_of.get(&root(i).index()) {
                    temps[t].last = temps[t].last.max(n);
                }
            }
        }
        for (&r, &t) in &temp_of {
            place[r] = Some(Place::Temp(t));
        }
        for k in 0..g.values.len() {
            if place[k].is_none() {
                let r = root(ValueId(k as u32));
                place[k] = place[r.index()];
            }
        }
        // Kernels, and scratch temporaries that live for one node.
        let mut launches_by_node = Vec::new();
        for (n, node) in g.nodes.iter().enumerate() {
            if matches!(place[node.output.index()], Some(Place::Weight(_))) {
                launches_by_node.push(vec![]);
                continue;
            }
            let tys: Vec<&wcc_ir::TensorType> = node.inputs.iter().map(|&i| g.ty(i)).collect();
            let lowered = if target.gpu().is_some() {
                crate::gpu::lower_op_gpu(&node.op, &tys, g.ty(node.output), in_place[n], target)
            } else {
                lower_op(&node.op, &tys, g.ty(node.output), in_place[n], target)
            };
            let ok = lowered.map_err(|e| {
                BackendError(format!("graph `{}`, %{} ({}): {e}", g.name, g.value(node.output).name, node.op.name()))
            })?;
            let scratch: Vec<usize> = ok
                .scratch
                .iter()
                .map(|&bytes| {
                    temps.push(Temp { bytes, first: n, last: n, offset: 0 });
                    temps.len() - 1
                })
                .collect();
            let mut ls = Vec::new();
            for (kernel, slots) in ok.launches {
                let key = format!("{kernel:?}");
                let kid = *kernel_index.entry(key).or_insert_with(|| {
                    kernels.push(kernel.clone());
                    kernels.len() - 1
                });
                let places: Vec<(Place, usize)> = slots
                    .iter()
                    .map(|s| match s {
                        Slot::Input(i) => {
                            (place[node.inputs[*i].index()].expect("placed"), bytes_of(g, node.inputs[*i]))
                        }
                        Slot::Output => (place[node.output.index()].expect("placed"), bytes_of(g, node.output)),
                        Slot::Scratch(j) => (Place::Temp(scratch[*j]), temps[scratch[*j]].bytes),
                    })
                    .collect();
                ls.push((kid, places));
            }
            launches_by_node.push(ls);
        }
        // First fit over live ranges.
        let mut order: Vec<usize> = (0..temps.len()).collect();
        order.sort_by_key(|&t| (temps[t].first, std::cmp::Reverse(temps[t].bytes)));
        let mut placed: Vec<usize> = Vec::new();
        let mut top = 0usize;
        for &t in &order {
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|&&o| temps[o].last >= temps[t].first && temps[o].first <= temps[t].last)
                .map(|&o| (temps[o].offset, temps[o].offset + temps[o].bytes))
                .collect();
            busy.sort();
            let mut at = 0usize;
            for (s, e) in busy {
                if at + temps[t].bytes <= s {
                    break;
                }
                at = at.max(align(e));
            }
            temps[t].offset = at;
            top = top.max(align(at + temps[t].bytes));
            placed.push(t);
        }
        temp_peak = temp_peak.max(top);
        plans.push((g, place, temps, launches_by_node));
    }

    let mut temporaries = Vec::new();
    let mut stored = Vec::new();
    for (g, place, temps, launches_by_node) in plans {
        temporaries.push(
            temps.iter().map(|t| Placed { first: t.first, last: t.last, offset: t.offset, bytes: t.bytes }).collect(),
        );
        let mut to_ref = |p: Place, len: usize| -> BufRef {
            match p {
                Place::Weight(id) => {
                    let at = *pool_at[id].get_or_insert_with(|| {
                        let at = push_weight(&mut weights, &pool[id]);
                        stored.push(WeightEntry {
                            name: pool_names[id].clone(),
                            dtype: pool[id].dtype().name().into(),
                            shape: pool[id].shape.clone(),
                            offset: at as u64,
                            quantization: pool_scales[id]
                                .clone()
                                .map(|scales| Quantization { scheme: "symmetric_per_row".into(), scales }),
                        });
                        at
                    });
                    // Stored as computed (f16 checkpoint weights are widened to f32).
                    let _ = len;
                    BufRef::Weight { offset: at as u64, len: pool[id].data.size_bytes() as u64 }
                }
                Place::Persistent(at) => BufRef::Arena { offset: at as u64, len: len as u64 },
                Place::Temp(t) => BufRef::Arena { offset: (persistent + temps[t].offset) as u64, len: len as u64 },
            }
        };
        let io = |v: ValueId| -> Result<IoSlot, BackendError> {
            let value = g.value(v);
            match place[v.index()] {
                Some(Place::Persistent(at)) => Ok(IoSlot {
                    name: value.name.clone(),
                    offset: at as u64,
                    // Checkpoint types (f16/bf16) are widened to f32 by the kernels that read them.
                    dtype: if value.ty.dtype.is_float() { "f32".into() } else { value.ty.dtype.name().into() },
                    shape: value.ty.shape.clone(),
                }),
                _ => Err(BackendError(format!("graph `{}`: %{} is not in the arena", g.name, value.name))),
            }
        };
        let launches = launches_by_node
            .into_iter()
            .flatten()
            .map(|(kid, places)| Launch {
                kernel: kid as u32,
                buffers: places.into_iter().map(|(p, len)| to_ref(p, len)).collect(),
            })
            .collect();
        graphs.push(GraphProgram {
            name: g.name.clone(),
            inputs: g.inputs.iter().map(|&v| io(v)).collect::<Result<_, _>>()?,
            outputs: g.outputs.iter().map(|&v| io(v)).collect::<Result<_, _>>()?,
            launches,
        });
    }
    Ok(Program {
        kernels,
        graphs,
        weights,
        constants: stored,
        arena_bytes: (persistent + temp_peak) as u64,
        persistent_bytes: persistent as u64,
        temporaries,
    })
}
