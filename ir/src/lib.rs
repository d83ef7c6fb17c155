//! The wcc graph IR.
//!
//! A [`Module`] holds the model's hyper-parameters, a table of weights (references into a
//! checkpoint, never the data itself) and named graphs (`encoder`, `decoder_step`). A graph is
//! a list of nodes in SSA form over values with static shapes and dtypes. The IR has a text
//! form that prints and parses back to the same module ([`print_module`], [`parse_module`]),
//! a [`verify`]er, a DOT export ([`to_dot`]) and a plain reference [`interp`]reter that is the
//! numeric oracle for every backend.

mod dot;
mod graph;
pub mod interp;
mod op;
mod text;
mod types;
mod verify;

pub use dot::{module_to_dot, to_dot};
pub use graph::{Graph, Module, Node, Value, ValueDef, ValueId, WeightDecl, WeightSource};
pub use op::{infer_type, Op};
pub use text::{parse_module, print_graph, print_module, ParseError};
pub use types::{DType, TensorType};
pub use verify::{verify, VerifyError};
