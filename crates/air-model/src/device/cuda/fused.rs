//! A decode step's block with its small kernels fused into Air's GEMV path (CUDA; stacked
//! query/key/value and gate/up projections whose matrices all take [`gemv`]'s kernels; up to 8
//! sequences; families without QK-norm or post-norms). Profiled on the H200 (`ncu`, the 8B
//! shape), the ops between the matmuls were over a third of the step, each a launch of 2.5-4.9
//! µs for a few thousand values. Here RMSNorm quantizes its output for the next matmul in the
//! same kernel, as do attention (for the output projection) and the gated activation (for the
//! down projection), and the output and down projections add the residual as they write: 9
//! launches per layer instead of 15.

use super::gemv;
use super::{DecodeStep, DeviceModel, LayerMatrices};
use crate::{Activation, ModelError};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Tensor};

/// Layer `index` of a decode step by the fused kernels, or `None` where they do not apply.
pub(in crate::device) fn block(
    pass: &DeviceModel,
    model: &crate::Model,
    index: usize,
    m: &LayerMatrices,
    x: &Tensor,
    step: &DecodeStep,
) -> Result<Option<Tensor>, ModelError> {
    let c = model.config();
    let v = &pass.vectors[index];
    let plain = v.q_norm.is_none() && v.k_norm.is_none() && v.post_attn_norm.is_none() && v.post_ffn_norm.is_none();
    let Some((QMatMul::QTensor(qkv), QMatMul::QTensor(gate_up))) = m.stacked() else { return Ok(None) };
    let QMatMul::QTensor(down) = m.w_down() else { return Ok(None) };
    let rows = x.dim(0)?;
    let fit = |w: &QTensor| gemv::fits_kept(w, rows);
    let norms = gemv::norm_applies(x, &v.attn_norm) && gemv::norm_applies(x, &v.ffn_norm);
    if !(plain && norms && x.dtype() == DType::F32 && fit(qkv) && fit(gate_up) && fit(down)) {
        return Ok(None);
    }
    let device = x.device().as_cuda_device()?;
    let eps = c.rms_norm_eps;
    gemv::norm_quantize(x, &v.attn_norm, eps)?;
    let mut projections = gemv::kept_matvec(qkv, rows, None, device)?;
    if let Some(b) = &v.b_qkv {
        projections = projections.broadcast_add(b)?;
    }
    // Attention writes its output quantized for the output projection where that takes it.
    let x = match m.wo() {
        QMatMul::QTensor(wo) if gemv::fits_kept(wo, rows) && c.head_dim.is_multiple_of(32) => {
            let kept = Some(gemv::kept(device)?);
            DecodeStep::stacked_decode_attention(model, index, step, &projections, kept)?;
            gemv::kept_matvec(wo, rows, Some(x), device)?
        }
        wo => {
            let attn = DecodeStep::stacked_decode_attention(model, index, step, &projections, None)?;
            (x + super::quantized_forward(wo, &attn)?)?
        }
    };
    gemv::norm_quantize(&x, &v.ffn_norm, eps)?;
    let gu = gemv::kept_matvec(gate_up, rows, None, device)?;
    gemv::gated_quantize(&gu, c.n_ff, c.activation == Activation::GeluTanh)?;
    Ok(Some(gemv::kept_matvec(down, rows, Some(&x), device)?))
}
