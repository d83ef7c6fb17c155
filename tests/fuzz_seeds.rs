//! The fuzz targets' seed corpora (`fuzz/`, `scripts/fuzz`), built from real inputs and
//! checked to be accepted by the reader each seeds: a seed refused at the door would leave
//! the fuzzer exploring error paths only. With `WCC_FUZZ_SEEDS=DIR` set, each target's seeds
//! are also written to `DIR/<target>/` (this is how `scripts/fuzz` gets them).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::Path;

use wcc_format::{
    Access, BufRef, BufferDesc, GenerationConfig, GraphProgram, Header, IoSlot, KernelEntry, Launch, Sections,
    SpecialTokens, TargetInfo, WbinFile,
};
use wcc_frontend::checkpoint::{Checkpoint, WhisperDims};

/// Collects seeds per target and writes them where `WCC_FUZZ_SEEDS` says.
struct Seeds(BTreeMap<&'static str, Vec<(String, Vec<u8>)>>);

impl Seeds {
    fn add(&mut self, target: &'static str, name: impl Into<String>, bytes: Vec<u8>) {
        self.0.entry(target).or_default().push((name.into(), bytes));
    }

    fn write(&self) {
        let Some(dir) = std::env::var_os("WCC_FUZZ_SEEDS") else { return };
        for (target, seeds) in &self.0 {
            let d = Path::new(&dir).join(target);
            std::fs::create_dir_all(&d).unwrap();
            for (name, bytes) in seeds {
                std::fs::write(d.join(name), bytes).unwrap();
            }
        }
    }
}

/// A miniature `.wbin` that passes every check of the loader: an encoder launch reading the
/// features and a weight, a decoder launch reading the token, position and cache and
/// writing the logits and the next cache.
fn mini_wbin() -> Vec<u8> {
    let buf = |name: &str, elem: &str, len: u64, access: Access| BufferDesc {
        name: name.into(),
        elem: elem.into(),
        len,
        access,
    };
    let slot = |name: &str, offset: u64, dtype: &str, shape: Vec<usize>| IoSlot {
        name: name.into(),
        offset,
        dtype: dtype.into(),
        shape,
    };
    let (n_mels, timesteps) = (2, 4);
    let kernels = vec![
        KernelEntry {
            name: "enc".into(),
            offset: 0,
            len: 16,
            kind: "cpu".into(),
            buffers: vec![
                buf("mel", "f32", 8, Access::Read),
                buf("w", "i8", 4, Access::Read),
                buf("out", "f32", 8, Access::Write),
            ],
            parallel_extent: 2,
            flops: 16,
            gpu: None,
        },
        KernelEntry {
            name: "dec".into(),
            offset: 16,
            len: 16,
            kind: "cpu".into(),
            buffers: vec![
                buf("tokens", "i32", 1, Access::Read),
                buf("position", "i32", 1, Access::Read),
                buf("cache", "f32", 2, Access::Read),
                buf("logits", "f32", 8, Access::Write),
                buf("cache_next", "f32", 2, Access::Write),
            ],
            parallel_extent: 1,
            flops: 8,
            gpu: None,
        },
    ];
    let arena = |offset, len| BufRef::Arena { offset, len };
    let graphs = vec![
        GraphProgram {
            name: "encoder".into(),
            inputs: vec![slot("mel", 0, "f32", vec![n_mels, timesteps])],
            outputs: vec![slot("audio", 64, "f32", vec![8])],
            launches: vec![Launch {
                kernel: 0,
                buffers: vec![arena(0, 32), BufRef::Weight { offset: 0, len: 4 }, arena(64, 32)],
            }],
        },
        GraphProgram {
            name: "decoder_step".into(),
            inputs: vec![
                slot("tokens", 128, "i32", vec![1]),
                slot("position", 192, "i32", vec![1]),
                slot("self_k", 256, "f32", vec![2]),
            ],
            outputs: vec![slot("logits", 320, "f32", vec![8]), slot("self_k.next", 384, "f32", vec![2])],
            launches: vec![Launch {
                kernel: 1,
                buffers: vec![arena(128, 4), arena(192, 4), arena(256, 8), arena(320, 32), arena(384, 8)],
            }],
        },
    ];
    let special = SpecialTokens {
        eot: 0,
        sot: 1,
        transcribe: 2,
        translate: 3,
        no_timestamps: 3,
        timestamp_begin: 4,
        no_speech: None,
        sot_prev: None,
    };
    let header = Header {
        wcc_version: "seed".into(),
        model_name: "mini".into(),
        target: TargetInfo { arch: std::env::consts::ARCH.into(), features: vec![] },
        params: BTreeMap::from([("n_mels".to_string(), n_mels as i64)]),
        timesteps,
        n_mels,
        weight_dtype: "i8".into(),
        generation: GenerationConfig {
            special,
            multilingual: false,
            languages: vec![],
            suppress: vec![],
            suppress_begin: vec![],
            max_text_ctx: 4,
        },
        alignment_heads: vec![],
        arena_bytes: 448,
        arena_persistent_bytes: 448,
        arena_unshared_temporaries_bytes: 0,
        weights: vec![],
        kernels,
        graphs,
    };
    let mel_filters = vec![0u8; n_mels * 201 * 8];
    let code = vec![0xc3u8; 32]; // `ret`: never run, only bounds-checked.
    wcc_format::to_bytes(
        &header,
        &Sections { code: &code, weights: &[1, 2, 3, 4], tokenizer: b"{}", mel_filters: &mel_filters },
    )
}

/// The dimensions of a miniature Whisper (every axis 2-16 long).
fn mini_dims() -> WhisperDims {
    WhisperDims {
        n_mels: 4,
        n_audio_ctx: 8,
        n_audio_state: 8,
        n_audio_head: 2,
        n_audio_layer: 1,
        n_audio_ffn: 16,
        n_vocab: 16,
        n_text_ctx: 8,
        n_text_state: 8,
        n_text_head: 2,
        n_text_layer: 1,
        n_text_ffn: 16,
    }
}

/// tiny.en's `model.bin` with every tensor shrunk to the miniature's axes (its names, ranks,
/// dtypes and layout kept, one layer a side): a CTranslate2 file of a few kilobytes.
fn mini_model_bin() -> Vec<u8> {
    let ck = Checkpoint::open(&model_dir("tiny.en")).unwrap();
    let bin = std::fs::read(model_dir("tiny.en").join("model.bin")).unwrap();
    let shrink = |d: usize| match d {
        384 => 8,
        1152 => 24,
        768 => 16,
        1536 => 16,
        51864 | 51865 => 16,
        1500 => 8,
        448 => 8,
        80 => 4,
        other => other,
    };
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u16 + 1).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    let mut out = Vec::new();
    out.extend_from_slice(&6u32.to_le_bytes());
    string(&mut out, "WhisperSpec");
    out.extend_from_slice(&1u32.to_le_bytes());
    // Aliases are written as plain variables (the reader resolves them to the same info).
    // One layer each side: layer 0's tensors.
    let mut names: Vec<&String> = ck
        .tensors
        .keys()
        .filter(|n| {
            n.split('/').all(|p| p.strip_prefix("layer_").is_none_or(|i| i == "0" || i.parse::<u32>().is_err()))
        })
        .collect();
    names.sort();
    out.extend_from_slice(&(names.len() as u32).to_le_bytes());
    for name in names {
        let t = &ck.tensors[name];
        string(&mut out, name);
        out.push(t.shape.len() as u8);
        let shape: Vec<usize> = t.shape.iter().map(|&d| shrink(d)).collect();
        for &d in &shape {
            out.extend_from_slice(&(d as u32).to_le_bytes());
        }
        let id = match t.dtype {
            wcc_ir::DType::F32 => 0u8,
            wcc_ir::DType::I8 => 1,
            wcc_ir::DType::I16 => 2,
            wcc_ir::DType::I32 => 3,
            wcc_ir::DType::F16 => 4,
            wcc_ir::DType::BF16 => 5,
            other => panic!("{name}: {other}"),
        };
        out.push(id);
        let nbytes = shape.iter().product::<usize>() * t.dtype.size_bytes();
        out.extend_from_slice(&(nbytes as u32).to_le_bytes());
        if name.ends_with("num_heads") {
            // Two heads, in the tensor's own integer type.
            let mut v = vec![0u8; nbytes];
            v[0] = 2;
            out.extend_from_slice(&v);
        } else if shape.is_empty() {
            out.extend_from_slice(&bin[t.offset..t.offset + t.nbytes]);
        } else {
            // The leading bytes of the real tensor, repeated: real values, miniature size.
            let src = &bin[t.offset..t.offset + t.nbytes];
            out.extend((0..nbytes).map(|i| src[i % src.len()]));
        }
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// A FLAC file keeping only its STREAMINFO block and the first audio frames, `len` bytes in all.
fn flac_without_metadata(flac: &[u8], len: usize) -> Vec<u8> {
    assert_eq!(&flac[..4], b"fLaC");
    let mut at = 4;
    let mut info = None;
    loop {
        let (head, size) = (flac[at], u32::from_be_bytes([0, flac[at + 1], flac[at + 2], flac[at + 3]]) as usize);
        if head & 0x7f == 0 {
            info = Some(flac[at + 4..at + 4 + size].to_vec());
        }
        at += 4 + size;
        if head & 0x80 != 0 {
            break;
        }
    }
    let info = info.expect("a STREAMINFO block");
    let mut out = b"fLaC".to_vec();
    out.push(0x80); // the last metadata block, of type STREAMINFO
    out.extend_from_slice(&(info.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&info);
    let rest = len - out.len();
    out.extend_from_slice(&flac[at..at + rest]);
    out
}

fn mini_wav(rate: u32, channels: u16, bits: u16, float: bool) -> Vec<u8> {
    let format = if float { hound::SampleFormat::Float } else { hound::SampleFormat::Int };
    let spec = hound::WavSpec { channels, sample_rate: rate, bits_per_sample: bits, sample_format: format };
    let mut cur = std::io::Cursor::new(Vec::new());
    let mut w = hound::WavWriter::new(&mut cur, spec).unwrap();
    for i in 0..rate / 50 {
        let v = 0.5 * (i as f32 * 0.3).sin();
        for _ in 0..channels {
            if float {
                w.write_sample(v).unwrap();
            } else {
                w.write_sample((v * ((1i64 << (bits - 1)) - 1) as f32) as i32).unwrap();
            }
        }
    }
    w.finalize().unwrap();
    cur.into_inner()
}

#[test]
fn fuzz_seeds_are_inputs_the_readers_accept() {
    let mut seeds = Seeds(BTreeMap::new());

    let wbin = mini_wbin();
    let file = WbinFile::from_bytes(wbin.clone(), "mini.wbin").unwrap();
    wcc_runtime::compiled::check_program(&file).unwrap();
    seeds.add("wbin", "mini.wbin", wbin);

    let bin = mini_model_bin();
    let ck = Checkpoint::from_ct2_bytes(Path::new("mini-ct2"), bin.clone(), None).unwrap();
    assert_eq!(ck.dims, mini_dims());
    wcc_ir::verify(&wcc_frontend::lower::lower(&ck).unwrap()).unwrap();
    assert!(bin.len() < 64 << 10, "{} bytes", bin.len());
    seeds.add("ct2", "mini-model.bin", bin);

    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("mini-hf");
    wcc_frontend::hf_writer::write_random_dims(&hf, &mini_dims(), 1, wcc_ir::DType::F16).unwrap();
    let (config, st) =
        (std::fs::read(hf.join("config.json")).unwrap(), std::fs::read(hf.join("model.safetensors")).unwrap());
    let ck = Checkpoint::from_safetensors_bytes(&hf, st.clone(), &config, None).unwrap();
    wcc_ir::verify(&wcc_frontend::lower::lower(&ck).unwrap()).unwrap();
    let mut joined = (config.len() as u16).to_le_bytes().to_vec();
    joined.extend_from_slice(&config);
    joined.extend_from_slice(&st);
    seeds.add("safetensors", "mini-hf", joined);

    for e in std::fs::read_dir(repo().join("tests/filetests")).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // The expected output is commented out: the whole file is one module.
        wcc_ir::parse_module(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seeds.add("ir_text", path.file_name().unwrap().to_string_lossy(), text.into_bytes());
    }

    for (rate, ch, bits, float) in
        [(16000, 1, 16, false), (8000, 1, 8, false), (44100, 2, 24, false), (8000, 7, 32, true), (22050, 1, 32, false)]
    {
        let wav = mini_wav(rate, ch, bits, float);
        let x = wcc_runtime::audio::decode_audio(wav.clone(), "seed.wav", Some("wav"), true).unwrap();
        assert_eq!(x.len(), 320, "{rate} Hz: 20 ms at 16 kHz");
        let name = format!("{rate}-{ch}ch-{bits}{}.wav", if float { "f" } else { "" });
        seeds.add("wav", name.clone(), wav.clone());
        seeds.add("audio", name, wav);
    }
    // Other containers: the first kilobytes of the shared MP3s and of jfk.flac with its
    // metadata cut to the stream info (its 8 kB of padding would fill the seed): a stream
    // cut short decodes. Every audio seed is kept under scripts/fuzz's 16 kB input limit.
    let formats = shared_data().join("audio/formats");
    for name in ["jfk.mp3", "multilingual.mp3"] {
        let bytes = std::fs::read(formats.join(name)).unwrap();
        seeds.add("audio", name, bytes[..6 << 10].to_vec());
    }
    seeds.add(
        "audio",
        "jfk-cut.flac",
        flac_without_metadata(&std::fs::read(formats.join("jfk.flac")).unwrap(), 15 << 10),
    );
    for (name, bytes) in &seeds.0["audio"] {
        assert!(bytes.len() <= 16 << 10, "{name}: {} bytes", bytes.len());
        let x = wcc_runtime::audio::decode_audio(bytes.clone(), name, None, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(x.len() >= 320, "{name}: {} samples", x.len());
    }

    let tok = wcc_runtime::tokenizer::WhisperTokenizer::from_bytes(
        &std::fs::read(model_dir("tiny.en").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let ids = tok.encode(" And so, my fellow Americans: ask not what your country can do for you.").unwrap();
    let special = tok.special_tokens().unwrap();
    let mut with_special = vec![special.sot, special.no_timestamps];
    with_special.extend(&ids);
    with_special.extend([special.timestamp_begin + 50, special.eot, 60_000]);
    for (name, ids) in [("jfk-text", &ids), ("jfk-with-special", &with_special)] {
        seeds.add("tokenizer", name, ids.iter().flat_map(|i| i.to_le_bytes()[..3].to_vec()).collect());
    }

    seeds.write();
}
