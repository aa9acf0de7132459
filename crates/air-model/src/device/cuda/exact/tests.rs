//! The exact kernels against the host code they reproduce, bit for bit. They need a GPU: without
//! one each test returns at once (CI builds no CUDA). On a GPU machine:
//! `air-model-tests exact` (the test binary of `cargo test --release -p air-model --features
//! cuda --no-run`), with `AIR_MODELS_DIR` naming where SmolLM2's file is for the whole-model test.

use super::*;
use crate::attention::{AttentionShape, QueryRows, ValueSums, causal_attention};
use crate::block_dot::BlockDot;
use crate::kv_cache::WHOLE;
use crate::{ComputeDevice, DeviceNumerics, KvCache, LoadOptions, Logits, Model, RopeScaling, RopeStyle};
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0};
use candle_core::quantized::{QStorage, QTensor};
use std::borrow::Cow;

fn gpu() -> Option<Device> {
    if super::super::device_count() == 0 {
        eprintln!("no CUDA device: skipped");
        return None;
    }
    Some(Device::new_cuda(0).unwrap())
}

/// `n` pseudo-random values in [-scale / 2, scale / 2), the same for the same seed.
pub(in crate::device) fn data(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let differ = got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
    let first = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits());
    assert_eq!(differ, 0, "{what}: {differ} of {} values differ, first at {first:?}", got.len());
}

#[test]
fn exact_rms_norm_gives_the_host_bits() {
    let Some(dev) = gpu() else { return };
    for (rows, d) in [(5, 576), (3, 64), (1, 4096)] {
        let x = Tensor::from_vec(data(rows * d, 1, 6.0), (rows, d), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(data(d, 2, 2.0), d, &Device::Cpu).unwrap();
        let want = values(&crate::ops::rms_norm(&x, &w, 1e-5).unwrap());
        let got = values(&rms_norm(&x.to_device(&dev).unwrap(), &w.to_device(&dev).unwrap(), 1e-5).unwrap());
        assert_bits(&got, &want, &format!("RMSNorm ({rows}, {d})"));
    }
}

fn check_matmul<T: BlockDot>(dtype: GgmlDType, dev: &Device) {
    // 32-value types: k not a multiple of 256 (padded activation rows); n not a multiple of 32
    // groups. Every third row in the batched arithmetic (which only the K-quants have).
    let shapes = if T::BLCK_SIZE == 256 {
        [(512, 100, 3), (1024, 37, 1), (256, 9, 12)]
    } else {
        [(576, 100, 3), (1536, 37, 1), (64, 9, 12)]
    };
    for (k, n, rows) in shapes {
        let kb = k / T::BLCK_SIZE;
        let mut w = vec![T::zeros(); n * kb];
        T::from_float(&data(n * k, 7, 1.0), &mut w);
        let x = data(rows * k, 9, 4.0);
        let batched: Vec<bool> = (0..rows).map(|r| r % 3 == 1).collect();
        let mut want = vec![0f32; rows * n];
        T::dots(kb, &w, &T::quantize(&x, k), 0..rows, &batched, &mut want, n);
        // SAFETY: the blocks are plain bytes (repr(C) structs of integers and halves).
        let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), std::mem::size_of_val(&w[..])) };
        let storage = QStorage::from_data(Cow::Borrowed(bytes), dev, dtype).unwrap();
        let m = QMatMul::from_qtensor(QTensor::new(storage, (n, k)).unwrap()).unwrap();
        let x = Tensor::from_vec(x, (rows, k), dev).unwrap();
        let got = values(&matmul(&m, &x, &row_flags(&batched, dev).unwrap()).unwrap());
        assert_bits(&got, &want, &format!("{dtype:?} matmul k {k} n {n} rows {rows}"));
    }
}

#[test]
fn exact_matmuls_give_the_host_bits() {
    let Some(dev) = gpu() else { return };
    check_matmul::<BlockQ4_0>(GgmlDType::Q4_0, &dev);
    check_matmul::<BlockQ4_1>(GgmlDType::Q4_1, &dev);
    check_matmul::<BlockQ5_0>(GgmlDType::Q5_0, &dev);
    check_matmul::<BlockQ5_1>(GgmlDType::Q5_1, &dev);
    check_matmul::<BlockQ8_0>(GgmlDType::Q8_0, &dev);
    check_matmul::<BlockQ4K>(GgmlDType::Q4K, &dev);
    check_matmul::<BlockQ6K>(GgmlDType::Q6K, &dev);
}

#[test]
fn exact_gated_activations_give_the_host_bits() {
    let Some(dev) = gpu() else { return };
    // 1000 values a row: 62 chunks of 16 and a remainder of 8 (libm's expf).
    let (rows, ffn) = (3, 1000);
    let gate = Tensor::from_vec(data(rows * ffn, 3, 30.0), (rows, ffn), &Device::Cpu).unwrap();
    let up = Tensor::from_vec(data(rows * ffn, 4, 2.0), (rows, ffn), &Device::Cpu).unwrap();
    let (g, u) = (gate.to_device(&dev).unwrap(), up.to_device(&dev).unwrap());
    let want = values(&crate::ops::swiglu(&gate, &up).unwrap());
    assert_bits(&values(&gated(&g, &u, None).unwrap()), &want, "SwiGLU");
    let table = Tensor::from_slice(crate::ops::gelu_f16_table(), 65_536, &dev).unwrap();
    let want = values(&crate::ops::geglu(&gate, &up).unwrap());
    assert_bits(&values(&gated(&g, &u, Some(&table)).unwrap()), &want, "GeGLU");
}

fn config(head_dim: usize, style: RopeStyle, window: Option<usize>) -> ModelConfig {
    ModelConfig {
        architecture: crate::Architecture::Llama,
        arch_name: "llama".into(),
        n_layer: 1,
        n_embd: 4 * head_dim,
        n_ff: 8,
        n_head: 4,
        n_head_kv: 2,
        head_dim,
        context_length: 256,
        rms_norm_eps: 1e-5,
        rope_base: 10_000.0,
        rope_dim: head_dim,
        rope_style: style,
        rope_scaling: RopeScaling::None,
        embedding_scale: None,
        attention_scale: 1.0 / (head_dim as f32).sqrt(),
        scale_queries: window.is_some(),
        qk_norm: false,
        post_norms: false,
        activation: Activation::Silu,
        sliding_window: window.map(|size| crate::SlidingWindow { size, pattern: 6, rope_base: 10_000.0 }),
    }
}

/// RoPE, the cache append and attention of calls of `chunks` rows, as the host pass computes
/// them (`Model::block`: the prompt path for calls of 64 rows or more) and as the exact kernels
/// do.
fn check_attention(c: ModelConfig, window: Option<usize>, chunks: &[usize], dev: &Device) {
    let rope = Rope::new(&c, c.rope_base, None);
    let (heads, kv_heads, d) = (c.n_head, c.n_head_kv, c.head_dim);
    let capacity = chunks.iter().sum();
    let mut host_cache = KvCache::new(&c, capacity).unwrap();
    let mut gpu_cache = KvCache::on_device(&c, capacity, dev).unwrap();
    let (q_scale, score_scale) = c.attention_scales();
    let mut start = 0;
    for (seed, &n) in (11..).zip(chunks) {
        let tiled = n >= crate::F32_QUERY_ROWS;
        let q_all = data(n * heads * d, seed, 6.0);
        let k_all = data(n * kv_heads * d, seed + 100, 6.0);
        let v_all = data(n * kv_heads * d, seed + 200, 2.0);
        // The host: heads first, rotated, scaled, written, attended.
        let tables = rope.tables(start, n, &Device::Cpu).unwrap();
        let heads_first = |y: &[f32], h: usize| {
            Tensor::from_vec(y.to_vec(), (1, n, h, d), &Device::Cpu)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let mut q = rope.apply(&heads_first(&q_all, heads), &tables).unwrap();
        if q_scale != 1.0 {
            q = (q * q_scale as f64).unwrap();
        }
        let k = values(&rope.apply(&heads_first(&k_all, kv_heads), &tables).unwrap());
        let v = values(&heads_first(&v_all, kv_heads));
        let store = host_cache.host().unwrap();
        for kv in 0..kv_heads {
            let span = kv * n * d..(kv + 1) * n * d;
            store.write(0, &WHOLE, kv, start, &k[span.clone()], &v[span]);
        }
        let shape = AttentionShape { heads, kv_heads, head_dim: d, scale: score_scale, window, values: ValueSums::F16 };
        let tiled_rows = if tiled { n } else { 0 };
        let rows = [QueryRows { kv: store.layer(0, &WHOLE), row: 0, n, start, tiled_rows }];
        let want = causal_attention(&values(&q), n, &rows, shape);
        host_cache.advance(n);
        // The GPU.
        let on_gpu = |y: &[f32], width: usize| Tensor::from_vec(y.to_vec(), (n, width), dev).unwrap();
        let seqs = [SequenceRows {
            row: 0,
            n,
            start,
            global: rope.tables(start, n, dev).unwrap(),
            local: None,
            cache: &gpu_cache,
            tiled,
        }];
        let layer = LayerAttention { index: 0, config: &c, rope: &rope, local: false, window };
        let got = attention(
            &on_gpu(&q_all, heads * d),
            &on_gpu(&k_all, kv_heads * d),
            &on_gpu(&v_all, kv_heads * d),
            &seqs,
            layer,
        )
        .unwrap();
        gpu_cache.advance(n);
        let what = format!("attention d {d} {:?} window {window:?} start {start} rows {n}", c.rope_style);
        assert_bits(&values(&got), &want, &what);
        start += n;
    }
}

#[test]
fn exact_attention_gives_the_host_bits() {
    let Some(dev) = gpu() else { return };
    // Generation path (calls under 64 rows), then the prompt path (70 rows: two query tiles,
    // key tiles across them) after a few rows already cached.
    check_attention(config(64, RopeStyle::Interleaved, None), None, &[5, 3, 70, 1], &dev);
    check_attention(config(96, RopeStyle::Neox, None), None, &[5, 3, 70], &dev);
    // Head 256: the f16 arithmetic lanes; windows and scaled queries.
    check_attention(config(256, RopeStyle::Neox, Some(4)), Some(4), &[5, 3, 66], &dev);
    check_attention(config(128, RopeStyle::Neox, Some(40)), Some(40), &[100, 2], &dev);
}

/// A real model on the GPU with the CPU's numerics: the reference's longest prompt (12 to 32
/// tokens: batched matmul rows), then 16 tokens one at a time, then the whole sequence in one
/// pass: every logit equal to the host pass's, bit for bit.
fn check_model(name: &str) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("AIR_MODELS_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| root.join("models"));
    let path = dir.join(format!("{name}.gguf"));
    let Ok(file) = air_gguf::GgufFile::open(&path) else {
        eprintln!("{} not found: skipped", path.display());
        return;
    };
    let text = std::fs::read_to_string(root.join(format!("tests/reference/public_{name}.json"))).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = reference["prompts"].as_array().unwrap().last().unwrap().clone();
    let mut tokens: Vec<u32> =
        case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let host = Model::load(&file).unwrap();
    let options =
        LoadOptions { device: ComputeDevice::Cuda(0), device_numerics: DeviceNumerics::Cpu, ..LoadOptions::default() };
    let gpu = Model::load_with(&file, options).unwrap();
    let (mut host_cache, mut gpu_cache) = (host.new_cache(64).unwrap(), gpu.new_cache(64).unwrap());
    let mut next = tokens.clone();
    for step in 0..16 {
        let want = host.forward(&next, &mut host_cache, Logits::Last).unwrap();
        let got = gpu.forward(&next, &mut gpu_cache, Logits::Last).unwrap();
        assert_bits(&got, &want, &format!("{name} step {step}"));
        let top = want.iter().enumerate().fold(0, |b, (i, &x)| if x > want[b] { i } else { b });
        next = vec![top as u32];
        tokens.push(top as u32);
    }
    let want = host.forward(&tokens, &mut host.new_cache(64).unwrap(), Logits::From(0)).unwrap();
    let got = gpu.forward(&tokens, &mut gpu.new_cache(64).unwrap(), Logits::From(0)).unwrap();
    assert_bits(&got, &want, &format!("{name} one pass"));
    // 80 rows in one pass: attention's prompt path.
    let long: Vec<u32> = tokens.iter().cycle().take(80).copied().collect();
    let want = host.forward(&long, &mut host.new_cache(80).unwrap(), Logits::From(70)).unwrap();
    let got = gpu.forward(&long, &mut gpu.new_cache(80).unwrap(), Logits::From(70)).unwrap();
    assert_bits(&got, &want, &format!("{name} one pass of 80"));
}

#[test]
fn exact_smollm2_gives_the_host_logits() {
    if gpu().is_some() {
        check_model("SmolLM2-135M-Instruct.Q4_1");
    }
}

#[test]
fn exact_qwen2_gives_the_host_logits() {
    if gpu().is_some() {
        check_model("qwen2.5-coder-0.5b-instruct-q4_k_m");
    }
}

#[test]
fn exact_gemma3_gives_the_host_logits() {
    if gpu().is_some() {
        check_model("gemma-3-270m-q4_k_m");
    }
}

/// NVRTC compiles the kernels (no GPU needed, only the CUDA build's NVRTC library).
#[test]
fn exact_kernels_compile() {
    ptx().unwrap();
}
