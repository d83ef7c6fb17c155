//! Log-mel features against faster-whisper's FeatureExtractor (numpy), fed the same audio
//! with openai-whisper's padding.

mod common;
use common::*;

#[test]
fn jfk_log_mel_matches_faster_whisper_feature_extractor() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("wcc.npy"), dir.path().join("ref.npy"));
    wcc_ok(&["features", p(&jfk()), "--n-mels", "80", "-o", p(&ours)]);
    reference(&["mel", p(&jfk()), "--n-mels", "80", "-o", p(&theirs)]);
    let (sa, a) = read_npy(&ours);
    let (sb, b) = read_npy(&theirs);
    assert_eq!(sa, vec![80, 3000]);
    assert_eq!(sa, sb);
    // jfk.wav is 11 s = 1100 frames of speech; the rest is the log-mel of silence.
    let speech = 1100;
    let mut max_speech = 0f32;
    let mut max_all = 0f32;
    for m in 0..80 {
        for t in 0..3000 {
            let d = (a[m * 3000 + t] - b[m * 3000 + t]).abs();
            max_all = max_all.max(d);
            if t < speech {
                max_speech = max_speech.max(d);
            }
        }
    }
    eprintln!("log-mel max |diff|: speech frames {max_speech:e}, all frames {max_all:e}");
    assert!(max_speech < 1e-4, "speech frames differ by {max_speech}");
    assert!(max_all < 1e-4, "padding frames differ by {max_all}");
}

#[test]
fn base_model_with_128_bins_shape_is_supported_by_features() {
    // large-v3 uses 128 mel bins: the filter bank is computed for any count.
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("wcc.npy"), dir.path().join("ref.npy"));
    wcc_ok(&["features", p(&jfk()), "--n-mels", "128", "-o", p(&ours)]);
    reference(&["mel", p(&jfk()), "--n-mels", "128", "-o", p(&theirs)]);
    let (_, a) = read_npy(&ours);
    let (_, b) = read_npy(&theirs);
    let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max < 1e-4, "128-bin log-mel differs by {max}");
}
