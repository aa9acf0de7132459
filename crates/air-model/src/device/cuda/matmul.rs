//! Quantized matmuls on CUDA with the CPU's activation rounding. candle's kernels quantize
//! activations to Q8_1 by their own rules (divide by the scale, round halves away from zero,
//! sum the unquantized values), so the GPU's integer dot products differ from the CPU's and a
//! model at the edge of a tie takes another token. For weights the CPU dots with Q8_0/Q8_1
//! activations (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), Air quantizes with the CPU's rounding
//! ([`super::kernels`]) and runs candle's MMVQ (up to 8 rows) or MMQ kernels on the result.
//! K-quants (Q8_K on the CPU, 256 values per scale) keep candle's path.

use super::kernels::function;
use crate::ModelError;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::ffi::c_void;
use std::sync::OnceLock;

/// candle pads quantized activation rows to this many values.
const ROW_PADDING: usize = 512;
/// MMVQ's largest batch.
const MMVQ_ROWS: usize = 8;
/// Bytes of a block_q8_1 (32 values) and of a block_q8_1_mmq (128 values).
const Q8_1_BYTES: usize = 36;
const Q8_1_MMQ_BYTES: usize = 144;
/// The kept MMVQ activation buffer: 8 rows of up to 65,536 values.
const MMVQ_SCRATCH_BYTES: usize = MMVQ_ROWS * 65_536 / 32 * Q8_1_BYTES;
/// MMQ's stream-k fixup buffer: up to 256 SMs × 128 × 128 f32 tiles.
const FIXUP_BYTES: usize = 256 * 128 * 128 * 4;

/// `x (rows, k) · Wᵀ` for a weight matrix on the device: Air's GEMV kernels
/// ([`super::gemv`]) where they apply, else Air's quantization and candle's kernels, else
/// candle's `QMatMul::forward`.
pub(crate) fn forward(m: &QMatMul, x: &Tensor) -> Result<Tensor, ModelError> {
    match m {
        QMatMul::QTensor(w) if super::gemv::applies(w, x) => {
            Ok(x.contiguous()?.apply_op1_no_bwd(&super::gemv::Gemv { w })?)
        }
        QMatMul::QTensor(w) if applies(w, x) => Ok(x.contiguous()?.apply_op1_no_bwd(&CpuRounded { w })?),
        _ => Ok(m.forward(x)?),
    }
}

fn applies(w: &QTensor, x: &Tensor) -> bool {
    let types = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0];
    matches!(x.device(), Device::Cuda(_))
        && x.dtype() == DType::F32
        && x.rank() == 2
        && types.contains(&w.dtype())
        && w.shape().dims2().is_ok_and(|(_, k)| x.dim(1).is_ok_and(|xk| xk == k && k % 32 == 0))
}

/// The matmul as a candle op on the activations (rows, k).
struct CpuRounded<'a> {
    w: &'a QTensor,
}

impl CustomOp1 for CpuRounded<'_> {
    fn name(&self) -> &'static str {
        "air-cpu-rounded-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("air-cpu-rounded-matmul runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("air-cpu-rounded-matmul needs contiguous activations")
        };
        let (rows, _) = layout.shape().dims2()?;
        let (n, k) = self.w.shape().dims2()?;
        let device = storage.device().clone();
        let x = storage.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: the matmul kernels write every element.
        let out = unsafe { device.alloc::<f32>(rows * n)? };
        let device_error = |e: ModelError| candle_core::Error::Msg(e.to_string());
        if rows <= MMVQ_ROWS {
            mmvq(&device, self.w, &x, rows, k, n, &out).map_err(device_error)?;
        } else {
            mmq(&device, self.w, &x, rows, k, n, &out).map_err(device_error)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from((rows, n))))
    }
}

/// Up to 8 rows: block_q8_1 activations and candle's MMVQ kernel.
fn mmvq(
    device: &CudaDevice,
    w: &QTensor,
    x: &cudarc::driver::CudaView<'_, f32>,
    rows: usize,
    k: usize,
    n: usize,
    out: &cudarc::driver::CudaSlice<f32>,
) -> Result<(), ModelError> {
    let k_padded = k.next_multiple_of(ROW_PADDING);
    let stream = device.cuda_stream();
    // A buffer kept across calls (no allocation per matmul, and the address a captured decode
    // graph holds stays valid), one of its own for unusually wide rows.
    let bytes = rows * k_padded / 32 * Q8_1_BYTES;
    static SCRATCH: OnceLock<CudaSlice<u8>> = OnceLock::new();
    let mut wide = None;
    let q = if bytes <= MMVQ_SCRATCH_BYTES {
        persistent(&SCRATCH, device, MMVQ_SCRATCH_BYTES)?
    } else {
        // SAFETY: the quantize kernel writes every block.
        let buffer = wide.insert(unsafe { device.alloc::<u8>(bytes)? });
        buffer.device_ptr(&stream).0
    };
    // SAFETY: x holds rows × k floats; q rows × k_padded / 32 blocks.
    unsafe { quantize_q8_1(device, x.device_ptr(&stream).0, q, rows, k, k_padded)? };
    let k_i = k as i32;
    let launcher = mmvq_launcher(w.dtype());
    let (q_addr, out_addr) = (q, out.device_ptr(&stream).0);
    // SAFETY: the weights hold n rows of k values in their type, q the quantized rows, out
    // rows × n floats; the arguments are those candle's fast MMVQ path passes.
    unsafe {
        launcher(
            w.device_ptr()? as *const c_void,
            q_addr as *const c_void,
            out_addr as *mut c_void,
            k_i,
            n as i32,
            (k_padded / 32) as i32,
            n as i32,
            rows as i32,
            stream.cu_stream() as *mut c_void,
        )
    };
    Ok(())
}

/// Quantizes `rows` rows of `k` floats at `x` into block_q8_1 rows of `k_padded` values (a
/// multiple of 256) at `q`, with the CPU's rounding (the layout of candle's MMVQ kernels).
///
/// # Safety
/// `x` and `q` are live device buffers of those sizes.
pub(super) unsafe fn quantize_q8_1(
    device: &CudaDevice,
    x: u64,
    q: u64,
    rows: usize,
    k: usize,
    k_padded: usize,
) -> Result<(), ModelError> {
    let cfg = LaunchConfig {
        grid_dim: ((k_padded / 256) as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = function(device, "air_quantize_q8_1")?;
    let (k_i, kp_i) = (k as i32, k_padded as i32);
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x).arg(&q).arg(&k_i).arg(&kp_i);
    // SAFETY: the caller's promise; the grid covers the blocks.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// More rows: block_q8_1_mmq activations and candle's MMQ kernel.
fn mmq(
    device: &CudaDevice,
    w: &QTensor,
    x: &cudarc::driver::CudaView<'_, f32>,
    rows: usize,
    k: usize,
    n: usize,
    out: &cudarc::driver::CudaSlice<f32>,
) -> Result<(), ModelError> {
    let k_padded = k.next_multiple_of(ROW_PADDING);
    let stream = device.cuda_stream();
    // Past the rows, MMQ reads up to 128 more columns of quantized activations, whose results
    // it does not write.
    // SAFETY: the quantize kernel writes every block of the rows.
    let q = unsafe { device.alloc::<u8>((rows + 128) * k_padded / 128 * Q8_1_MMQ_BYTES)? };
    let with_sums = i32::from(matches!(w.dtype(), GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_1));
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, (k_padded / 512) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = function(device, "air_quantize_q8_1_mmq")?;
    let (k_i, kp_i, rows_i) = (k as i32, k_padded as i32, rows as i32);
    let mut launch = stream.launch_builder(&func);
    launch.arg(x).arg(&q).arg(&k_i).arg(&kp_i).arg(&rows_i).arg(&with_sums);
    // SAFETY: x holds rows × k floats; q covers (rows + 128) × k_padded / 128 blocks.
    unsafe { launch.launch(cfg) }.w()?;
    static INFO: OnceLock<DeviceInfo> = OnceLock::new();
    let info = *INFO.get_or_init(|| DeviceInfo::of(device));
    static FIXUP: OnceLock<CudaSlice<u8>> = OnceLock::new();
    let fixup = persistent(&FIXUP, device, FIXUP_BYTES)?;
    let launcher = mmq_launcher(w.dtype());
    let (q_addr, out_addr) = (q.device_ptr(&stream).0, out.device_ptr(&stream).0);
    // SAFETY: as for MMVQ, with candle's fast MMQ path's arguments; the fixup buffer is device
    // memory of FIXUP_BYTES.
    unsafe {
        launcher(
            fixup as *mut c_void,
            w.device_ptr()? as *const c_void,
            q_addr as *const c_void,
            out_addr as *mut c_void,
            k as i64,
            n as i64,
            rows as i64,
            (k / 32) as i64,
            n as i64,
            info.cc,
            info.sms,
            info.shared_per_block,
            info.warp,
            stream.cu_stream() as *mut c_void,
        )
    };
    Ok(())
}

type MmvqLauncher =
    unsafe extern "C" fn(*const c_void, *const c_void, *mut c_void, i32, i32, i32, i32, i32, *mut c_void);

fn mmvq_launcher(dtype: GgmlDType) -> MmvqLauncher {
    use candle_kernels::ffi::*;
    match dtype {
        GgmlDType::Q4_0 => launch_mmvq_gguf_q4_0_f32_plain,
        GgmlDType::Q4_1 => launch_mmvq_gguf_q4_1_f32_plain,
        GgmlDType::Q5_0 => launch_mmvq_gguf_q5_0_f32_plain,
        GgmlDType::Q5_1 => launch_mmvq_gguf_q5_1_f32_plain,
        _ => launch_mmvq_gguf_q8_0_f32_plain,
    }
}

type MmqLauncher = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    *const c_void,
    *mut c_void,
    i64,
    i64,
    i64,
    i64,
    i64,
    i32,
    i32,
    i64,
    i32,
    *mut c_void,
);

fn mmq_launcher(dtype: GgmlDType) -> MmqLauncher {
    use candle_kernels::ffi::*;
    match dtype {
        GgmlDType::Q4_0 => launch_mmq_gguf_q4_0,
        GgmlDType::Q4_1 => launch_mmq_gguf_q4_1,
        GgmlDType::Q5_0 => launch_mmq_gguf_q5_0,
        GgmlDType::Q5_1 => launch_mmq_gguf_q5_1,
        _ => launch_mmq_gguf_q8_0,
    }
}

/// What the MMQ launcher asks of the device.
#[derive(Clone, Copy)]
struct DeviceInfo {
    /// Compute capability as 100 × major + 10 × minor.
    cc: i32,
    sms: i32,
    shared_per_block: i64,
    warp: i32,
}

impl DeviceInfo {
    fn of(device: &CudaDevice) -> Self {
        use cudarc::driver::{result::device::get_attribute, sys::CUdevice_attribute as A};
        let cu = device.cuda_stream().context().cu_device();
        // SAFETY: attribute queries of a live device.
        let get = |a| unsafe { get_attribute(cu, a) }.ok();
        Self {
            cc: get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(8) * 100
                + get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0) * 10,
            sms: get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(1),
            shared_per_block: get(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).unwrap_or(49152) as i64,
            warp: get(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE).unwrap_or(32),
        }
    }
}

/// The address of a device buffer of `bytes` allocated on first use and kept (one process
/// drives one device); calls use it one after the other on the device's stream. No lock: after
/// the first call it is a read of a set cell.
pub(super) fn persistent(
    slot: &'static OnceLock<CudaSlice<u8>>,
    device: &CudaDevice,
    bytes: usize,
) -> Result<u64, ModelError> {
    if slot.get().is_none() {
        // SAFETY: the kernels write what they read of their scratch buffers.
        let buffer = unsafe { device.alloc::<u8>(bytes) }?;
        // A concurrent first call may have set it; either buffer serves.
        let _ = slot.set(buffer);
    }
    let buffer = slot.get().expect("set above");
    Ok(buffer.device_ptr(buffer.stream()).0)
}
