//! Helpers shared by the pass tests: random weights and small modules.
#![allow(dead_code)]

use wcc_ir::interp::WeightLoader;
use wcc_ir::{DType, Graph, Module, TensorType, ValueId, WeightDecl, WeightSource};

/// Seeded random weights in [-1, 1) for any declaration (seeded by its name).
pub struct Random;

impl WeightLoader for Random {
    fn load_f32(&self, decl: &WeightDecl) -> Result<Vec<f32>, String> {
        let mut s = decl.name.bytes().fold(0x9E37_79B9u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) | 1;
        Ok((0..decl.ty.numel())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect())
    }
}

/// Declares an f16 weight `name` and uses it in `g`.
pub fn weight(m: &mut Module, g: &mut Graph, name: &str, shape: &[usize]) -> ValueId {
    let d = m.add_weight(
        name,
        TensorType::new(DType::F16, shape.to_vec()),
        WeightSource { tensor: name.into(), rows: None },
    );
    g.use_weight(&d)
}
