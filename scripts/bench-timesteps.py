#!/usr/bin/env python3
"""Word error rate and encoder time of `wcc transcribe` at --timesteps 3000 versus auto, over a
manifest of clips (default: ../shared/data/audio/en). A benchmark, not a test: it reports.

  scripts/bench-timesteps.py [--model tiny.en] [--manifest DIR/manifest.tsv] [--threads 2]
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wer import edit_distance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def normalize(text):
    # Lower case, apostrophes dropped, other punctuation to spaces (a basic English normalizer).
    text = text.lower().replace("'", "")
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--manifest", default=str(ROOT / "../shared/data/audio/en/manifest.tsv"))
    ap.add_argument("--threads", default="2")
    a = ap.parse_args()
    wcc = ROOT / "target/release/wcc"
    manifest = Path(a.manifest)
    rows = [l.split("\t") for l in manifest.read_text().splitlines()[1:] if l.strip()]
    for timesteps in ("3000", "auto"):
        errors = words = 0
        enc = 0.0
        for row in rows:
            clip = manifest.parent / row[0]
            out = subprocess.run(
                [wcc, "transcribe", "--model", a.model, "--timesteps", timesteps, "--threads", a.threads, "--json", clip],
                capture_output=True, text=True,
            )
            if out.returncode != 0:
                sys.exit(f"{clip}: {out.stderr}")
            d = json.loads(out.stdout)
            ref, hyp = normalize(row[3]), normalize(d["text"])
            errors += edit_distance(ref, hyp)
            words += len(ref)
            enc += d["timings"]["encode_s"]
        print(f"{a.model} --timesteps {timesteps:>4}: WER {100 * errors / words:.2f}% ({errors}/{words} words), "
              f"encoder {enc:.2f} s over {len(rows)} clips ({1000 * enc / len(rows):.0f} ms/clip)", flush=True)


if __name__ == "__main__":
    main()
