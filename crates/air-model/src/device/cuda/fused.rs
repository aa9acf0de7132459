//! A decode step's block with its small kernels fused (CUDA, every layer's projections stacked,
//! up to 8 sequences, families without QK-norm or post-norms). Profiled on the H200 (`ncu`, the
//! 8B shape), the ops between the matmuls were a third of the step, each a launch of 2.5-4.7 µs
//! for a few thousand values. Here RMSNorm and the quantization of its output for the next
//! matmul are one kernel, the residual add joins the second RMSNorm, and the gated activation
//! joins the down projection's quantization: 11 launches per layer instead of 16. The fused
//! kernels write into the buffer MMVQ reads ([`matmul::mmvq_scratch`]).

use super::kernels::{address, function};
use super::matmul;
use super::{DecodeStep, DeviceModel, LayerMatrices};
use crate::{Activation, ModelError};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Threads per row of the fused kernels.
const THREADS: u32 = 1024;

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
    let Some((qkv, gate_up)) = m.stacked() else { return Ok(None) };
    let (rows, k) = x.dims2()?;
    let plain = v.q_norm.is_none() && v.k_norm.is_none() && v.post_attn_norm.is_none() && v.post_ffn_norm.is_none();
    let fits = matmul::fits_mmvq_scratch(rows, k) && matmul::fits_mmvq_scratch(rows, c.n_ff);
    let kernels = [qkv, gate_up, m.w_down()].into_iter().all(matmul::has_mmvq);
    if !(plain && fits && kernels && x.dtype() == DType::F32) {
        return Ok(None);
    }
    let device = x.device().as_cuda_device()?;
    let eps = c.rms_norm_eps;
    let x = x.contiguous()?;
    norm_quantize(device, &x, None, &v.attn_norm, eps)?;
    let mut projections = matmul::mmvq_prequantized(qkv, rows, device)?;
    if let Some(b) = &v.b_qkv {
        projections = projections.broadcast_add(b)?;
    }
    let attn = DecodeStep::stacked_decode_attention(model, index, step, &projections)?;
    let out = super::quantized_forward(m.wo(), &attn)?;
    let x = norm_quantize(device, &x, Some(&out), &v.ffn_norm, eps)?.expect("the sum of a residual add");
    let gu = matmul::mmvq_prequantized(gate_up, rows, device)?;
    gated_quantize(device, &gu, c.n_ff, c.activation == Activation::GeluTanh)?;
    let down = matmul::mmvq_prequantized(m.w_down(), rows, device)?;
    Ok(Some((x + down)?))
}

/// RMSNorm of `x` (plus `y`, whose sum it returns) times `w`, quantized into the MMVQ buffer.
fn norm_quantize(
    device: &CudaDevice,
    x: &Tensor,
    y: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> Result<Option<Tensor>, ModelError> {
    let (rows, k) = x.dims2()?;
    // SAFETY: the kernel writes every element of the sum.
    let sum = y.map(|_| unsafe { device.alloc::<f32>(rows * k) }).transpose()?;
    let sum = sum.map(|s| {
        let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(s, device.clone()));
        Tensor::from_storage(storage, (rows, k), candle_core::op::BackpropOp::none(), false)
    });
    let y = y.map(Tensor::contiguous).transpose()?;
    let (y_addr, sum_addr) = match (&y, &sum) {
        (Some(y), Some(sum)) => (address(y)?, address(sum)?),
        _ => (0, 0),
    };
    let func = function(device, "air_rms_norm_q8_1")?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (x_addr, w_addr, q) = (address(x)?, address(&w.contiguous()?)?, matmul::mmvq_scratch(device)?);
    let (k_i, padded) = (k as i32, matmul::mmvq_padded(k) as i32);
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x_addr).arg(&y_addr).arg(&sum_addr).arg(&w_addr).arg(&eps).arg(&q).arg(&k_i).arg(&padded);
    // SAFETY: x (and y, sum) hold rows × k floats, w k; the MMVQ buffer holds rows × padded
    // values (checked by the caller).
    unsafe { launch.launch(cfg) }.w()?;
    Ok(sum)
}

/// The gated activation of stacked gate/up rows (rows, 2 ffn), quantized into the MMVQ buffer.
fn gated_quantize(device: &CudaDevice, gate_up: &Tensor, ffn: usize, gelu: bool) -> Result<(), ModelError> {
    let rows = gate_up.dim(0)?;
    let func = function(device, "air_gated_q8_1")?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (g, q) = (address(&gate_up.contiguous()?)?, matmul::mmvq_scratch(device)?);
    let (ffn_i, padded, gelu) = (ffn as i32, matmul::mmvq_padded(ffn) as i32, i32::from(gelu));
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&g).arg(&q).arg(&ffn_i).arg(&padded).arg(&gelu);
    // SAFETY: gate_up holds rows × 2 ffn floats; the MMVQ buffer rows × padded values.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}
