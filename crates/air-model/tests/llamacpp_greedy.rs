//! Greedy decoding against llama.cpp's recorded outputs (tests/reference/). The acceptance
//! rule asks for greedy ids identical for 64 steps or up to llama.cpp's first near-tie (top-1/
//! top-2 margin under 0.05), and first-step top-5 logits within 0.1. Air reproduces ggml's CPU
//! arithmetic (docs/numerics.md), so this test asserts the stricter rule, which implies it and
//! catches any numeric regression: every step's id equals llama.cpp's, near-ties included, and
//! every step's top-5 logits equal llama.cpp's to the reference's printed digits ([`EXACT`]).
//! Needs the models: `scripts/fetch-models.sh all`.

use air_gguf::GgufFile;
use air_model::{CpuNumerics, KvCache, LoadOptions, Logits, Model};
use serde_json::Value;
use std::path::PathBuf;

/// Logits equal to the reference's precision.
const EXACT: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

fn open(model: &str) -> GgufFile {
    let dir = std::env::var_os("AIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    GgufFile::open(dir.join(format!("{model}.gguf")))
        .unwrap_or_else(|e| panic!("{e} (fetch the models with scripts/fetch-models.sh all)"))
}

fn reference(model: &str) -> Value {
    let text = std::fs::read_to_string(root().join(format!("tests/reference/public_{model}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A reference case's prompt run through `m`: the prompt's text, llama.cpp's steps, the cache
/// (room for every step) and the logits of the first step.
fn prompt_run<'a>(m: &Model, case: &'a Value) -> (&'a str, &'a [Value], KvCache, Vec<f32>) {
    let prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let steps = case["steps"].as_array().unwrap();
    let mut cache = m.new_cache(prompt.len() + steps.len()).unwrap();
    let logits = m.forward(&prompt, &mut cache, Logits::Last).unwrap();
    (case["prompt"].as_str().unwrap(), steps, cache, logits)
}

fn check_model(model: &str) {
    let m = Model::load(&open(model)).unwrap();
    for case in reference(model)["prompts"].as_array().unwrap() {
        let (name, steps, mut cache, mut logits) = prompt_run(&m, case);
        for (i, step) in steps.iter().enumerate() {
            for entry in step["top5"].as_array().unwrap() {
                let (id, logit) = (entry["id"].as_u64().unwrap() as usize, entry["logit"].as_f64().unwrap());
                let got = logits[id] as f64;
                assert!(
                    (got - logit).abs() < EXACT,
                    "{model} {name:?}: step {i}: logit of {id} is {got}, llama.cpp {logit}"
                );
            }
            let got = argmax(&logits);
            assert_eq!(got as u64, step["id"].as_u64().unwrap(), "{model} {name:?}: step {i} differs");
            if i + 1 < steps.len() {
                logits = m.forward(&[got as u32], &mut cache, Logits::Last).unwrap();
            }
        }
    }
}

/// `--cpu-numerics fast` sums each block in integers and rounds once per block, not in ggml's
/// eight lanes, and SmolLM2 amplifies such last-bit differences: every matmul agrees with
/// ggml's to about 1e-6, yet its final logits move by up to 0.32 (docs/numerics.md). So this
/// asks for less than the reference's rule (greedy ids up to llama.cpp's first top-1/top-2
/// margin under 0.05, first-step top-5 logits within 0.1): the greedy ids up to the first
/// margin under 0.2, the first step's top-5 logits within 0.5.
#[test]
fn smollm2_with_fast_cpu_numerics_follows_llamacpp() {
    if !CpuNumerics::Fast.supported() {
        return;
    }
    let model = "SmolLM2-135M-Instruct.Q4_1";
    let options = LoadOptions { cpu_numerics: CpuNumerics::Fast, ..LoadOptions::default() };
    let m = Model::load_with(&open(model), options).unwrap();
    for case in reference(model)["prompts"].as_array().unwrap() {
        let (name, steps, mut cache, mut logits) = prompt_run(&m, case);
        for entry in steps[0]["top5"].as_array().unwrap() {
            let (id, logit) = (entry["id"].as_u64().unwrap() as usize, entry["logit"].as_f64().unwrap());
            let got = logits[id] as f64;
            assert!((got - logit).abs() < 0.5, "{name:?}: first step's logit of {id} is {got}, llama.cpp {logit}");
        }
        for (i, step) in steps.iter().enumerate() {
            let top5 = step["top5"].as_array().unwrap();
            if top5[0]["logit"].as_f64().unwrap() - top5[1]["logit"].as_f64().unwrap() < 0.2 {
                break;
            }
            let got = argmax(&logits);
            assert_eq!(got as u64, step["id"].as_u64().unwrap(), "{name:?}: step {i} differs");
            logits = m.forward(&[got as u32], &mut cache, Logits::Last).unwrap();
        }
    }
}

#[test]
fn smollm2_greedy_matches_llamacpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1");
}

#[test]
fn qwen2_greedy_matches_llamacpp() {
    check_model("qwen2.5-coder-0.5b-instruct-q4_k_m");
}

#[test]
fn gemma3_greedy_matches_llamacpp() {
    check_model("gemma-3-270m-q4_k_m");
}

#[test]
fn gemma3_configuration_has_its_fixed_constants() {
    let dir = std::env::var_os("AIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let file = GgufFile::open(dir.join("gemma-3-270m-q4_k_m.gguf")).unwrap();
    let c = air_model::ModelConfig::from_gguf(file.metadata()).unwrap();
    assert_eq!(c.embedding_scale, Some(640f32.sqrt()));
    assert_eq!(c.attention_scale, 1.0 / 16.0);
    assert!(c.qk_norm && c.post_norms);
    // Five local layers (window 512, RoPE base 10,000), then one global (base 1,000,000).
    assert_eq!(c.layer_attention(0), (Some(512), 10_000.0));
    assert_eq!(c.layer_attention(4), (Some(512), 10_000.0));
    assert_eq!(c.layer_attention(5), (None, 1_000_000.0));
    assert_eq!(c.layer_attention(17), (None, 1_000_000.0));
}
