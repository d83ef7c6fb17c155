use std::collections::{BTreeMap, HashMap};

use crate::op::{infer_type, Op};
use crate::types::TensorType;

/// Where a weight's data lives: a tensor of the checkpoint, optionally a range of its rows
/// (axis 0), which is how fused checkpoint tensors (CTranslate2's QKV) are split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSource {
    pub tensor: String,
    pub rows: Option<(usize, usize)>,
}

/// A weight of the module: its IR name, type (storage dtype and shape) and source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightDecl {
    pub name: String,
    pub ty: TensorType,
    pub source: WeightSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What defines a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueDef {
    /// The graph's `n`-th input.
    Input(usize),
    /// A weight of the module, by name.
    Weight(String),
    /// The result of the graph's `n`-th node.
    Node(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub name: String,
    pub ty: TensorType,
    pub def: ValueDef,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

/// One graph in SSA form: nodes are in a topological order, each defines one value.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    pub inputs: Vec<ValueId>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.values[id.index()].ty
    }

    pub fn find_value(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name).map(|i| ValueId(i as u32))
    }

    fn push_value(&mut self, name: String, ty: TensorType, def: ValueDef) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value { name, ty, def });
        id
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: impl Into<String>, ty: TensorType) -> ValueId {
        let id = self.push_value(name.into(), ty, ValueDef::Input(self.inputs.len()));
        self.inputs.push(id);
        id
    }

    /// The value standing for weight `decl` in this graph (created on first use).
    pub fn use_weight(&mut self, decl: &WeightDecl) -> ValueId {
        if let Some(i) = self.values.iter().position(|v| v.def == ValueDef::Weight(decl.name.clone())) {
            return ValueId(i as u32);
        }
        self.push_value(decl.name.clone(), decl.ty.clone(), ValueDef::Weight(decl.name.clone()))
    }

    /// Adds a value standing for the weight `name` of type `ty` (the caller guarantees the
    /// module declares it so; the verifier checks).
    pub fn add_weight_value(&mut self, name: impl Into<String>, ty: TensorType) -> ValueId {
        let name = name.into();
        self.push_value(name.clone(), ty, ValueDef::Weight(name))
    }

    /// Appends a node whose result type is inferred; `name` must be unique in the graph.
    pub fn add_node(&mut self, name: impl Into<String>, op: Op, inputs: &[ValueId]) -> Result<ValueId, String> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| self.ty(i)).collect();
        let name = name.into();
        let ty = infer_type(&op, &tys).map_err(|e| format!("node %{name}: {e}"))?;
        Ok(self.add_node_typed(name, op, inputs, ty))
    }

    /// Appends a node with a given result type (the parser's path; the verifier checks it).
    pub fn add_node_typed(&mut self, name: impl Into<String>, op: Op, inputs: &[ValueId], ty: TensorType) -> ValueId {
        let out = self.push_value(name.into(), ty, ValueDef::Node(self.nodes.len()));
        self.nodes.push(Node { op, inputs: inputs.to_vec(), output: out });
        out
    }

    /// Renumbers values in the order the text form introduces them (inputs, then for each
    /// node its not-yet-seen weight operands and its result) and drops values nothing
    /// refers to. Two graphs with the same text are then equal as data.
    pub fn canonicalize(&mut self) {
        let mut order: Vec<ValueId> = self.inputs.clone();
        let mut seen = vec![false; self.values.len()];
        for &i in &self.inputs {
            seen[i.index()] = true;
        }
        for node in &self.nodes {
            for &i in &node.inputs {
                if !seen[i.index()] && matches!(self.values[i.index()].def, ValueDef::Weight(_)) {
                    seen[i.index()] = true;
                    order.push(i);
                }
            }
            seen[node.output.index()] = true;
            order.push(node.output);
        }
        let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
        for (new, &old) in order.iter().enumerate() {
            remap.insert(old, ValueId(new as u32));
        }
        let map = |v: &ValueId| *remap.get(v).unwrap_or(v);
        let values = order.iter().map(|&old| self.values[old.index()].clone()).collect();
        self.values = values;
        self.inputs = self.inputs.iter().map(map).collect();
        for node in &mut self.nodes {
            node.inputs = node.inputs.iter().map(map).collect();
            node.output = map(&node.output);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            self.values[node.output.index()].def = ValueDef::Node(i);
        }
        self.outputs = self.outputs.iter().map(map).collect();
    }

    /// Drops the nodes no graph output depends on, then [`Graph::canonicalize`]s. Passes
    /// that replace a subgraph by one node call it to remove what they replaced; every op is
    /// pure, so a node nothing reads computes nothing observable.
    pub fn remove_dead_nodes(&mut self) {
        let mut live = vec![false; self.values.len()];
        for &o in &self.outputs {
            live[o.index()] = true;
        }
        for node in self.nodes.iter().rev() {
            if live[node.output.index()] {
                for &i in &node.inputs {
                    live[i.index()] = true;
                }
            }
        }
        self.nodes.retain(|n| live[n.output.index()]);
        for (i, node) in self.nodes.iter().enumerate() {
            self.values[node.output.index()].def = ValueDef::Node(i);
        }
        self.canonicalize();
    }

    /// How many nodes use each value (graph outputs count as a use).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.values.len()];
        for n in &self.nodes {
            for &i in &n.inputs {
                uses[i.index()] += 1;
            }
        }
        for &o in &self.outputs {
            uses[o.index()] += 1;
        }
        uses
    }
}

/// A whole model: hyper-parameters, the weight table and the graphs.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Module {
    pub name: String,
    /// Integer hyper-parameters (`n_mels`, `n_audio_ctx`, ...), sorted by key.
    pub params: BTreeMap<String, i64>,
    pub weights: Vec<WeightDecl>,
    pub graphs: Vec<Graph>,
}

impl Module {
    pub fn new(name: impl Into<String>) -> Self {
        Module { name: name.into(), ..Default::default() }
    }

    pub fn graph(&self, name: &str) -> Option<&Graph> {
        self.graphs.iter().find(|g| g.name == name)
    }

    pub fn graph_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.graphs.iter_mut().find(|g| g.name == name)
    }

    pub fn weight(&self, name: &str) -> Option<&WeightDecl> {
        self.weights.iter().find(|w| w.name == name)
    }

    /// Declares a weight; returns a copy of its declaration for [`Graph::use_weight`].
    pub fn add_weight(&mut self, name: impl Into<String>, ty: TensorType, source: WeightSource) -> WeightDecl {
        let decl = WeightDecl { name: name.into(), ty, source };
        self.weights.push(decl.clone());
        decl
    }

    pub fn param(&self, key: &str) -> Option<i64> {
        self.params.get(key).copied()
    }
}
