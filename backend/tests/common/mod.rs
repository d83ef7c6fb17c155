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
