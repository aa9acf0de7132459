use crate::Linear;
use crate::attention::{AttentionShape, causal_attention};
use crate::rope::{Rope, RopeTables};
use crate::{Activation, KvCache, LayerWeights, ModelConfig, ModelError, Weights};
use air_gguf::GgufFile;
use candle_core::{Device, Tensor};

/// Which positions of a forward pass to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// The positions of this call from index `i` on (`From(0)`: all of them; perplexity scoring
    /// asks only for the half it scores, sparing the output head the rest).
    From(usize),
}

/// A loaded model: configuration, mapped weights and RoPE.
pub struct Model {
    config: ModelConfig,
    weights: Weights,
    /// RoPE of the global layers, and of the sliding-window layers when they have their own base.
    rope: Rope,
    local_rope: Option<Rope>,
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
        let rope = Rope::new(&config, config.rope_base, freq_factors.as_deref());
        let local_rope = config.sliding_window.map(|w| Rope::new(&config, w.rope_base, freq_factors.as_deref()));
        Ok(Self { rope, local_rope, config, weights, vocab_size, device })
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
        // One hand-off to the compute pool per pass: the pass runs on a pool thread, so its
        // parallel regions (a dozen per layer) do not each wake the calling thread.
        rayon::scope(|_| self.forward_on_pool(tokens, cache, logits))
    }

    fn forward_on_pool(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let start = cache.len();
        if start + n > cache.capacity() {
            return Err(ModelError::ContextOverflow { needed: start + n, capacity: cache.capacity() });
        }
        let mut x = self.weights.token_embd.rows(tokens)?;
        if let Some(scale) = self.config.embedding_scale {
            x = (x * scale as f64)?;
        }
        let tables = self.rope.tables(start, n, &self.device)?;
        let local_tables = self.local_rope.as_ref().map(|r| r.tables(start, n, &self.device)).transpose()?;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            let (window, _) = self.config.layer_attention(i);
            let rope = match (&self.local_rope, &local_tables, window) {
                (Some(r), Some(t), Some(_)) => (r, t),
                _ => (&self.rope, &tables),
            };
            x = self.block(i, layer, &x, cache, rope, window)?;
        }
        cache.advance(n);
        let x = match logits {
            Logits::Last => x.narrow(0, n - 1, 1)?,
            Logits::From(i) if i >= n => return Ok(Vec::new()),
            Logits::From(i) => x.narrow(0, i, n - i)?,
        };
        let x = crate::ops::rms_norm(&x.contiguous()?, &self.weights.output_norm, self.config.rms_norm_eps)?;
        let out = self.weights.output.forward(&x)?;
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }

    /// One transformer block: pre-norm attention and gated feed-forward, each with a residual
    /// (and, per family, QK-norm and post-norms).
    fn block(
        &self,
        index: usize,
        w: &LayerWeights,
        x: &Tensor,
        cache: &mut KvCache,
        (rope, tables): (&Rope, &RopeTables),
        window: Option<usize>,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let n = x.dim(0)?;
        let h = crate::ops::rms_norm(x, &w.attn_norm, c.rms_norm_eps)?;
        let project =
            |m: &Linear, bias: &Option<Tensor>, norm: &Option<Tensor>, heads: usize| -> Result<Tensor, ModelError> {
                let mut y = m.forward(&h)?;
                if let Some(b) = bias {
                    y = y.broadcast_add(b)?;
                }
                if let Some(norm) = norm {
                    let per_head = y.reshape((n * heads, c.head_dim))?;
                    y = crate::ops::rms_norm(&per_head, norm, c.rms_norm_eps)?;
                }
                // (n, heads * head_dim) -> (1, heads, n, head_dim)
                Ok(y.reshape((1, n, heads, c.head_dim))?.transpose(1, 2)?.contiguous()?)
            };
        let mut q = rope.apply(&project(&w.wq, &w.bq, &w.q_norm, c.n_head)?, tables)?;
        if c.scale_queries {
            q = (q * c.attention_scale as f64)?;
        }
        let k = rope.apply(&project(&w.wk, &w.bk, &w.k_norm, c.n_head_kv)?, tables)?;
        let v = project(&w.wv, &w.bv, &None, c.n_head_kv)?;
        let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        cache.write(index, &flat(k)?, &flat(v)?, n);
        let (keys, values) = cache.layer(index);
        let shape = AttentionShape {
            heads: c.n_head,
            kv_heads: c.n_head_kv,
            head_dim: c.head_dim,
            capacity: cache.capacity(),
            scale: if c.scale_queries { 1.0 } else { c.attention_scale },
            window,
        };
        let attn = causal_attention(&flat(q)?, keys, values, cache.len(), n, shape);
        let attn = Tensor::from_vec(attn, (n, c.n_head * c.head_dim), &self.device)?;
        let x = (x + self.post_norm(w.wo.forward(&attn)?, &w.post_attn_norm)?)?;

        let h = crate::ops::rms_norm(&x, &w.ffn_norm, c.rms_norm_eps)?;
        let (gate, up) = (w.w_gate.forward(&h)?, w.w_up.forward(&h)?);
        let gated = match c.activation {
            Activation::Silu => crate::ops::swiglu(&gate, &up)?,
            Activation::GeluTanh => crate::ops::geglu(&gate, &up)?,
        };
        let ffn = w.w_down.forward(&gated)?;
        Ok((x + self.post_norm(ffn, &w.post_ffn_norm)?)?)
    }

    /// RMSNorm of a sub-layer's output before its residual add, where the family has one.
    fn post_norm(&self, y: Tensor, norm: &Option<Tensor>) -> Result<Tensor, ModelError> {
        Ok(match norm {
            Some(norm) => crate::ops::rms_norm(&y, norm, self.config.rms_norm_eps)?,
            None => y,
        })
    }
}
