//! Synthetic models: valid GGUF files of any shape with deterministic pseudo-random weights and a
//! small SentencePiece vocabulary, written as a stream (no buffer of the file's size), for scale
//! tests and benchmarks where no real model of that size is at hand.

use crate::ModelError;
use air_gguf::{GgufWriter, TensorDesc, TensorType, Value, ValueType};
use rayon::prelude::*;
use std::io::Write;

/// The shape and weight type of a synthetic llama-family model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
    /// Type of every matrix (norm weights are F32).
    pub ty: TensorType,
    /// Seed of the weights: the same spec and seed give the same file.
    pub seed: u64,
}

/// Weight types a synthetic model can have.
pub const SYNTH_TYPES: [TensorType; 13] = [
    TensorType::F32,
    TensorType::F16,
    TensorType::BF16,
    TensorType::Q4_0,
    TensorType::Q4_1,
    TensorType::Q5_0,
    TensorType::Q5_1,
    TensorType::Q8_0,
    TensorType::Q2_K,
    TensorType::Q3_K,
    TensorType::Q4_K,
    TensorType::Q5_K,
    TensorType::Q6_K,
];

/// Vocabulary entries before the generated pieces: unknown, BOS, EOS and the 256 byte tokens.
const BASE_VOCAB: usize = 3 + 256;
/// Bytes generated per parallel piece of a tensor.
const CHUNK_BYTES: usize = 4 << 20;

impl SynthSpec {
    /// Checks the shape is a model Air can run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |m: String| Err(ModelError::Config(m));
        if !SYNTH_TYPES.contains(&self.ty) {
            return fail(format!("synthetic weights of type {} are not supported", self.ty));
        }
        let sizes = [self.layers, self.hidden, self.ffn, self.heads, self.kv_heads, self.context, self.vocab];
        if sizes.contains(&0) {
            return fail("layers, hidden, ffn, heads, kv-heads and context must all be at least 1".into());
        }
        if sizes.iter().any(|&x| x > u32::MAX as usize) {
            return fail(format!("sizes are written as 32-bit numbers: at most {}", u32::MAX));
        }
        if !self.hidden.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
            || !(self.hidden / self.heads).is_multiple_of(2)
        {
            return fail(format!(
                "{} heads over {} KV heads cannot split a hidden size of {} into even head sizes",
                self.heads, self.kv_heads, self.hidden
            ));
        }
        let block = self.ty.block_size() as usize;
        if !self.hidden.is_multiple_of(block) || !self.ffn.is_multiple_of(block) {
            return fail(format!("{} needs hidden and ffn sizes that are multiples of {block}", self.ty));
        }
        if self.vocab < BASE_VOCAB {
            return fail(format!("the vocabulary needs at least {BASE_VOCAB} tokens (3 special, 256 bytes)"));
        }
        Ok(())
    }

    /// The tensors of the file, in file order.
    pub fn tensors(&self) -> Vec<TensorDesc> {
        let (d, ff, v) = (self.hidden as u64, self.ffn as u64, self.vocab as u64);
        let kv = (self.hidden / self.heads * self.kv_heads) as u64;
        let t = |name: String, dims: Vec<u64>, ty| TensorDesc { name, dims, ty };
        let mut tensors = vec![t("token_embd.weight".into(), vec![d, v], self.ty)];
        for i in 0..self.layers {
            let b = |n: &str| format!("blk.{i}.{n}.weight");
            tensors.extend([
                t(b("attn_norm"), vec![d], TensorType::F32),
                t(b("attn_q"), vec![d, d], self.ty),
                t(b("attn_k"), vec![d, kv], self.ty),
                t(b("attn_v"), vec![d, kv], self.ty),
                t(b("attn_output"), vec![d, d], self.ty),
                t(b("ffn_norm"), vec![d], TensorType::F32),
                t(b("ffn_gate"), vec![d, ff], self.ty),
                t(b("ffn_up"), vec![d, ff], self.ty),
                t(b("ffn_down"), vec![ff, d], self.ty),
            ]);
        }
        tensors.push(t("output_norm.weight".into(), vec![d], TensorType::F32));
        tensors.push(t("output.weight".into(), vec![d, v], self.ty));
        tensors
    }

    /// Bytes of tensor data the file holds (the header adds a little).
    pub fn data_bytes(&self) -> u64 {
        self.tensors().iter().filter_map(TensorDesc::size_bytes).sum()
    }

    /// Writes the model to `out`, calling `progress` with the tensor-data bytes written so far.
    pub fn write<W: Write>(&self, out: W, mut progress: impl FnMut(u64)) -> Result<(), ModelError> {
        self.validate()?;
        let tensors = self.tensors();
        let mut writer = GgufWriter::new(out, &self.metadata(), tensors.clone())?;
        let mut written = 0u64;
        for (index, t) in tensors.iter().enumerate() {
            let size = t.size_bytes().ok_or_else(|| ModelError::Config(format!("tensor {} overflows", t.name)))?;
            let fill = Fill::for_tensor(t);
            let seed = self.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let chunk = CHUNK_BYTES / t.ty.block_bytes() as usize * t.ty.block_bytes() as usize;
            // Generate a group of chunks in parallel, then write them in order.
            let group = chunk * rayon::current_num_threads().max(1) * 2;
            let mut buffer = vec![0u8; group.min(size as usize)];
            let mut offset = 0usize;
            while (offset as u64) < size {
                let len = group.min(size as usize - offset);
                buffer[..len].par_chunks_mut(chunk).enumerate().for_each(|(i, bytes)| {
                    fill.generate(
                        bytes,
                        seed.wrapping_add(((offset / chunk + i) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)),
                    );
                });
                writer.write_tensor(&buffer[..len])?;
                offset += len;
                written += len as u64;
                progress(written);
            }
        }
        writer.finish()?;
        Ok(())
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        let u32v = |x: usize| Value::U32(x as u32);
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        tokens.extend((BASE_VOCAB..self.vocab).map(piece));
        let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
        types.extend((0..256).map(|_| Value::I32(6)));
        types.extend((BASE_VOCAB..self.vocab).map(|_| Value::I32(1)));
        let scores = (0..self.vocab).map(|i| Value::F32(if i < BASE_VOCAB { 0.0 } else { -(i as f32) })).collect();
        let kv = |k: &str, v: Value| (k.to_string(), v);
        vec![
            kv("general.architecture", Value::String("llama".into())),
            kv("general.name", Value::String(format!("air synthetic {}-layer {}", self.layers, self.ty))),
            kv("llama.block_count", u32v(self.layers)),
            kv("llama.context_length", u32v(self.context)),
            kv("llama.embedding_length", u32v(self.hidden)),
            kv("llama.feed_forward_length", u32v(self.ffn)),
            kv("llama.attention.head_count", u32v(self.heads)),
            kv("llama.attention.head_count_kv", u32v(self.kv_heads)),
            kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            kv("llama.rope.freq_base", Value::F32(10_000.0)),
            kv("tokenizer.ggml.model", Value::String("llama".into())),
            kv(
                "tokenizer.ggml.tokens",
                Value::Array(ValueType::String, tokens.into_iter().map(Value::String).collect()),
            ),
            kv("tokenizer.ggml.scores", Value::Array(ValueType::F32, scores)),
            kv("tokenizer.ggml.token_type", Value::Array(ValueType::I32, types)),
            kv("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            kv("tokenizer.ggml.bos_token_id", Value::U32(1)),
            kv("tokenizer.ggml.eos_token_id", Value::U32(2)),
            kv("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ]
    }
}

/// The `i`-th generated vocabulary piece: lower-case letters counted in base 26, the even ones
/// starting a word (`▁a`, `b`, `▁c`, ..., `▁ba`, ...).
fn piece(i: usize) -> String {
    let mut n = i - BASE_VOCAB;
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
        n -= 1;
    }
    letters.reverse();
    let word = String::from_utf8(letters).unwrap_or_default();
    if i.is_multiple_of(2) { format!("▁{word}") } else { word }
}

/// How one tensor's bytes are generated.
enum Fill {
    /// Every value 1.0 (norm weights).
    Ones,
    /// Uniform values of standard deviation `std`, stored as F32, F16 or BF16.
    Float { ty: TensorType, std: f32 },
    /// Random blocks whose f16 scale fields are overwritten: (offset in the block, value).
    Blocks { block: usize, scales: Vec<(usize, half::f16)> },
}

impl Fill {
    fn for_tensor(t: &TensorDesc) -> Self {
        // Weights of standard deviation ~1/sqrt(fan-in) keep activations of order one.
        let std = 1.0 / (t.dims[0] as f32).sqrt();
        if t.dims.len() == 1 {
            return Self::Ones;
        }
        // Per type: (std of the block's values in units of its scale d, f16 fields as multiples of
        // d: the scale itself, then any minimum, chosen so the values centre near zero).
        let (unit, fields): (f32, &[(usize, f32)]) = match t.ty {
            TensorType::F32 | TensorType::F16 | TensorType::BF16 => return Self::Float { ty: t.ty, std },
            TensorType::Q4_0 | TensorType::Q5_0 | TensorType::Q8_0 => {
                let unit = match t.ty {
                    TensorType::Q4_0 => 4.6,
                    TensorType::Q5_0 => 9.2,
                    _ => 74.0,
                };
                (unit, &[(0, 1.0)])
            }
            TensorType::Q4_1 => (4.6, &[(0, 1.0), (2, -7.5)]),
            TensorType::Q5_1 => (9.2, &[(0, 1.0), (2, -15.5)]),
            TensorType::Q2_K => (10.0, &[(80, 1.0), (82, 1.5)]),
            TensorType::Q3_K => (42.0, &[(108, 1.0)]),
            TensorType::Q4_K => (150.0, &[(0, 1.0), (2, 7.5)]),
            TensorType::Q5_K => (290.0, &[(0, 1.0), (2, 15.5)]),
            _ => (1370.0, &[(208, 1.0)]), // Q6_K
        };
        let d = std / unit;
        Self::Blocks {
            block: t.ty.block_bytes() as usize,
            scales: fields.iter().map(|&(at, times)| (at, half::f16::from_f32(d * times))).collect(),
        }
    }

    fn generate(&self, bytes: &mut [u8], seed: u64) {
        let mut rng = SplitMix(seed);
        match self {
            Self::Ones => bytes.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&1f32.to_le_bytes())),
            Self::Float { ty, std } => {
                let width = if *ty == TensorType::F32 { 4 } else { 2 };
                // Uniform on [-a, a] has standard deviation a/sqrt(3).
                let a = std * 3f32.sqrt();
                for c in bytes.chunks_exact_mut(width) {
                    let x = (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 * a - a;
                    match ty {
                        TensorType::F32 => c.copy_from_slice(&x.to_le_bytes()),
                        TensorType::F16 => c.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                        _ => c.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    }
                }
            }
            Self::Blocks { block, scales } => {
                for c in bytes.chunks_mut(8) {
                    let r = rng.next().to_le_bytes();
                    c.copy_from_slice(&r[..c.len()]);
                }
                for b in bytes.chunks_exact_mut(*block) {
                    for (at, value) in scales {
                        b[*at..*at + 2].copy_from_slice(&value.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// SplitMix64: a fast, well-mixed 64-bit generator.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
