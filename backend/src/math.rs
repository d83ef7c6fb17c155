//! The math functions' definitions that both emitters use, so the CPU and the GPU compute
//! the same approximation, operation for operation (an emitter chooses only the
//! instructions): with the same FMAs, their results are bit for bit the same.

/// `erf(x) ≈ sign(x) · (1 - t·(a₀ + t·(a₁ + … + t·a₄)) · e^{-x²})` with `t = 1 / (1 + p·|x|)`:
/// Abramowitz–Stegun 7.1.26, absolute error below 1.5e-7. Evaluated as `poly = a₀`, then
/// `poly = poly·t + aᵢ` for `i = 1..5`, then `poly·t`.
pub const ERF_P: f32 = 0.327_591_1;
pub const ERF_A: [f32; 5] = [1.061_405_4, -1.453_152, 1.421_413_7, -0.284_496_72, 0.254_829_6];

/// `e^x` (see the emitters' `exp`): inputs are clamped to `[EXP_LO, EXP_HI]` (below
/// `EXP_LO` the result is exactly 0); `x = n·ln2 + r` with `n = (x·log2 e + EXP_MAGIC) -
/// EXP_MAGIC` (adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa
/// bits); `r = (x + n·LN2_HI) + n·LN2_LO`; the Taylor polynomial `EXP_COEFFS` in `r`
/// (Horner, highest degree first, one FMA a step) times `2^n` built in the exponent bits.
/// Relative error < 2e-7.
pub const EXP_LO: f32 = -87.3;
pub const EXP_HI: f32 = 88.7;
pub const EXP_MAGIC: f32 = 12_582_912.0;
pub const LN2_HI: f32 = -0.693_145_75;
pub const LN2_LO: f32 = -1.428_606_8e-6;
pub const EXP_COEFFS: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
/// `UnOp::ExpLow`: only the lower clamp, `r = x - n·ln 2` in one constant, degree 4
/// (relative error < 5e-5): enough for values rounded to 8 bits next.
pub const EXP_LOW_COEFFS: [f32; 5] = [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
