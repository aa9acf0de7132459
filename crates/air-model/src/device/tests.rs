//! The device pass on candle's CPU backend against the host pass, on the real models: the same
//! code path the GPU runs (only the kernels differ), so shapes, masks, grouped-query attention,
//! the KV cache and batching are checked here without a GPU.
//!
//! candle's CPU matmuls quantize activations by their own rules, which change with the number of
//! rows (repacked AVX-512 paths), so logits move by up to ~1.7 between the passes and ~0.7
//! between one pass and token-by-token (~1.05 on Gemma 3): the tolerances below sit above those measured levels.
//! The sharp check is top-1 agreement at every position but near-ties (one allowed); a wrong
//! mask, position or cache slot moves logits by whole units and changes tokens.

use super::{DeviceModel, DeviceOptions};
use crate::{Logits, Model, Sequence};
use air_gguf::GgufFile;
use candle_core::Device;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The host model, and the same model with its pass on candle's CPU device.
fn models(name: &str) -> (Model, Model) {
    let dir = std::env::var_os("AIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let file = GgufFile::open(dir.join(format!("{name}.gguf")))
        .unwrap_or_else(|e| panic!("{e} (fetch the models with scripts/fetch-models.sh all)"));
    let host = Model::load(&file).unwrap();
    let mut device = Model::load(&file).unwrap();
    let pass = DeviceModel::load(&file, &device.config, &device.weights, Device::Cpu, DeviceOptions::default());
    device.on_device = Some(pass.unwrap());
    (host, device)
}

/// The prompt of the reference's last (longest) case.
fn prompt(name: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(root().join(format!("tests/reference/public_{name}.json"))).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = reference["prompts"].as_array().unwrap().last().unwrap().clone();
    case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best })
}

/// Logits of every position from `from` on, with `tokens` in one pass.
fn teacher_forced(model: &Model, tokens: &[u32], from: usize) -> Vec<f32> {
    let mut cache = model.new_cache(tokens.len()).unwrap();
    model.forward(tokens, &mut cache, Logits::From(from)).unwrap()
}

fn check(name: &str, tolerance: f32) {
    let (host, device) = models(name);
    let vocab = host.vocab_size();
    let prompt = prompt(name);
    // Greedy continuation on the host.
    let mut tokens = prompt.clone();
    let mut cache = host.new_cache(prompt.len() + 16).unwrap();
    let mut logits = host.forward(&prompt, &mut cache, Logits::Last).unwrap();
    for _ in 0..16 {
        let next = argmax(&logits) as u32;
        tokens.push(next);
        logits = host.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    let from = prompt.len() - 1;
    let want = teacher_forced(&host, &tokens, from);
    let got = teacher_forced(&device, &tokens, from);
    assert_eq!(got.len(), want.len());
    let mut agree = 0;
    let mut worst = 0f32;
    for (w, g) in want.chunks(vocab).zip(got.chunks(vocab)) {
        if argmax(w) == argmax(g) {
            agree += 1;
        } else {
            assert!(margin(w) < NEAR_TIE, "{name}: top-1 differs where the host's top two are {} apart", margin(w));
        }
        worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    let positions = want.len() / vocab;
    eprintln!("{name}: agree {agree}/{positions} worst {worst}");
    assert!(agree + 1 >= positions, "{name}: top-1 agrees at {agree} of {positions} positions");
    assert!(worst < tolerance, "{name}: logits differ by up to {worst}");

    // Token by token through the device KV cache: the same logits as one pass.
    let mut cache = device.new_cache(tokens.len()).unwrap();
    let mut stepwise = device.forward(&tokens[..from], &mut cache, Logits::Last).unwrap();
    stepwise.clear();
    for &t in &tokens[from..] {
        stepwise.extend(device.forward(&[t], &mut cache, Logits::Last).unwrap());
    }
    assert_close(name, "token by token", &stepwise, &got, vocab);

    // A batch of two sequences of different lengths: each gets its own logits.
    let short = &tokens[..prompt.len() / 2 + 1];
    let mut caches = [device.new_cache(tokens.len()).unwrap(), device.new_cache(tokens.len()).unwrap()];
    let [a, b] = &mut caches;
    let mut batch = [Sequence { tokens: &tokens, cache: a }, Sequence { tokens: short, cache: b }];
    let both = device.forward_batch(&mut batch, Logits::Last).unwrap();
    let alone = [teacher_forced(&device, &tokens, tokens.len() - 1), teacher_forced(&device, short, short.len() - 1)];
    for (i, (batched, alone)) in both.chunks(vocab).zip(&alone).enumerate() {
        assert_close(name, &format!("sequence {i} of a batch"), batched, alone, vocab);
    }
}

/// Logits within [`DRIFT`], and the same top-1 at every position where `want`'s top two are
/// further apart than that.
fn assert_close(name: &str, what: &str, got: &[f32], want: &[f32], vocab: usize) {
    assert_eq!(got.len(), want.len(), "{name}: {what}: logit count");
    for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
        let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < DRIFT, "{name}: {what}: logits differ by {diff}");
        if margin(w) > DRIFT {
            assert_eq!(argmax(g), argmax(w), "{name}: {what}: top-1 differs");
        }
    }
}

/// How far the best logit is above the second.
fn margin(logits: &[f32]) -> f32 {
    let best = argmax(logits);
    logits[best] - logits.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &x)| x).fold(f32::MIN, f32::max)
}

/// A top-two margin under which the two passes' arithmetic may pick either token.
const NEAR_TIE: f32 = 0.5;

/// Largest logit difference between two ways of running the same pass on candle's CPU.
const DRIFT: f32 = 1.5;

#[test]
fn device_pass_matches_host_pass_on_smollm2() {
    check("SmolLM2-135M-Instruct.Q4_1", 2.0);
}

#[test]
fn device_pass_matches_host_pass_on_qwen2() {
    check("qwen2.5-coder-0.5b-instruct-q4_k_m", 2.0);
}

#[test]
fn device_pass_matches_host_pass_on_gemma3() {
    check("gemma-3-270m-q4_k_m", 2.0);
}
