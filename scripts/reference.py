#!/usr/bin/env python3
"""Independent references for wcc's tests, run from the venv that scripts/setup-reference makes.

  mel AUDIO.wav --n-mels N -o OUT.npy      faster-whisper's FeatureExtractor, openai-whisper's padding
                                            (30 s of zero audio before the STFT), first 3000 frames
  encode MODEL_DIR MEL.npy -o OUT.npy      CTranslate2 float32 encoder output [frames/2, d]
  greedy MODEL_DIR MEL.npy... --prompt IDS...
                                            CTranslate2 float32 greedy ids (JSON list, no prompt, no EOT;
                                            a list of lists for several files)
  transcribe MODEL_DIR AUDIO.wav FEATURES.npy [options]
                                            faster-whisper's WhisperModel.transcribe fed the given
                                            features (the whole file's log-mel and 30 s of silence
                                            after it): segments as JSON
  hf-encode HF_DIR MEL.npy -o OUT.npy      a plain numpy Whisper encoder over a Hugging Face safetensors
                                            checkpoint (checks wcc's converter independently of wcc)
"""
import argparse
import json
import os
import sys
import wave

import numpy as np

N_SAMPLES = 480000


def read_wav(path):
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            sys.exit("reference.py reads 16-bit WAV only")
        if w.getframerate() != 16000:
            sys.exit("reference.py reads 16 kHz WAV only")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        ch = w.getnchannels()
        return x.reshape(-1, ch).mean(axis=1) if ch > 1 else x


def cmd_mel(a):
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = read_wav(a.audio)
    fe = FeatureExtractor(feature_size=a.n_mels)
    # padding=N_SAMPLES appends 30 s of zeros before the STFT: openai-whisper's convention.
    mel = fe(audio, padding=N_SAMPLES)[:, :3000]
    np.save(a.output, np.ascontiguousarray(mel, dtype=np.float32))


def whisper(model_dir):
    import ctranslate2

    return ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=2)


def features(path):
    import ctranslate2

    mel = np.load(path).astype(np.float32)
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None]))


def cmd_encode(a):
    out = whisper(a.model).encode(features(a.mel), to_cpu=True)
    np.save(a.output, np.asarray(out)[0].astype(np.float32))


def cmd_greedy(a):
    # One model load for any number of (features, prompt) pairs: --mel and --prompt repeat.
    if len(a.mel) != len(a.prompt):
        sys.exit("give one --prompt per features file")
    model = whisper(a.model)
    out = []
    for mel, prompt in zip(a.mel, a.prompt):
        ids = [int(t) for t in prompt.split(",")]
        r = model.generate(
            features(mel), [ids], beam_size=1, max_length=a.max_length, suppress_blank=True, suppress_tokens=[-1]
        )[0]
        out.append(r.sequences_ids[0])
    print(json.dumps(out[0] if a.single else out))


def cmd_beam(a):
    # CTranslate2's beam search as faster-whisper calls it at temperature 0: one model load
    # for any number of (features, prompt) pairs; prints [[ids, score], ...].
    if len(a.mel) != len(a.prompt):
        sys.exit("give one --prompt per features file")
    model = whisper(a.model)
    out = []
    for mel, prompt in zip(a.mel, a.prompt):
        ids = [int(t) for t in prompt.split(",")]
        r = model.generate(
            features(mel),
            [ids],
            beam_size=a.beam_size,
            patience=a.patience,
            length_penalty=a.length_penalty,
            max_length=448,
            return_scores=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )[0]
        out.append([r.sequences_ids[0], r.scores[0]])
    print(json.dumps(out))


def cmd_words(a):
    # faster-whisper's own word alignment (WhisperModel.find_alignment on CTranslate2's
    # `align`, then its merge_punctuations), from the given features and text tokens.
    import types

    import tokenizers
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import WhisperModel, merge_punctuations

    model = whisper(a.model)
    hf = tokenizers.Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tok = Tokenizer(hf, model.is_multilingual, task="transcribe", language="en" if model.is_multilingual else None)
    text = [int(t) for t in a.tokens.split(",")]
    fake = types.SimpleNamespace(model=model, tokens_per_second=50)
    words = WhisperModel.find_alignment(fake, tok, [text], features(a.mel), a.num_frames)[0]
    merge_punctuations(words, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    out = [dict(word=w["word"], start=float(w["start"]), end=float(w["end"]), probability=float(w["probability"])) for w in words if w["word"]]
    print(json.dumps(out))


def cmd_transcribe(a):
    # faster-whisper's whole long-form loop (seeking, timestamp rules, conditioning, fallback,
    # word alignment), its own code, with one change: the features are the given ones.
    # faster-whisper pads a window that runs past the audio with zeros in the normalised
    # domain; Whisper's log-mel of the file with 30 s of silence after it (openai-whisper's
    # padding before the STFT) is what wcc feeds, so each window here is cut from that.
    import faster_whisper.transcribe as fwt
    from faster_whisper import WhisperModel

    full = np.ascontiguousarray(np.load(a.features).astype(np.float32))
    content = len(read_wav(a.audio)) // 160
    if full.shape[1] < content + 3000:
        sys.exit("the features must cover the audio and 3000 frames after it")
    model = WhisperModel(a.model, device="cpu", compute_type="float32", cpu_threads=2)
    fe = model.feature_extractor

    class GivenFeatures(type(fe)):
        def __call__(self, waveform, padding=160, chunk_length=None):
            # faster-whisper's content is one frame shorter than what it returns.
            return full[:, : content + 1]

    fe.__class__ = GivenFeatures
    plain_pad = fwt.pad_or_trim

    def pad_from_file(segment, length=3000, axis=-1):
        # `segment` is a view of `full` (features[:, seek:seek + size]): its first column's
        # offset is `seek`, and the window is the file's own frames from there.
        if segment.shape[-1] < length and np.shares_memory(segment, full):
            seek = (segment.ctypes.data - full.ctypes.data) // full.itemsize
            return full[:, seek : seek + length]
        return plain_pad(segment, length, axis=axis)

    fwt.pad_or_trim = pad_from_file
    segments, _ = model.transcribe(
        read_wav(a.audio),
        language="en",
        beam_size=a.beam_size,
        best_of=a.best_of,
        temperature=[float(t) for t in a.temperatures.split(",")],
        condition_on_previous_text=a.condition_on_previous_text == "true",
        without_timestamps=a.without_timestamps,
        word_timestamps=a.word_timestamps,
        initial_prompt=a.initial_prompt,
    )
    out = []
    for s in segments:
        d = dict(
            start=s.start,
            end=s.end,
            text=s.text,
            tokens=list(s.tokens),
            avg_logprob=s.avg_logprob,
            no_speech_prob=s.no_speech_prob,
            compression_ratio=s.compression_ratio,
            temperature=s.temperature,
        )
        if s.words is not None:
            d["words"] = [dict(word=w.word, start=w.start, end=w.end, probability=w.probability) for w in s.words]
        out.append(d)
    print(json.dumps(out))


def erf(x):
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: ample for a 1e-3 comparison.
    s = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-x * x)
    return s * y


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def layer_norm(x, w, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def conv1d(x, w, b, stride):
    # x [Cin, T], w [Cout, Cin, K], padding 1
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (1, 1)))
    t_out = (xp.shape[1] - k) // stride + 1
    cols = np.stack([xp[:, i : i + (t_out - 1) * stride + 1 : stride] for i in range(k)], axis=1)
    return np.einsum("oik,ikt->ot", w, cols) + b[:, None]


def cmd_hf_encode(a):
    from safetensors.numpy import load_file

    cfg = json.load(open(f"{a.model}/config.json"))
    t = {k.removeprefix("model."): v.astype(np.float64) for k, v in load_file(f"{a.model}/model.safetensors").items()}
    heads = cfg["encoder_attention_heads"]
    x = np.load(a.mel).astype(np.float64)
    x = gelu(conv1d(x, t["encoder.conv1.weight"], t["encoder.conv1.bias"], 1))
    x = gelu(conv1d(x, t["encoder.conv2.weight"], t["encoder.conv2.bias"], 2)).T
    x = x + t["encoder.embed_positions.weight"][: x.shape[0]]
    n, d = x.shape
    dh = d // heads
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}."
        h = layer_norm(x, t[p + "self_attn_layer_norm.weight"], t[p + "self_attn_layer_norm.bias"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T + t[p + "self_attn.q_proj.bias"]) * dh**-0.5
        k = h @ t[p + "self_attn.k_proj.weight"].T
        v = h @ t[p + "self_attn.v_proj.weight"].T + t[p + "self_attn.v_proj.bias"]
        q, k, v = (z.reshape(n, heads, dh).transpose(1, 0, 2) for z in (q, k, v))
        s = q @ k.transpose(0, 2, 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(n, d)
        x = x + o @ t[p + "self_attn.out_proj.weight"].T + t[p + "self_attn.out_proj.bias"]
        h = layer_norm(x, t[p + "final_layer_norm.weight"], t[p + "final_layer_norm.bias"])
        h = gelu(h @ t[p + "fc1.weight"].T + t[p + "fc1.bias"])
        x = x + h @ t[p + "fc2.weight"].T + t[p + "fc2.bias"]
    x = layer_norm(x, t["encoder.layer_norm.weight"], t["encoder.layer_norm.bias"])
    np.save(a.output, x.astype(np.float32))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("mel")
    p.add_argument("audio")
    p.add_argument("--n-mels", type=int, default=80)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(f=cmd_mel)
    for name, f in (("encode", cmd_encode), ("hf-encode", cmd_hf_encode)):
        p = sub.add_parser(name)
        p.add_argument("model")
        p.add_argument("mel")
        p.add_argument("-o", "--output", required=True)
        p.set_defaults(f=f)
    p = sub.add_parser("greedy")
    p.add_argument("model")
    p.add_argument("mel", nargs="+")
    p.add_argument("--prompt", required=True, action="append", help="comma-separated token ids, one per features file")
    p.add_argument("--max-length", type=int, default=224)
    p.set_defaults(f=cmd_greedy)
    p = sub.add_parser("beam")
    p.add_argument("model")
    p.add_argument("mel", nargs="+")
    p.add_argument("--prompt", required=True, action="append", help="comma-separated token ids, one per features file")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--patience", type=float, default=1.0)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.set_defaults(f=cmd_beam)
    p = sub.add_parser("words")
    p.add_argument("model")
    p.add_argument("mel")
    p.add_argument("--tokens", required=True, help="comma-separated text token ids")
    p.add_argument("--num-frames", type=int, required=True, help="mel frames of the window's audio")
    p.set_defaults(f=cmd_words)
    p = sub.add_parser("transcribe")
    p.add_argument("model")
    p.add_argument("audio")
    p.add_argument("features")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--best-of", type=int, default=5)
    p.add_argument("--temperatures", default="0,0.2,0.4,0.6,0.8,1")
    p.add_argument("--condition-on-previous-text", choices=["true", "false"], default="true")
    p.add_argument("--without-timestamps", action="store_true")
    p.add_argument("--word-timestamps", action="store_true")
    p.add_argument("--initial-prompt")
    p.set_defaults(f=cmd_transcribe)
    a = ap.parse_args()
    if a.cmd == "greedy":
        a.single = len(a.mel) == 1
    a.f(a)


if __name__ == "__main__":
    main()
