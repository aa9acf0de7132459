//! The tokenizer against llama.cpp's own tokenization of the real models (tests/reference/),
//! and round trips. Needs the models: `scripts/fetch-models.sh all`.

use air_gguf::GgufFile;
use air_tokenizer::{StreamDecoder, TokenKind, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(file: &str) -> (GgufFile, Tokenizer) {
    let dir = std::env::var_os("AIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let path = dir.join(file);
    let gguf =
        GgufFile::open(&path).unwrap_or_else(|e| panic!("{e} (fetch the models with scripts/fetch-models.sh all)"));
    let tok = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    (gguf, tok)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference").join(name)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Decodes with control tokens written out, so text containing them round-trips too.
fn decode_all(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut bytes = Vec::new();
    for &id in ids {
        match tok.token_kind(id) {
            Some(TokenKind::Control) => bytes.extend_from_slice(tok.token_text(id).unwrap().as_bytes()),
            _ => bytes.extend_from_slice(tok.token_bytes(id)),
        }
    }
    String::from_utf8(bytes).unwrap()
}

fn check_model(model: &str) {
    let (_gguf, tok) = load(&format!("{model}.gguf"));
    let mut mismatches = Vec::new();
    for case in reference(&format!("tokenize_{model}.json")).as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        let got = tok.encode(text, true).unwrap();
        if got != expected {
            mismatches.push(format!("{text:?}\n  llama.cpp {expected:?}\n  air       {got:?}"));
        }
        // Round trip: the ids (without BOS) decode back to the text.
        let body = if tok.adds_bos() { &got[1..] } else { &got[..] };
        assert_eq!(decode_all(&tok, body), text, "round trip of {text:?}");
        // Streaming decode gives the same text as a whole decode, never broken UTF-8.
        let mut stream = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in body {
            streamed.push_str(&stream.push(&tok, id));
        }
        streamed.push_str(&stream.flush());
        assert_eq!(streamed, tok.decode(body));
    }
    for case in reference(&format!("public_{model}.json"))["prompts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["prompt_ids"]);
        let got = tok.encode(prompt, true).unwrap();
        if got != expected {
            mismatches.push(format!("{prompt:?}\n  llama.cpp {expected:?}\n  air       {got:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{model}: {} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}

#[test]
fn smollm2_matches_llamacpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1");
}

#[test]
fn qwen2_matches_llamacpp() {
    check_model("qwen2.5-coder-0.5b-instruct-q4_k_m");
}

#[test]
fn gemma3_matches_llamacpp() {
    check_model("gemma-3-270m-q4_k_m");
}

#[test]
fn end_of_generation_tokens() {
    let (_g, tok) = load("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(tok.is_end_of_generation(2)); // <|im_end|>, the EOS
    assert!(tok.is_end_of_generation(0)); // <|endoftext|>
    assert!(!tok.is_end_of_generation(1)); // <|im_start|>
}

#[test]
fn stream_decoder_holds_split_characters() {
    let (_g, tok) = load("SmolLM2-135M-Instruct.Q4_1.gguf");
    // Find single-byte tokens for the UTF-8 bytes of "é" (0xC3 0xA9).
    let find = |b: u8| (0..tok.vocab_size() as u32).find(|&i| tok.token_bytes(i) == [b]).unwrap();
    let (first, second) = (find(0xC3), find(0xA9));
    let mut s = StreamDecoder::new();
    assert_eq!(s.push(&tok, first), "");
    assert_eq!(s.push(&tok, second), "é");
}

#[test]
fn chat_template_renders_with_generation_prompt() {
    let (gguf, tok) = load("SmolLM2-135M-Instruct.Q4_1.gguf");
    let source = gguf.metadata().get_str("tokenizer.chat_template").unwrap();
    let template = air_tokenizer::ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").unwrap();
    let text = template.render(&[air_tokenizer::ChatMessage::new("user", "Hi")], true).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{text}");
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids[0], 1);
}
