//! The reference interpreter: every op in plain f32 loops, written to be obviously right
//! rather than fast. It is the oracle the backend's kernels are tested against. The only
//! concessions to speed are rayon over independent output rows and dot products with
//! several accumulators (which reorders sums, within f32 rounding).

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use crate::graph::{Module, ValueDef, WeightDecl};
use crate::op::{broadcast_shapes, Op};
use crate::types::DType;

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I8(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the elements in memory.
    pub fn size_bytes(&self) -> usize {
        match self {
            Data::F32(v) => 4 * v.len(),
            Data::I32(v) => 4 * v.len(),
            Data::I8(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }

    /// The elements as little-endian bytes (the layout of buffers in memory and in a `.wbin`).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
            Data::U8(v) => v.clone(),
        }
    }

    /// Elements of `dtype` from little-endian bytes (the inverse of [`Data::to_le_bytes`]).
    pub fn from_le_bytes(dtype: DType, b: &[u8]) -> Option<Data> {
        Some(match dtype {
            DType::F32 => Data::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            DType::I32 => Data::I32(b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()),
            DType::I8 => Data::I8(b.iter().map(|&x| x as i8).collect()),
            DType::U8 => Data::U8(b.to_vec()),
            _ => return None,
        })
    }

    /// `index` picks elements by position (shared by the data-movement ops).
    fn pick(&self, n: usize, index: impl Fn(usize) -> usize) -> Data {
        match self {
            Data::F32(v) => Data::F32((0..n).map(|i| v[index(i)]).collect()),
            Data::I32(v) => Data::I32((0..n).map(|i| v[index(i)]).collect()),
            Data::I8(v) => Data::I8((0..n).map(|i| v[index(i)]).collect()),
            Data::U8(v) => Data::U8((0..n).map(|i| v[index(i)]).collect()),
        }
    }
}

impl Tensor {
    pub fn f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Tensor {
        let shape = shape.into();
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not fill its shape");
        Tensor { shape, data: Data::F32(data) }
    }

    pub fn i32(shape: impl Into<Vec<usize>>, data: Vec<i32>) -> Tensor {
        let shape = shape.into();
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not fill its shape");
        Tensor { shape, data: Data::I32(data) }
    }

    pub fn zeros(shape: impl Into<Vec<usize>>) -> Tensor {
        let shape = shape.into();
        let n = shape.iter().product();
        Tensor::f32(shape, vec![0.0; n])
    }

    pub fn new(shape: impl Into<Vec<usize>>, data: Data) -> Tensor {
        let shape = shape.into();
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not fill its shape");
        Tensor { shape, data }
    }

    fn wrong(&self, want: DType) -> InterpError {
        InterpError(format!("expected a {want} tensor, got {}", self.dtype()))
    }

    pub fn as_f32(&self) -> Result<&[f32], InterpError> {
        match &self.data {
            Data::F32(v) => Ok(v),
            _ => Err(self.wrong(DType::F32)),
        }
    }

    pub fn as_i32(&self) -> Result<&[i32], InterpError> {
        match &self.data {
            Data::I32(v) => Ok(v),
            _ => Err(self.wrong(DType::I32)),
        }
    }

    pub fn as_i8(&self) -> Result<&[i8], InterpError> {
        match &self.data {
            Data::I8(v) => Ok(v),
            _ => Err(self.wrong(DType::I8)),
        }
    }

    pub fn as_u8(&self) -> Result<&[u8], InterpError> {
        match &self.data {
            Data::U8(v) => Ok(v),
            _ => Err(self.wrong(DType::U8)),
        }
    }

    pub fn into_f32(self) -> Result<Vec<f32>, InterpError> {
        match self.data {
            Data::F32(v) => Ok(v),
            _ => Err(self.wrong(DType::F32)),
        }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I32(_) => DType::I32,
            Data::I8(_) => DType::I8,
            Data::U8(_) => DType::U8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InterpError(pub String);

/// Supplies weight data, widened to f32, for a declaration (the frontend's checkpoints
/// implement it).
pub trait WeightLoader {
    fn load_f32(&self, decl: &WeightDecl) -> Result<Vec<f32>, String>;
}

/// Runs the graphs of one module. Weights are loaded (and widened to f32) once.
pub struct Interpreter<'m> {
    module: &'m Module,
    weights: HashMap<String, Arc<Tensor>>,
    /// Per graph: the values computed from weights alone, evaluated once at construction.
    consts: HashMap<String, HashMap<usize, Arc<Tensor>>>,
}

impl<'m> Interpreter<'m> {
    pub fn new(module: &'m Module, loader: &dyn WeightLoader) -> Result<Self, InterpError> {
        let mut weights = HashMap::new();
        for g in &module.graphs {
            for v in &g.values {
                let ValueDef::Weight(name) = &v.def else {
                    continue;
                };
                if weights.contains_key(name) {
                    continue;
                }
                let decl =
                    module.weight(name).ok_or_else(|| InterpError(format!("@{name} is not a declared weight")))?;
                let data = loader.load_f32(decl).map_err(|e| InterpError(format!("loading @{name}: {e}")))?;
                if data.len() != decl.ty.numel() {
                    return Err(InterpError(format!("@{name}: loader gave {} elements for {}", data.len(), decl.ty)));
                }
                weights.insert(name.clone(), Arc::new(Tensor::f32(decl.ty.shape.clone(), data)));
            }
        }
        let mut consts = HashMap::new();
        for g in &module.graphs {
            let mut known: HashMap<usize, Arc<Tensor>> = HashMap::new();
            for (k, v) in g.values.iter().enumerate() {
                if let ValueDef::Weight(w) = &v.def {
                    known.insert(k, weights[w].clone());
                }
            }
            let mut folded = HashMap::new();
            for node in &g.nodes {
                if node.inputs.iter().all(|i| known.contains_key(&i.index())) {
                    let args: Vec<&Tensor> = node.inputs.iter().map(|i| &*known[&i.index()]).collect();
                    let t = Arc::new(eval(&node.op, &args).map_err(|e| {
                        InterpError(format!("graph `{}`, %{}: {}", g.name, g.value(node.output).name, e.0))
                    })?);
                    known.insert(node.output.index(), t.clone());
                    folded.insert(node.output.index(), t);
                }
            }
            consts.insert(g.name.clone(), folded);
        }
        Ok(Interpreter { module, weights, consts })
    }

    pub fn module(&self) -> &Module {
        self.module
    }

    /// Runs graph `name` on `inputs` (in the graph's input order) and returns its outputs.
    pub fn run(&self, name: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, InterpError> {
        let g = self.module.graph(name).ok_or_else(|| InterpError(format!("no graph `{name}`")))?;
        if inputs.len() != g.inputs.len() {
            return Err(InterpError(format!("graph `{name}` takes {} inputs, got {}", g.inputs.len(), inputs.len())));
        }
        let mut env: Vec<Option<Arc<Tensor>>> = vec![None; g.values.len()];
        for (&id, t) in g.inputs.iter().zip(inputs) {
            let want = g.ty(id);
            let dtype_ok = t.dtype() == want.dtype || (t.dtype() == DType::F32 && want.dtype.is_float());
            if t.shape != want.shape || !dtype_ok {
                return Err(InterpError(format!(
                    "input %{} must be {want}, got {}{:?}",
                    g.value(id).name,
                    t.dtype(),
                    t.shape
                )));
            }
            env[id.index()] = Some(Arc::new(t.clone()));
        }
        for (k, v) in g.values.iter().enumerate() {
            if let ValueDef::Weight(w) = &v.def {
                env[k] = Some(self.weights[w].clone());
            }
        }
        let consts = &self.consts[&g.name];
        for (&k, t) in consts {
            env[k] = Some(t.clone());
        }
        // Free each intermediate after its last use so the peak stays near one layer's worth.
        let mut last_use = vec![usize::MAX; g.values.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for &x in &n.inputs {
                last_use[x.index()] = i;
            }
        }
        for &o in &g.outputs {
            last_use[o.index()] = usize::MAX;
        }
        for (i, node) in g.nodes.iter().enumerate() {
            if consts.contains_key(&node.output.index()) {
                continue;
            }
            let args: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|&x| env[x.index()].as_deref().expect("verified graph: operand defined"))
                .collect();
            let out = eval(&node.op, &args)
                .map_err(|e| InterpError(format!("graph `{name}`, %{}: {}", g.value(node.output).name, e.0)))?;
            debug_assert_eq!(out.shape, g.ty(node.output).shape);
            env[node.output.index()] = Some(Arc::new(out));
            for &x in &node.inputs {
                if last_use[x.index()] == i
                    && !matches!(g.value(x).def, ValueDef::Weight(_))
                    && !consts.contains_key(&x.index())
                {
                    env[x.index()] = None;
                }
            }
        }
        Ok(g.outputs.iter().map(|&o| (*env[o.index()].clone().expect("output computed")).clone()).collect())
    }
}

/// Evaluates one op.
pub fn eval(op: &Op, args: &[&Tensor]) -> Result<Tensor, InterpError> {
    let f = |i: usize| args[i].as_f32();
    Ok(match op {
        Op::Conv1d { stride, padding } => conv1d(args[0], args[1], f(2)?, *stride, *padding)?,
        Op::Im2col { kernel, stride, padding } => im2col(args[0], *kernel, *stride, *padding)?,
        Op::Linear => linear(args[0], args[1], args.get(2).map(|b| b.as_f32()).transpose()?)?,
        Op::MatMul { transpose_b } => matmul(args[0], args[1], *transpose_b)?,
        Op::Add => broadcast(args[0], args[1], |a, b| a + b)?,
        Op::Mul => broadcast(args[0], args[1], |a, b| a * b)?,
        Op::Scale { factor } => Tensor::f32(args[0].shape.clone(), f(0)?.iter().map(|x| x * factor).collect()),
        Op::Gelu => Tensor::f32(args[0].shape.clone(), f(0)?.iter().map(|&x| gelu(x)).collect()),
        Op::LayerNorm { eps } if args.len() == 1 => {
            let d = *args[0].shape.last().unwrap();
            layer_norm(args[0], &vec![1.0; d], &vec![0.0; d], *eps)?
        }
        Op::LayerNorm { eps } => layer_norm(args[0], f(1)?, f(2)?, *eps)?,
        Op::Concat { axis } => concat(args, *axis)?,
        Op::FusedLinear { gelu: g, residual } => {
            let mut y = linear(args[0], args[1], Some(f(2)?))?;
            if *g {
                y = Tensor::f32(y.shape.clone(), y.as_f32()?.iter().map(|&v| gelu(v)).collect());
            }
            if *residual {
                y = broadcast(&y, args[3], |a, b| a + b)?;
            }
            y
        }
        Op::MaskedSoftmax => softmax(&broadcast(args[0], args[1], |a, b| a + b)?)?,
        Op::Softmax => softmax(args[0])?,
        Op::Reshape { shape } => Tensor { shape: shape.clone(), data: args[0].data.clone() },
        Op::Transpose { perm } => transpose(args[0], perm),
        Op::Slice { axis, start, end } => slice(args[0], *axis, *start, *end),
        Op::Gather if args.len() == 3 => {
            let (table, scales) = (args[0].as_i8()?, f(2)?);
            let d = args[0].shape[1];
            let rows: Vec<Tensor> = args[1]
                .as_i32()?
                .iter()
                .map(|&id| {
                    let id = position(&[id], scales.len())?;
                    let row = table[id * d..(id + 1) * d].iter().map(|&q| q as f32 * scales[id]).collect();
                    Ok(Tensor::f32([1, d], row))
                })
                .collect::<Result<_, InterpError>>()?;
            let refs: Vec<&Tensor> = rows.iter().collect();
            concat(&refs, 0)?
        }
        Op::Gather => gather(args[0], args[1].as_i32()?)?,
        Op::ScatterRow if args.len() == 4 => beam_scatter_row(args[0], args[1].as_i32()?, f(2)?, args[3].as_i32()?)?,
        Op::ScatterRow => scatter_row(args[0], args[1].as_i32()?, args[2])?,
        Op::CacheAttention { heads } if args[1].shape.len() == 3 => {
            beam_cache_attention(args[0], f(1)?, f(2)?, args[3].as_i32()?, *heads)?
        }
        Op::CacheAttention { heads } => cache_attention(args[0], f(1)?, f(2)?, args[3].as_i32()?, *heads)?,
        Op::CausalMask { len } => {
            let pos = position(args[0].as_i32()?, *len)?;
            Tensor::f32([1, *len], (0..*len).map(|j| if j <= pos { 0.0 } else { f32::NEG_INFINITY }).collect())
        }
        Op::RowScale => {
            let x = f(0)?;
            let k = (*args[0].shape.last().unwrap()).max(1);
            Tensor::f32([x.len() / k], x.par_chunks(k).map(row_scale).collect())
        }
        Op::Quantize { dtype } => quantize(args[0], f(1)?, *dtype)?,
        Op::SoftmaxScale => softmax_scale(args[0])?,
        Op::SoftmaxQuantize => softmax_quantize(args[0])?,
        Op::RowSum => {
            let w = args[0].as_i8()?;
            let k = *args[0].shape.last().unwrap();
            let k = k.max(1);
            Tensor::i32([w.len() / k], w.par_chunks(k).map(|r| r.iter().map(|&v| v as i32).sum()).collect())
        }
        Op::QMatMul => qmatmul(args)?,
        Op::QAttention => {
            // By definition (see the op): the two products around the quantized softmax.
            let s = qmatmul(&args[..5])?;
            let (p, ps) = (softmax_quantize(&s)?, softmax_scale(&s)?);
            qmatmul(&[&p, &ps, args[5], args[6], args[7]])?
        }
        Op::Fill { value } => Tensor::f32([1], vec![*value]),
        Op::QLinear { gelu: g, residual } => {
            let mut y = qlinear(args)?;
            if *g {
                y = Tensor::f32(y.shape.clone(), y.as_f32()?.iter().map(|&v| gelu(v)).collect());
            }
            if *residual {
                y = broadcast(&y, args[6], |a, b| a + b)?;
            }
            y
        }
    })
}

/// The smallest maximum `row_scale` divides by 127: a row of zeros gets a tiny scale (and
/// quantizes to zeros) instead of a division by zero.
pub const ROW_SCALE_FLOOR: f32 = 1e-30;

/// The symmetric int8 scale of one row: `max(max |x|, ROW_SCALE_FLOOR) / 127`.
pub fn row_scale(row: &[f32]) -> f32 {
    row.iter().fold(0f32, |m, v| m.max(v.abs())).max(ROW_SCALE_FLOOR) / 127.0
}

/// The zero point of a quantized type: 128 for `u8` (so symmetric values fit unsigned bytes,
/// as `vpdpbusd` wants them), 0 for `i8`.
pub fn zero_point(dtype: DType) -> i32 {
    if dtype == DType::U8 {
        128
    } else {
        0
    }
}

/// A row's maximum and `Σ exp(x − max)`.
pub fn softmax_denominator(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, row.iter().map(|&v| (v - max).exp()).sum())
}

/// `round_ties_even(127 · exp(d))` clamped to ±127 (NaN becomes 0): one probability of
/// `softmax_quantize`, `d` being the score minus the row's maximum.
pub fn quantize_exp(d: f32) -> i32 {
    let q = (127.0 * d.exp()).round_ties_even();
    if q.is_nan() {
        0
    } else {
        q.clamp(-127.0, 127.0) as i32
    }
}

/// One element quantized: `round_ties_even(x / s)` clamped to ±127 (NaN becomes 0).
pub fn quantize_one(x: f32, s: f32) -> i32 {
    let v = x / s;
    if v.is_nan() {
        return 0;
    }
    // Clamped to ±128 first (anything past ±127.5 ends at ±127 either way), then rounded
    // half to even by adding and subtracting 1.5·2²³, exact for |v| <= 2²² in the default
    // rounding mode. `round_ties_even` is a call to libm's `rintf` on the baseline x86-64
    // target: folding medium's int8 weights at compile time spent a fifth of its time there.
    const MAGIC: f32 = 12_582_912.0;
    let r = (v.clamp(-128.0, 128.0) + MAGIC) - MAGIC;
    r.clamp(-127.0, 127.0) as i32
}

fn quantize(x: &Tensor, s: &[f32], dtype: DType) -> Result<Tensor, InterpError> {
    let xd = x.as_f32()?;
    let k = *x.shape.last().unwrap();
    let zp = zero_point(dtype);
    // Rows in parallel (a model's weights are quantized here at compile time), each with
    // its scale (or the one scale).
    let k = k.max(1);
    let scale = |r: usize| if s.len() == 1 { s[0] } else { s[r] };
    let rows = |out: &mut [u8], to: fn(i32) -> u8| {
        out.par_chunks_mut(k).zip(xd.par_chunks(k)).enumerate().for_each(|(r, (o, x))| {
            let sr = scale(r);
            for (o, &v) in o.iter_mut().zip(x) {
                *o = to(quantize_one(v, sr) + zp);
            }
        })
    };
    let mut out = vec![0u8; xd.len()];
    let data = match dtype {
        DType::I8 => {
            rows(&mut out, |q| q as i8 as u8);
            Data::I8(out.into_iter().map(|b| b as i8).collect())
        }
        DType::U8 => {
            rows(&mut out, |q| q as u8);
            Data::U8(out)
        }
        other => return Err(InterpError(format!("quantize to {other}"))),
    };
    Ok(Tensor::new(x.shape.clone(), data))
}

/// `softmax_scale` (see the op).
fn softmax_scale(x: &Tensor) -> Result<Tensor, InterpError> {
    let k = *x.shape.last().unwrap();
    let v = x.as_f32()?;
    Ok(Tensor::f32([v.len() / k], v.chunks(k).map(|r| 1.0 / (127.0 * softmax_denominator(r).1)).collect()))
}

/// `softmax_quantize` (see the op).
fn softmax_quantize(x: &Tensor) -> Result<Tensor, InterpError> {
    let k = *x.shape.last().unwrap();
    let v = x.as_f32()?;
    let mut q = Vec::with_capacity(v.len());
    for r in v.chunks(k) {
        let max = softmax_denominator(r).0;
        q.extend(r.iter().map(|&v| (quantize_exp(v - max) + 128) as u8));
    }
    Ok(Tensor::new(x.shape.clone(), Data::U8(q)))
}

fn qmatmul(args: &[&Tensor]) -> Result<Tensor, InterpError> {
    let (aq, asc, bq) = (args[0].as_u8()?, args[1].as_f32()?, args[2].as_i8()?);
    let (bsc, bsum) = (args[3].as_f32()?, args[4].as_i32()?);
    let (bt, m, k) = (args[0].shape[0], args[0].shape[1], args[0].shape[2]);
    let n = args[2].shape[1];
    let mut out = vec![0.0f32; bt * m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let b = r / m;
        let ar = &aq[r * k..(r + 1) * k];
        for (j, o) in row.iter_mut().enumerate() {
            let c = b * n + j;
            let br = &bq[c * k..(c + 1) * k];
            let acc: i32 = ar.iter().zip(br).map(|(&x, &w)| x as i32 * w as i32).sum();
            let v = acc.wrapping_sub(128i32.wrapping_mul(bsum[c]));
            *o = v as f32 * (if asc.len() == 1 { asc[0] } else { asc[r] } * bsc[c]);
        }
    });
    Ok(Tensor::f32([bt, m, n], out))
}

/// `qlinear` without its GELU/residual epilogue.
fn qlinear(args: &[&Tensor]) -> Result<Tensor, InterpError> {
    let (xq, xs, wq) = (args[0].as_u8()?, args[1].as_f32()?, args[2].as_i8()?);
    let (ws, wsum, b) = (args[3].as_f32()?, args[4].as_i32()?, args[5].as_f32()?);
    let (n, k) = (args[2].shape[0], args[2].shape[1]);
    let m = xq.len() / k;
    let mut out = vec![0.0f32; m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let xr = &xq[i * k..(i + 1) * k];
        let sx = if xs.len() == 1 { xs[0] } else { xs[i] };
        for (j, o) in row.iter_mut().enumerate() {
            let wr = &wq[j * k..(j + 1) * k];
            let acc: i32 = xr.iter().zip(wr).map(|(&a, &w)| a as i32 * w as i32).sum();
            let c = acc.wrapping_sub(128i32.wrapping_mul(wsum[j]));
            *o = c as f32 * (sx * ws[j]) + b[j];
        }
    });
    let mut shape = args[0].shape.clone();
    *shape.last_mut().unwrap() = n;
    Ok(Tensor::f32(shape, out))
}

fn position(ids: &[i32], len: usize) -> Result<usize, InterpError> {
    match ids.first() {
        Some(&p) if p >= 0 && (p as usize) < len => Ok(p as usize),
        other => Err(InterpError(format!("position {other:?} is outside 0..{len}"))),
    }
}

/// The exact GELU: `x/2 * (1 + erf(x/√2))`.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Dot product with eight partial sums, which lets the compiler vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn conv1d(x: &Tensor, w: &Tensor, b: &[f32], stride: usize, pad: usize) -> Result<Tensor, InterpError> {
    let (xd, wd) = (x.as_f32()?, w.as_f32()?);
    let (cin, t) = (x.shape[0], x.shape[1]);
    let (cout, k) = (w.shape[0], w.shape[2]);
    let tout = (t + 2 * pad - k) / stride + 1;
    let mut out = vec![0.0f32; cout * tout];
    out.par_chunks_mut(tout).enumerate().for_each(|(co, row)| {
        row.fill(b[co]);
        for ci in 0..cin {
            let xrow = &xd[ci * t..(ci + 1) * t];
            for kk in 0..k {
                let wv = wd[(co * cin + ci) * k + kk];
                for (to, o) in row.iter_mut().enumerate() {
                    // input index = to*stride + kk - pad, outside [0, t) is zero padding
                    let ti = (to * stride + kk) as isize - pad as isize;
                    if ti >= 0 && (ti as usize) < t {
                        *o += wv * xrow[ti as usize];
                    }
                }
            }
        }
    });
    Ok(Tensor::f32([cout, tout], out))
}

fn im2col(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor, InterpError> {
    let xd = x.as_f32()?;
    let (cin, t) = (x.shape[0], x.shape[1]);
    let tout = (t + 2 * pad - k) / stride + 1;
    let mut out = vec![0.0f32; tout * cin * k];
    for (to, row) in out.chunks_mut(cin * k).enumerate() {
        for ci in 0..cin {
            for kk in 0..k {
                let ti = (to * stride + kk) as isize - pad as isize;
                if ti >= 0 && (ti as usize) < t {
                    row[ci * k + kk] = xd[ci * t + ti as usize];
                }
            }
        }
    }
    Ok(Tensor::f32([tout, cin * k], out))
}

fn linear(x: &Tensor, w: &Tensor, b: Option<&[f32]>) -> Result<Tensor, InterpError> {
    let (xd, wd) = (x.as_f32()?, w.as_f32()?);
    let (n, k) = (w.shape[0], w.shape[1]);
    let m = xd.len() / k;
    let mut out = vec![0.0f32; m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let xr = &xd[i * k..(i + 1) * k];
        for (j, o) in row.iter_mut().enumerate() {
            *o = dot(xr, &wd[j * k..(j + 1) * k]) + b.map_or(0.0, |b| b[j]);
        }
    });
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = n;
    Ok(Tensor::f32(shape, out))
}

fn matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor, InterpError> {
    let (ad, bd) = (a.as_f32()?, b.as_f32()?);
    let (batch, m, k) = (a.shape[0], a.shape[1], a.shape[2]);
    let n = if transpose_b { b.shape[1] } else { b.shape[2] };
    let mut out = vec![0.0f32; batch * m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let (bi, i) = (r / m, r % m);
        let ar = &ad[(bi * m + i) * k..(bi * m + i + 1) * k];
        let bm = &bd[bi * k * n..(bi + 1) * k * n];
        if transpose_b {
            for (j, o) in row.iter_mut().enumerate() {
                *o = dot(ar, &bm[j * k..(j + 1) * k]);
            }
        } else {
            for (kk, &av) in ar.iter().enumerate() {
                for (o, &bv) in row.iter_mut().zip(&bm[kk * n..(kk + 1) * n]) {
                    *o += av * bv;
                }
            }
        }
    });
    Ok(Tensor::f32([batch, m, n], out))
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn broadcast(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor, InterpError> {
    let (ad, bd) = (a.as_f32()?, b.as_f32()?);
    if a.shape == b.shape {
        return Ok(Tensor::f32(a.shape.clone(), ad.par_iter().zip(bd).map(|(&x, &y)| f(x, y)).collect()));
    }
    let shape = broadcast_shapes(&a.shape, &b.shape)
        .ok_or_else(|| InterpError(format!("cannot broadcast {:?} with {:?}", a.shape, b.shape)))?;
    let rank = shape.len();
    // Strides of each operand in the output's index space; 0 along broadcast axes.
    let bstrides = |s: &[usize]| -> Vec<usize> {
        let own = strides(s);
        (0..rank)
            .map(|i| {
                let off = rank - s.len();
                if i < off || s[i - off] == 1 {
                    0
                } else {
                    own[i - off]
                }
            })
            .collect()
    };
    let (sa, sb, so) = (bstrides(&a.shape), bstrides(&b.shape), strides(&shape));
    let n: usize = shape.iter().product();
    // Row by row along the last axis (each operand's stride there is 0 or 1), the rows in
    // parallel: the fold pass scales every projection by a layer norm's gain this way at
    // compile time, and an index split per element made that most of medium's compile.
    let last = *shape.last().unwrap_or(&1);
    let mut out = vec![0f32; n];
    if last > 0 {
        out.par_chunks_mut(last).enumerate().for_each(|(row, o)| {
            let flat = row * last;
            let (mut ia, mut ib) = (0, 0);
            for d in 0..rank.saturating_sub(1) {
                let idx = (flat / so[d]) % shape[d];
                ia += idx * sa[d];
                ib += idx * sb[d];
            }
            let (ta, tb) = (sa[rank - 1], sb[rank - 1]);
            for (j, o) in o.iter_mut().enumerate() {
                *o = f(ad[ia + j * ta], bd[ib + j * tb]);
            }
        });
    }
    Ok(Tensor::f32(shape, out))
}

fn layer_norm(x: &Tensor, gamma: &[f32], beta: &[f32], eps: f32) -> Result<Tensor, InterpError> {
    let xd = x.as_f32()?;
    let d = gamma.len();
    let mut out = vec![0.0f32; xd.len()];
    out.par_chunks_mut(d).zip(xd.par_chunks(d)).for_each(|(o, r)| {
        let mean = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            o[i] = ((r[i] as f64 - mean) * inv) as f32 * gamma[i] + beta[i];
        }
    });
    Ok(Tensor::f32(x.shape.clone(), out))
}

fn softmax(x: &Tensor) -> Result<Tensor, InterpError> {
    let xd = x.as_f32()?;
    let d = *x.shape.last().unwrap();
    let mut out = vec![0.0f32; xd.len()];
    out.par_chunks_mut(d).zip(xd.par_chunks(d)).for_each(|(o, r)| {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (oi, &v) in o.iter_mut().zip(r) {
            *oi = (v - max).exp();
            sum += *oi;
        }
        for oi in o.iter_mut() {
            *oi /= sum;
        }
    });
    Ok(Tensor::f32(x.shape.clone(), out))
}

fn transpose(x: &Tensor, perm: &[usize]) -> Tensor {
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let (si, so) = (strides(&x.shape), strides(&shape));
    let src_index =
        |flat: usize| -> usize { (0..shape.len()).map(|d| ((flat / so[d]) % shape[d]) * si[perm[d]]).sum() };
    let n = x.shape.iter().product();
    let data = x.data.pick(n, src_index);
    Tensor { shape, data }
}

fn slice(x: &Tensor, axis: usize, start: usize, end: usize) -> Tensor {
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let len = x.shape[axis];
    let mut shape = x.shape.clone();
    shape[axis] = end - start;
    let w = (end - start) * inner;
    let data = x.data.pick(outer * w, |i| (i / w * len + start) * inner + i % w);
    Tensor { shape, data }
}

fn concat(args: &[&Tensor], axis: usize) -> Result<Tensor, InterpError> {
    let outer: usize = args[0].shape[..axis].iter().product();
    let mut shape = args[0].shape.clone();
    shape[axis] = args.iter().map(|t| t.shape[axis]).sum();
    let mut out = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for t in args {
            let block: usize = t.shape[axis..].iter().product();
            out.extend_from_slice(&t.as_f32()?[o * block..(o + 1) * block]);
        }
    }
    Ok(Tensor::f32(shape, out))
}

fn gather(table: &Tensor, ids: &[i32]) -> Result<Tensor, InterpError> {
    let td = table.as_f32()?;
    let (v, d) = (table.shape[0], table.shape[1]);
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        if id < 0 || id as usize >= v {
            return Err(InterpError(format!("gather index {id} is outside 0..{v}")));
        }
        out.extend_from_slice(&td[id as usize * d..(id as usize + 1) * d]);
    }
    Ok(Tensor::f32([ids.len(), d], out))
}

fn scatter_row(cache: &Tensor, index: &[i32], rows: &Tensor) -> Result<Tensor, InterpError> {
    let (s, d, m) = (cache.shape[0], cache.shape[1], rows.shape[0]);
    let rows = rows.as_f32()?;
    let i = position(index, (s + 1).saturating_sub(m))?;
    let mut out = cache.as_f32()?.to_vec();
    out[i * d..(i + m) * d].copy_from_slice(rows);
    Ok(Tensor::f32([s, d], out))
}

/// The batched `scatter_row` of a beam step: hypothesis `b` takes the rows before `index`
/// from hypothesis `origin[b]`, row `index` from `rows[b]`, and keeps its rows after.
fn beam_scatter_row(cache: &Tensor, index: &[i32], rows: &[f32], origin: &[i32]) -> Result<Tensor, InterpError> {
    let (b, s, d) = (cache.shape[0], cache.shape[1], cache.shape[2]);
    let p = position(index, s)?;
    let old = cache.as_f32()?;
    let mut out = old.to_vec();
    for (h, &o) in origin.iter().enumerate() {
        if o < 0 || o as usize >= b {
            return Err(InterpError(format!("beam origin {o} is outside 0..{b}")));
        }
        let (dst, src) = (h * s * d, o as usize * s * d);
        out[dst..dst + p * d].copy_from_slice(&old[src..src + p * d]);
        out[dst + p * d..dst + (p + 1) * d].copy_from_slice(&rows[h * d..(h + 1) * d]);
    }
    Ok(Tensor::f32([b, s, d], out))
}

/// The batched `cache_attention`: hypothesis `b`'s one query row over its own cache, as
/// [`cache_attention`] computes it.
fn beam_cache_attention(q: &Tensor, k: &[f32], v: &[f32], pos: &[i32], heads: usize) -> Result<Tensor, InterpError> {
    let (b, d) = (q.shape[0], q.shape[1]);
    let sd = k.len() / b;
    let qd = q.as_f32()?;
    let mut out = Vec::with_capacity(b * d);
    for h in 0..b {
        let qh = Tensor::f32([1, d], qd[h * d..(h + 1) * d].to_vec());
        let r = cache_attention(&qh, &k[h * sd..(h + 1) * sd], &v[h * sd..(h + 1) * sd], pos, heads)?;
        out.extend_from_slice(r.as_f32()?);
    }
    Ok(Tensor::f32([b, d], out))
}

/// `cache_attention`: per query row and head, scores over the visible cache rows, softmax
/// (as [`softmax`] computes it), then the probability-weighted sum of the value rows.
fn cache_attention(q: &Tensor, k: &[f32], v: &[f32], pos: &[i32], heads: usize) -> Result<Tensor, InterpError> {
    let (m, d) = (q.shape[0], q.shape[1]);
    let s = k.len() / d;
    let dh = d / heads;
    let p = position(pos, s)?;
    if p + m > s {
        return Err(InterpError(format!("{m} query rows from position {p} run past the cache's {s} rows")));
    }
    let qd = q.as_f32()?;
    let mut out = vec![0.0f32; m * d];
    for i in 0..m {
        let len = p + i + 1;
        for h in 0..heads {
            let qh = &qd[i * d + h * dh..i * d + (h + 1) * dh];
            let scores: Vec<f32> = (0..len).map(|t| dot(qh, &k[t * d + h * dh..t * d + (h + 1) * dh])).collect();
            let probs = softmax(&Tensor::f32([len], scores))?;
            let probs = probs.as_f32()?;
            let o = &mut out[i * d + h * dh..i * d + (h + 1) * dh];
            for (t, &pt) in probs.iter().enumerate() {
                for (oj, &vj) in o.iter_mut().zip(&v[t * d + h * dh..t * d + (h + 1) * dh]) {
                    *oj += pt * vj;
                }
            }
        }
    }
    Ok(Tensor::f32([m, d], out))
}
