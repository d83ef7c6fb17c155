//! `wcc bench` on a small model: every figure is printed (timings are not asserted).

mod common;
use common::*;

#[test]
fn bench_prints_every_figure() {
    let tmp = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(tmp.path());
    let out = wcc_ok(&["bench", p(&wbin), p(&jfk()), "--runs", "1", "--threads", "2"]);
    for row in ["load", "log-mel", "encoder", "decoder step", "end to end", "peak", "int8 products", "% peak"] {
        assert!(out.contains(row), "no `{row}` in:\n{out}");
    }
    // The JSON form carries the same figures, each a positive time.
    let json: serde_json::Value =
        serde_json::from_str(&wcc_ok(&["bench", p(&wbin), p(&jfk()), "--runs", "1", "--json"])).unwrap();
    for key in ["load", "log_mel", "encoder", "decoder_step", "end_to_end"] {
        let s = &json[key];
        let (lo, med, hi) = (s["min"].as_f64().unwrap(), s["median"].as_f64().unwrap(), s["max"].as_f64().unwrap());
        assert!(0.0 < lo && lo <= med && med <= hi, "{key}: {s}");
    }
    assert!(json["peaks"]["fma_f32_per_thread"].as_f64().unwrap() > 0.0);
    assert!(json["classes"].as_array().unwrap().iter().any(|c| c["class"] == "int8 products"));
    // Bad input: a clear error, no panic.
    let bad = wcc(&["bench", p(&wbin), p(&jfk()), "--runs", "0"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--runs must be at least 1"));
}
