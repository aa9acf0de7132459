use crate::host::with_f32;
use crate::{ModelConfig, RopeScaling, RopeStyle};
use candle_core::{Device, Tensor};

/// Rotary position embedding, with the angles computed as ggml computes them (the angle of pair
/// i is the position times theta_scale^i, built by repeated multiplication in f32, divided by
/// the pair's factor from a `rope_freqs.weight` tensor when the file has one (Llama 3.1 style),
/// times the linear scaling's frequency scale), so that rotations round as llama.cpp's do.
pub struct Rope {
    /// base^(-2/dim).
    theta_scale: f32,
    freq_factors: Option<Vec<f32>>,
    freq_scale: f32,
    dim: usize,
    style: RopeStyle,
}

/// cos/sin tables for a run of consecutive positions, shared by every layer of a forward pass.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

#[cfg(feature = "cuda")]
impl RopeTables {
    /// A copy in memory of its own (buffers a captured CUDA graph keeps reading).
    pub(crate) fn deep_copy(&self) -> candle_core::Result<Self> {
        Ok(Self { cos: self.cos.copy()?, sin: self.sin.copy()? })
    }

    /// cos and sin.
    pub(crate) fn cos_sin(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Writes these tables into `dst`'s memory (same shapes).
    pub(crate) fn write_into(&self, dst: &Self) -> candle_core::Result<()> {
        dst.cos.slice_set(&self.cos, 0, 0)?;
        dst.sin.slice_set(&self.sin, 0, 0)
    }
}

impl Rope {
    /// RoPE for `config` with frequency base `base`; `freq_factors` (one per pair) divide the
    /// frequencies when given.
    pub fn new(config: &ModelConfig, base: f32, freq_factors: Option<&[f32]>) -> Self {
        let dim = config.rope_dim;
        Self {
            theta_scale: base.powf(-2.0 / dim as f32),
            freq_factors: freq_factors.map(<[f32]>::to_vec),
            freq_scale: match config.rope_scaling {
                RopeScaling::None => 1.0,
                RopeScaling::Linear { factor } => 1.0 / factor,
            },
            dim,
            style: config.rope_style,
        }
    }

    /// Tables for positions `start..start + len`: cos and sin of shape (len, rope_dim / 2).
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> candle_core::Result<RopeTables> {
        self.tables_for(start..start + len, device)
    }

    /// Tables for one row per position in `positions` (e.g. the rows of several sequences,
    /// stacked): cos and sin of shape (rows, rope_dim / 2).
    pub fn tables_for(
        &self,
        positions: impl Iterator<Item = usize>,
        device: &Device,
    ) -> candle_core::Result<RopeTables> {
        let (cos, sin) = self.angles(positions);
        let (half, rows) = (self.dim / 2, cos.len() / (self.dim / 2).max(1));
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (rows, half), device)?,
            sin: Tensor::from_vec(sin, (rows, half), device)?,
        })
    }

    /// Tables for one position per sequence of a batch: cos and sin of shape
    /// (positions.len(), 1, rope_dim / 2), for inputs of shape (batch, heads, 1, head_dim).
    #[cfg(feature = "cuda")]
    pub fn tables_at(&self, positions: &[usize], device: &Device) -> candle_core::Result<RopeTables> {
        let (cos, sin) = self.angles(positions.iter().copied());
        let shape = (positions.len(), 1, self.dim / 2);
        Ok(RopeTables { cos: Tensor::from_vec(cos, shape, device)?, sin: Tensor::from_vec(sin, shape, device)? })
    }

    /// cos and sin of every pair's angle at each of `positions`, row after row.
    fn angles(&self, positions: impl Iterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let half = self.dim / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let (s, c) = (self.freq_scale * (theta / factor)).sin_cos();
                cos.push(c);
                sin.push(s);
                theta *= self.theta_scale;
            }
        }
        (cos, sin)
    }

    /// Dimensions of a head that rotate (from the first), and whether pairs are adjacent.
    #[cfg(feature = "cuda")]
    pub(crate) fn layout(&self) -> (usize, bool) {
        (self.dim, self.style == RopeStyle::Interleaved)
    }

    /// Rotates `x` of shape (batch, heads, seq, head_dim), contiguous.
    pub fn apply(&self, x: &Tensor, t: &RopeTables) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && t.cos.rank() == 2 {
            return self.apply_on_host(x, t);
        }
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

    /// The rotation on the CPU with ggml's rounding: its C is compiled with floating-point
    /// contraction, so `x0·cos − x1·sin` is one fused multiply-add over the rounded `x1·sin`,
    /// and `x0·sin + x1·cos` one over the rounded `x1·cos`. Dimensions past `rope_dim` pass
    /// through.
    fn apply_on_host(&self, x: &Tensor, t: &RopeTables) -> candle_core::Result<Tensor> {
        let (batch, heads, seq, head_dim) = x.dims4()?;
        let mut out = x.flatten_all()?.to_vec1::<f32>()?;
        self.rotate_on_host(&mut out, seq, head_dim, t)?;
        Tensor::from_vec(out, (batch, heads, seq, head_dim), x.device())
    }

    /// [`Self::apply`] on the host for activations as a matmul leaves them, `x` being (rows,
    /// heads · head_dim) with row r at the tables' position r: the rotated values rearranged to
    /// (heads, rows, head_dim), the layout attention reads, and multiplied by `scale` where it
    /// is not 1 (as candle's affine map computes it, `v · scale + 0`).
    pub fn heads_first_on_host(
        &self,
        x: &[f32],
        heads: usize,
        head_dim: usize,
        t: &RopeTables,
        scale: f32,
    ) -> candle_core::Result<Vec<f32>> {
        let rows = x.len() / (heads * head_dim).max(1);
        self.with_angles(t, rows, |cos, sin| {
            let mut out = vec![0f32; x.len()];
            // Row o of the result is head o / rows of input row o % rows; each is copied,
            // rotated and scaled while in cache, rows spread over the compute pool.
            crate::host::for_row_chunks(&mut out, head_dim, head_dim, |first, chunk| {
                for (o, dst) in chunk.chunks_exact_mut(head_dim).enumerate() {
                    let (h, r) = ((first + o) / rows, (first + o) % rows);
                    dst.copy_from_slice(&x[(r * heads + h) * head_dim..][..head_dim]);
                    self.rotate_row(dst, cos, sin, r);
                    if scale != 1.0 {
                        dst.iter_mut().for_each(|v| *v = *v * scale + 0.0);
                    }
                }
            });
            out
        })
    }

    /// Rotates `rows` (rows of head_dim, row r at the tables' position r mod `seq`) in place,
    /// with ggml's rounding (see [`Self::apply_on_host`]).
    fn rotate_on_host(&self, rows: &mut [f32], seq: usize, head_dim: usize, t: &RopeTables) -> candle_core::Result<()> {
        self.with_angles(t, seq, |cos, sin| {
            for (r, row) in rows.chunks_exact_mut(head_dim).enumerate() {
                self.rotate_row(row, cos, sin, r % seq);
            }
        })
    }

    /// Calls `f` with the tables' cos and sin values (`rope_dim / 2` per position), after
    /// checking that they hold `seq` positions.
    fn with_angles<R>(
        &self,
        t: &RopeTables,
        seq: usize,
        f: impl FnOnce(&[f32], &[f32]) -> R,
    ) -> candle_core::Result<R> {
        let half = self.dim / 2;
        with_f32(&t.cos, |cos| {
            with_f32(&t.sin, |sin| {
                if cos.len() != seq * half {
                    candle_core::bail!("rope tables hold {} angles, {seq} positions of {half} pairs need", cos.len());
                }
                Ok(f(cos, sin))
            })?
        })?
    }

    /// Rotates one head's values by the angles of the tables' position `p`.
    fn rotate_row(&self, row: &mut [f32], cos: &[f32], sin: &[f32], p: usize) {
        let half = self.dim / 2;
        let (offset, stride) = match self.style {
            RopeStyle::Interleaved => (1, 2),
            RopeStyle::Neox => (half, 1),
        };
        let (cos, sin) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
            let j = i * stride;
            let (x0, x1) = (row[j], row[j + offset]);
            row[j] = x0.mul_add(c, -(x1 * s));
            row[j + offset] = x0.mul_add(s, x1 * c);
        }
    }
}

/// `x` (rows, heads · head_dim) rearranged to (heads, rows, head_dim).
pub(crate) fn heads_first(x: &[f32], rows: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for h in 0..heads {
        for r in 0..rows {
            out.extend_from_slice(&x[(r * heads + h) * head_dim..(r * heads + h + 1) * head_dim]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Architecture, ModelConfig};

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            arch_name: "llama".into(),
            n_layer: 1,
            n_embd: 8,
            n_ff: 8,
            n_head: 1,
            n_head_kv: 1,
            head_dim: 8,
            context_length: 16,
            rms_norm_eps: 1e-5,
            rope_base: 10_000.0,
            rope_dim: 8,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: RopeScaling::None,
            embedding_scale: None,
            attention_scale: 0.25,
            scale_queries: false,
            qk_norm: false,
            post_norms: false,
            activation: crate::Activation::Silu,
            sliding_window: None,
        }
    }

    fn angles(rope: &Rope, pos: usize) -> Vec<f32> {
        let t = rope.tables(pos, 1, &Device::Cpu).unwrap();
        let (c, s) = (
            t.cos.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.sin.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        c.iter().zip(&s).map(|(c, s)| s.atan2(*c)).collect()
    }

    #[test]
    fn frequency_factors_and_linear_scaling_slow_the_rotation() {
        let plain = angles(&Rope::new(&config(), 10_000.0, None), 2);
        assert!((plain[0] - 2.0).abs() < 1e-6 && (plain[1] - 0.2).abs() < 1e-6, "{plain:?}");
        let halved = angles(&Rope::new(&config(), 10_000.0, Some(&[1.0, 2.0, 4.0, 1.0])), 2);
        assert!((halved[1] - 0.1).abs() < 1e-6 && (halved[2] - plain[2] / 4.0).abs() < 1e-6, "{halved:?}");
        let linear = ModelConfig { rope_scaling: RopeScaling::Linear { factor: 2.0 }, ..config() };
        let scaled = angles(&Rope::new(&linear, 10_000.0, None), 2);
        assert!((scaled[0] - 1.0).abs() < 1e-6, "{scaled:?}");
    }
}
