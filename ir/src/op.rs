use crate::types::{DType, TensorType};

/// The operations of the graph IR. Float ops compute in f32 whatever the storage type of
/// their weight operands (f16/bf16 weights are widened on read); data-movement ops
/// (`reshape`, `transpose`, `slice`) keep their input's dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `x[Cin,T], w[Cout,Cin,K], b[Cout] -> [Cout, (T + 2*padding - K)/stride + 1]`, zero padding.
    Conv1d { stride: usize, padding: usize },
    /// `x f32[C, T] -> f32[T_out, C·kernel]`: the columns of a 1-D convolution,
    /// `out[t, c·kernel + k] = x[c, t·stride + k − padding]` (0 outside `[0, T)`), so that
    /// `conv1d(x, w, b) = transpose(linear(im2col(x), reshape(w, [C_out, C·kernel]), b))`.
    Im2col { kernel: usize, stride: usize, padding: usize },
    /// `x[..., K], w[N, K] (, b[N]) -> [..., N]`: `x · wᵀ + b`, PyTorch's weight layout.
    Linear,
    /// Batched matrix product `a[B,M,K] · b[B,K,N] -> [B,M,N]`; with `transpose_b`, `b` is
    /// `[B,N,K]` and is read transposed.
    MatMul { transpose_b: bool },
    /// Element-wise sum with numpy broadcasting.
    Add,
    /// Element-wise product with numpy broadcasting.
    Mul,
    /// Multiplication by a constant.
    Scale { factor: f32 },
    /// `x * 0.5 * (1 + erf(x / sqrt 2))`, the exact GELU Whisper uses.
    Gelu,
    /// Normalisation over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta`;
    /// with the operand `x` alone, no affine part (`gamma = 1`, `beta = 0`).
    LayerNorm { eps: f32 },
    /// Concatenation of the operands along `axis` (all other extents equal).
    Concat { axis: usize },
    /// A linear layer with its epilogue fused: `x · wᵀ + b`, then GELU if `gelu`, then
    /// `+ residual` (the fourth operand, shaped like the result) if `residual`.
    FusedLinear { gelu: bool, residual: bool },
    /// `softmax(x + mask)` over the last axis, the mask broadcast (numpy rules) to `x`.
    MaskedSoftmax,
    /// Softmax over the last axis.
    Softmax,
    /// Same elements, another shape.
    Reshape { shape: Vec<usize> },
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Transpose { perm: Vec<usize> },
    /// `x[start..end]` along `axis`.
    Slice { axis: usize, start: usize, end: usize },
    /// Row lookup: `table[V, D], ids i32[N] -> f32[N, D]`; or, from an int8 table,
    /// `table i8[V, D], ids i32[N], scales f32[V] -> f32[N, D]` with each row dequantized
    /// (`table[id, d] · scales[id]`).
    Gather,
    /// `cache[S, D], index i32[1], rows[M, D] -> [S, D]`: the cache with rows
    /// `index..index + M` replaced by `rows` (`M = 1`: one decoding step's row; more: a
    /// prompt prefilled at once). `index + M` must be at most `S`.
    ///
    /// The batched form is one decoding step of a beam: `cache[B, S, D], index i32[1],
    /// rows[B, D], origin i32[B] -> [B, S, D]`, where hypothesis `b` continues hypothesis
    /// `origin[b]` of the last step: its rows before `index` are `origin[b]`'s, row `index`
    /// is `rows[b]`, and its rows after `index` are its own, unchanged (no step reads them).
    ScatterRow,
    /// `position i32[1] -> f32[1, len]`: 0 for columns `<= position`, -inf after (causal mask
    /// of one decoding step over a static-length cache).
    CausalMask { len: usize },
    /// `x[..., K] -> f32[rows]`, `rows = numel / K`: the symmetric int8 scale of each row,
    /// `max(max |x_row|, 1e-30) / 127` (the floor keeps a row of zeros from dividing by 0).
    RowScale,
    /// `x f32[..., K], s f32[rows] or f32[1] -> dtype[..., K]`: `round_ties_even(x / s)`
    /// clamped to `[-127, 127]`, plus the zero point of `dtype` (0 for `i8`, 128 for `u8`).
    /// `s` holds one scale per row, or one for the whole tensor (a calibrated static scale).
    Quantize { dtype: DType },
    /// `x f32[..., K] -> f32[rows]`: `1 / (127 · Σ_k exp(x_k − max x))`, the int8 scale of
    /// the row's softmax (whose largest value is `1 / Σ exp(x_k − max x)`), computed from the
    /// scores without the probabilities (`quantize` pairs it with `softmax_quantize`).
    SoftmaxScale,
    /// `x f32[..., K] -> u8[..., K]`: the row's softmax quantized with `softmax_scale`'s
    /// scale, `round_ties_even(127 · exp(x_k − max x))` clamped to `[-127, 127]` (NaN: 0),
    /// plus the zero point 128. Equal, in exact arithmetic, to
    /// `quantize{dtype=u8}(p, row_scale(p))` of `p = softmax(x)`: that scale is
    /// `max p / 127 = 1 / (127 Σ exp)`, and `p_k / scale = 127 · exp(x_k − max x)`.
    SoftmaxQuantize,
    /// `i8[..., K] -> i32[rows]`: the sum of each row (the zero-point correction of `qlinear`
    /// and `qmatmul`).
    RowSum,
    /// The int8 linear layer, dequantized in its epilogue:
    /// `xq u8[..., K], xs f32[rows]|[1], wq i8[N, K], ws f32[N], wsum i32[N], b f32[N]
    /// (, residual) -> f32[..., N]` with
    /// `y[i, j] = float(Σ_k xq[i,k]·wq[j,k] − 128·wsum[j]) · (xs[i]·ws[j]) + b[j]`
    /// (the sum exact in i32, then one rounding per operation in this order), then GELU if
    /// `gelu`, then `+ residual` if `residual`.
    QLinear { gelu: bool, residual: bool },
    /// The int8 batched product `a · bᵀ` (attention's Q·Kᵀ, and P·V with V transposed):
    /// `aq u8[B, M, K], as f32[B·M] (or f32[1], static), bq i8[B, N, K], bs f32[B·N], bsum i32[B·N] -> f32[B, M, N]`,
    /// `y[b, i, j] = float(Σ_k aq[b,i,k]·bq[b,j,k] − 128·bsum[b·N+j]) · (as[b·M+i]·bs[b·N+j])`.
    QMatMul,
    /// Int8 attention in one op (the `flash` pass's fusion of `qmatmul`, `softmax_scale`,
    /// `softmax_quantize` and `qmatmul`): `qq u8[B, M, K], qs f32[B·M] (or f32[1]), kq i8[B, N, K],
    /// ks f32[B·N], ksum i32[B·N], vq i8[B, E, N], vs f32[B·E], vsum i32[B·E] -> f32[B, M, E]`,
    /// defined as `s = qmatmul(qq, qs, kq, ks, ksum)`, then
    /// `qmatmul(softmax_quantize(s), softmax_scale(s), vq, vs, vsum)` (V given transposed, as
    /// the second product reads it). The scores are an intermediate, never a tensor.
    QAttention,
    /// `-> f32[1]`: a constant, such as a calibrated static quantization scale.
    Fill { value: f32 },
    /// Attention of `M` query rows over a key/value cache in its stored layout:
    /// `q f32[M, D], k f32[S, D], v f32[S, D], position i32[1] -> f32[M, D]`, `D = heads·dh`.
    /// Query row `i` sits at position `p + i` and sees cache rows `t <= p + i` only (causal);
    /// for head `h` (columns `h·dh..(h+1)·dh`):
    /// `out[i, h·dh + j] = Σ_t softmax_t(Σ_c q[i, h·dh+c]·k[t, h·dh+c]) · v[t, h·dh + j]`.
    /// No scaling: Whisper's `dh^-1/4` is already in `q` and `k`. `p + M - 1` must be `< S`.
    ///
    /// The batched form (a beam of `B` hypotheses, one query row each, each with its own
    /// cache): `q f32[B, D], k f32[B, S, D], v f32[B, S, D], position i32[1] -> f32[B, D]`,
    /// row `b` the attention of `q[b]` at position `p` over `k[b]`, `v[b]`.
    CacheAttention { heads: usize },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv1d { .. } => "conv1d",
            Op::Im2col { .. } => "im2col",
            Op::Linear => "linear",
            Op::MatMul { .. } => "matmul",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::Gelu => "gelu",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Softmax => "softmax",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Gather => "gather",
            Op::ScatterRow => "scatter_row",
            Op::CausalMask { .. } => "causal_mask",
            Op::Concat { .. } => "concat",
            Op::FusedLinear { .. } => "fused_linear",
            Op::MaskedSoftmax => "masked_softmax",
            Op::RowScale => "row_scale",
            Op::Quantize { .. } => "quantize",
            Op::SoftmaxScale => "softmax_scale",
            Op::SoftmaxQuantize => "softmax_quantize",
            Op::RowSum => "row_sum",
            Op::QLinear { .. } => "qlinear",
            Op::QMatMul => "qmatmul",
            Op::QAttention => "qattention",
            Op::Fill { .. } => "fill",
            Op::CacheAttention { .. } => "cache_attention",
        }
    }

    /// Attributes as `(key, value)` text pairs, in a fixed order (the text form).
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        fn list(v: &[usize]) -> String {
            let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("[{}]", items.join(","))
        }
        match self {
            Op::Conv1d { stride, padding } => {
                vec![("stride", stride.to_string()), ("padding", padding.to_string())]
            }
            Op::Im2col { kernel, stride, padding } => {
                vec![("kernel", kernel.to_string()), ("stride", stride.to_string()), ("padding", padding.to_string())]
            }
            Op::MatMul { transpose_b } => vec![("transpose_b", transpose_b.to_string())],
            // `{:?}` prints the shortest decimal that reads back to the same f32.
            Op::Scale { factor } => vec![("factor", format!("{factor:?}"))],
            Op::LayerNorm { eps } => vec![("eps", format!("{eps:?}"))],
            Op::Reshape { shape } => vec![("shape", list(shape))],
            Op::Transpose { perm } => vec![("perm", list(perm))],
            Op::Slice { axis, start, end } => {
                vec![("axis", axis.to_string()), ("start", start.to_string()), ("end", end.to_string())]
            }
            Op::CausalMask { len } => vec![("len", len.to_string())],
            Op::Fill { value } => vec![("value", format!("{value:?}"))],
            Op::CacheAttention { heads } => vec![("heads", heads.to_string())],
            Op::Concat { axis } => vec![("axis", axis.to_string())],
            Op::FusedLinear { gelu, residual } | Op::QLinear { gelu, residual } => {
                vec![("gelu", gelu.to_string()), ("residual", residual.to_string())]
            }
            Op::Quantize { dtype } => vec![("dtype", dtype.name().to_string())],
            Op::RowScale | Op::RowSum | Op::QMatMul | Op::QAttention | Op::SoftmaxScale | Op::SoftmaxQuantize => vec![],
            Op::Linear
            | Op::Add
            | Op::Mul
            | Op::Gelu
            | Op::Softmax
            | Op::Gather
            | Op::ScatterRow
            | Op::MaskedSoftmax => vec![],
        }
    }

    /// Builds an op from its name and attributes (the inverse of [`Op::name`] + [`Op::attrs`]).
    pub fn from_parts(name: &str, attrs: &[(String, String)]) -> Result<Op, String> {
        let get = |key: &str| -> Result<&str, String> {
            attrs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("op `{name}` needs attribute `{key}`"))
        };
        let usize_ = |key: &str| -> Result<usize, String> {
            get(key)?.parse().map_err(|_| format!("attribute `{key}` of `{name}` is not an integer"))
        };
        let f32_ = |key: &str| -> Result<f32, String> {
            get(key)?.parse().map_err(|_| format!("attribute `{key}` of `{name}` is not a number"))
        };
        let bool_ = |key: &str| -> Result<bool, String> {
            match get(key)? {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(format!("{key} must be true or false, not `{other}`")),
            }
        };
        let list = |key: &str| -> Result<Vec<usize>, String> {
            let v = get(key)?;
            let inner = v
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .ok_or_else(|| format!("attribute `{key}` of `{name}` is not a list"))?;
            if inner.trim().is_empty() {
                return Ok(vec![]);
            }
            inner.split(',').map(|x| x.trim().parse().map_err(|_| format!("bad list item `{x}` in `{key}`"))).collect()
        };
        let op = match name {
            "conv1d" => Op::Conv1d { stride: usize_("stride")?, padding: usize_("padding")? },
            "im2col" => {
                Op::Im2col { kernel: usize_("kernel")?, stride: usize_("stride")?, padding: usize_("padding")? }
            }
            "linear" => Op::Linear,
            "matmul" => Op::MatMul { transpose_b: bool_("transpose_b")? },
            "add" => Op::Add,
            "mul" => Op::Mul,
            "scale" => Op::Scale { factor: f32_("factor")? },
            "gelu" => Op::Gelu,
            "layer_norm" => Op::LayerNorm { eps: f32_("eps")? },
            "softmax" => Op::Softmax,
            "reshape" => Op::Reshape { shape: list("shape")? },
            "transpose" => Op::Transpose { perm: list("perm")? },
            "slice" => Op::Slice { axis: usize_("axis")?, start: usize_("start")?, end: usize_("end")? },
            "gather" => Op::Gather,
            "scatter_row" => Op::ScatterRow,
            "causal_mask" => Op::CausalMask { len: usize_("len")? },
            "cache_attention" => Op::CacheAttention { heads: usize_("heads")? },
            "fill" => Op::Fill { value: f32_("value")? },
            "concat" => Op::Concat { axis: usize_("axis")? },
            "fused_linear" => Op::FusedLinear { gelu: bool_("gelu")?, residual: bool_("residual")? },
            "masked_softmax" => Op::MaskedSoftmax,
            "row_scale" => Op::RowScale,
            "softmax_scale" => Op::SoftmaxScale,
            "softmax_quantize" => Op::SoftmaxQuantize,
            "row_sum" => Op::RowSum,
            "qmatmul" => Op::QMatMul,
            "qattention" => Op::QAttention,
            "quantize" => {
                let d = get("dtype")?;
                match DType::from_name(d) {
                    Some(dtype @ (DType::I8 | DType::U8)) => Op::Quantize { dtype },
                    _ => return Err(format!("quantize produces i8 or u8, not `{d}`")),
                }
            }
            "qlinear" => Op::QLinear { gelu: bool_("gelu")?, residual: bool_("residual")? },
            other => return Err(format!("unknown op `{other}`")),
        };
        let known: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
        if let Some((k, _)) = attrs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(format!("op `{name}` has no attribute `{k}`"));
        }
        Ok(op)
    }

    /// How many operands the op takes: `(min, max)`.
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Conv1d { .. } => (3, 3),
            Op::ScatterRow => (3, 4),
            Op::LayerNorm { .. } => (1, 3),
            Op::Concat { .. } => (1, usize::MAX),
            Op::FusedLinear { residual, .. } => {
                if *residual {
                    (4, 4)
                } else {
                    (3, 3)
                }
            }
            Op::MaskedSoftmax | Op::Quantize { .. } => (2, 2),
            Op::QLinear { residual, .. } => {
                if *residual {
                    (7, 7)
                } else {
                    (6, 6)
                }
            }
            Op::RowScale | Op::RowSum | Op::SoftmaxScale | Op::SoftmaxQuantize | Op::Im2col { .. } => (1, 1),
            Op::QMatMul => (5, 5),
            Op::QAttention => (8, 8),
            Op::CacheAttention { .. } => (4, 4),
            Op::Fill { .. } => (0, 0),
            Op::Linear => (2, 3),
            Op::MatMul { .. } | Op::Add | Op::Mul => (2, 2),
            Op::Gather => (2, 3),
            Op::Scale { .. }
            | Op::Gelu
            | Op::Softmax
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::CausalMask { .. } => (1, 1),
        }
    }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// The result type of `op` applied to operands of the given types, or why it is ill-typed.
pub fn infer_type(op: &Op, inputs: &[&TensorType]) -> Result<TensorType, String> {
    let (lo, hi) = op.arity();
    if inputs.len() < lo || inputs.len() > hi {
        return Err(format!(
            "{} takes {} operand(s), got {}",
            op.name(),
            if lo == hi { lo.to_string() } else { format!("{lo} to {hi}") },
            inputs.len()
        ));
    }
    let float = |i: usize| -> Result<&TensorType, String> {
        if inputs[i].dtype.is_float() {
            Ok(inputs[i])
        } else {
            Err(format!("operand {i} of {} must be a float tensor, got {}", op.name(), inputs[i]))
        }
    };
    let int_scalar = |i: usize| -> Result<(), String> {
        if inputs[i].dtype == DType::I32 && inputs[i].shape == [1] {
            Ok(())
        } else {
            Err(format!("operand {i} of {} must be i32[1], got {}", op.name(), inputs[i]))
        }
    };
    let shape_err = || {
        let tys: Vec<String> = inputs.iter().map(|t| t.to_string()).collect();
        format!("{} cannot take operands ({})", op.name(), tys.join(", "))
    };
    let typed = |i: usize, d: DType| -> Result<&TensorType, String> {
        if inputs[i].dtype == d {
            Ok(inputs[i])
        } else {
            Err(format!("operand {i} of {} must be a {d} tensor, got {}", op.name(), inputs[i]))
        }
    };
    // Rows of a tensor whose last axis is reduced or quantized per row.
    let rows = |t: &TensorType| -> Result<usize, String> {
        match t.shape.last() {
            Some(&k) if k > 0 => Ok(t.numel() / k),
            _ => Err(format!("{} needs a non-empty last axis, got {t}", op.name())),
        }
    };
    match op {
        Op::Fill { .. } => Ok(TensorType::f32([1])),
        Op::CacheAttention { heads } => {
            let (q, k, v) = (float(0)?, float(1)?, float(2)?);
            int_scalar(3)?;
            if k.rank() == 3 {
                // Batched: one query row per hypothesis.
                if k.shape != v.shape || q.shape != [k.shape[0], k.shape[2]] || k.shape[1] == 0 {
                    return Err(shape_err());
                }
                let d = q.shape[1];
                if *heads == 0 || d % heads != 0 || d == 0 || q.shape[0] == 0 {
                    return Err(format!(
                        "cache_attention{{heads={heads}}} needs D > 0 divisible by the heads, got {q}"
                    ));
                }
                return Ok(TensorType::f32(q.shape.clone()));
            }
            if q.rank() != 2 || k.rank() != 2 || k.shape != v.shape || q.shape[1] != k.shape[1] {
                return Err(shape_err());
            }
            let d = q.shape[1];
            if *heads == 0 || d % heads != 0 || d == 0 || q.shape[0] == 0 || q.shape[0] > k.shape[0] {
                return Err(format!(
                    "cache_attention{{heads={heads}}} needs D > 0 divisible by the heads and 0 < M <= S, got ({})",
                    [q, k, v].iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
            Ok(TensorType::f32(q.shape.clone()))
        }
        Op::RowScale | Op::SoftmaxScale => {
            let x = float(0)?;
            Ok(TensorType::f32([rows(x)?]))
        }
        Op::SoftmaxQuantize => {
            let x = float(0)?;
            rows(x)?;
            Ok(TensorType::new(DType::U8, x.shape.clone()))
        }
        Op::Quantize { dtype } => {
            let (x, s) = (float(0)?, typed(1, DType::F32)?);
            if s.shape != [rows(x)?] && s.shape != [1] {
                return Err(shape_err());
            }
            Ok(TensorType::new(*dtype, x.shape.clone()))
        }
        Op::RowSum => {
            let w = typed(0, DType::I8)?;
            if w.rank() < 2 {
                return Err(shape_err());
            }
            Ok(TensorType::new(DType::I32, [rows(w)?]))
        }
        Op::QMatMul => {
            let (a, asc, b) = (typed(0, DType::U8)?, typed(1, DType::F32)?, typed(2, DType::I8)?);
            let (bsc, bsum) = (typed(3, DType::F32)?, typed(4, DType::I32)?);
            if a.rank() != 3 || b.rank() != 3 || a.shape[0] != b.shape[0] || a.shape[2] != b.shape[2] {
                return Err(shape_err());
            }
            let (bt, m, n) = (a.shape[0], a.shape[1], b.shape[1]);
            if (asc.shape != [bt * m] && asc.shape != [1]) || bsc.shape != [bt * n] || bsum.shape != [bt * n] {
                return Err(shape_err());
            }
            Ok(TensorType::f32([bt, m, n]))
        }
        Op::QAttention => {
            let (q, qs, k) = (typed(0, DType::U8)?, typed(1, DType::F32)?, typed(2, DType::I8)?);
            let (ks, ksum, v) = (typed(3, DType::F32)?, typed(4, DType::I32)?, typed(5, DType::I8)?);
            let (vs, vsum) = (typed(6, DType::F32)?, typed(7, DType::I32)?);
            if q.rank() != 3 || k.rank() != 3 || v.rank() != 3 || q.shape[0] != k.shape[0] || q.shape[2] != k.shape[2] {
                return Err(shape_err());
            }
            let (bt, m, n, e) = (q.shape[0], q.shape[1], k.shape[1], v.shape[1]);
            let scales = (qs.shape == [bt * m] || qs.shape == [1]) && ks.shape == [bt * n] && ksum.shape == [bt * n];
            if !scales || v.shape != [bt, e, n] || vs.shape != [bt * e] || vsum.shape != [bt * e] {
                return Err(shape_err());
            }
            Ok(TensorType::f32([bt, m, e]))
        }
        Op::QLinear { residual, .. } => {
            let (xq, xs, wq) = (typed(0, DType::U8)?, typed(1, DType::F32)?, typed(2, DType::I8)?);
            let (ws, wsum, b) = (typed(3, DType::F32)?, typed(4, DType::I32)?, float(5)?);
            if wq.rank() != 2 || xq.shape.last() != Some(&wq.shape[1]) {
                return Err(shape_err());
            }
            let n = wq.shape[0];
            if (xs.shape != [rows(xq)?] && xs.shape != [1]) || ws.shape != [n] || wsum.shape != [n] || b.shape != [n] {
                return Err(shape_err());
            }
            let mut shape = xq.shape.clone();
            *shape.last_mut().unwrap() = n;
            if *residual && float(6)?.shape != shape {
                return Err(shape_err());
            }
            Ok(TensorType::f32(shape))
        }
        Op::Conv1d { stride, padding } => {
            let (x, w, b) = (float(0)?, float(1)?, float(2)?);
            if x.rank() != 2 || w.rank() != 3 || b.shape != [w.shape[0]] || w.shape[1] != x.shape[0] {
                return Err(shape_err());
            }
            let k = w.shape[2];
            if *stride == 0 || x.shape[1] + 2 * padding < k {
                return Err(shape_err());
            }
            Ok(TensorType::f32([w.shape[0], (x.shape[1] + 2 * padding - k) / stride + 1]))
        }
        Op::Im2col { kernel, stride, padding } => {
            let x = float(0)?;
            if x.rank() != 2 || *stride == 0 || *kernel == 0 || x.shape[1] + 2 * padding < *kernel {
                return Err(shape_err());
            }
            Ok(TensorType::f32([(x.shape[1] + 2 * padding - kernel) / stride + 1, x.shape[0] * kernel]))
        }
        Op::Linear => {
            let (x, w) = (float(0)?, float(1)?);
            if x.rank() < 1 || w.rank() != 2 || x.shape[x.rank() - 1] != w.shape[1] {
                return Err(shape_err());
            }
            if inputs.len() == 3 && float(2)?.shape != [w.shape[0]] {
                return Err(shape_err());
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = w.shape[0];
            Ok(TensorType::f32(shape))
        }
        Op::MatMul { transpose_b } => {
            let (a, b) = (float(0)?, float(1)?);
            if a.rank() != 3 || b.rank() != 3 || a.shape[0] != b.shape[0] {
                return Err(shape_err());
            }
            let (bk, bn) = if *transpose_b { (b.shape[2], b.shape[1]) } else { (b.shape[1], b.shape[2]) };
            if a.shape[2] != bk {
                return Err(shape_err());
            }
            Ok(TensorType::f32([a.shape[0], a.shape[1], bn]))
        }
        Op::Add | Op::Mul => {
            let (a, b) = (float(0)?, float(1)?);
            broadcast_shapes(&a.shape, &b.shape).map(TensorType::f32).ok_or_else(shape_err)
        }
        Op::Scale { .. } | Op::Gelu => Ok(TensorType::f32(float(0)?.shape.clone())),
        Op::Softmax => {
            let x = float(0)?;
            if x.rank() == 0 {
                return Err(shape_err());
            }
            Ok(TensorType::f32(x.shape.clone()))
        }
        Op::LayerNorm { .. } => {
            let x = float(0)?;
            let d = *x.shape.last().ok_or_else(shape_err)?;
            match inputs.len() {
                1 => {}
                3 if float(1)?.shape == [d] && float(2)?.shape == [d] => {}
                _ => return Err(shape_err()),
            }
            Ok(TensorType::f32(x.shape.clone()))
        }
        Op::FusedLinear { residual, .. } => {
            let out = infer_type(&Op::Linear, &inputs[..3])?;
            if *residual && float(3)?.shape != out.shape {
                return Err(shape_err());
            }
            Ok(out)
        }
        Op::MaskedSoftmax => {
            let (x, m) = (float(0)?, float(1)?);
            if x.rank() == 0 || broadcast_shapes(&x.shape, &m.shape).as_deref() != Some(&x.shape[..]) {
                return Err(shape_err());
            }
            Ok(TensorType::f32(x.shape.clone()))
        }
        Op::Concat { axis } => {
            let first = inputs[0];
            if *axis >= first.rank() {
                return Err(shape_err());
            }
            let mut shape = first.shape.clone();
            for t in &inputs[1..] {
                let same = t.rank() == first.rank()
                    && (0..first.rank()).all(|d| d == *axis || t.shape[d] == first.shape[d])
                    && t.dtype.is_float() == first.dtype.is_float();
                if !same {
                    return Err(shape_err());
                }
                shape[*axis] += t.shape[*axis];
            }
            Ok(TensorType::new(if first.dtype.is_float() { DType::F32 } else { first.dtype }, shape))
        }
        Op::Reshape { shape } => {
            let x = inputs[0];
            if shape.iter().product::<usize>() != x.numel() {
                return Err(format!("reshape of {x} to {shape:?} changes the element count"));
            }
            Ok(TensorType::new(x.dtype, shape.clone()))
        }
        Op::Transpose { perm } => {
            let x = inputs[0];
            let mut seen = vec![false; x.rank()];
            if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true)) {
                return Err(format!("transpose perm {perm:?} is not a permutation of the axes of {x}"));
            }
            Ok(TensorType::new(x.dtype, perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>()))
        }
        Op::Slice { axis, start, end } => {
            let x = inputs[0];
            if *axis >= x.rank() || start >= end || *end > x.shape[*axis] {
                return Err(format!("slice [{start}..{end}] on axis {axis} is out of bounds of {x}"));
            }
            let mut shape = x.shape.clone();
            shape[*axis] = end - start;
            Ok(TensorType::new(x.dtype, shape))
        }
        Op::Gather => {
            let table = if inputs.len() == 3 { typed(0, DType::I8)? } else { float(0)? };
            let ids = inputs[1];
            if table.rank() != 2 || ids.dtype != DType::I32 || ids.rank() != 1 {
                return Err(shape_err());
            }
            if inputs.len() == 3 && typed(2, DType::F32)?.shape != [table.shape[0]] {
                return Err(shape_err());
            }
            Ok(TensorType::f32([ids.shape[0], table.shape[1]]))
        }
        Op::ScatterRow => {
            let cache = float(0)?;
            int_scalar(1)?;
            let row = float(2)?;
            if inputs.len() == 4 {
                let origin = inputs[3];
                let ok = cache.rank() == 3
                    && row.shape == [cache.shape[0], cache.shape[2]]
                    && origin.dtype == DType::I32
                    && origin.shape == [cache.shape[0]];
                if !ok {
                    return Err(shape_err());
                }
                return Ok(TensorType::f32(cache.shape.clone()));
            }
            if cache.rank() != 2 || row.rank() != 2 {
                return Err(shape_err());
            }
            if row.shape[0] == 0 || row.shape[0] > cache.shape[0] || row.shape[1] != cache.shape[1] {
                return Err(shape_err());
            }
            Ok(TensorType::f32(cache.shape.clone()))
        }
        Op::CausalMask { len } => {
            int_scalar(0)?;
            if *len == 0 {
                return Err(shape_err());
            }
            Ok(TensorType::f32([1, *len]))
        }
    }
}
