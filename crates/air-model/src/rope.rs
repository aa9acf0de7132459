use crate::{ModelConfig, RopeScaling, RopeStyle};
use candle_core::{Device, Tensor};

/// Rotary position embedding: inverse frequencies theta_i = base^(-2i/dim), positions scaled
/// as the model's RoPE scaling says.
pub struct Rope {
    inv_freq: Vec<f32>,
    position_scale: f32,
    dim: usize,
    style: RopeStyle,
}

/// cos/sin tables for a run of consecutive positions, shared by every layer of a forward pass.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.rope_dim;
        Self {
            inv_freq: (0..dim / 2).map(|i| config.rope_base.powf(-((2 * i) as f32) / dim as f32)).collect(),
            position_scale: match config.rope_scaling {
                RopeScaling::None => 1.0,
                RopeScaling::Linear { factor } => 1.0 / factor,
            },
            dim,
            style: config.rope_style,
        }
    }

    /// Tables for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> candle_core::Result<RopeTables> {
        let half = self.dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            let p = p as f32 * self.position_scale;
            for f in &self.inv_freq {
                let (s, c) = (p * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (len, half), device)?,
            sin: Tensor::from_vec(sin, (len, half), device)?,
        })
    }

    /// Rotates `x` of shape (batch, heads, seq, head_dim), contiguous.
    pub fn apply(&self, x: &Tensor, t: &RopeTables) -> candle_core::Result<Tensor> {
        let head_dim = x.dim(3)?;
        let rotate = |x: &Tensor| match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, &t.cos, &t.sin),
            RopeStyle::Neox => candle_nn::rotary_emb::rope(x, &t.cos, &t.sin),
        };
        if self.dim == head_dim {
            rotate(x)
        } else {
            let rotated = rotate(&x.narrow(3, 0, self.dim)?.contiguous()?)?;
            let rest = x.narrow(3, self.dim, head_dim - self.dim)?;
            Tensor::cat(&[&rotated, &rest], 3)
        }
    }
}
