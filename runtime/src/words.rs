//! Word timestamps, as openai-whisper computes them (`timing.py`): the decoder is run once more
//! over the window's text, without timestamps; the cross-attention scores of the alignment
//! heads (a build with `--word-timestamps` outputs them) are softmaxed over the window's
//! audio frames, normalised per frame over the tokens, median-filtered along time (width 7)
//! and averaged over the heads; dynamic time warping then finds the monotonic path from the
//! first token and frame to the last, and each word starts at the frame where the path
//! reaches its first token.

use crate::tokenizer::{GenerationConfig, WhisperTokenizer};
use crate::transcribe::{TranscribeError, WhisperModel};

/// Encoder frames per second (two mel frames of 10 ms each).
const TOKENS_PER_SECOND: f64 = 50.0;
/// Width of the median filter along time.
const MEDIAN_FILTER_WIDTH: usize = 7;
/// Punctuation that joins the word after it, and the word before it (openai-whisper's and
/// faster-whisper's defaults).
const PREPEND_PUNCTUATIONS: &str = "\"'“¿([{-";
const APPEND_PUNCTUATIONS: &str = "\"'.。,，!！?？:：”)]}、";

#[derive(Clone, Debug, PartialEq)]
pub struct Word {
    /// The word's text with its leading space, as decoded.
    pub word: String,
    pub tokens: Vec<u32>,
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    /// Mean probability of the word's tokens.
    pub probability: f32,
}

/// Aligns `text_tokens` (ordinary tokens only) to the audio the model last encoded, of which
/// the first `num_frames` mel frames hold the window's audio; times are offset by `offset`
/// seconds. `sot_sequence` is the start of the prompt (start-of-transcript, and language and
/// task on multilingual models). Returns the words, before punctuation is merged.
pub fn find_alignment(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    sot_sequence: &[u32],
    text_tokens: &[u32],
    num_frames: usize,
    offset: f64,
) -> Result<Vec<Word>, TranscribeError> {
    if text_tokens.is_empty() {
        return Ok(vec![]);
    }
    let eot = cfg.special.eot;
    let mut tokens = sot_sequence.to_vec();
    tokens.push(cfg.special.no_timestamps);
    tokens.extend_from_slice(text_tokens);
    // Row k of the matrix: the step that predicts text token k (the last: end-of-text), that
    // is the step taking token `sot_sequence.len() + k` as input.
    let first = sot_sequence.len();
    let mut rows: Vec<f32> = Vec::new();
    let (mut heads, mut frames) = (0, 0);
    let mut probs = Vec::with_capacity(text_tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        let logits = model.step(t, i).map_err(TranscribeError::Align)?;
        if i < first {
            continue;
        }
        // The probability of the next text token among the text tokens (ids below eot).
        if let Some(&next) = text_tokens.get(i - first) {
            let text = &logits[..eot as usize];
            let max = text.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f32 = text.iter().map(|&x| (x - max).exp()).sum();
            probs.push((text[next as usize] - max).exp() / sum);
        }
        (heads, frames) = model.alignment(&mut rows).ok_or(TranscribeError::NoAlignment)?;
    }
    let n = text_tokens.len() + 1;
    let t = (num_frames / 2).clamp(1, frames);
    let matrix = alignment_matrix(&rows, n, heads, frames, t);
    let (text_idx, time_idx) = dtw(&matrix, n, t);

    let (words, word_tokens) = split_to_word_tokens(tokenizer, text_tokens, eot)?;
    // The path's first frame at each token.
    let mut jump_times = Vec::new();
    for k in 0..text_idx.len() {
        if k == 0 || text_idx[k] != text_idx[k - 1] {
            jump_times.push(time_idx[k] as f64 / TOKENS_PER_SECOND);
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    for (word, toks) in words.into_iter().zip(word_tokens) {
        let end_at = at + toks.len();
        let p = probs[at..end_at].iter().sum::<f32>() / toks.len() as f32;
        out.push(Word {
            word,
            tokens: toks,
            start: offset + jump_times[at],
            end: offset + jump_times[end_at],
            probability: p,
        });
        at = end_at;
    }
    Ok(out)
}

/// The `[n, t]` matrix DTW runs on: per head, the softmax of each row's scores over the first
/// `t` frames, normalised over the rows per frame (mean 0, standard deviation 1), median
/// filtered along time; then the mean over the heads. `rows` holds `n` steps of `heads ×
/// frames` scores.
fn alignment_matrix(rows: &[f32], n: usize, heads: usize, frames: usize, t: usize) -> Vec<f64> {
    let mut matrix = vec![0f64; n * t];
    for h in 0..heads {
        let mut w = vec![0f64; n * t];
        for k in 0..n {
            let s = &rows[(k * heads + h) * frames..][..t];
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let e: Vec<f64> = s.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, v) in e.into_iter().enumerate() {
                w[k * t + j] = v / sum;
            }
        }
        for j in 0..t {
            let mean = (0..n).map(|k| w[k * t + j]).sum::<f64>() / n as f64;
            let var = (0..n).map(|k| (w[k * t + j] - mean).powi(2)).sum::<f64>() / n as f64;
            let std = var.sqrt();
            for k in 0..n {
                w[k * t + j] = (w[k * t + j] - mean) / std;
            }
        }
        for k in 0..n {
            let filtered = median_filter(&w[k * t..(k + 1) * t], MEDIAN_FILTER_WIDTH);
            for (m, f) in matrix[k * t..(k + 1) * t].iter_mut().zip(filtered) {
                *m += f / heads as f64;
            }
        }
    }
    matrix
}

/// The running median of `x` over `width` values, the edges padded by reflection (without
/// repeating the edge value), as `torch.nn.functional.pad(mode="reflect")` pads; `x` as it is
/// when it is too short to reflect.
fn median_filter(x: &[f64], width: usize) -> Vec<f64> {
    let pad = width / 2;
    if x.len() <= pad {
        return x.to_vec();
    }
    let at = |i: isize| -> f64 {
        let n = x.len() as isize;
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        x[j as usize]
    };
    (0..x.len() as isize)
        .map(|i| {
            let mut w: Vec<f64> = (i - pad as isize..=i + pad as isize).map(at).collect();
            w.sort_by(f64::total_cmp);
            w[pad]
        })
        .collect()
}

/// Dynamic time warping on `-matrix` (`[n, t]`): the monotonic path from `(0, 0)` to
/// `(n-1, t-1)` of greatest total, ties broken as openai-whisper's `dtw_cpu` breaks them.
/// Returns the path's token and frame indices.
fn dtw(matrix: &[f64], n: usize, t: usize) -> (Vec<usize>, Vec<usize>) {
    let (rows, cols) = (n + 1, t + 1);
    let mut cost = vec![f64::INFINITY; rows * cols];
    let mut trace = vec![-1i8; rows * cols];
    cost[0] = 0.0;
    for j in 1..cols {
        for i in 1..rows {
            let c0 = cost[(i - 1) * cols + j - 1];
            let c1 = cost[(i - 1) * cols + j];
            let c2 = cost[i * cols + j - 1];
            let (c, tr) = if c0 < c1 && c0 < c2 {
                (c0, 0)
            } else if c1 < c0 && c1 < c2 {
                (c1, 1)
            } else {
                (c2, 2)
            };
            // openai's cost matrix is float32: round as it does.
            cost[i * cols + j] = ((-matrix[(i - 1) * t + j - 1]) as f32 + c as f32) as f64;
            trace[i * cols + j] = tr;
        }
    }
    for j in 0..cols {
        trace[j] = 2;
    }
    for i in 0..rows {
        trace[i * cols] = 1;
    }
    let (mut i, mut j) = (n, t);
    let mut path = Vec::new();
    while i > 0 || j > 0 {
        path.push((i - 1, j - 1));
        match trace[i * cols + j] {
            0 => {
                i -= 1;
                j -= 1;
            }
            1 => i -= 1,
            _ => j -= 1,
        }
    }
    path.reverse();
    path.into_iter().map(|(i, j)| (i as usize, j as usize)).unzip()
}

/// Splits text tokens into words, as openai-whisper's `split_to_word_tokens`: at tokens that
/// complete a character, then (except for languages written without spaces) joined into
/// words at a leading space or punctuation. The end-of-text token closes the list as a word
/// of its own, which is dropped here.
fn split_to_word_tokens(
    tokenizer: &WhisperTokenizer,
    tokens: &[u32],
    eot: u32,
) -> Result<(Vec<String>, Vec<Vec<u32>>), TranscribeError> {
    let decode = |t: &[u32]| tokenizer.decode(t, eot).map_err(|e| TranscribeError::Text(e.to_string()));
    let full = decode(tokens)?;
    let mut subwords: Vec<(String, Vec<u32>)> = Vec::new();
    let mut current = Vec::new();
    let mut offset = 0;
    for &t in tokens {
        current.push(t);
        let d = decode(&current)?;
        let complete = match d.find('\u{fffd}') {
            None => true,
            Some(i) => full[offset..].get(i..).is_some_and(|rest| rest.starts_with('\u{fffd}')),
        };
        if complete {
            offset += d.len();
            subwords.push((d, std::mem::take(&mut current)));
        }
    }
    let mut words: Vec<String> = Vec::new();
    let mut word_tokens: Vec<Vec<u32>> = Vec::new();
    for (sub, toks) in subwords {
        let punctuation = sub.trim().chars().count() == 1 && sub.trim().chars().all(|c| c.is_ascii_punctuation());
        if sub.starts_with(' ') || punctuation || words.is_empty() {
            words.push(sub);
            word_tokens.push(toks);
        } else {
            words.last_mut().unwrap().push_str(&sub);
            word_tokens.last_mut().unwrap().extend(toks);
        }
    }
    Ok((words, word_tokens))
}

/// Joins punctuation to its word, as openai-whisper's `merge_punctuations`: an opening mark
/// (`"`, `(`, ...) to the word after it, a closing one (`.`, `,`, ...) to the word before;
/// the emptied entries are dropped.
pub fn merge_punctuations(words: &mut Vec<Word>) {
    // Substring tests, as Python's `in` on strings (the empty word is in every set).
    // Prepend: from the end, a word that is an opening mark goes onto the next word.
    if words.len() >= 2 {
        let (mut i, mut j) = (words.len() as isize - 2, words.len() - 1);
        while i >= 0 {
            let (a, b) = (i as usize, j);
            if words[a].word.starts_with(' ') && PREPEND_PUNCTUATIONS.contains(words[a].word.trim()) {
                let prev = std::mem::take(&mut words[a].word);
                words[b].word = prev + &words[b].word;
                let toks = std::mem::take(&mut words[a].tokens);
                words[b].tokens.splice(0..0, toks);
            } else {
                j = a;
            }
            i -= 1;
        }
    }
    // Append: from the start, a word that is a closing mark goes onto the word before.
    let (mut i, mut j) = (0usize, 1usize);
    while j < words.len() {
        if !words[i].word.ends_with(' ') && APPEND_PUNCTUATIONS.contains(words[j].word.as_str()) {
            let following = std::mem::take(&mut words[j].word);
            words[i].word.push_str(&following);
            let toks = std::mem::take(&mut words[j].tokens);
            words[i].tokens.extend(toks);
        } else {
            i = j;
        }
        j += 1;
    }
    words.retain(|w| !w.word.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_filter_reflects_at_the_edges() {
        // torch: pad [1, 5, 2, 8, 3] by 3 with reflect -> [8, 2, 5, 1, 5, 2, 8, 3, 8, 2, 5].
        let got = median_filter(&[1.0, 5.0, 2.0, 8.0, 3.0], 7);
        assert_eq!(got, vec![5.0, 5.0, 5.0, 3.0, 5.0]);
        assert_eq!(median_filter(&[4.0, 1.0, 2.0], 7), vec![4.0, 1.0, 2.0]);
    }

    #[test]
    fn dtw_follows_the_greatest_total() {
        // Token 0 lies on frames 0-1, token 1 on frames 2-3.
        let m = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let (i, j) = dtw(&m, 2, 4);
        assert_eq!(i, vec![0, 0, 1, 1]);
        assert_eq!(j, vec![0, 1, 2, 3]);
    }
}
