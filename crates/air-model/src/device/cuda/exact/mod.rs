//! `--gpu-numerics cpu`: the GPU computes what the CPU pass computes, bit for bit. Small models
//! are chaotic at the last bit (docs/numerics.md): with llama.cpp's CUDA rounding, SmolLM2's
//! greedy text on the GPU parts from the CPU's within a few tokens. Here every operation of the
//! CPU pass has a CUDA kernel doing the same floating-point operations in the same order
//! ([`kernels.cu`](kernels.cu)): the block dot products' 8 f32 lanes and their horizontal sum
//! (and, for K-quant rows of calls of 8 rows or more, ggml's batched sums), RMSNorm's f64 sum,
//! RoPE's fused multiply-adds, attention's generation path (f16 query, ggml's dot order,
//! glibc's `expf`, the f16 value accumulator) and, for calls of 64 rows or more, its prompt path
//! (f32 tiles of 64 positions), ggml's exponential in SiLU and its GELU table. A row takes the
//! arithmetic the host pass gives it, chosen by the rows of its sequence's call as there.
//!
//! It is slower than the default pass: no CUDA graphs, one warp per query row and head walking
//! the cache position by position, a group of threads per output of every matmul.

mod pass;

pub(in crate::device) use pass::forward;

use super::kernels::address;
use super::matmul::quantize_q8_1;
use crate::rope::{Rope, RopeTables};
use crate::{Activation, ModelConfig, ModelError};
use air_gguf::{GgufFile, TensorType};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use std::sync::OnceLock;

const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "air_exact";
/// Activation rows are quantized in rows padded to this many values.
const ROW_PADDING: usize = 256;
/// Bytes of a block_q8_1 (32 values) and of a block_q8_K (256 values).
const Q8_1_BYTES: usize = 36;
const Q8_K_BYTES: usize = 292;
/// Widest head the attention kernel takes (32 lanes × 8 values).
const MAX_HEAD_DIM: usize = 256;

/// Launches kernel `$name` of the exact module on `$device`'s stream with `$cfg` and the
/// arguments (each evaluated into a binding of its own, which the launch borrows); the caller
/// states the safety of the arguments.
macro_rules! launch {
    ($device:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = function($device, $name)?;
        let stream = $device.cuda_stream();
        launch!(@bind stream, func, $cfg, [] $($arg,)+)
    }};
    (@bind $stream:ident, $func:ident, $cfg:expr, [$($bound:ident)*] $head:expr, $($rest:expr,)*) => {{
        let value = $head;
        launch!(@bind $stream, $func, $cfg, [$($bound)* value] $($rest,)*)
    }};
    (@bind $stream:ident, $func:ident, $cfg:expr, [$($bound:ident)*]) => {{
        let mut builder = $stream.launch_builder(&$func);
        $(builder.arg(&$bound);)*
        // SAFETY: each caller passes live device buffers of the sizes its kernel indexes.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

fn ptx() -> Result<&'static str, ModelError> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    // No contraction: the kernels write out every fused multiply-add the CPU has.
    let options = cudarc::nvrtc::CompileOptions { fmad: Some(false), ..Default::default() };
    super::kernels::compiled(&PTX, SOURCE, options, "exact")
}

fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction, ModelError> {
    Ok(device.get_or_load_custom_func(name, MODULE, ptx()?)?.into_cuda_function())
}

/// What the exact pass keeps for a model: the GELU table, for the families that gate by GELU.
pub(in crate::device) struct ExactNumerics {
    gelu_table: Option<Tensor>,
}

impl ExactNumerics {
    /// For the model in `file`, or why the exact pass cannot run it (a weight type or head
    /// size its kernels do not cover).
    pub(in crate::device) fn new(file: &GgufFile, config: &ModelConfig, device: &Device) -> Result<Self, ModelError> {
        if !device.is_cuda() {
            return Err(ModelError::Device("the CPU's numerics on a GPU need a CUDA device".into()));
        }
        let covered = [
            TensorType::Q4_0,
            TensorType::Q4_1,
            TensorType::Q5_0,
            TensorType::Q5_1,
            TensorType::Q8_0,
            TensorType::Q4_K,
            TensorType::Q6_K,
        ];
        let output = if file.tensor("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
        for t in file.tensors() {
            let matrix = t.name == output
                || (t.name.starts_with("blk.")
                    && crate::device::matrices::MATRIX_NAMES.iter().any(|m| t.name.ends_with(&format!(".{m}.weight"))));
            if matrix && !covered.contains(&t.ty) {
                return Err(ModelError::Device(format!(
                    "the CPU's numerics on a GPU cover Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K weights; {} is {:?}",
                    t.name, t.ty
                )));
            }
        }
        let (d, heads, kv_heads) = (config.head_dim, config.n_head, config.n_head_kv);
        if !d.is_multiple_of(32) || d > MAX_HEAD_DIM || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ModelError::Device(format!(
                "the CPU's numerics on a GPU need heads of a multiple of 32 dimensions up to {MAX_HEAD_DIM} (this model: {d})"
            )));
        }
        let gelu_table = match config.activation {
            Activation::GeluTanh => Some(Tensor::from_slice(crate::ops::gelu_f16_table(), 65_536, device)?),
            Activation::Silu => None,
        };
        Ok(Self { gelu_table })
    }
}

/// One thread per value: the launch shape of the elementwise kernels.
fn elementwise(total: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (total.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// An f32 tensor of `shape` on `device` for a kernel to fill.
fn output(shape: impl Into<candle_core::Shape>, device: &Device) -> Result<Tensor, ModelError> {
    Ok(Tensor::zeros(shape, DType::F32, device)?)
}

/// RMSNorm of each row of `x` (rows, d) times `w` (d), as the CPU's `ops::rms_norm`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor, ModelError> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (rows, d) = x.dims2()?;
    if w.dims1()? != d {
        return Err(ModelError::Config(format!("RMSNorm weight of {} values for rows of {d}", w.dims1()?)));
    }
    let y = output((rows, d), x.device())?;
    if rows > 0 {
        let device = x.device().as_cuda_device()?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(device, "air_x_rms_norm", cfg, address(&x)?, address(&w)?, address(&y)?, d as i32, eps);
    }
    Ok(y)
}

/// `x (rows, k) · Wᵀ` with the CPU's one-row dot products (`block_dot`), or, for K-quant
/// weights and rows flagged in `batched` (a u32 per row on the device), ggml's batched kernel's:
/// activations quantized by the CPU's rules (Q8_0/Q8_1 for the 32-value types, Q8_K for the
/// K-quants), the dots' f32 lanes and sums in ggml's order.
pub(crate) fn matmul(m: &QMatMul, x: &Tensor, batched: &Tensor) -> Result<Tensor, ModelError> {
    let QMatMul::QTensor(w) = m else {
        return Err(ModelError::Device("the exact matmul needs a quantized weight matrix".into()));
    };
    let dtype = w.dtype();
    let (kernel, block) = match dtype {
        GgmlDType::Q4_0 => ("air_x_matmul_q4_0", 32),
        GgmlDType::Q4_1 => ("air_x_matmul_q4_1", 32),
        GgmlDType::Q5_0 => ("air_x_matmul_q5_0", 32),
        GgmlDType::Q5_1 => ("air_x_matmul_q5_1", 32),
        GgmlDType::Q8_0 => ("air_x_matmul_q8_0", 32),
        GgmlDType::Q4K => ("air_x_matmul_q4_k", 256),
        GgmlDType::Q6K => ("air_x_matmul_q6_k", 256),
        other => return Err(ModelError::Device(format!("the exact matmul does not cover {other:?} weights"))),
    };
    let (n, k) = w.shape().dims2()?;
    let x = x.contiguous()?;
    let (rows, xk) = x.dims2()?;
    if xk != k || !k.is_multiple_of(block) {
        return Err(ModelError::Config(format!("matmul of rows of {xk} values with a {dtype:?} matrix of ({n}, {k})")));
    }
    if batched.dims1()? != rows || batched.dtype() != DType::U32 {
        return Err(ModelError::Config(format!("{} matmul flags for {rows} rows", batched.elem_count())));
    }
    let y = output((rows, n), x.device())?;
    if rows == 0 {
        return Ok(y);
    }
    let device = x.device().as_cuda_device()?;
    let stream = device.cuda_stream();
    let cfg = LaunchConfig {
        grid_dim: ((n * 8).div_ceil(256) as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (w_addr, y_addr) = (w.device_ptr()? as u64, address(&y)?);
    if block == 256 {
        // SAFETY: the quantize kernel writes every block before the matmul reads it.
        let q = unsafe { device.alloc::<u8>(rows * k / 256 * Q8_K_BYTES) }?;
        let q_addr = cudarc::driver::DevicePtr::device_ptr(&q, &stream).0;
        let quantize =
            LaunchConfig { grid_dim: ((k / 256) as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // x holds rows × k floats, q rows × k / 256 blocks.
        launch!(device, "air_x_quantize_q8_k", quantize, address(&x)?, q_addr, k as i32);
        // w holds n rows of k values in its type, q the quantized rows, the flags rows u32, y
        // rows × n floats.
        launch!(device, kernel, cfg, w_addr, q_addr, address(batched)?, y_addr, k as i32, n as i32);
    } else {
        let k_padded = k.next_multiple_of(ROW_PADDING);
        // SAFETY: the quantize kernel writes every block before the matmul reads it.
        let q = unsafe { device.alloc::<u8>(rows * k_padded / 32 * Q8_1_BYTES) }?;
        let q_addr = cudarc::driver::DevicePtr::device_ptr(&q, &stream).0;
        // SAFETY: x holds rows × k floats, q rows × k_padded / 32 blocks.
        unsafe { quantize_q8_1(device, address(&x)?, q_addr, rows, k, k_padded)? };
        // w holds n rows of k values in its type, q the quantized rows, y rows × n floats.
        launch!(device, kernel, cfg, w_addr, q_addr, y_addr, k as i32, n as i32, k_padded as i32);
    }
    Ok(y)
}

/// One u32 flag per row on `device`: whether the row's matmuls take the batched arithmetic.
pub(crate) fn row_flags(flags: &[bool], device: &Device) -> Result<Tensor, ModelError> {
    let values: Vec<u32> = flags.iter().map(|&f| u32::from(f)).collect();
    Ok(Tensor::from_vec(values, flags.len(), device)?)
}

/// The gated activation `act(gate) · up` of the CPU's `ops::swiglu` / `ops::geglu`.
fn gated(gate: &Tensor, up: &Tensor, gelu_table: Option<&Tensor>) -> Result<Tensor, ModelError> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let (rows, ffn) = gate.dims2()?;
    if up.dims2()? != (rows, ffn) {
        return Err(ModelError::Config("gate and up projections of different shapes".into()));
    }
    let y = output((rows, ffn), gate.device())?;
    let total = rows * ffn;
    if total == 0 {
        return Ok(y);
    }
    let device = gate.device().as_cuda_device()?;
    let (g, u, out) = (address(&gate)?, address(&up)?, address(&y)?);
    // gate, up and y hold rows × ffn floats; the table 65,536 halves.
    match gelu_table {
        Some(table) => launch!(device, "air_x_geglu", elementwise(total), g, u, address(table)?, out, total as i64),
        None => launch!(device, "air_x_swiglu", elementwise(total), g, u, out, ffn as i32, total as i64),
    }
    Ok(y)
}

/// One sequence's rows in an exact pass: where they sit among the pass's rows, their positions,
/// their RoPE tables, and the sequence's cache.
pub(crate) struct SequenceRows<'a> {
    pub row: usize,
    pub n: usize,
    pub start: usize,
    pub global: RopeTables,
    pub local: Option<RopeTables>,
    /// The layer caches, (keys, values) per layer, f16 (kv_heads, capacity, head_dim).
    pub cache: &'a crate::KvCache,
    /// Whether the rows take attention's prompt path (the CPU's for calls of
    /// [`crate::F32_QUERY_ROWS`] rows or more) rather than its generation path.
    pub tiled: bool,
}

/// What the attention of one layer needs to know about it.
pub(crate) struct LayerAttention<'a> {
    pub index: usize,
    pub config: &'a ModelConfig,
    pub rope: &'a Rope,
    /// Whether the layer takes the sliding-window RoPE tables.
    pub local: bool,
    pub window: Option<usize>,
}

/// Attention of one layer for every sequence: RoPE, the append of keys and values to each
/// cache, and each row's attention over its cached positions, as the CPU's prompt or generation
/// path.
/// `q` is (rows, heads · dim), `k` and `v` (rows, kv_heads · dim); returns (rows, heads · dim).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &[SequenceRows<'_>],
    layer: LayerAttention<'_>,
) -> Result<Tensor, ModelError> {
    let c = layer.config;
    let (heads, kv_heads, dim) = (c.n_head, c.n_head_kv, c.head_dim);
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let rows = q.dim(0)?;
    let rotated = output((rows, heads * dim), q.device())?;
    let out = output((rows, heads * dim), q.device())?;
    let device = q.device().as_cuda_device()?;
    let (q_scale, scale) = c.attention_scales();
    let (rope_dim, interleaved) = layer.rope.layout();
    let window = layer.window.map_or(0, |w| w as i32);
    let f32_offset = |base: u64, row: usize, width: usize| base + (row * width * 4) as u64;
    let (q_addr, k_addr, v_addr) = (address(&q)?, address(&k)?, address(&v)?);
    let (rotated_addr, out_addr) = (address(&rotated)?, address(&out)?);
    for s in seqs.iter().filter(|s| s.n > 0) {
        let (keys, values) = s
            .cache
            .device_layer(layer.index)
            .ok_or_else(|| ModelError::Config("this KV cache was made for a model on another device".into()))?;
        let capacity = keys.dim(1)?;
        let tables = match (&s.local, layer.local) {
            (Some(local), true) => local,
            _ => &s.global,
        };
        let (cos, sin) = tables.cos_sin();
        let (kc, vc) = (address(keys)?, address(values)?);
        let rope = LaunchConfig {
            grid_dim: ((heads + 2 * kv_heads) as u32, s.n as u32, 1),
            block_dim: (dim.min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // The sequence's rows of q, k, v and of the outputs; tables of n × rope_dim / 2; caches
        // of kv_heads × capacity × dim halves, of which positions start..start + n are written.
        launch!(
            device,
            "air_x_rope_kv",
            rope,
            f32_offset(q_addr, s.row, heads * dim),
            f32_offset(k_addr, s.row, kv_heads * dim),
            f32_offset(v_addr, s.row, kv_heads * dim),
            address(cos)?,
            address(sin)?,
            rope_dim as i32,
            i32::from(interleaved),
            q_scale,
            f32_offset(rotated_addr, s.row, heads * dim),
            kc,
            vc,
            capacity as i32,
            s.start as i32,
            heads as i32,
            kv_heads as i32,
            dim as i32,
        );
        let cfg = LaunchConfig { grid_dim: (heads as u32, s.n as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let kernel = if s.tiled { "air_x_attention_tiled" } else { "air_x_attention" };
        launch!(
            device,
            kernel,
            cfg,
            f32_offset(rotated_addr, s.row, heads * dim),
            kc,
            vc,
            capacity as i32,
            s.start as i32,
            heads as i32,
            kv_heads as i32,
            dim as i32,
            scale,
            window,
            f32_offset(out_addr, s.row, heads * dim),
        );
    }
    Ok(out)
}

#[cfg(test)]
pub(in crate::device) mod tests;
