use crate::{Architecture, CpuNumerics, Linear, ModelConfig, ModelError};
use air_gguf::GgufFile;
use candle_core::Tensor;
use std::sync::Arc;

/// The weights of one transformer block.
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    /// Q/K/V biases (Qwen2).
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    /// Per-head RMSNorm weights of queries and keys (QK-norm, gemma).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// RMSNorm of the attention output before its residual add (gemma).
    pub post_attn_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
    /// RMSNorm of the FFN output before its residual add (gemma).
    pub post_ffn_norm: Option<Tensor>,
}

/// All weights of a model, as views into the GGUF mapping.
pub struct Weights {
    pub token_embd: Arc<Linear>,
    pub output_norm: Tensor,
    /// The output head: `output.weight`, or the token embedding when the file ties them.
    pub output: Arc<Linear>,
    /// Per-pair RoPE frequency divisors (`rope_freqs.weight`, Llama 3.1 style), if any.
    pub rope_freqs: Option<Tensor>,
    pub layers: Vec<LayerWeights>,
}

struct Loader<'a> {
    file: &'a GgufFile,
    numerics: CpuNumerics,
}

impl Loader<'_> {
    fn linear(&self, name: &str, dims: &[usize]) -> Result<Linear, ModelError> {
        let info = self.file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let expected: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if info.dims != expected {
            return Err(ModelError::BadShape { name: name.into(), expected, found: info.dims.clone() });
        }
        Linear::new(self.file, info, self.numerics)
    }

    /// A small tensor (norm weight, bias) dequantized to an f32 vector.
    fn vector(&self, name: &str, len: usize) -> Result<Tensor, ModelError> {
        Ok(self.linear(name, &[len])?.rows(&[0])?.squeeze(0)?)
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Tensor>, ModelError> {
        match self.file.tensor(name) {
            Some(_) => self.vector(name, len).map(Some),
            None => Ok(None),
        }
    }
}

impl Weights {
    /// Maps every weight of the model described by `config` from `file`, checking shapes; the
    /// matmuls round as `numerics` says.
    pub fn load(
        file: &GgufFile,
        config: &ModelConfig,
        vocab: usize,
        numerics: CpuNumerics,
    ) -> Result<Self, ModelError> {
        let l = Loader { file, numerics };
        let (d, ff) = (config.n_embd, config.n_ff);
        let q_dim = config.n_head * config.head_dim;
        let kv_dim = config.n_head_kv * config.head_dim;
        let token_embd = Arc::new(l.linear("token_embd.weight", &[d, vocab])?);
        let output = match file.tensor("output.weight") {
            Some(_) => Arc::new(l.linear("output.weight", &[d, vocab])?),
            None => token_embd.clone(),
        };
        let layers = (0..config.n_layer)
            .map(|i| {
                let name = |t: &str| format!("blk.{i}.{t}");
                let biased = config.architecture == Architecture::Qwen2;
                let bias = |t: &str, len| {
                    if biased { l.vector(&name(t), len).map(Some) } else { l.optional_vector(&name(t), len) }
                };
                // A vector the configuration requires, absent otherwise.
                let when = |needed: bool, t: &str, len| needed.then(|| l.vector(&name(t), len)).transpose();
                let hd = config.head_dim;
                Ok(LayerWeights {
                    attn_norm: l.vector(&name("attn_norm.weight"), d)?,
                    wq: l.linear(&name("attn_q.weight"), &[d, q_dim])?,
                    wk: l.linear(&name("attn_k.weight"), &[d, kv_dim])?,
                    wv: l.linear(&name("attn_v.weight"), &[d, kv_dim])?,
                    wo: l.linear(&name("attn_output.weight"), &[q_dim, d])?,
                    bq: bias("attn_q.bias", q_dim)?,
                    bk: bias("attn_k.bias", kv_dim)?,
                    bv: bias("attn_v.bias", kv_dim)?,
                    q_norm: when(config.qk_norm, "attn_q_norm.weight", hd)?,
                    k_norm: when(config.qk_norm, "attn_k_norm.weight", hd)?,
                    post_attn_norm: when(config.post_norms, "post_attention_norm.weight", d)?,
                    ffn_norm: l.vector(&name("ffn_norm.weight"), d)?,
                    w_gate: l.linear(&name("ffn_gate.weight"), &[d, ff])?,
                    w_up: l.linear(&name("ffn_up.weight"), &[d, ff])?,
                    w_down: l.linear(&name("ffn_down.weight"), &[ff, d])?,
                    post_ffn_norm: when(config.post_norms, "post_ffw_norm.weight", d)?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let rope_freqs = l.optional_vector("rope_freqs.weight", config.rope_dim / 2)?;
        Ok(Self { output_norm: l.vector("output_norm.weight", d)?, token_embd, output, rope_freqs, layers })
    }
}
