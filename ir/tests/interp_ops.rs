//! The interpreter's ops on small inputs whose results are worked out by hand.

use wcc_ir::interp::{eval, gelu, Tensor};
use wcc_ir::Op;

fn f(t: &Tensor) -> Vec<f32> {
    t.as_f32().unwrap().to_vec()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} != {b:?}");
    }
}

#[test]
fn conv1d_with_stride_and_zero_padding() {
    // One channel in, one out, kernel [1, 2, 3], bias 10, x = [1, 2, 3, 4].
    let x = Tensor::f32([1, 4], vec![1., 2., 3., 4.]);
    let w = Tensor::f32([1, 1, 3], vec![1., 2., 3.]);
    let b = Tensor::f32([1], vec![10.]);
    // padding 1: windows [0,1,2], [1,2,3], [2,3,4], [3,4,0]
    let y = eval(&Op::Conv1d { stride: 1, padding: 1 }, &[&x, &w, &b]).unwrap();
    close(&f(&y), &[10. + 0. + 2. + 6., 10. + 1. + 4. + 9., 10. + 2. + 6. + 12., 10. + 3. + 8. + 0.]);
    let y = eval(&Op::Conv1d { stride: 2, padding: 1 }, &[&x, &w, &b]).unwrap();
    assert_eq!(y.shape, vec![1, 2]);
    close(&f(&y), &[10. + 2. + 6., 10. + 2. + 6. + 12.]); // windows [0,1,2], [2,3,4]
}

#[test]
fn linear_is_x_times_w_transposed_plus_bias() {
    let x = Tensor::f32([1, 2], vec![1., 2.]);
    let w = Tensor::f32([3, 2], vec![1., 0., 0., 1., 1., 1.]);
    let b = Tensor::f32([3], vec![0.5, 0., -1.]);
    close(&f(&eval(&Op::Linear, &[&x, &w, &b]).unwrap()), &[1.5, 2., 2.]);
    close(&f(&eval(&Op::Linear, &[&x, &w]).unwrap()), &[1., 2., 3.]);
}

#[test]
fn matmul_plain_and_transposed() {
    let a = Tensor::f32([1, 1, 2], vec![1., 2.]);
    let b = Tensor::f32([1, 2, 2], vec![1., 2., 3., 4.]);
    close(&f(&eval(&Op::MatMul { transpose_b: false }, &[&a, &b]).unwrap()), &[7., 10.]);
    close(&f(&eval(&Op::MatMul { transpose_b: true }, &[&a, &b]).unwrap()), &[5., 11.]);
}

#[test]
fn add_broadcasts_like_numpy() {
    let a = Tensor::f32([2, 1, 3], vec![0., 1., 2., 10., 11., 12.]);
    let b = Tensor::f32([1, 3], vec![100., 200., 300.]);
    let y = eval(&Op::Add, &[&a, &b]).unwrap();
    assert_eq!(y.shape, vec![2, 1, 3]);
    close(&f(&y), &[100., 201., 302., 110., 211., 312.]);
}

#[test]
fn softmax_and_masking() {
    let x = Tensor::f32([1, 3], vec![0., (2f32).ln(), f32::NEG_INFINITY]);
    close(&f(&eval(&Op::Softmax, &[&x]).unwrap()), &[1. / 3., 2. / 3., 0.]);
    let pos = Tensor::i32([1], vec![1]);
    let m = eval(&Op::CausalMask { len: 3 }, &[&pos]).unwrap();
    assert_eq!(f(&m), vec![0., 0., f32::NEG_INFINITY]);
    let bad = Tensor::i32([1], vec![3]);
    assert!(eval(&Op::CausalMask { len: 3 }, &[&bad]).is_err());
}

#[test]
fn layer_norm_normalises_then_applies_gain_and_bias() {
    let x = Tensor::f32([1, 2], vec![1., 3.]);
    let g = Tensor::f32([2], vec![2., 1.]);
    let b = Tensor::f32([2], vec![0., 1.]);
    // mean 2, variance 1: normalised [-1, 1] (eps 0)
    close(&f(&eval(&Op::LayerNorm { eps: 0.0 }, &[&x, &g, &b]).unwrap()), &[-2., 2.]);
}

#[test]
fn gelu_known_values() {
    // GELU(1) = Φ(1) = 0.841344746..., GELU(-1) = -(1 - Φ(1))
    assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    assert!((gelu(-1.0) + 0.158_655_25).abs() < 1e-6);
    assert_eq!(gelu(0.0), 0.0);
}

#[test]
fn data_movement() {
    let x = Tensor::f32([2, 3], vec![0., 1., 2., 3., 4., 5.]);
    let t = eval(&Op::Transpose { perm: vec![1, 0] }, &[&x]).unwrap();
    assert_eq!((t.shape.clone(), f(&t)), (vec![3, 2], vec![0., 3., 1., 4., 2., 5.]));
    let s = eval(&Op::Slice { axis: 1, start: 1, end: 3 }, &[&x]).unwrap();
    assert_eq!(f(&s), vec![1., 2., 4., 5.]);
    let ids = Tensor::i32([2], vec![1, 0]);
    assert_eq!(f(&eval(&Op::Gather, &[&x, &ids]).unwrap()), vec![3., 4., 5., 0., 1., 2.]);
    let row = Tensor::f32([1, 3], vec![9., 9., 9.]);
    let at = Tensor::i32([1], vec![0]);
    assert_eq!(f(&eval(&Op::ScatterRow, &[&x, &at, &row]).unwrap()), vec![9., 9., 9., 3., 4., 5.]);
    // Several rows from `index` on (a prompt prefilled at once); they must fit in the cache.
    let c = Tensor::f32([4, 2], (0..8).map(|v| v as f32).collect());
    let rows = Tensor::f32([2, 2], vec![7., 7., 8., 8.]);
    let at1 = Tensor::i32([1], vec![1]);
    assert_eq!(f(&eval(&Op::ScatterRow, &[&c, &at1, &rows]).unwrap()), vec![0., 1., 7., 7., 8., 8., 6., 7.]);
    let at2 = Tensor::i32([1], vec![2]);
    assert_eq!(f(&eval(&Op::ScatterRow, &[&c, &at2, &rows]).unwrap()), vec![0., 1., 2., 3., 7., 7., 8., 8.]);
    let at3 = Tensor::i32([1], vec![3]);
    assert!(eval(&Op::ScatterRow, &[&c, &at3, &rows]).is_err());
    let oob = Tensor::i32([1], vec![5]);
    assert!(eval(&Op::Gather, &[&x, &oob]).is_err());
}

#[test]
fn quantize_one_rounds_half_to_even_and_clamps() {
    use wcc_ir::interp::quantize_one;
    // The definition: round half to even, clamp to ±127, NaN to 0.
    let reference = |x: f32, s: f32| {
        let q = (x / s).round_ties_even();
        if q.is_nan() {
            0
        } else {
            q.clamp(-127.0, 127.0) as i32
        }
    };
    let mut xs: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.25).collect();
    xs.extend([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.5, -127.5, 128.5, 1e9, -1e9, f32::INFINITY, f32::NEG_INFINITY]);
    xs.extend([f32::NAN, 1e-40, -0.0, 0.49999997, 126.49999]);
    let mut seed = 7u64;
    for _ in 0..20000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        xs.push(((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 300.0);
    }
    for &x in &xs {
        for s in [1.0f32, 0.5, 3.0, 1e-3, 1e30, 0.0] {
            assert_eq!(quantize_one(x, s), reference(x, s), "quantize_one({x}, {s})");
        }
    }
}
