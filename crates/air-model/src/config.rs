use crate::ModelError;
use air_gguf::Metadata;

/// Architecture families the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and its many look-alikes (SmolLM, Mistral-style files).
    Llama,
    /// Qwen2: llama with biases on Q/K/V and NeoX-style RoPE.
    Qwen2,
    /// Gemma 3: scaled embeddings, QK-norm, post-attention and post-FFN norms, GELU-gated FFN,
    /// sliding-window layers with their own RoPE base.
    Gemma3,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "gemma3" => Ok(Architecture::Gemma3),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.cpp's "normal" RoPE for llama GGUFs.
    Interleaved,
    /// Halves (x[i], x[i + d/2]): GPT-NeoX style, used by Qwen2 and Gemma.
    Neox,
}

/// The activation of the gated feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): llama, qwen2.
    Silu,
    /// GELU, tanh approximation (GeGLU): gemma.
    GeluTanh,
}

/// Local attention of some layers: each query sees only the last `size` positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// Every `pattern`-th layer (the last of each group) is global; the others are local.
    pub pattern: usize,
    /// RoPE base of the local layers.
    pub rope_base: f32,
}

/// RoPE frequency scaling from `{arch}.rope.scaling.*`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor.
    Linear {
        factor: f32,
    },
}

/// Hyper-parameters of a model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub arch_name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rms_norm_eps: f32,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    /// Multiplier of the token embeddings (gemma: sqrt(n_embd)).
    pub embedding_scale: Option<f32>,
    /// Scale of attention scores (1/sqrt(head_dim) unless the family says otherwise).
    pub attention_scale: f32,
    /// The scale multiplies the queries before attention instead of the scores (gemma, as
    /// llama.cpp orders it; the rounding differs).
    pub scale_queries: bool,
    /// RMSNorm of each query and key head before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before their residual adds.
    pub post_norms: bool,
    pub activation: Activation,
    pub sliding_window: Option<SlidingWindow>,
}

impl ModelConfig {
    /// The attention scale split as the family applies it: (factor on the queries before the
    /// dot products, factor on the scores). Gemma scales the queries; the others the scores.
    pub fn attention_scales(&self) -> (f32, f32) {
        if self.scale_queries { (self.attention_scale, 1.0) } else { (1.0, self.attention_scale) }
    }

    /// The geometry of a KV store for this model with blocks of `block_size` positions.
    pub fn kv_shape(&self, block_size: usize) -> air_kv::KvShape {
        air_kv::KvShape { layers: self.n_layer, kv_heads: self.n_head_kv, head_dim: self.head_dim, block_size }
    }

    /// The attention window of layer `layer` (None: global) and its RoPE base.
    pub fn layer_attention(&self, layer: usize) -> (Option<usize>, f32) {
        match self.sliding_window {
            Some(w) if !(layer + 1).is_multiple_of(w.pattern) => (Some(w.size), w.rope_base),
            _ => (None, self.rope_base),
        }
    }
}

impl ModelConfig {
    /// Reads the configuration of the file's architecture.
    pub fn from_gguf(md: &Metadata) -> Result<Self, ModelError> {
        let arch_name = md.get_str("general.architecture")?.to_string();
        let architecture = Architecture::from_name(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize, ModelError> { Ok(md.get_u64(&key(k))? as usize) };
        let n_embd = usize_of("embedding_length")?;
        let n_head = usize_of("attention.head_count")?;
        let n_head_kv = match md.opt(md.get_u64(&key("attention.head_count_kv")))? {
            Some(n) => n as usize,
            None => n_head,
        };
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::Config(format!(
                "{n_head} attention heads cannot be grouped over {n_head_kv} KV heads"
            )));
        }
        let head_dim = match md.opt(md.get_u64(&key("attention.key_length")))? {
            Some(d) => d as usize,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => return Err(ModelError::Config(format!("embedding {n_embd} is not divisible by {n_head} heads"))),
        };
        let rope_dim = match md.opt(md.get_u64(&key("rope.dimension_count")))? {
            Some(d) => d as usize,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::Config(format!(
                "rope dimension {rope_dim} does not fit head dimension {head_dim}"
            )));
        }
        let rope_scaling = match md.opt(md.get_str(&key("rope.scaling.type")))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let factor = md.get_f64(&key("rope.scaling.factor"))? as f32;
                if factor > 0.0 && factor != 1.0 { RopeScaling::Linear { factor } } else { RopeScaling::None }
            }
            Some(other) => return Err(ModelError::Config(format!("RoPE scaling {other:?} is not supported yet"))),
        };
        let gemma = architecture == Architecture::Gemma3;
        let sliding_window = match md.opt(md.get_u64(&key("attention.sliding_window")))? {
            Some(size) if size > 0 && gemma => Some(SlidingWindow {
                size: size as usize,
                // Gemma 3 stores neither the pattern nor the local base: llama.cpp's constants.
                pattern: md.opt(md.get_u64(&key("attention.sliding_window_pattern")))?.unwrap_or(6).max(1) as usize,
                rope_base: md.opt(md.get_f64(&key("rope.freq_base_swa")))?.unwrap_or(10_000.0) as f32,
            }),
            _ => None,
        };
        let config = Self {
            architecture,
            n_layer: usize_of("block_count")?,
            n_embd,
            n_ff: usize_of("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            context_length: usize_of("context_length")?,
            rms_norm_eps: md.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_base: md.opt(md.get_f64(&key("rope.freq_base")))?.unwrap_or(10_000.0) as f32,
            rope_dim,
            rope_style: match architecture {
                Architecture::Llama => RopeStyle::Interleaved,
                Architecture::Qwen2 | Architecture::Gemma3 => RopeStyle::Neox,
            },
            rope_scaling,
            embedding_scale: gemma.then(|| (n_embd as f32).sqrt()),
            // Gemma 3 27B scales by the embedding per head instead (llama.cpp's rule).
            attention_scale: if gemma && md.get_u64(&key("block_count"))? == 62 {
                1.0 / ((n_embd / n_head) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
            scale_queries: gemma,
            qk_norm: gemma,
            post_norms: gemma,
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            sliding_window,
            arch_name,
        };
        if config.n_layer == 0 || config.n_embd == 0 || config.context_length == 0 {
            return Err(ModelError::Config("zero layers, embedding size or context length".into()));
        }
        Ok(config)
    }
}
