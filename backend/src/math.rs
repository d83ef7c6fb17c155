//! The math functions' definitions that both emitters use, so the CPU and the GPU compute
//! the same approximation (an emitter chooses only the instructions).

/// `erf(x) ≈ sign(x) · (1 - t·(a₀ + t·(a₁ + … + t·a₄)) · e^{-x²})` with `t = 1 / (1 + p·|x|)`:
/// Abramowitz–Stegun 7.1.26, absolute error below 1.5e-7. Evaluated as `poly = a₀`, then
/// `poly = poly·t + aᵢ` for `i = 1..5`, then `poly·t`.
pub const ERF_P: f32 = 0.327_591_1;
pub const ERF_A: [f32; 5] = [1.061_405_4, -1.453_152, 1.421_413_7, -0.284_496_72, 0.254_829_6];
