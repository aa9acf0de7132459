//! Small CPU ops whose rounding must follow ggml's for logits to agree with llama.cpp.

use candle_core::{Device, Tensor};

/// RMSNorm of each row of `x` (m, d) times `weight` (d), as ggml computes it: the mean of
/// squares accumulated in f64, `scale = 1 / sqrt(mean + eps)` in f32, then `(x * scale) * w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let (m, d) = x.dims2()?;
    let mut xs = x.flatten_all()?.to_vec1::<f32>()?;
    let w = weight.to_vec1::<f32>()?;
    for row in xs.chunks_exact_mut(d) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((sum / d as f64) as f32 + eps).sqrt();
        for (v, &wi) in row.iter_mut().zip(&w) {
            *v = (*v * scale) * wi;
        }
    }
    Tensor::from_vec(xs, (m, d), &Device::Cpu)
}
