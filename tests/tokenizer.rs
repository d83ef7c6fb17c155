//! wcc's own decoding of token ids (the vocabulary and GPT-2's byte alphabet, no BPE model
//! built) against the `tokenizers` library's decode of the same `tokenizer.json`.

mod common;

use common::model_dir;

#[test]
fn decode_equals_the_tokenizers_library_on_every_token_and_on_random_sequences() {
    for name in ["tiny.en", "base"] {
        let loaded = wcc_frontend::load(&model_dir(name)).unwrap();
        let json = loaded.checkpoint.tokenizer_json().unwrap();
        let ours = wcc_runtime::tokenizer::WhisperTokenizer::from_bytes(&json).unwrap();
        let reference = tokenizers::Tokenizer::from_bytes(&json).unwrap();
        let eot = ours.special_tokens().unwrap().eot;
        // Every ordinary token alone (a token may be part of a UTF-8 sequence: both sides
        // then give the replacement character).
        for id in 0..eot {
            assert_eq!(ours.decode(&[id], eot).unwrap(), reference.decode(&[id], false).unwrap(), "{name}: token {id}");
        }
        // Sequences of random tokens, specials mixed in (left out of the text by both).
        let mut s = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let n = (s >> 60) as usize + 1;
            let ids: Vec<u32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) % (eot as u64 + 100)) as u32
                })
                .collect();
            let text: Vec<u32> = ids.iter().copied().filter(|&t| t < eot).collect();
            assert_eq!(ours.decode(&ids, eot).unwrap(), reference.decode(&text, false).unwrap(), "{name}: {ids:?}");
        }
        // The special tokens resolve to the same ids.
        for t in ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"] {
            assert_eq!(ours.token_id(t), reference.token_to_id(t), "{name}: {t}");
        }
        assert_eq!(ours.token(eot), reference.id_to_token(eot));
    }
}
