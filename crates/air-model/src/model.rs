use crate::Linear;
use crate::attention::{AttentionShape, causal_attention};
use crate::rope::{Rope, RopeTables};
use crate::{KvCache, LayerWeights, ModelConfig, ModelError, Weights};
use air_gguf::GgufFile;
use candle_core::{Device, Tensor};

/// Which positions of a forward pass to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (perplexity, scoring).
    All,
}

/// A loaded model: configuration, mapped weights and RoPE.
pub struct Model {
    config: ModelConfig,
    weights: Weights,
    rope: Rope,
    vocab_size: usize,
    device: Device,
}

impl Model {
    /// Loads the model in `file` for the CPU.
    pub fn load(file: &GgufFile) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(file.metadata())?;
        let embd =
            file.tensor("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size =
            *embd.dims.get(1).ok_or_else(|| ModelError::Config("token_embd.weight is not 2-D".into()))? as usize;
        let device = Device::Cpu;
        let weights = Weights::load(file, &config, vocab_size)?;
        let freq_factors = weights.rope_freqs.as_ref().map(|t| t.to_vec1::<f32>()).transpose()?;
        let rope = Rope::new(&config, freq_factors.as_deref());
        Ok(Self { rope, config, weights, vocab_size, device })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Rows of the output head (logits per position).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A KV cache for one sequence of up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        KvCache::new(&self.config, capacity)
    }

    /// Runs `tokens` (the continuation of the sequence held in `cache`) through the model,
    /// appends their keys/values to the cache, and returns logits, row-major, one row of
    /// `vocab_size` per position asked for.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let start = cache.len();
        if start + n > cache.capacity() {
            return Err(ModelError::ContextOverflow { needed: start + n, capacity: cache.capacity() });
        }
        let mut x = self.weights.token_embd.rows(tokens)?;
        let rope = self.rope.tables(start, n, &self.device)?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            x = self.block(i, layer, &x, cache, &rope)?;
        }
        cache.advance(n);
        let x = match logits {
            Logits::Last => x.narrow(0, n - 1, 1)?,
            Logits::All => x,
        };
        let x = crate::ops::rms_norm(&x.contiguous()?, &self.weights.output_norm, self.config.rms_norm_eps)?;
        let out = self.weights.output.forward(&x)?;
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }

    /// One transformer block: pre-norm attention and SwiGLU feed-forward, each with a residual.
    fn block(
        &self,
        index: usize,
        w: &LayerWeights,
        x: &Tensor,
        cache: &mut KvCache,
        rope: &RopeTables,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let n = x.dim(0)?;
        let h = crate::ops::rms_norm(x, &w.attn_norm, c.rms_norm_eps)?;
        let project = |m: &Linear, bias: &Option<Tensor>, heads: usize| -> Result<Tensor, ModelError> {
            let mut y = m.forward(&h)?;
            if let Some(b) = bias {
                y = y.broadcast_add(b)?;
            }
            // (n, heads * head_dim) -> (1, heads, n, head_dim)
            Ok(y.reshape((1, n, heads, c.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = self.rope.apply(&project(&w.wq, &w.bq, c.n_head)?, rope)?;
        let k = self.rope.apply(&project(&w.wk, &w.bk, c.n_head_kv)?, rope)?;
        let v = project(&w.wv, &w.bv, c.n_head_kv)?;
        let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        cache.write(index, &flat(k)?, &flat(v)?, n);
        let (keys, values) = cache.layer(index);
        let shape =
            AttentionShape { heads: c.n_head, kv_heads: c.n_head_kv, head_dim: c.head_dim, capacity: cache.capacity() };
        let attn = causal_attention(&flat(q)?, keys, values, cache.len(), n, shape);
        let attn = Tensor::from_vec(attn, (n, c.n_head * c.head_dim), &self.device)?;
        let x = (x + w.wo.forward(&attn)?)?;

        let h = crate::ops::rms_norm(&x, &w.ffn_norm, c.rms_norm_eps)?;
        let gated = (candle_nn::ops::silu(&w.w_gate.forward(&h)?)? * w.w_up.forward(&h)?)?;
        Ok((x + w.w_down.forward(&gated)?)?)
    }
}
