#!/usr/bin/env python3
"""Word error rate, speed and size of wcc's int8 builds next to the f32 build of the same model,
and CTranslate2 int8's encoder on the same features, all in one run. A benchmark, not a test: it
reports.

  scripts/bench-int8.py [--model tiny.en] [--build NAME=FLAGS ...] [--threads 2]

Builds (compiled once into target/bench/): `f32` (no flags), `int8` (`--int8`), and any
`--build NAME="--int8 --keep-float logits"` given. For each build: WER on the dev set
(../shared/data/audio/en, after Whisper's English normalizer), the longest repeated phrase on
the long-form clip (a runaway check), the mean encoder time per 30 s window and decoder time
per token, and the .wbin size. Then CTranslate2's encoder (compute_type int8 and float32, the
reference venv's faster-whisper model) timed on the same log-mel.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wer import edit_distance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "../shared/data/audio"


def normalizer():
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        sys.exit("whisper-normalizer is missing: run with the reference venv (scripts/setup-reference)")
    return EnglishTextNormalizer()


def longest_repeat(words):
    """Length of the longest phrase said twice in a row (a decoder runaway shows as a long one)."""
    best = 0
    for n in range(1, len(words) // 2 + 1):
        for i in range(len(words) - 2 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                best = n
                break
    return best


def wcc(*args):
    out = subprocess.run([ROOT / "target/release/wcc", *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"wcc {' '.join(map(str, args))}: {out.stderr}")
    return out.stdout


def rows(manifest):
    return [l.split("\t") for l in manifest.read_text().splitlines()[1:] if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--build", action="append", default=[], help="NAME=FLAGS, e.g. int8-lf='--int8 --keep-float logits'")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--skip-ct2", action="store_true")
    ap.add_argument("--only", help="comma-separated build names to run (default: all)")
    a = ap.parse_args()
    norm = normalizer()
    builds = {"f32": [], "int8": ["--int8"]}
    for b in a.build:
        name, _, flags = b.partition("=")
        builds[name] = flags.split()
    if a.only:
        builds = {k: v for k, v in builds.items() if k in a.only.split(",")}
    out_dir = ROOT / "target/bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = DATA / "en/manifest.tsv"
    long_rows = rows(DATA / "longform/manifest.tsv")
    report = {}
    for name, flags in builds.items():
        wbin = out_dir / f"{a.model}-{name}.wbin"
        wcc("compile", "--model", a.model, *flags, "-o", wbin, "--force")
        errors = words = 0
        enc = steps = dec = 0.0
        windows = 0
        for row in rows(dev):
            d = json.loads(wcc("run", wbin, dev.parent / row[0], "--threads", a.threads, "--json"))
            ref, hyp = norm(row[3]).split(), norm(d["text"]).split()
            errors += edit_distance(ref, hyp)
            words += len(ref)
            t = d["timings"]
            enc += t["encode_s"]
            windows += len(d["segments"])
            steps += t["decoder_steps"]
            dec += t["decoder_s"]
        lf = json.loads(wcc("run", wbin, DATA / "longform" / long_rows[0][0], "--threads", a.threads, "--json"))
        lf_words = norm(lf["text"]).split()
        lf_wer = edit_distance(norm(long_rows[0][3]).split(), lf_words) / max(1, len(norm(long_rows[0][3]).split()))
        report[name] = dict(
            wer=100 * errors / words,
            errors=errors,
            words=words,
            encoder_ms=1000 * enc / windows,
            ms_per_token=1000 * dec / steps,
            mb=wbin.stat().st_size / 1e6,
            longform_wer=100 * lf_wer,
            longform_repeat=longest_repeat(lf_words),
        )
        r = report[name]
        print(f"{a.model} {name:>10}: WER {r['wer']:.2f}% ({errors}/{words}), long-form WER {r['longform_wer']:.2f}% "
              f"(longest repeat {r['longform_repeat']} words), encoder {r['encoder_ms']:.0f} ms/window, "
              f"decoder {r['ms_per_token']:.2f} ms/token, {r['mb']:.1f} MB", flush=True)
    interleaved_encoder(a.model, list(report), a.threads, report)
    f32 = report.get("f32")
    for name, r in report.items():
        if f32 and name != "f32":
            print(f"{a.model} {name} vs f32: WER {r['wer'] - f32['wer']:+.2f} abs, encoder {f32['encoder_ms'] / r['encoder_ms']:.2f}x "
                  f"faster over the dev set, {f32['encoder_interleaved_ms'] / r['encoder_interleaved_ms']:.2f}x interleaved, "
                  f"decoder {r['ms_per_token'] / f32['ms_per_token']:.2f}x the time per token, "
                  f"size {r['mb'] / f32['mb']:.2f}x")
    if not a.skip_ct2 and f32 and "int8" in report:
        ct2_encoder(a.model, int(a.threads), report)
    print(json.dumps(report))


def interleaved_encoder(model, names, threads, report, rounds=5):
    """Each build's encoder on jfk.wav (one window), the builds taking turns for `rounds` rounds:
    the median per build. The dev-set means above are taken build after build, minutes apart,
    and this shared machine's load changes over minutes; turns within seconds see the same load."""
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            d = json.loads(wcc("run", ROOT / f"target/bench/{model}-{n}.wbin", DATA / "en/jfk.wav", "--threads", threads, "--json"))
            times[n].append(1000 * d["timings"]["encode_s"])
    for n in names:
        report[n]["encoder_interleaved_ms"] = sorted(times[n])[rounds // 2]
    print(f"{model} encoder on jfk.wav, builds in turns, median of {rounds}: "
          + ", ".join(f"{n} {report[n]['encoder_interleaved_ms']:.0f} ms" for n in names), flush=True)


def ct2_encoder(model, threads, report):
    """CTranslate2's encoder on wcc's own features of jfk.wav, interleaved with wcc's int8 build."""
    import numpy as np
    import ctranslate2

    mel_path = ROOT / "target/bench/jfk_mel.npy"
    wcc("features", DATA / "en/jfk.wav", "-o", mel_path)
    mel = np.load(mel_path)[None].astype(np.float32)
    path = Path.home() / ".cache/wcc/models" / model
    times = {}
    for ct in ("int8", "float32"):
        m = ctranslate2.models.Whisper(str(path), device="cpu", compute_type=ct, intra_threads=threads)
        features = ctranslate2.StorageView.from_array(mel)
        m.encode(features)  # warm-up
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            m.encode(features)
            best.append(time.perf_counter() - t0)
        times[ct] = 1000 * sorted(best)[1]
    for name in ("f32", "int8"):
        d = json.loads(wcc("run", ROOT / f"target/bench/{model}-{name}.wbin", DATA / "en/jfk.wav", "--threads", str(threads), "--json"))
        times[f"wcc-{name}"] = 1000 * d["timings"]["encode_s"]
    print(f"{model} encoder on jfk.wav (one 30 s window, {threads} threads): "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in times.items())
          + f"; wcc int8 / CTranslate2 int8 = {times['wcc-int8'] / times['int8']:.2f}x the time")
    report["ct2_encoder_ms"] = times


if __name__ == "__main__":
    main()
