//! Builds the IR of a Whisper model from a checkpoint.
//!
//! `encoder`: `mel f32[n_mels, 3000]` → two convolutions with GELU → positional embedding →
//! pre-norm transformer layers → final layer norm → `audio_features f32[1500, d]`.
//!
//! `decoder_step`: one token at one position against a static-length self-attention cache
//! (`self_k.i`, `self_v.i`: `f32[n_text_ctx, d]` per layer) and `audio_features` → `logits
//! f32[1, n_vocab]` and the updated caches (`self_k.i.next`, ...). Graphs are connected by
//! value names: a decoder input is fed from the encoder output of the same name.
//!
//! The graphs are written as Whisper's reference does it (separate Q/K/V projections, the
//! `d_head^-0.25` scaling of q and k, cross-attention K/V computed inside the step); the
//! passes fold, fuse and hoist.

use wcc_ir::{DType, Graph, Module, Op, TensorType, ValueId, WeightDecl};

use crate::checkpoint::{Checkpoint, FrontendError};

/// Whisper's layer-norm epsilon.
const LN_EPS: f32 = 1e-5;

struct Lowering<'a> {
    ck: &'a Checkpoint,
    m: Module,
}

impl Lowering<'_> {
    /// Declares (once) and uses the weight with logical name `name`, checking that the
    /// checkpoint has it with `shape`.
    fn weight(&mut self, g: &mut Graph, name: &str, shape: &[usize]) -> Result<ValueId, FrontendError> {
        if let Some(decl) = self.m.weight(name) {
            let decl = decl.clone();
            return Ok(g.use_weight(&decl));
        }
        let source = self
            .ck
            .source(name)
            .ok_or_else(|| self.ck.error(format!("no tensor holds weight `{name}` in this format")))?;
        let info = self.ck.tensor(&source.tensor)?;
        let mut got = info.shape.clone();
        if let Some((a, b)) = source.rows {
            if got.is_empty() || b > got[0] {
                return Err(self.ck.error(format!(
                    "tensor `{}` has shape {:?}, too small to hold `{name}`",
                    source.tensor, info.shape
                )));
            }
            got[0] = b - a;
        }
        if got != shape {
            return Err(self
                .ck
                .error(format!("tensor `{}` has shape {:?}, expected {:?} for `{name}`", source.tensor, got, shape)));
        }
        if !info.dtype.is_float() {
            return Err(self.ck.error(format!("tensor `{}` holds {}, expected floats", source.tensor, info.dtype)));
        }
        let decl: WeightDecl = self.m.add_weight(name, TensorType::new(info.dtype, shape.to_vec()), source);
        Ok(g.use_weight(&decl))
    }
}

fn node(g: &mut Graph, name: String, op: Op, inputs: &[ValueId]) -> Result<ValueId, FrontendError> {
    g.add_node(name, op, inputs).map_err(|e| FrontendError::Checkpoint { path: String::new(), msg: e })
}

/// What a build asks of the graphs beyond transcription.
#[derive(Clone, Debug, Default)]
pub struct LowerOptions {
    /// The decoder step also outputs the alignment heads' cross-attention scores
    /// ([`ALIGNMENT_OUTPUT`]), for word timestamps.
    pub alignment: bool,
    /// Beam widths to build a batched decoder step for (`decoder_beam{N}`, see
    /// [`beam_graph`]); 1 is the plain `decoder_step`, always built.
    pub beam_sizes: Vec<usize>,
    /// Prompt blocks to build a prefill graph for ([`prefill_graph`]), and with them, for
    /// each beam, the graph that starts its hypotheses from the prefilled caches
    /// ([`beam_init_graph`]). None: prompts are fed one step at a time.
    pub prefill_sizes: Vec<usize>,
}

/// The prompt block sizes `wcc compile` builds by default: a long block for the previous
/// text a window is conditioned on, a short one for the rest (padded).
pub const DEFAULT_PREFILL_SIZES: [usize; 2] = [8, 64];

/// The name of the graph that feeds `m` prompt tokens at once (`decoder_prefill{m}`): the
/// decoder step over `m` rows at positions `p..p + m`, causal among them, writing their K
/// and V into the plain step's caches (`self_k.{i}`, `self_v.{i}`: the same values, by
/// name) and computing no logits. Its own inputs: `prefill{m}.tokens` i32[m],
/// `prefill{m}.positions` i32[m] (`p..p + m`) and `prefill{m}.position` i32[1] (`p`).
pub fn prefill_graph(m: usize) -> String {
    format!("decoder_prefill{m}")
}

/// The name of the graph that gives every hypothesis of a beam of `n` the plain step's
/// caches (`beam_init{n}`: outputs `beam{n}.self_k.{i}`, ... each `n` copies of
/// `self_k.{i}`), so a beam starts from a prompt prefilled once.
pub fn beam_init_graph(n: usize) -> String {
    format!("beam_init{n}")
}

/// The name of the decoder step of a beam of `n` hypotheses. Its own inputs and outputs
/// are named `beam{n}.tokens`, `beam{n}.position`, `beam{n}.origin`, `beam{n}.self_k.{i}`,
/// `beam{n}.logits`, ... (graphs share a value by name, so the plain step's names are not
/// reused); it reads `audio_features` (and what is hoisted from it) like `decoder_step`.
pub fn beam_graph(n: usize) -> String {
    format!("decoder_beam{n}")
}

/// Builds the module of a checkpoint.
pub fn lower(ck: &Checkpoint) -> Result<Module, FrontendError> {
    lower_with(ck, &LowerOptions::default())
}

/// [`lower`] with options.
pub fn lower_with(ck: &Checkpoint, opts: &LowerOptions) -> Result<Module, FrontendError> {
    let dims = &ck.dims;
    let name = ck.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "whisper".into());
    let mut lw = Lowering { ck, m: Module::new(name) };
    for (k, v) in [
        ("n_mels", dims.n_mels),
        ("n_audio_ctx", dims.n_audio_ctx),
        ("n_audio_state", dims.n_audio_state),
        ("n_audio_head", dims.n_audio_head),
        ("n_audio_layer", dims.n_audio_layer),
        ("n_vocab", dims.n_vocab),
        ("n_text_ctx", dims.n_text_ctx),
        ("n_text_state", dims.n_text_state),
        ("n_text_head", dims.n_text_head),
        ("n_text_layer", dims.n_text_layer),
    ] {
        lw.m.params.insert(k.into(), v as i64);
    }
    if dims.n_audio_state != dims.n_text_state {
        return Err(ck.error("audio and text widths differ; Whisper shares one width"));
    }
    for (what, d, h) in
        [("audio", dims.n_audio_state, dims.n_audio_head), ("text", dims.n_text_state, dims.n_text_head)]
    {
        if h == 0 || d % h != 0 {
            return Err(ck.error(format!("{what} width {d} is not divisible by {h} heads")));
        }
    }
    let enc = encoder(&mut lw)?;
    let dec = decoder_step(&mut lw, opts)?;
    lw.m.graphs = vec![enc, dec];
    let mut sizes = opts.beam_sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes.into_iter().filter(|&n| n > 1) {
        if n > 64 {
            return Err(ck.error(format!("a beam of {n} hypotheses is more than the 64 wcc builds")));
        }
        let g = decoder_beam(&mut lw, n)?;
        lw.m.graphs.push(g);
    }
    let mut blocks = opts.prefill_sizes.clone();
    blocks.sort_unstable();
    blocks.dedup();
    for &m in &blocks {
        if m == 0 || m > dims.n_text_ctx {
            return Err(
                ck.error(format!("a prompt block of {m} tokens does not fit the {}-token context", dims.n_text_ctx))
            );
        }
        let g = decoder_prefill(&mut lw, m)?;
        lw.m.graphs.push(g);
    }
    if !blocks.is_empty() {
        for n in opts.beam_sizes.iter().copied().filter(|&n| n > 1).collect::<std::collections::BTreeSet<_>>() {
            let g = beam_init(&mut lw, n)?;
            lw.m.graphs.push(g);
        }
    }
    for g in &mut lw.m.graphs {
        g.canonicalize();
    }
    wcc_ir::verify(&lw.m).map_err(|e| ck.error(format!("lowered IR is malformed: {e}")))?;
    Ok(lw.m)
}

/// `layer_norm(x)` with the weights `{p}.weight`, `{p}.bias`.
fn layer_norm(
    lw: &mut Lowering,
    g: &mut Graph,
    x: ValueId,
    p: &str,
    out: String,
    d: usize,
) -> Result<ValueId, FrontendError> {
    let w = lw.weight(g, &format!("{p}.weight"), &[d])?;
    let b = lw.weight(g, &format!("{p}.bias"), &[d])?;
    node(g, out, Op::LayerNorm { eps: LN_EPS }, &[x, w, b])
}

/// `linear(x)` with `{p}.weight` `[n, k]` and, if `bias`, `{p}.bias`.
fn linear(
    lw: &mut Lowering,
    g: &mut Graph,
    x: ValueId,
    p: &str,
    out: String,
    (n, k): (usize, usize),
    bias: bool,
) -> Result<ValueId, FrontendError> {
    let mut args = vec![x, lw.weight(g, &format!("{p}.weight"), &[n, k])?];
    if bias {
        args.push(lw.weight(g, &format!("{p}.bias"), &[n])?);
    }
    node(g, out, Op::Linear, &args)
}

/// Multi-head attention of projected `q [tq, d]`, `k`, `v` `[tk, d]` (q and k already
/// scaled); `mask` `[1, tk]` is added to the scores. Returns the merged heads `[tq, d]` and
/// the scores `[heads, tq, tk]` before the mask and softmax.
fn attention(
    g: &mut Graph,
    p: &str,
    (q, k, v): (ValueId, ValueId, ValueId),
    heads: usize,
    mask: Option<ValueId>,
) -> Result<(ValueId, ValueId), FrontendError> {
    let (tq, d) = (g.ty(q).shape[0], g.ty(q).shape[1]);
    let tk = g.ty(k).shape[0];
    let dh = d / heads;
    let split = |g: &mut Graph, x: ValueId, t: usize, n: &str| -> Result<ValueId, FrontendError> {
        let r = node(g, format!("{p}.{n}_split"), Op::Reshape { shape: vec![t, heads, dh] }, &[x])?;
        node(g, format!("{p}.{n}_heads"), Op::Transpose { perm: vec![1, 0, 2] }, &[r])
    };
    let qh = split(g, q, tq, "q")?;
    let kh = split(g, k, tk, "k")?;
    let vh = split(g, v, tk, "v")?;
    let scores = node(g, format!("{p}.scores"), Op::MatMul { transpose_b: true }, &[qh, kh])?;
    let mut s = scores;
    if let Some(m) = mask {
        s = node(g, format!("{p}.masked"), Op::Add, &[s, m])?;
    }
    let probs = node(g, format!("{p}.probs"), Op::Softmax, &[s])?;
    let ctx = node(g, format!("{p}.ctx_heads"), Op::MatMul { transpose_b: false }, &[probs, vh])?;
    let t = node(g, format!("{p}.ctx_t"), Op::Transpose { perm: vec![1, 0, 2] }, &[ctx])?;
    Ok((node(g, format!("{p}.ctx"), Op::Reshape { shape: vec![tq, d] }, &[t])?, scores))
}

/// The feed-forward block with its residual: `x + fc2(gelu(fc1(ln(x))))`.
fn ffn(
    lw: &mut Lowering,
    g: &mut Graph,
    x: ValueId,
    w: &str,
    p: &str,
    (d, f): (usize, usize),
) -> Result<ValueId, FrontendError> {
    let h = layer_norm(lw, g, x, &format!("{w}.final_layer_norm"), format!("{p}.ffn_ln"), d)?;
    let h = linear(lw, g, h, &format!("{w}.fc1"), format!("{p}.fc1"), (f, d), true)?;
    let h = node(g, format!("{p}.gelu"), Op::Gelu, &[h])?;
    let h = linear(lw, g, h, &format!("{w}.fc2"), format!("{p}.fc2"), (d, f), true)?;
    node(g, format!("{p}.ffn_out"), Op::Add, &[x, h])
}

/// Q, K, V projections of `x` (K without bias, as in Whisper), q and k scaled by
/// `d_head^-0.25` each.
fn qkv(
    lw: &mut Lowering,
    g: &mut Graph,
    (xq, xkv): (ValueId, ValueId),
    w: &str,
    p: &str,
    d: usize,
    heads: usize,
) -> Result<(ValueId, ValueId, ValueId), FrontendError> {
    let scale = ((d / heads) as f32).powf(-0.25);
    let q = linear(lw, g, xq, &format!("{w}.q_proj"), format!("{p}.q"), (d, d), true)?;
    let q = node(g, format!("{p}.q_scaled"), Op::Scale { factor: scale }, &[q])?;
    let k = linear(lw, g, xkv, &format!("{w}.k_proj"), format!("{p}.k"), (d, d), false)?;
    let k = node(g, format!("{p}.k_scaled"), Op::Scale { factor: scale }, &[k])?;
    let v = linear(lw, g, xkv, &format!("{w}.v_proj"), format!("{p}.v"), (d, d), true)?;
    Ok((q, k, v))
}

fn encoder(lw: &mut Lowering) -> Result<Graph, FrontendError> {
    let dims = lw.ck.dims.clone();
    let (d, ctx, heads) = (dims.n_audio_state, dims.n_audio_ctx, dims.n_audio_head);
    let frames = ctx.checked_mul(2).ok_or_else(|| lw.ck.error(format!("{ctx} audio positions is not a size")))?;
    let mut g = Graph::new("encoder");
    let mel = g.add_input("mel", TensorType::f32([dims.n_mels, frames]));
    let c1w = lw.weight(&mut g, "encoder.conv1.weight", &[d, dims.n_mels, 3])?;
    let c1b = lw.weight(&mut g, "encoder.conv1.bias", &[d])?;
    let x = node(&mut g, "enc.conv1".into(), Op::Conv1d { stride: 1, padding: 1 }, &[mel, c1w, c1b])?;
    let x = node(&mut g, "enc.conv1_gelu".into(), Op::Gelu, &[x])?;
    let c2w = lw.weight(&mut g, "encoder.conv2.weight", &[d, d, 3])?;
    let c2b = lw.weight(&mut g, "encoder.conv2.bias", &[d])?;
    let x = node(&mut g, "enc.conv2".into(), Op::Conv1d { stride: 2, padding: 1 }, &[x, c2w, c2b])?;
    let x = node(&mut g, "enc.conv2_gelu".into(), Op::Gelu, &[x])?;
    let x = node(&mut g, "enc.frames".into(), Op::Transpose { perm: vec![1, 0] }, &[x])?;
    let pos = lw.weight(&mut g, "encoder.embed_positions.weight", &[ctx, d])?;
    let pos = node(&mut g, "enc.positions".into(), Op::Slice { axis: 0, start: 0, end: ctx }, &[pos])?;
    let mut x = node(&mut g, "enc.embedded".into(), Op::Add, &[x, pos])?;
    for i in 0..dims.n_audio_layer {
        let (w, p) = (format!("encoder.layers.{i}"), format!("enc.l{i}"));
        let h = layer_norm(lw, &mut g, x, &format!("{w}.self_attn_layer_norm"), format!("{p}.attn_ln"), d)?;
        let proj = qkv(lw, &mut g, (h, h), &format!("{w}.self_attn"), &format!("{p}.attn"), d, heads)?;
        let (a, _) = attention(&mut g, &format!("{p}.attn"), proj, heads, None)?;
        let a = linear(lw, &mut g, a, &format!("{w}.self_attn.out_proj"), format!("{p}.attn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.attn_out"), Op::Add, &[x, a])?;
        x = ffn(lw, &mut g, x, &w, &p, (d, dims.n_audio_ffn))?;
    }
    let out = layer_norm(lw, &mut g, x, "encoder.layer_norm", "audio_features".into(), d)?;
    g.outputs.push(out);
    Ok(g)
}

/// The decoder's per-layer self-attention caches as graph inputs, `(K, V)` per layer, named
/// by `name("self_k" | "self_v", layer)`.
fn cache_inputs(
    g: &mut Graph,
    layers: usize,
    name: &dyn Fn(&str, usize) -> String,
    shape: &[usize],
) -> Vec<(ValueId, ValueId)> {
    (0..layers)
        .map(|i| {
            (
                g.add_input(name("self_k", i), TensorType::f32(shape.to_vec())),
                g.add_input(name("self_v", i), TensorType::f32(shape.to_vec())),
            )
        })
        .collect()
}

/// The token embedding of `tokens` plus the positional embedding at `positions`; returns the
/// token embedding table too (the logits reuse it) and the sum.
fn embed(
    lw: &mut Lowering,
    g: &mut Graph,
    tokens: ValueId,
    positions: ValueId,
) -> Result<(ValueId, ValueId), FrontendError> {
    let dims = lw.ck.dims.clone();
    let (d, n_ctx) = (dims.n_text_state, dims.n_text_ctx);
    let emb = lw.weight(g, "decoder.embed_tokens.weight", &[dims.n_vocab, d])?;
    let pos_table = lw.weight(g, "decoder.embed_positions.weight", &[n_ctx, d])?;
    let tok = node(g, "dec.token".into(), Op::Gather, &[emb, tokens])?;
    let pos = node(g, "dec.position".into(), Op::Gather, &[pos_table, positions])?;
    Ok((emb, node(g, "dec.embedded".into(), Op::Add, &[tok, pos])?))
}

fn decoder_step(lw: &mut Lowering, opts: &LowerOptions) -> Result<Graph, FrontendError> {
    let dims = lw.ck.dims.clone();
    let (d, n_ctx, heads) = (dims.n_text_state, dims.n_text_ctx, dims.n_text_head);
    let mut g = Graph::new("decoder_step");
    let tokens = g.add_input("tokens", TensorType::new(DType::I32, [1]));
    let position = g.add_input("position", TensorType::new(DType::I32, [1]));
    let caches = cache_inputs(&mut g, dims.n_text_layer, &|kv, i| format!("{kv}.{i}"), &[n_ctx, d]);
    let audio = g.add_input("audio_features", TensorType::f32([dims.n_audio_ctx, d]));

    let (emb, mut x) = embed(lw, &mut g, tokens, position)?;
    let mask = node(&mut g, "dec.causal_mask".into(), Op::CausalMask { len: n_ctx }, &[position])?;
    let mut new_caches = Vec::new();
    let mut cross_scores = Vec::new();
    for (i, &(k_cache, v_cache)) in caches.iter().enumerate() {
        let (w, p) = (format!("decoder.layers.{i}"), format!("dec.l{i}"));
        // Self-attention: this token's K and V go into the cache at `position`; the mask
        // hides the slots after it.
        let h = layer_norm(lw, &mut g, x, &format!("{w}.self_attn_layer_norm"), format!("{p}.attn_ln"), d)?;
        let (q, k, v) = qkv(lw, &mut g, (h, h), &format!("{w}.self_attn"), &format!("{p}.attn"), d, heads)?;
        let k_all = node(&mut g, format!("self_k.{i}.next"), Op::ScatterRow, &[k_cache, position, k])?;
        let v_all = node(&mut g, format!("self_v.{i}.next"), Op::ScatterRow, &[v_cache, position, v])?;
        new_caches.extend([k_all, v_all]);
        let (a, _) = attention(&mut g, &format!("{p}.attn"), (q, k_all, v_all), heads, Some(mask))?;
        let a = linear(lw, &mut g, a, &format!("{w}.self_attn.out_proj"), format!("{p}.attn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.attn_out"), Op::Add, &[x, a])?;
        // Cross-attention over the audio features.
        let h = layer_norm(lw, &mut g, x, &format!("{w}.encoder_attn_layer_norm"), format!("{p}.xattn_ln"), d)?;
        let proj = qkv(lw, &mut g, (h, audio), &format!("{w}.encoder_attn"), &format!("{p}.xattn"), d, heads)?;
        let (a, scores) = attention(&mut g, &format!("{p}.xattn"), proj, heads, None)?;
        cross_scores.push(scores);
        let a = linear(lw, &mut g, a, &format!("{w}.encoder_attn.out_proj"), format!("{p}.xattn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.xattn_out"), Op::Add, &[x, a])?;
        x = ffn(lw, &mut g, x, &w, &p, (d, dims.n_text_ffn))?;
    }
    let h = layer_norm(lw, &mut g, x, "decoder.layer_norm", "dec.final_ln".into(), d)?;
    // The output projection is the token embedding, transposed (tied weights).
    let logits = node(&mut g, "logits".into(), Op::Linear, &[h, emb])?;
    g.outputs.push(logits);
    g.outputs.extend(new_caches);
    if opts.alignment {
        // The cross-attention scores `[heads, 1, audio frames]` of each layer with an
        // alignment head: what word timestamps align tokens to audio with. Whole layers are
        // output (the runtime picks the heads), so no activation is sliced or copied.
        let mut layers: Vec<usize> = alignment_heads(lw.ck)?.iter().map(|&(l, _)| l).collect();
        layers.sort_unstable();
        layers.dedup();
        for l in layers {
            let out = node(&mut g, format!("{ALIGNMENT_OUTPUT}.{l}"), Op::Scale { factor: 1.0 }, &[cross_scores[l]])?;
            g.outputs.push(out);
        }
    }
    Ok(g)
}

/// The decoder step of a beam of `n` hypotheses ([`beam_graph`]): `decoder_step` with a
/// leading batch axis. Every hypothesis is at the same position (a beam grows in step);
/// `origin[b]` names the hypothesis of the last step that hypothesis `b` continues, and the
/// batched `scatter_row` reorders the caches by it before writing this step's row, so the
/// runtime never copies a cache. The self-attention is written as `cache_attention`
/// directly (what the `attention` pass makes of `decoder_step`'s); the cross-attention as
/// in `decoder_step`, its `n` query rows against the one audio.
fn decoder_beam(lw: &mut Lowering, n: usize) -> Result<Graph, FrontendError> {
    let dims = lw.ck.dims.clone();
    let (d, n_ctx, heads) = (dims.n_text_state, dims.n_text_ctx, dims.n_text_head);
    let io = |s: &str| format!("beam{n}.{s}");
    let mut g = Graph::new(beam_graph(n));
    let tokens = g.add_input(io("tokens"), TensorType::new(DType::I32, [n]));
    let position = g.add_input(io("position"), TensorType::new(DType::I32, [1]));
    let origin = g.add_input(io("origin"), TensorType::new(DType::I32, [n]));
    let caches = cache_inputs(&mut g, dims.n_text_layer, &|kv, i| io(&format!("{kv}.{i}")), &[n, n_ctx, d]);
    let audio = g.add_input("audio_features", TensorType::f32([dims.n_audio_ctx, d]));

    let (emb, mut x) = embed(lw, &mut g, tokens, position)?;
    let mut new_caches = Vec::new();
    for (i, &(k_cache, v_cache)) in caches.iter().enumerate() {
        // The node names are `decoder_step`'s: the cross-attention values hoisted into the
        // encoder are found by name, and both steps read the same ones.
        let (w, p) = (format!("decoder.layers.{i}"), format!("dec.l{i}"));
        let h = layer_norm(lw, &mut g, x, &format!("{w}.self_attn_layer_norm"), format!("{p}.attn_ln"), d)?;
        let (q, k, v) = qkv(lw, &mut g, (h, h), &format!("{w}.self_attn"), &format!("{p}.attn"), d, heads)?;
        let k_all = node(&mut g, io(&format!("self_k.{i}.next")), Op::ScatterRow, &[k_cache, position, k, origin])?;
        let v_all = node(&mut g, io(&format!("self_v.{i}.next")), Op::ScatterRow, &[v_cache, position, v, origin])?;
        new_caches.extend([k_all, v_all]);
        let a = node(&mut g, format!("{p}.attn.ctx"), Op::CacheAttention { heads }, &[q, k_all, v_all, position])?;
        let a = linear(lw, &mut g, a, &format!("{w}.self_attn.out_proj"), format!("{p}.attn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.attn_out"), Op::Add, &[x, a])?;
        let h = layer_norm(lw, &mut g, x, &format!("{w}.encoder_attn_layer_norm"), format!("{p}.xattn_ln"), d)?;
        let proj = qkv(lw, &mut g, (h, audio), &format!("{w}.encoder_attn"), &format!("{p}.xattn"), d, heads)?;
        let (a, _) = attention(&mut g, &format!("{p}.xattn"), proj, heads, None)?;
        let a = linear(lw, &mut g, a, &format!("{w}.encoder_attn.out_proj"), format!("{p}.xattn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.xattn_out"), Op::Add, &[x, a])?;
        x = ffn(lw, &mut g, x, &w, &p, (d, dims.n_text_ffn))?;
    }
    let h = layer_norm(lw, &mut g, x, "decoder.layer_norm", "dec.final_ln".into(), d)?;
    let logits = node(&mut g, io("logits"), Op::Linear, &[h, emb])?;
    g.outputs.push(logits);
    g.outputs.extend(new_caches);
    Ok(g)
}

/// The prompt block of `m` tokens ([`prefill_graph`]): `decoder_step`'s layers over `m` rows,
/// its self-attention written as `cache_attention` directly (row `r` sees the cache up to
/// position `p + r`, its own block's earlier rows included, which `scatter_row` has just
/// written), its cross-attention as in `decoder_step`. What only the logits need (after the
/// last layer's K and V: the rest of that layer, the final norm) is removed as dead. The node
/// names are `decoder_step`'s, so the cross-attention K/V hoisted into the encoder are the
/// same values.
fn decoder_prefill(lw: &mut Lowering, m: usize) -> Result<Graph, FrontendError> {
    let dims = lw.ck.dims.clone();
    let (d, n_ctx, heads) = (dims.n_text_state, dims.n_text_ctx, dims.n_text_head);
    let io = |s: &str| format!("prefill{m}.{s}");
    let mut g = Graph::new(prefill_graph(m));
    let tokens = g.add_input(io("tokens"), TensorType::new(DType::I32, [m]));
    let positions = g.add_input(io("positions"), TensorType::new(DType::I32, [m]));
    let position = g.add_input(io("position"), TensorType::new(DType::I32, [1]));
    let caches = cache_inputs(&mut g, dims.n_text_layer, &|kv, i| format!("{kv}.{i}"), &[n_ctx, d]);
    let audio = g.add_input("audio_features", TensorType::f32([dims.n_audio_ctx, d]));

    let (_, mut x) = embed(lw, &mut g, tokens, positions)?;
    for (i, &(k_cache, v_cache)) in caches.iter().enumerate() {
        let (w, p) = (format!("decoder.layers.{i}"), format!("dec.l{i}"));
        let h = layer_norm(lw, &mut g, x, &format!("{w}.self_attn_layer_norm"), format!("{p}.attn_ln"), d)?;
        let (q, k, v) = qkv(lw, &mut g, (h, h), &format!("{w}.self_attn"), &format!("{p}.attn"), d, heads)?;
        let k_all = node(&mut g, format!("self_k.{i}.next"), Op::ScatterRow, &[k_cache, position, k])?;
        let v_all = node(&mut g, format!("self_v.{i}.next"), Op::ScatterRow, &[v_cache, position, v])?;
        g.outputs.extend([k_all, v_all]);
        let a = node(&mut g, format!("{p}.attn.ctx"), Op::CacheAttention { heads }, &[q, k_all, v_all, position])?;
        let a = linear(lw, &mut g, a, &format!("{w}.self_attn.out_proj"), format!("{p}.attn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.attn_out"), Op::Add, &[x, a])?;
        let h = layer_norm(lw, &mut g, x, &format!("{w}.encoder_attn_layer_norm"), format!("{p}.xattn_ln"), d)?;
        let proj = qkv(lw, &mut g, (h, audio), &format!("{w}.encoder_attn"), &format!("{p}.xattn"), d, heads)?;
        let (a, _) = attention(&mut g, &format!("{p}.xattn"), proj, heads, None)?;
        let a = linear(lw, &mut g, a, &format!("{w}.encoder_attn.out_proj"), format!("{p}.xattn_proj"), (d, d), true)?;
        x = node(&mut g, format!("{p}.xattn_out"), Op::Add, &[x, a])?;
        x = ffn(lw, &mut g, x, &w, &p, (d, dims.n_text_ffn))?;
    }
    g.remove_dead_nodes();
    Ok(g)
}

/// The start of a beam of `n` from a prefilled prompt ([`beam_init_graph`]): each of the
/// beam's caches is `n` copies of the plain step's (rows after the prompt included; no step
/// reads a row before writing it). A copy is a `gather` of row 0 of the cache seen as a
/// one-row table `[1, S·D]`, `n` times: the input `beam_init{n}.source` i32[n] is all zeros
/// (the runtime writes it).
fn beam_init(lw: &mut Lowering, n: usize) -> Result<Graph, FrontendError> {
    let dims = lw.ck.dims.clone();
    let (d, n_ctx) = (dims.n_text_state, dims.n_text_ctx);
    let mut g = Graph::new(beam_init_graph(n));
    let source = g.add_input(format!("beam_init{n}.source"), TensorType::new(DType::I32, [n]));
    for i in 0..dims.n_text_layer {
        for kv in ["self_k", "self_v"] {
            let cache = g.add_input(format!("{kv}.{i}"), TensorType::f32([n_ctx, d]));
            let p = format!("beam_init{n}.{kv}.{i}");
            let table = node(&mut g, format!("{p}.table"), Op::Reshape { shape: vec![1, n_ctx * d] }, &[cache])?;
            let rows = node(&mut g, format!("{p}.copies"), Op::Gather, &[table, source])?;
            let all = node(&mut g, format!("beam{n}.{kv}.{i}"), Op::Reshape { shape: vec![n, n_ctx, d] }, &[rows])?;
            g.outputs.push(all);
        }
    }
    Ok(g)
}

/// The decoder outputs `alignment.{layer}` hold the cross-attention scores of the layers
/// with alignment heads.
pub const ALIGNMENT_OUTPUT: &str = "alignment";

/// The `(layer, head)` pairs whose cross-attention aligns tokens to audio: the checkpoint's
/// list, else every head of the second half of the layers (openai-whisper's default). The
/// runtime applies the same rule to the list in the `.wbin` header.
pub fn alignment_heads(ck: &Checkpoint) -> Result<Vec<(usize, usize)>, FrontendError> {
    let (layers, heads) = (ck.dims.n_text_layer, ck.dims.n_text_head);
    let listed = &ck.generation.alignment_heads;
    if listed.is_empty() {
        return Ok((layers / 2..layers).flat_map(|l| (0..heads).map(move |h| (l, h))).collect());
    }
    if let Some(&(l, h)) = listed.iter().find(|&&(l, h)| l >= layers || h >= heads) {
        return Err(
            ck.error(format!("alignment head ({l}, {h}) is outside the decoder's {layers} layers of {heads} heads"))
        );
    }
    Ok(listed.clone())
}
