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

/// Languages written without spaces between words: their words are the tokens that complete
/// a character (openai-whisper's list).
const NO_SPACE_LANGUAGES: [&str; 6] = ["zh", "ja", "th", "lo", "my", "yue"];

/// Aligns `text_tokens` (ordinary tokens only) to the audio the model last encoded, of which
/// the first `num_frames` mel frames hold the window's audio; times are offset by `offset`
/// seconds. `sot_sequence` is the start of the prompt (start-of-transcript, and language and
/// task on multilingual models), `language` the window's language code if known. Returns the
/// words, before punctuation is merged; none if the window is too short to align (under two
/// encoder frames) or its attention is not finite.
#[allow(clippy::too_many_arguments)]
pub fn find_alignment(
    model: &mut dyn WhisperModel,
    tokenizer: &WhisperTokenizer,
    cfg: &GenerationConfig,
    sot_sequence: &[u32],
    language: Option<&str>,
    text_tokens: &[u32],
    num_frames: usize,
    offset: f64,
) -> Result<Vec<Word>, TranscribeError> {
    if text_tokens.is_empty() {
        return Ok(vec![]);
    }
    let eot = cfg.special.eot;
    // openai-whisper's pass: `sot_sequence`, `<|notimestamps|>`, the text, end-of-text. Every
    // step's attention is normalised together; the matrix then keeps the rows of the steps
    // that predict the text tokens and end-of-text (inputs `<|notimestamps|>` to the last
    // text token).
    let mut tokens = sot_sequence.to_vec();
    tokens.push(cfg.special.no_timestamps);
    tokens.extend_from_slice(text_tokens);
    tokens.push(eot);
    let first = sot_sequence.len();
    let mut rows: Vec<f32> = Vec::new();
    let (mut heads, mut frames) = (0, 0);
    let mut probs = Vec::with_capacity(text_tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        let logits = model.step(t, i).map_err(TranscribeError::Align)?;
        // The probability of the next text token among the text tokens (ids below eot).
        if let Some(&next) = i.checked_sub(first).and_then(|k| text_tokens.get(k)) {
            let text = logits
                .get(..eot as usize)
                .ok_or_else(|| TranscribeError::Align("end-of-text beyond the logits".into()))?;
            let max = text.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f32 = text.iter().map(|&x| (x - max).exp()).sum();
            probs.push(text.get(next as usize).map_or(0.0, |&x| (x - max).exp() / sum));
        }
        (heads, frames) = model.alignment(&mut rows).ok_or(TranscribeError::NoAlignment)?;
    }
    let t = (num_frames / 2).min(frames);
    if t < 2 || heads == 0 {
        return Ok(vec![]);
    }
    let n = text_tokens.len() + 1;
    let matrix = alignment_matrix(&rows, tokens.len(), first..first + n, heads, frames, t);
    if matrix.iter().any(|x| !x.is_finite()) {
        return Ok(vec![]);
    }
    let (text_idx, time_idx) = dtw(&matrix, n, t);

    let spaces = !language.is_some_and(|l| NO_SPACE_LANGUAGES.contains(&l));
    let (words, word_tokens) = split_to_word_tokens(tokenizer, text_tokens, eot, spaces)?;
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

/// The `[keep, t]` matrix DTW runs on: per head, the softmax of each step's scores over the
/// first `t` frames, normalised over all `steps` per frame (mean 0, standard deviation 1),
/// median filtered along time; then the mean over the heads, of the steps in `keep`. `rows`
/// holds `steps` steps of `heads × frames` scores. In f32, as openai-whisper computes it.
fn alignment_matrix(
    rows: &[f32],
    steps: usize,
    keep: std::ops::Range<usize>,
    heads: usize,
    frames: usize,
    t: usize,
) -> Vec<f32> {
    let n = keep.len();
    let mut matrix = vec![0f32; n * t];
    let mut w = vec![0f32; steps * t];
    for h in 0..heads {
        for k in 0..steps {
            let s = &rows[(k * heads + h) * frames..][..t];
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f32 = s.iter().map(|&x| (x - max).exp()).sum();
            for (j, &x) in s.iter().enumerate() {
                w[k * t + j] = (x - max).exp() / sum;
            }
        }
        for j in 0..t {
            let mean = (0..steps).map(|k| w[k * t + j]).sum::<f32>() / steps as f32;
            let var = (0..steps).map(|k| (w[k * t + j] - mean).powi(2)).sum::<f32>() / steps as f32;
            let std = var.sqrt();
            for k in 0..steps {
                w[k * t + j] = (w[k * t + j] - mean) / std;
            }
        }
        for (r, k) in keep.clone().enumerate() {
            let filtered = median_filter(&w[k * t..(k + 1) * t], MEDIAN_FILTER_WIDTH);
            for (m, f) in matrix[r * t..(r + 1) * t].iter_mut().zip(filtered) {
                *m += f / heads as f32;
            }
        }
    }
    matrix
}

/// The running median of `x` over `width` (at most 15) values, the edges padded by
/// reflection (without repeating the edge value), as `torch.nn.functional.pad(mode="reflect")`
/// pads; `x` as it is when it is too short to reflect.
fn median_filter(x: &[f32], width: usize) -> Vec<f32> {
    let pad = width / 2;
    if x.len() <= pad {
        return x.to_vec();
    }
    let n = x.len() as isize;
    let at = |i: isize| {
        x[(if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        }) as usize]
    };
    let mut win = [0f32; 15];
    (0..n)
        .map(|i| {
            let w = &mut win[..width];
            for (slot, j) in w.iter_mut().zip(i - pad as isize..) {
                *slot = at(j);
            }
            w.sort_by(f32::total_cmp);
            w[pad]
        })
        .collect()
}

/// Dynamic time warping on `-matrix` (`[n, t]`): the monotonic path from `(0, 0)` to
/// `(n-1, t-1)` of greatest total, ties broken as openai-whisper's `dtw_cpu` breaks them.
/// Returns the path's token and frame indices.
fn dtw(matrix: &[f32], n: usize, t: usize) -> (Vec<usize>, Vec<usize>) {
    let (rows, cols) = (n + 1, t + 1);
    let mut cost = vec![f32::INFINITY; rows * cols];
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
            cost[i * cols + j] = -matrix[(i - 1) * t + j - 1] + c;
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
    // With a finite matrix the path never reaches column 0 before row 0 (its cost there is
    // infinite); the saturating steps only keep a degenerate input from wrapping.
    while i > 0 || j > 0 {
        path.push((i.saturating_sub(1), j.saturating_sub(1)));
        match trace[i * cols + j] {
            0 => {
                i = i.saturating_sub(1);
                j = j.saturating_sub(1);
            }
            1 => i = i.saturating_sub(1),
            _ => j = j.saturating_sub(1),
        }
    }
    path.reverse();
    path.into_iter().unzip()
}

/// Splits text tokens into words, as openai-whisper's `split_to_word_tokens`: at tokens that
/// complete a character, then (except for languages written without spaces) joined into
/// words at a leading space or punctuation. The end-of-text token closes the list as a word
/// of its own, which is dropped here.
fn split_to_word_tokens(
    tokenizer: &WhisperTokenizer,
    tokens: &[u32],
    eot: u32,
    spaces: bool,
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
    if !spaces {
        return Ok(subwords.into_iter().unzip());
    }
    let mut words: Vec<String> = Vec::new();
    let mut word_tokens: Vec<Vec<u32>> = Vec::new();
    for (sub, toks) in subwords {
        // Python's `subword.strip() in string.punctuation`: a substring test (true for "").
        let punctuation = r##"!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"##.contains(sub.trim());
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

/// The median duration of an alignment's words that have one, at most 0.7 s, and twice it:
/// the limits openai-whisper's `add_word_timestamps` holds long words to. `(0, 0)` when no
/// word has a duration.
pub fn duration_limits(words: &[Word]) -> (f64, f64) {
    let mut d: Vec<f64> = words.iter().map(|w| w.end - w.start).filter(|&d| d != 0.0).collect();
    if d.is_empty() {
        return (0.0, 0.0);
    }
    d.sort_by(f64::total_cmp);
    let n = d.len();
    let median = if n % 2 == 1 { d[n / 2] } else { (d[n / 2 - 1] + d[n / 2]) / 2.0 };
    let median = median.min(0.7);
    (median, 2.0 * median)
}

/// Marks that end a sentence (openai-whisper's list).
const SENTENCE_END_MARKS: &str = ".。!！?？";

/// openai-whisper's fix for DTW stretching a word over the pause at a sentence boundary
/// (before punctuation is merged): a sentence-ending mark longer than `max` is cut to `max`
/// from its start, and a word after one is cut to `max` before its end. The first word is
/// left alone. Substring tests, as Python's `in` on strings.
pub fn clip_at_sentence_ends(words: &mut [Word], max: f64) {
    for i in 1..words.len() {
        if words[i].end - words[i].start > max {
            if SENTENCE_END_MARKS.contains(words[i].word.as_str()) {
                words[i].end = words[i].start + max;
            } else if SENTENCE_END_MARKS.contains(words[i - 1].word.as_str()) {
                words[i].start = words[i].end - max;
            }
        }
    }
}

/// Times `words` (one segment's, punctuation merged, in the window's time) as `offset` +
/// their time, to the hundredth of a second, and reconciles them with their segment's times
/// `start..end`, as openai-whisper's `add_word_timestamps` does (faster-whisper's is the
/// same):
/// - after a pause (the first word ends more than 4 median durations after the last speech),
///   a first word (or first two) stretched over the pause is cut to `max`;
/// - a segment start more than 0.5 s after the first word's start wins over it (the word
///   starts there, or `median` before its end); otherwise the segment starts with the word;
/// - the same at the end, mirrored.
///
/// Returns the segment's end, the last speech for the next segment; with no words,
/// `last_speech` unchanged.
pub fn reconcile(
    words: &mut [Word],
    (start, end): (&mut f64, &mut f64),
    offset: f64,
    last_speech: f64,
    (median, max): (f64, f64),
) -> f64 {
    let round = |x: f64| (x * 100.0).round() / 100.0;
    for w in words.iter_mut() {
        w.start = round(offset + w.start);
        w.end = round(offset + w.end);
    }
    let Some(last) = words.len().checked_sub(1) else { return last_speech };
    let (first_long, second_long) =
        (words[0].end - words[0].start > max, last >= 1 && words[1].end - words[0].start > max * 2.0);
    if words[0].end - last_speech > median * 4.0 && (first_long || second_long) {
        if last >= 1 && words[1].end - words[1].start > max {
            let boundary = (words[1].end / 2.0).max(words[1].end - max);
            words[0].end = boundary;
            words[1].start = boundary;
        }
        words[0].start = (words[0].end - max).max(0.0);
    }
    if *start < words[0].end && *start - 0.5 > words[0].start {
        words[0].start = (words[0].end - median).min(*start).max(0.0);
    } else {
        *start = words[0].start;
    }
    if *end > words[last].start && *end + 0.5 < words[last].end {
        words[last].end = (words[last].start + median).max(*end);
    } else {
        *end = words[last].end;
    }
    *end
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

    fn w(word: &str, start: f64, end: f64) -> Word {
        Word { word: word.into(), tokens: vec![1], start, end, probability: 1.0 }
    }

    #[test]
    fn duration_limits_take_the_median_of_words_with_a_duration() {
        let words = [w(" a", 0.0, 0.2), w(" b", 0.2, 0.2), w(" c", 0.2, 0.6), w(" d", 0.6, 1.2)];
        let (median, max) = duration_limits(&words);
        assert!((median - 0.4).abs() < 1e-12 && (max - 0.8).abs() < 1e-12);
        // An even count averages the middle two; the median is capped at 0.7 s.
        let (median, _) = duration_limits(&words[..3]);
        assert!((median - 0.3).abs() < 1e-12);
        assert_eq!(duration_limits(&[w(" a", 0.0, 1.0), w(" b", 1.0, 3.0)]), (0.7, 1.4));
        assert_eq!(duration_limits(&[w(" a", 1.0, 1.0)]), (0.0, 0.0));
    }

    #[test]
    fn a_sentence_end_and_the_word_after_it_are_clipped() {
        let mut words = vec![w(" Hello", 0.0, 0.2), w(".", 0.2, 2.0), w(" Then", 2.0, 3.5), w(" on", 3.5, 3.6)];
        clip_at_sentence_ends(&mut words, 0.4);
        let times: Vec<(f64, f64)> = words.iter().map(|w| (w.start, w.end)).collect();
        let want = [(0.0, 0.2), (0.2, 0.6000000000000001), (3.1, 3.5), (3.5, 3.6)];
        assert_eq!(times, want);
    }

    #[test]
    fn a_first_word_stretched_over_a_pause_is_cut_and_the_segment_follows_its_words() {
        // After a pause (ends 7 s after the last speech, over 4 medians), the 2 s first word
        // is cut to `max` before its end, and the segment starts with it.
        let mut words = vec![w(" A", 5.0, 7.0), w(" B", 7.0, 7.2)];
        let (mut start, mut end) = (4.0, 7.3);
        let last = reconcile(&mut words, (&mut start, &mut end), 0.0, 0.0, (0.3, 0.6));
        assert_eq!((words[0].start, words[0].end), (6.4, 7.0));
        assert_eq!((start, end, last), (6.4, 7.2, 7.2));
        // No pause: a segment start 0.5 s past a long first word's start wins over it, and
        // a segment end 0.5 s before a long last word's end wins too.
        let mut words = vec![w(" A", 1.0, 3.0), w(" B", 3.0, 6.0)];
        let (mut start, mut end) = (2.0, 4.5);
        let last = reconcile(&mut words, (&mut start, &mut end), 0.0, 2.9, (0.3, 0.6));
        assert_eq!((words[0].start, words[1].end), (2.0, 4.5));
        assert_eq!((start, end, last), (2.0, 4.5, 4.5));
        // Times are the window's offset plus the word's, kept to the hundredth of a second.
        let mut words = vec![w(" A", 0.004, 0.496)];
        let (mut start, mut end) = (1.0, 1.5);
        reconcile(&mut words, (&mut start, &mut end), 1.0, 1.0, (0.3, 0.6));
        assert_eq!((words[0].start, words[0].end, start, end), (1.0, 1.5, 1.0, 1.5));
    }

    #[test]
    fn median_filter_reflects_at_the_edges() {
        // torch: pad [1, 5, 2, 8, 3] by 3 with reflect -> [8, 2, 5, 1, 5, 2, 8, 3, 8, 2, 5];
        // the medians of its seven-wide windows, worked by hand.
        let got = median_filter(&[1.0f32, 5.0, 2.0, 8.0, 3.0], 7);
        assert_eq!(got, vec![5.0, 3.0, 5.0, 3.0, 5.0]);
        assert_eq!(median_filter(&[4.0, 1.0, 2.0], 7), vec![4.0, 1.0, 2.0]);
    }

    #[test]
    fn dtw_follows_the_greatest_total() {
        // Token 0 lies on frames 0-1, token 1 on frames 2-3. openai's dtw_cpu, worked by hand:
        // at (2, 3) the three costs tie and the tie goes left, so the path reaches token 1 at
        // frame 1 and stays there.
        let m = [1.0f32, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let (i, j) = dtw(&m, 2, 4);
        assert_eq!(i, vec![0, 0, 1, 1, 1]);
        assert_eq!(j, vec![0, 1, 1, 2, 3]);
    }
}
