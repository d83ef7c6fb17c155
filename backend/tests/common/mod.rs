//! Shared by the backend's tests: random inputs and where the fetched models are.
#![allow(dead_code)]

/// xorshift noise in [-1, 1), repeatable from `seed`.
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The directory of a fetched model.
pub fn model_dir(name: &str) -> std::path::PathBuf {
    wcc_frontend::resolve_model(name).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-models {name}"))
}

/// A fetched model lowered as `wcc compile` builds it by default: with the decoder step of a
/// beam of 5 beside the plain one, and the prompt blocks.
pub fn load_default_build(name: &str) -> wcc_frontend::LoadedModel {
    let opts = wcc_frontend::lower::LowerOptions {
        beam_sizes: vec![1, 5],
        prefill_sizes: wcc_frontend::lower::DEFAULT_PREFILL_SIZES.to_vec(),
        ..Default::default()
    };
    wcc_frontend::load_with(&model_dir(name), &opts).unwrap()
}

/// One representative node per (op, attributes, operand shapes) of `modules`, skipping the
/// values computed from weights alone (folded at compile time: no kernel): every distinct
/// kernel the modules need, once.
pub fn op_cases(
    modules: &[&wcc_ir::Module],
) -> std::collections::BTreeMap<String, (wcc_ir::Op, Vec<wcc_ir::TensorType>, wcc_ir::TensorType)> {
    let mut cases = std::collections::BTreeMap::new();
    for m in modules {
        for g in &m.graphs {
            let mut konst: Vec<bool> = g.values.iter().map(|v| matches!(v.def, wcc_ir::ValueDef::Weight(_))).collect();
            for n in &g.nodes {
                konst[n.output.index()] = n.inputs.iter().all(|i| konst[i.index()]);
                if konst[n.output.index()] {
                    continue;
                }
                let tys: Vec<_> = n.inputs.iter().map(|&i| g.ty(i).clone()).collect();
                let key = format!(
                    "{} {:?} {:?}",
                    n.op.name(),
                    n.op.attrs(),
                    tys.iter().map(|t| t.shape.clone()).collect::<Vec<_>>()
                );
                cases.entry(key).or_insert((n.op.clone(), tys, g.ty(n.output).clone()));
            }
        }
    }
    cases
}

/// Operands for a case of [`op_cases`]: noise in [-2, 2) for floats; for ids a token or a
/// position inside every table and cache used with them (a beam start gathers from a
/// one-row table: row 0), and for a beam's origins the hypotheses swapped, repeated and kept.
pub fn case_inputs(op: &wcc_ir::Op, tys: &[wcc_ir::TensorType]) -> Vec<wcc_ir::interp::Tensor> {
    use wcc_ir::interp::{Data, Tensor};
    use wcc_ir::{DType, Op};
    tys.iter()
        .enumerate()
        .map(|(k, t)| match t.dtype {
            DType::I32 if matches!(op, Op::ScatterRow) && k == 3 => {
                let b = t.shape[0] as i32;
                Tensor::i32(t.shape.clone(), (0..b).map(|j| (j * 3 + 2) % b).collect())
            }
            DType::I32 => {
                let id = if matches!(op, Op::Gather) { 5 % tys[0].shape[0] as i32 } else { 5 };
                Tensor::i32(t.shape.clone(), vec![id; t.numel()])
            }
            DType::U8 => Tensor::new(
                t.shape.clone(),
                Data::U8(noise(t.numel(), k as u64 + 1).iter().map(|v| ((v + 1.0) * 127.99) as u8).collect()),
            ),
            DType::I8 => Tensor::new(
                t.shape.clone(),
                Data::I8(noise(t.numel(), k as u64 + 1).iter().map(|v| (v * 127.99) as i8).collect()),
            ),
            _ => Tensor::f32(t.shape.clone(), noise(t.numel(), k as u64 + 1).iter().map(|v| v * 2.0).collect()),
        })
        .collect()
}
