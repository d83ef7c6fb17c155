//! Decoding strategies over any model that can run one decoder step.

use crate::tokenizer::GenerationConfig;

/// A Whisper decoder with its self-attention cache: `step` feeds one token at one position
/// and returns the logits for the next token. Positions are fed in order from 0; feeding
/// position 0 again starts a new sequence (the cache is overwritten position by position).
pub trait Decoder {
    fn step(&mut self, token: u32, position: usize) -> Result<&[f32], String>;
    /// Feeds `tokens` at positions `start..start + tokens.len()` for what they leave in the
    /// decoder's caches, without logits: a prompt's previous text. A build with prompt
    /// blocks feeds them a block at a time; [`prefill_by_steps`] steps through them. No
    /// default, as for [`BeamDecoder`]: a wrapper that forgot to forward it would silently
    /// lose the blocks.
    fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<(), String>;
}

/// [`Decoder::prefill`] one step per token (for decoders without prompt blocks).
pub fn prefill_by_steps(dec: &mut dyn Decoder, tokens: &[u32], start: usize) -> Result<(), String> {
    for (i, &t) in tokens.iter().enumerate() {
        dec.step(t, start + i)?;
    }
    Ok(())
}

/// A decoder that can also step a beam of hypotheses at once (a build's `decoder_beam{N}`
/// graphs). No method has a default: a wrapper that forgot to forward them would silently
/// lose beam search.
pub trait BeamDecoder {
    /// The beam widths (above 1) this decoder can step.
    fn beam_widths(&self) -> Vec<usize>;
    /// One step of a beam of `tokens.len()` hypotheses, all at `position`: hypothesis `b`
    /// continues hypothesis `origin[b]` of the last step (its self-attention cache before
    /// `position` becomes that one's) and takes `tokens[b]`. Returns the logits, one row of
    /// the vocabulary per hypothesis. Feeding position 0 starts a new sequence.
    fn beam_step(&mut self, tokens: &[u32], origin: &[u32], position: usize) -> Result<&[f32], String>;
    /// Starts a beam of `width` hypotheses on `prompt` (positions `0..prompt.len()`), every
    /// hypothesis with the same caches, without logits. [`beam_prefill_by_steps`] does it
    /// with beam steps.
    fn beam_prefill(&mut self, width: usize, prompt: &[u32]) -> Result<(), String>;
}

/// [`BeamDecoder::beam_prefill`] one beam step per token, every hypothesis taking the same
/// token (for decoders without a faster way).
pub fn beam_prefill_by_steps(dec: &mut dyn BeamDecoder, width: usize, prompt: &[u32]) -> Result<(), String> {
    let identity: Vec<u32> = (0..width as u32).collect();
    for (pos, &t) in prompt.iter().enumerate() {
        dec.beam_step(&vec![t; width], &identity, pos)?;
    }
    Ok(())
}

/// Where a prompt's stepped part starts: at start-of-transcript (whose logits give the
/// no-speech probability, and from which every token's logits matter). What comes before
/// it, the previous text, only fills the caches: [`Decoder::prefill`]. A prompt without
/// start-of-transcript steps its last token only.
fn prompt_split(prompt: &[u32], cfg: &GenerationConfig) -> usize {
    prompt.iter().position(|&t| t == cfg.special.sot).unwrap_or(prompt.len().saturating_sub(1))
}

/// Beam search settings, as faster-whisper's and CTranslate2's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamOptions {
    /// Hypotheses kept at each step (`beam_size`).
    pub width: usize,
    /// The search ends when `round(width · patience)` hypotheses have finished.
    pub patience: f32,
    /// A finished hypothesis is ranked by its summed log-probability over
    /// `length^length_penalty` (1: the mean per token).
    pub length_penalty: f32,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("decoder step at position {position}: {msg}")]
    Step { position: usize, msg: String },
    #[error("the prompt ({0} tokens) does not fit the decoder's context")]
    PromptTooLong(usize),
    #[error("this model has no language tokens to detect a language with")]
    NoLanguages,
}

/// Whisper's cap on generated tokens per 30 s window (openai-whisper's `sample_len`): half
/// the text context. A model that never emits end-of-text stops here.
pub fn max_new_tokens(cfg: &GenerationConfig) -> usize {
    cfg.max_text_ctx / 2
}

fn step(dec: &mut dyn Decoder, token: u32, position: usize, logits: &mut Vec<f32>) -> Result<(), DecodeError> {
    let out = dec.step(token, position).map_err(|msg| DecodeError::Step { position, msg })?;
    logits.clear();
    logits.extend_from_slice(out);
    Ok(())
}

/// The greedy choice: the index of the largest logit.
pub fn argmax(v: &[f32]) -> u32 {
    // First maximum on ties, as torch.argmax / CTranslate2 do.
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The prompt that starts a transcription: `<|startoftranscript|>`, then for multilingual
/// models the language and task tokens, then `<|notimestamps|>`.
pub fn transcribe_prompt(cfg: &GenerationConfig, language: Option<u32>, translate: bool) -> Vec<u32> {
    let mut p = timestamp_prompt(cfg, language, translate);
    p.push(cfg.special.no_timestamps);
    p
}

/// [`transcribe_prompt`] without `<|notimestamps|>`: decoding then follows Whisper's
/// timestamp rules ([`apply_timestamp_rules`]).
pub fn timestamp_prompt(cfg: &GenerationConfig, language: Option<u32>, translate: bool) -> Vec<u32> {
    let s = &cfg.special;
    let mut p = vec![s.sot];
    if cfg.multilingual {
        p.push(language.unwrap_or(s.sot + 1));
        p.push(if translate { s.translate } else { s.transcribe });
    }
    p
}

/// The latest a window's first timestamp may be, in timestamp steps of 0.02 s (1.0 s, as
/// openai-whisper's and faster-whisper's `max_initial_timestamp`).
pub const MAX_INITIAL_TIMESTAMP_STEPS: usize = 50;

/// Masks `logits` by Whisper's timestamp rules, given the tokens generated so far in this
/// window (`out`, without the prompt):
/// - `<|notimestamps|>` is never generated;
/// - timestamps come in pairs (end of one segment, start of the next), except right before
///   end-of-text: after a lone timestamp only a timestamp or end-of-text may follow, after a
///   pair only text;
/// - timestamps never decrease, and a segment is never empty (a new start is later than the
///   last end);
/// - the first token is a timestamp, at most [`MAX_INITIAL_TIMESTAMP_STEPS`] in;
/// - when the timestamps together are likelier than any single text token, a timestamp is
///   taken.
pub fn apply_timestamp_rules(logits: &mut [f32], out: &[u32], cfg: &GenerationConfig) {
    let (tb, eot) = (cfg.special.timestamp_begin as usize, cfg.special.eot as usize);
    let n = logits.len();
    if tb >= n {
        return;
    }
    let mask =
        |l: &mut [f32], lo: usize, hi: usize| l[lo.min(n)..hi.min(n)].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
    mask(logits, cfg.special.no_timestamps as usize, cfg.special.no_timestamps as usize + 1);
    let is_ts = |t: u32| t as usize >= tb;
    let len = out.len();
    let last_ts = len >= 1 && is_ts(out[len - 1]);
    let penultimate_ts = len < 2 || is_ts(out[len - 2]);
    if last_ts {
        if penultimate_ts {
            mask(logits, tb, n);
        } else {
            mask(logits, 0, eot);
        }
    }
    if let Some(&last) = out.iter().rev().find(|&&t| is_ts(t)) {
        let floor = if last_ts && !penultimate_ts { last as usize } else { last as usize + 1 };
        mask(logits, tb, floor);
    }
    if len == 0 {
        mask(logits, 0, tb);
        mask(logits, tb + MAX_INITIAL_TIMESTAMP_STEPS + 1, n);
    }
    // Sum of the timestamps' probabilities against the likeliest text token, in log space.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let sum_exp = |r: &[f32]| -> f64 { r.iter().map(|&l| ((l - max) as f64).exp()).sum() };
    let ts_mass = sum_exp(&logits[tb..]);
    let text_max = logits[..tb].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if ts_mass > 0.0 && ts_mass.ln() > (text_max - max) as f64 {
        mask(logits, 0, tb);
    }
}

/// Greedy decoding: feeds `prompt`, then repeatedly takes the most likely token that is not
/// suppressed until end-of-text, the per-window cap, or the end of the context. Returns the
/// generated tokens without the prompt and without end-of-text.
pub fn greedy(dec: &mut dyn Decoder, cfg: &GenerationConfig, prompt: &[u32]) -> Result<Vec<u32>, DecodeError> {
    Ok(greedy_scored(dec, cfg, prompt)?.tokens)
}

/// The result of decoding one window.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// Generated tokens, without the prompt and without end-of-text.
    pub tokens: Vec<u32>,
    /// Probability of `<|nospeech|>` right after `<|startoftranscript|>` (0 when the
    /// vocabulary has no such token).
    pub no_speech_prob: f32,
    /// Mean log-probability of the chosen tokens, end-of-text included (openai-whisper's
    /// `avg_logprob`).
    pub avg_logprob: f32,
}

/// `log softmax(logits)[i]`.
fn log_prob(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    ((logits[i] - max) as f64 - sum.ln()) as f32
}

/// [`greedy`], also scoring the window the way openai-whisper does to detect silence.
pub fn greedy_scored(dec: &mut dyn Decoder, cfg: &GenerationConfig, prompt: &[u32]) -> Result<Decoded, DecodeError> {
    sample_scored(dec, cfg, prompt, 0.0, &mut Rng::new(0))
}

/// A small deterministic generator (SplitMix64) for sampling: the same seed gives the same
/// transcript on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A token drawn from `softmax(logits / temperature)`.
fn sample(logits: &[f32], temperature: f32, rng: &mut Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = logits.iter().map(|&l| (((l - max) / temperature) as f64).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, &x) in w.iter().enumerate() {
        if u < x {
            return i as u32;
        }
        u -= x;
    }
    argmax(logits)
}

/// [`greedy_scored`] at a temperature: 0 takes the likeliest token, above 0 draws from the
/// filtered distribution sharpened or flattened by it. The scores are of the filtered
/// logits as they are (openai-whisper's `sum_logprobs`).
pub fn sample_scored(
    dec: &mut dyn Decoder,
    cfg: &GenerationConfig,
    prompt: &[u32],
    temperature: f32,
    rng: &mut Rng,
) -> Result<Decoded, DecodeError> {
    if prompt.is_empty() || prompt.len() >= cfg.max_text_ctx {
        return Err(DecodeError::PromptTooLong(prompt.len()));
    }
    let mut logits = Vec::new();
    let mut no_speech_prob = 0.0;
    let fed = prompt_split(prompt, cfg);
    dec.prefill(&prompt[..fed], 0).map_err(|msg| DecodeError::Step { position: 0, msg })?;
    for (pos, &t) in prompt.iter().enumerate().skip(fed) {
        step(dec, t, pos, &mut logits)?;
        if t == cfg.special.sot {
            if let Some(ns) = cfg.special.no_speech.filter(|&ns| (ns as usize) < logits.len()) {
                no_speech_prob = log_prob(&logits, ns as usize).exp();
            }
        }
    }
    let cap = max_new_tokens(cfg).min(cfg.max_text_ctx - prompt.len());
    // Without `<|notimestamps|>` in the prompt, the timestamp rules apply (as CTranslate2).
    let timestamps = !prompt.contains(&cfg.special.no_timestamps);
    let mut out = Vec::new();
    let mut sum_logprob = 0f64;
    while out.len() < cap {
        for &t in &cfg.suppress {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if out.is_empty() {
            for &t in &cfg.suppress_begin {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if timestamps {
            apply_timestamp_rules(&mut logits, &out, cfg);
        }
        let next = if temperature > 0.0 { sample(&logits, temperature, rng) } else { argmax(&logits) };
        sum_logprob += log_prob(&logits, next as usize) as f64;
        if next == cfg.special.eot {
            break;
        }
        out.push(next);
        let pos = prompt.len() + out.len() - 1;
        if pos + 1 >= cfg.max_text_ctx {
            break;
        }
        step(dec, next, pos, &mut logits)?;
    }
    let avg_logprob = (sum_logprob / (out.len() + 1) as f64) as f32;
    Ok(Decoded { tokens: out, no_speech_prob, avg_logprob })
}

/// `log_softmax(logits)`, in place: `x - max - ln Σ exp(x - max)`, one rounding per element
/// (as CTranslate2 computes it).
fn log_softmax(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let c = -max - (sum.ln() as f32);
    logits.iter_mut().for_each(|l| *l += c);
}

/// Beam search over one window, as CTranslate2's (what faster-whisper runs at temperature
/// 0): the prompt is fed to every hypothesis; at each step the suppression and timestamp
/// rules mask each hypothesis's logits, its log-probabilities are added to its score, and
/// the `2·width` best continuations over all hypotheses (ties to the lower hypothesis, then
/// token) are taken in order; the first `width` of them are checked for end-of-text: one
/// that ends is set aside with its score and replaced by the next candidate that does not
/// end. The first step expands the one hypothesis the prompt made. The search stops when
/// `round(width · patience)` hypotheses have ended, or at the window's length limit (where
/// every live hypothesis counts as ended). The winner has the best score over
/// `length^length_penalty` (length without end-of-text; the first set aside wins a tie).
/// `avg_logprob` is its summed log-probability over its length plus one, as faster-whisper
/// reports it.
pub fn beam_search(
    dec: &mut dyn BeamDecoder,
    cfg: &GenerationConfig,
    prompt: &[u32],
    opts: BeamOptions,
) -> Result<Decoded, DecodeError> {
    let b = opts.width;
    if prompt.is_empty() || prompt.len() >= cfg.max_text_ctx {
        return Err(DecodeError::PromptTooLong(prompt.len()));
    }
    let fail = |position: usize| move |msg: String| DecodeError::Step { position, msg };
    let identity: Vec<u32> = (0..b as u32).collect();
    let mut logits: Vec<f32> = Vec::new();
    let mut no_speech_prob = 0.0;
    let mut v = 0;
    let fed = prompt_split(prompt, cfg);
    dec.beam_prefill(b, &prompt[..fed]).map_err(fail(0))?;
    for (pos, &t) in prompt.iter().enumerate().skip(fed) {
        let out = dec.beam_step(&vec![t; b], &identity, pos).map_err(fail(pos))?;
        v = out.len() / b;
        logits.clear();
        logits.extend_from_slice(out);
        if t == cfg.special.sot {
            if let Some(ns) = cfg.special.no_speech.filter(|&ns| (ns as usize) < v) {
                no_speech_prob = log_prob(&logits[..v], ns as usize).exp();
            }
        }
    }
    let timestamps = !prompt.contains(&cfg.special.no_timestamps);
    // CTranslate2's length limit: the start token (the prompt's last) is at `start`.
    let start = prompt.len() - 1;
    let limit = max_new_tokens(cfg).min(cfg.max_text_ctx - start);
    let candidates = 2 * b;
    let most_finished = ((b as f32 * opts.patience).round() as usize).max(1);
    let mut alive: Vec<Vec<u32>> = vec![Vec::new()];
    let mut cum: Vec<f32> = vec![0.0];
    let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(candidates + 1);
    for step in 0..limit {
        let rows = alive.len();
        best.clear();
        for r in 0..rows {
            let row = &mut logits[r * v..(r + 1) * v];
            for &t in &cfg.suppress {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            if step == 0 {
                for &t in &cfg.suppress_begin {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            if timestamps {
                apply_timestamp_rules(row, &alive[r], cfg);
            }
            log_softmax(row);
            // The best `candidates` of (score, flat index), best first; scanning in index
            // order, an equal score never displaces an earlier one.
            for (t, &lp) in row.iter().enumerate() {
                let score = if step == 0 { lp } else { cum[r] + lp };
                if best.len() == candidates && score <= best[candidates - 1].0 {
                    continue;
                }
                let at = best.partition_point(|&(s, _)| s >= score);
                best.insert(at, (score, r * v + t));
                best.truncate(candidates);
            }
        }
        let is_last = step + 1 == limit;
        let word = |j: usize| (best[j].1 % v) as u32;
        let seq = |j: usize| -> Vec<u32> {
            let mut s = alive[best[j].1 / v].clone();
            s.push(word(j));
            s
        };
        let mut next = b;
        let mut source: Vec<usize> = (0..b.min(best.len())).collect();
        for k in 0..source.len() {
            let ended = word(k) == cfg.special.eot;
            if ended || is_last {
                let mut toks = seq(k);
                if ended {
                    toks.pop();
                }
                finished.push((toks, best[k].0));
                if let Some(j) = (next..best.len()).find(|&j| word(j) != cfg.special.eot) {
                    source[k] = j;
                    next = j + 1;
                }
            }
        }
        if is_last || finished.len() >= most_finished {
            break;
        }
        let origin: Vec<u32> = source.iter().map(|&j| (best[j].1 / v) as u32).collect();
        let tokens: Vec<u32> = source.iter().map(|&j| word(j)).collect();
        alive = source.iter().map(|&j| seq(j)).collect();
        cum = source.iter().map(|&j| best[j].0).collect();
        if alive.len() < b {
            // Fewer continuations than hypotheses (a vocabulary smaller than the beam).
            break;
        }
        let pos = prompt.len() + step;
        let out = dec.beam_step(&tokens, &origin, pos).map_err(fail(pos))?;
        logits.clear();
        logits.extend_from_slice(out);
    }
    let mut winner: Option<(f32, usize)> = None;
    for (i, (toks, raw)) in finished.iter().enumerate() {
        let score = raw / (toks.len() as f32).powf(opts.length_penalty);
        if winner.is_none_or(|(s, _)| score > s) {
            winner = Some((score, i));
        }
    }
    let Some((_, i)) = winner else {
        return Ok(Decoded { tokens: vec![], no_speech_prob, avg_logprob: f32::NEG_INFINITY });
    };
    let (tokens, raw) = finished.swap_remove(i);
    let avg_logprob = raw / (tokens.len() + 1) as f32;
    Ok(Decoded { tokens, no_speech_prob, avg_logprob })
}

/// Language identification: one step on `<|startoftranscript|>`, then the most likely
/// language token. Returns `(code, token)`.
pub fn detect_language(dec: &mut dyn Decoder, cfg: &GenerationConfig) -> Result<(String, u32), DecodeError> {
    let mut logits = Vec::new();
    step(dec, cfg.special.sot, 0, &mut logits)?;
    cfg.languages
        .iter()
        .filter(|(_, id)| (*id as usize) < logits.len())
        .max_by(|a, b| logits[a.1 as usize].total_cmp(&logits[b.1 as usize]))
        .cloned()
        .ok_or(DecodeError::NoLanguages)
}

/// The summed log-probability of `d` (end-of-text counted) over its tokens (end-of-text
/// not counted): what [`best_of`] ranks by.
fn per_token_logprob(d: &Decoded) -> f64 {
    d.avg_logprob as f64 * (d.tokens.len() + 1) as f64 / d.tokens.len().max(1) as f64
}

/// `n` samples at `temperature`, drawn one after the other from `rng`; the one with the
/// highest summed log-probability per token wins (openai-whisper's ranking without a length
/// penalty; the sum counts end-of-text, the length does not), the first of equals.
pub fn best_of(
    dec: &mut dyn Decoder,
    cfg: &GenerationConfig,
    prompt: &[u32],
    temperature: f32,
    n: usize,
    rng: &mut Rng,
) -> Result<Decoded, DecodeError> {
    let mut best: Option<(f64, Decoded)> = None;
    for _ in 0..n.max(1) {
        let d = sample_scored(dec, cfg, prompt, temperature, rng)?;
        let s = per_token_logprob(&d);
        if best.as_ref().is_none_or(|(b, _)| s > *b) {
            best = Some((s, d));
        }
    }
    Ok(best.expect("at least one sample").1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::SpecialTokens;

    /// A decoder whose logits prefer a scripted token at each position.
    struct Scripted {
        script: Vec<u32>,
        logits: Vec<f32>,
        seen: Vec<(u32, usize)>,
    }

    impl Decoder for Scripted {
        fn step(&mut self, token: u32, position: usize) -> Result<&[f32], String> {
            self.seen.push((token, position));
            self.logits = vec![0.0; 10];
            let want = self.script.get(position).copied().unwrap_or(0);
            self.logits[want as usize] = 5.0;
            self.logits[7] = 4.0; // the runner-up everywhere
            Ok(&self.logits)
        }
        fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<(), String> {
            prefill_by_steps(self, tokens, start)
        }
    }

    fn cfg() -> GenerationConfig {
        GenerationConfig {
            special: SpecialTokens {
                eot: 0,
                sot: 1,
                transcribe: 2,
                translate: 3,
                no_timestamps: 4,
                timestamp_begin: 5,
                no_speech: Some(3),
                sot_prev: None,
            },
            multilingual: false,
            languages: vec![],
            suppress: vec![9],
            suppress_begin: vec![6],
            max_text_ctx: 16,
        }
    }

    #[test]
    fn greedy_feeds_positions_in_order_and_applies_suppression() {
        // prompt [1, 4] at positions 0, 1; script says: after pos 1 → 6 (suppressed at the
        // start, so the runner-up 7 wins), after pos 2 → 9 (always suppressed → 7), then 8, then eot.
        let mut d = Scripted { script: vec![0, 6, 9, 8, 0], logits: vec![], seen: vec![] };
        let out = greedy(&mut d, &cfg(), &[1, 4]).unwrap();
        assert_eq!(out, vec![7, 7, 8]);
        assert_eq!(d.seen, vec![(1, 0), (4, 1), (7, 2), (7, 3), (8, 4)]);
    }

    #[test]
    fn scores_follow_openai_whisper() {
        // After sot the scripted logits are 5 at token 0 (eot), 4 at token 7, 0 elsewhere
        // (10 tokens): p(no_speech = 3) = 1 / (e^5 + e^4 + 8).
        let mut d = Scripted { script: vec![0, 8, 0], logits: vec![], seen: vec![] };
        let r = greedy_scored(&mut d, &cfg(), &[1, 4]).unwrap();
        let z = 5f32.exp() + 4f32.exp() + 8.0;
        assert!((r.no_speech_prob - 1.0 / z).abs() < 1e-6);
        // Log-probabilities are taken after suppression, as openai-whisper does: token 8 with
        // tokens 6 and 9 suppressed (8 - 2 + ... = 6 zeros left), then eot with 9 suppressed.
        assert_eq!(r.tokens, vec![8]);
        let first = 5.0 - (5f32.exp() + 4f32.exp() + 6.0).ln();
        let eot = 5.0 - (5f32.exp() + 4f32.exp() + 7.0).ln();
        assert!((r.avg_logprob - (first + eot) / 2.0).abs() < 1e-5, "{}", r.avg_logprob);
    }

    /// A beam decoder whose logits depend on each hypothesis's whole history, which it
    /// tracks from the origins it is fed: a wrong reorder gives other logits.
    struct Paths {
        hist: Vec<Vec<u32>>,
        logits: Vec<f32>,
    }

    impl Paths {
        /// Log-probabilities (as logits) after `h` (generated tokens only; the prompt is
        /// `[1, 4]`): from the start, token 7 is likelier than 8; after 7 every text token
        /// is as likely as end-of-text; after 8, end-of-text is near certain.
        fn next(h: &[u32]) -> Vec<f32> {
            let mut l = vec![-30.0f32; 10];
            match h {
                [] => {
                    l[7] = (0.55f32).ln();
                    l[8] = (0.45f32).ln();
                }
                [.., 7] | [.., 2] => (0..10).filter(|&t| t != 1 && t != 4).for_each(|t| l[t] = -2.0),
                [.., 8] => l[0] = -0.01,
                _ => l[0] = 0.0,
            }
            l
        }
    }

    impl BeamDecoder for Paths {
        fn beam_widths(&self) -> Vec<usize> {
            vec![3]
        }
        fn beam_prefill(&mut self, width: usize, prompt: &[u32]) -> Result<(), String> {
            beam_prefill_by_steps(self, width, prompt)
        }
        fn beam_step(&mut self, tokens: &[u32], origin: &[u32], position: usize) -> Result<&[f32], String> {
            if position < 2 {
                // The prompt: every hypothesis the same, nothing generated yet.
                self.hist = vec![vec![]; tokens.len()];
            } else {
                let old = std::mem::take(&mut self.hist);
                self.hist = origin.iter().zip(tokens).map(|(&o, &t)| [&old[o as usize][..], &[t]].concat()).collect();
            }
            self.logits = self.hist.iter().flat_map(|h| Paths::next(h)).collect();
            Ok(&self.logits)
        }
    }

    #[test]
    fn beam_search_finds_the_likelier_whole_sequence_greedy_misses() {
        let mut c = cfg();
        c.suppress.clear();
        c.suppress_begin.clear();
        let opts = BeamOptions { width: 3, patience: 1.0, length_penalty: 1.0 };
        let mut d = Paths { hist: vec![], logits: vec![] };
        let r = beam_search(&mut d, &c, &[1, 4], opts).unwrap();
        // Greedy would take 7 first (0.55 > 0.45) and then wander; the beam keeps 8, whose
        // end-of-text follows at once: ln 0.45 + (-0.01) over one token beats every path
        // through 7.
        assert_eq!(r.tokens, vec![8]);
        let raw = (0.45f32).ln() - 0.01;
        // The logits above are not normalised: the search takes log-softmax of each row.
        let z8: f32 = Paths::next(&[8]).iter().map(|x| x.exp()).sum();
        let z0: f32 = Paths::next(&[]).iter().map(|x| x.exp()).sum();
        let want = (0.45f32.ln() - z0.ln()) + (-0.01 - z8.ln());
        assert!((r.avg_logprob * 2.0 - want).abs() < 1e-4, "{} vs {want} ({raw})", r.avg_logprob * 2.0);
        // A width the decoder lacks is not this function's concern; a bad prompt is.
        assert!(matches!(beam_search(&mut d, &c, &[], opts), Err(DecodeError::PromptTooLong(0))));
    }

    /// Logits that leave several likely continuations at every step, so samples differ.
    struct Flat {
        logits: Vec<f32>,
    }

    impl Decoder for Flat {
        fn step(&mut self, token: u32, position: usize) -> Result<&[f32], String> {
            self.logits = (0..10).map(|i| ((i * 7 + token as usize * 3 + position) % 5) as f32 * 0.3).collect();
            Ok(&self.logits)
        }
        fn prefill(&mut self, tokens: &[u32], start: usize) -> Result<(), String> {
            prefill_by_steps(self, tokens, start)
        }
    }

    #[test]
    fn best_of_keeps_the_likeliest_of_the_draws_per_token() {
        let mut c = cfg();
        c.suppress.clear();
        let per_token = per_token_logprob;
        let mut d = Flat { logits: vec![] };
        let mut distinct = 0;
        for seed in 0..20 {
            let chosen = best_of(&mut d, &c, &[1, 4], 1.0, 5, &mut Rng::new(seed)).unwrap();
            // The same five draws, one by one from the same seed.
            let mut rng = Rng::new(seed);
            let draws: Vec<Decoded> =
                (0..5).map(|_| sample_scored(&mut d, &c, &[1, 4], 1.0, &mut rng).unwrap()).collect();
            let best = draws.iter().map(per_token).fold(f64::NEG_INFINITY, f64::max);
            let first_best = draws.iter().find(|x| per_token(x) == best).unwrap();
            assert_eq!(chosen.tokens, first_best.tokens, "seed {seed}");
            distinct += usize::from(draws.iter().any(|x| x.tokens != draws[0].tokens));
        }
        // The draws did differ, so the choice was a real one.
        assert!(distinct > 10, "only {distinct} of 20 seeds drew different samples");
        // One draw is plain sampling.
        let one = best_of(&mut d, &c, &[1, 4], 1.0, 1, &mut Rng::new(3)).unwrap();
        assert_eq!(one.tokens, sample_scored(&mut d, &c, &[1, 4], 1.0, &mut Rng::new(3)).unwrap().tokens);
    }

    #[test]
    fn greedy_stops_at_the_cap_when_eot_never_comes() {
        let mut d = Scripted { script: vec![8; 64], logits: vec![], seen: vec![] };
        let out = greedy(&mut d, &cfg(), &[1, 4]).unwrap();
        assert_eq!(out.len(), max_new_tokens(&cfg()));
    }
}
