#!/usr/bin/env python3
"""Word error rate of wcc's decoding modes, side by side: greedy and beam search, with and
without timestamps, on the English dev set and the long-form clip. A benchmark, not a test: it
reports.

  scripts/bench-decoding.py [--model tiny.en] [--threads 2] [--mode NAME=FLAGS ...]

Compiles the model once (a default build: beam sizes 1 and 5) into target/bench/, then runs
every mode over all the clips in one `wcc run` each (one model load). WER after Whisper's
English normalizer (the reference venv's `whisper-normalizer`), pooled over the dev clips; the
long-form clip's WER and its longest phrase said twice in a row (a runaway shows as a long one);
and the decoding time (transcription without load, all clips).
"""
import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wer import edit_distance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "../shared/data/audio"

MODES = [
    ("defaults (beam 5)", ""),
    ("greedy", "--beam-size 1"),
    ("no conditioning", "--condition-on-previous-text false"),
    ("no timestamps, greedy", "--without-timestamps --beam-size 1"),
    ("no timestamps, beam 5", "--without-timestamps --beam-size 5"),
]


def rows(manifest):
    return [l.split("\t") for l in manifest.read_text().splitlines()[1:] if l.strip()]


def longest_repeat(words):
    best = 0
    for n in range(1, len(words) // 2 + 1):
        for i in range(len(words) - 2 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                best = n
                break
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--mode", action="append", default=[], help='NAME=FLAGS, e.g. "patience 2=--patience 2"')
    a = ap.parse_args()
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        sys.exit("whisper-normalizer is missing: run with the reference venv (scripts/setup-reference)")
    norm = EnglishTextNormalizer()
    modes = [tuple(m.split("=", 1)) for m in a.mode] or MODES
    wcc = ROOT / "target/release/wcc"
    out_dir = ROOT / "target/bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    wbin = out_dir / f"{a.model}.decoding.wbin"
    subprocess.run([wcc, "compile", "--model", a.model, "-o", wbin, "--force"], check=True, capture_output=True)
    dev = [(DATA / "en" / r[0], r[3]) for r in rows(DATA / "en/manifest.tsv")]
    longform = [(DATA / "longform" / r[0], r[3]) for r in rows(DATA / "longform/manifest.tsv")]
    clips = dev + longform
    print(f"{a.model}, {len(dev)} dev clips + {len(longform)} long-form, {a.threads} threads")
    print(f"{'mode':<24} {'dev WER':>14} {'long-form WER':>15} {'repeat':>7} {'time':>8}")
    for name, flags in modes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [wcc, "run", wbin, *[c for c, _ in clips], "--threads", a.threads, "--output-dir", tmp,
                   "--output-format", "json", *shlex.split(flags)]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            took = time.time() - t0
            if r.returncode != 0:
                sys.exit(f"{name}: {r.stderr}")
            texts = [json.loads((Path(tmp) / (c.stem + ".json")).read_text())["text"] for c, _ in clips]
        errs = words = 0
        for (c, ref), hyp in zip(dev, texts):
            rw, hw = norm(ref).split(), norm(hyp).split()
            errs += edit_distance(rw, hw)
            words += len(rw)
        lf_ref, lf_hyp = norm(longform[0][1]).split(), norm(texts[len(dev)]).split()
        lf = edit_distance(lf_ref, lf_hyp)
        print(f"{name:<24} {100 * errs / words:6.2f}% ({errs:>3}/{words}) {100 * lf / len(lf_ref):6.2f}% ({lf:>2}/{len(lf_ref)}) "
              f"{longest_repeat(lf_hyp):>7} {took:7.1f}s")


if __name__ == "__main__":
    main()
