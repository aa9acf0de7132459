//! Air's matrix-vector kernels for Q4_0 and Q4_K weights, the decode step's matmuls (up to 8
//! activation rows). candle's MMVQ kernels read Q4_0's 18-byte blocks two bytes at a time and
//! reached 2.27 of the H200's ~4.3 TB/s in a decode step (docs/benchmarks.md); these read every
//! weight byte with 16-byte coalesced loads:
//! - Q4_0: a warp per weight row stages up to 128 blocks (2,304 bytes) of its row in shared
//!   memory with 16-byte loads, then each lane dots whole blocks from there;
//! - Q4_K: 144-byte blocks keep 16-byte alignment, so each lane loads a block's header and 16 of
//!   its 128 quant bytes (two sub-blocks' halves) straight from global memory.
//!
//! Activations are quantized per 32 values with the CPU's Q8_0 rounding (int8 values and an f32
//! scale kept at f16 precision), the integer dot of a block is exact, and the blocks' sums are
//! added in f32. They apply where rows are whole multiples of 256 values and 16-byte aligned; other
//! shapes keep candle's kernels ([`super::matmul`]).

use super::matmul::persistent;
use crate::ModelError;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::OnceLock;

const SOURCE: &str = r#"
#define GEMV_WARPS 4
// Q4_0 blocks of a row one warp stages in shared memory per step (2,304 bytes).
#define Q4_0_STAGE 128

// Quantizes rows of k floats (k a multiple of 256) per 32 values as the CPU quantizes for Q8_0
// dot products: d = amax / 127 rounded to f16, q = x * (127 / amax) rounded half to even. Values
// to q (rows, k), scales to d (rows, k / 32). Grid (k / 256, rows), 256 threads.
extern "C" __global__ void air_quantize_q8_32(const float* __restrict__ x, signed char* __restrict__ q,
        float* __restrict__ d, int k) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const long long row = blockIdx.y;
    const float xi = x[row * k + i];
    float amax = fabsf(xi);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    const float inverse = amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
    q[row * k + i] = (signed char)__float2int_rn(__fmul_rn(xi, inverse));
    if (i % 32 == 0) d[row * (k / 32) + i / 32] = h2f(f2h(__fdiv_rn(amax, 127.0f)));
}

// Nibbles 0..15 of four bytes as signed q - 8.
__device__ __forceinline__ int q4_0_low(unsigned int q) { return __vsub4(q & 0x0F0F0F0F, 0x08080808); }
__device__ __forceinline__ int q4_0_high(unsigned int q) { return __vsub4((q >> 4) & 0x0F0F0F0F, 0x08080808); }

// Sums each lane's R partial results over the warp; lane 0 writes them to y (R, n) at `row`.
template <int R>
__device__ __forceinline__ void write_rows(float (&acc)[R], float* __restrict__ y, int n, int row) {
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x % 32 == 0) y[(size_t)r * n + row] = v;
    }
}

// y (R, n) = x (R, k) · Wᵀ for Q4_0 weights W (n rows of k / 32 blocks of 18 bytes: f16 d, 16
// bytes of nibbles, value i low in byte i, value 16 + i high). A warp per weight row.
template <int R>
__device__ __forceinline__ void gemv_q4_0(const unsigned char* __restrict__ w, const signed char* __restrict__ xq,
        const float* __restrict__ xd, float* __restrict__ y, int n, int k) {
    __shared__ __align__(16) unsigned char staged[GEMV_WARPS][Q4_0_STAGE * 18];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * GEMV_WARPS + warp;
    if (row >= n) return;
    const int nb = k / 32;
    const uint4* src = (const uint4*)(w + (size_t)row * nb * 18);
    unsigned char* s = staged[warp];
    float acc[R];
    #pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int b0 = 0; b0 < nb; b0 += Q4_0_STAGE) {
        const int blocks = min(Q4_0_STAGE, nb - b0);
        const int vectors = blocks * 18 / 16;
        const uint4* from = src + b0 * 18 / 16;
        uint4 v[5];
        #pragma unroll
        for (int i = 0; i < 5; i++) if (lane + 32 * i < vectors) v[i] = __ldg(from + lane + 32 * i);
        #pragma unroll
        for (int i = 0; i < 5; i++) if (lane + 32 * i < vectors) ((uint4*)s)[lane + 32 * i] = v[i];
        __syncwarp();
        for (int j = lane; j < blocks; j += 32) {
            // Block j starts 18 j bytes in: 4-byte aligned when j is even, 2 bytes past when odd.
            const unsigned int* word = (const unsigned int*)(s + 18 * j - 2 * (j & 1));
            const unsigned int w0 = word[0], w1 = word[1], w2 = word[2], w3 = word[3], w4 = word[4];
            const bool odd = j & 1;
            const float dw = h2f((unsigned short)(odd ? w0 >> 16 : w0 & 0xffff));
            const unsigned int q0 = odd ? w1 : __funnelshift_r(w0, w1, 16);
            const unsigned int q1 = odd ? w2 : __funnelshift_r(w1, w2, 16);
            const unsigned int q2 = odd ? w3 : __funnelshift_r(w2, w3, 16);
            const unsigned int q3 = odd ? w4 : __funnelshift_r(w3, w4, 16);
            const int b = b0 + j;
            #pragma unroll
            for (int r = 0; r < R; r++) {
                const int4* x = (const int4*)(xq + (size_t)r * k) + 2 * b;
                const int4 xa = __ldg(x), xb = __ldg(x + 1);
                int sum = __dp4a(q4_0_low(q0), xa.x, 0);
                sum = __dp4a(q4_0_low(q1), xa.y, sum);
                sum = __dp4a(q4_0_low(q2), xa.z, sum);
                sum = __dp4a(q4_0_low(q3), xa.w, sum);
                sum = __dp4a(q4_0_high(q0), xb.x, sum);
                sum = __dp4a(q4_0_high(q1), xb.y, sum);
                sum = __dp4a(q4_0_high(q2), xb.z, sum);
                sum = __dp4a(q4_0_high(q3), xb.w, sum);
                acc[r] += dw * __ldg(xd + (size_t)r * nb + b) * (float)sum;
            }
        }
        __syncwarp();
    }
    write_rows<R>(acc, y, n, row);
}

// Sub-block s's 6-bit scale and min of a Q4_K block whose 12 scale bytes are low8 (bytes 0-7)
// and high4 (bytes 8-11), packed as ggml packs them.
__device__ __forceinline__ void q4_k_scale_min(int s, unsigned long long low8, unsigned int high4, int& sc, int& m) {
    if (s < 4) {
        sc = (int)((low8 >> (8 * s)) & 63);
        m = (int)((low8 >> (8 * (s + 4))) & 63);
    } else {
        const unsigned int upper = (high4 >> (8 * (s - 4))) & 0xff;
        sc = (int)((upper & 0xF) | ((((low8 >> (8 * (s - 4))) & 0xff) >> 6) << 4));
        m = (int)((upper >> 4) | ((((low8 >> (8 * s)) & 0xff) >> 6) << 4));
    }
}

// y (R, n) = x (R, k) · Wᵀ for Q4_K weights (n rows of k / 256 blocks of 144 bytes: f16 d and
// dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of nibbles: sub-blocks 2j and
// 2j + 1 in the low and high nibbles of bytes 32j..32j+31). A warp per weight row; lane part
// p = lane % 8 takes bytes 16p..16p+15 of every fourth block's nibbles.
template <int R>
__device__ __forceinline__ void gemv_q4_k(const unsigned char* __restrict__ w, const signed char* __restrict__ xq,
        const float* __restrict__ xd, float* __restrict__ y, int n, int k) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * GEMV_WARPS + warp;
    if (row >= n) return;
    const int nb = k / 256;
    const unsigned char* wr = w + (size_t)row * nb * 144;
    const int part = lane % 8, s0 = part / 2 * 2, s1 = s0 + 1, offset = 16 * (part % 2);
    float acc[R];
    #pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    #pragma unroll 2
    for (int b = lane / 8; b < nb; b += 4) {
        const uint4 head = __ldg((const uint4*)(wr + (size_t)b * 144));
        const uint4 qv = __ldg((const uint4*)(wr + (size_t)b * 144 + 16) + part);
        const float d = h2f((unsigned short)(head.x & 0xffff)), dmin = h2f((unsigned short)(head.x >> 16));
        const unsigned long long low8 = head.y | ((unsigned long long)head.z << 32);
        int sc0, m0, sc1, m1;
        q4_k_scale_min(s0, low8, head.w, sc0, m0);
        q4_k_scale_min(s1, low8, head.w, sc1, m1);
        const float d0 = d * (float)sc0, d1 = d * (float)sc1, min0 = dmin * (float)m0, min1 = dmin * (float)m1;
        const int l0 = qv.x & 0x0F0F0F0F, l1 = qv.y & 0x0F0F0F0F, l2 = qv.z & 0x0F0F0F0F, l3 = qv.w & 0x0F0F0F0F;
        const int h0 = (qv.x >> 4) & 0x0F0F0F0F, h1 = (qv.y >> 4) & 0x0F0F0F0F;
        const int h2 = (qv.z >> 4) & 0x0F0F0F0F, h3 = (qv.w >> 4) & 0x0F0F0F0F;
        #pragma unroll
        for (int r = 0; r < R; r++) {
            const signed char* x = xq + (size_t)r * k + 256 * b + offset;
            const int4 xa = __ldg((const int4*)(x + 32 * s0)), xb = __ldg((const int4*)(x + 32 * s1));
            int sa = __dp4a(l0, xa.x, 0), sb = __dp4a(h0, xb.x, 0);
            sa = __dp4a(l1, xa.y, sa); sb = __dp4a(h1, xb.y, sb);
            sa = __dp4a(l2, xa.z, sa); sb = __dp4a(h2, xb.z, sb);
            sa = __dp4a(l3, xa.w, sa); sb = __dp4a(h3, xb.w, sb);
            int xa_sum = __dp4a(0x01010101, xa.x, 0), xb_sum = __dp4a(0x01010101, xb.x, 0);
            xa_sum = __dp4a(0x01010101, xa.y, xa_sum); xb_sum = __dp4a(0x01010101, xb.y, xb_sum);
            xa_sum = __dp4a(0x01010101, xa.z, xa_sum); xb_sum = __dp4a(0x01010101, xb.z, xb_sum);
            xa_sum = __dp4a(0x01010101, xa.w, xa_sum); xb_sum = __dp4a(0x01010101, xb.w, xb_sum);
            const float* scales = xd + (size_t)r * (k / 32) + 8 * b;
            acc[r] += __ldg(scales + s0) * (d0 * (float)sa - min0 * (float)xa_sum)
                    + __ldg(scales + s1) * (d1 * (float)sb - min1 * (float)xb_sum);
        }
    }
    write_rows<R>(acc, y, n, row);
}

#define AIR_GEMV(R) \
extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) air_gemv_q4_0_##R(const unsigned char* w, \
        const signed char* xq, const float* xd, float* y, int n, int k) { gemv_q4_0<R>(w, xq, xd, y, n, k); } \
extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) air_gemv_q4_k_##R(const unsigned char* w, \
        const signed char* xq, const float* xd, float* y, int n, int k) { gemv_q4_k<R>(w, xq, xd, y, n, k); }
AIR_GEMV(1) AIR_GEMV(2) AIR_GEMV(3) AIR_GEMV(4) AIR_GEMV(5) AIR_GEMV(6) AIR_GEMV(7) AIR_GEMV(8)
"#;

/// Warps per block: the `GEMV_WARPS` of the source (one weight row each).
const WARPS: usize = 4;
/// The most activation rows a launch takes.
pub(super) const MAX_ROWS: usize = 8;
/// The kept activation buffers cover rows of up to this many values; wider ones get their own.
const SCRATCH_VALUES: usize = MAX_ROWS * 65_536;
const MODULE: &str = "air_gemv";

/// Whether `x (rows, k) · Wᵀ` runs on these kernels: CUDA f32 activations of 1-8 rows, Q4_0 or
/// Q4_K weights with rows of a multiple of 256 values at a 16-byte aligned address.
pub(super) fn applies(w: &QTensor, x: &Tensor) -> bool {
    matches!(x.device(), Device::Cuda(_))
        && x.dtype() == DType::F32
        && x.dims2().is_ok_and(|(rows, k)| (1..=MAX_ROWS).contains(&rows) && k % 256 == 0)
        && matches!(w.dtype(), GgmlDType::Q4_0 | GgmlDType::Q4K)
        && w.shape().dims2().is_ok_and(|(_, k)| x.dim(1).is_ok_and(|xk| xk == k))
        && w.device_ptr().is_ok_and(|p| (p as usize).is_multiple_of(16))
}

/// The matmul as a candle op on the activations (rows, k).
pub(super) struct Gemv<'a> {
    pub w: &'a QTensor,
}

impl CustomOp1 for Gemv<'_> {
    fn name(&self) -> &'static str {
        "air-gemv"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("air-gemv runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("air-gemv needs contiguous activations")
        };
        let (rows, k) = layout.shape().dims2()?;
        let (n, _) = self.w.shape().dims2()?;
        let device = storage.device().clone();
        let x = storage.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: the kernel writes every element.
        let out = unsafe { device.alloc::<f32>(rows * n)? };
        let stream = device.cuda_stream();
        let (x_addr, out_addr) = (x.device_ptr(&stream).0, out.device_ptr(&stream).0);
        let weights = self.w.device_ptr()? as u64;
        // SAFETY: x holds rows × k floats, out rows × n, the weights n rows of k values in their
        // type (checked by `applies`).
        unsafe { launch(&device, self.w.dtype(), weights, x_addr, out_addr, rows, k, n) }
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from((rows, n))))
    }
}

/// Quantizes the activations at `x` (rows, k) and runs the kernel of `dtype` into `out` (rows, n).
///
/// # Safety
/// `x`, `weights` and `out` are live device buffers of those shapes; `k` is a multiple of 256.
#[allow(clippy::too_many_arguments)]
unsafe fn launch(
    device: &CudaDevice,
    dtype: GgmlDType,
    weights: u64,
    x: u64,
    out: u64,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ModelError> {
    let stream = device.cuda_stream();
    // Buffers kept across calls (no allocation per matmul, and the addresses a captured decode
    // graph holds stay valid), ones of their own for unusually wide rows.
    static VALUES: OnceLock<CudaSlice<u8>> = OnceLock::new();
    static SCALES: OnceLock<CudaSlice<u8>> = OnceLock::new();
    let mut wide = Vec::new();
    let (q, d) = if rows * k <= SCRATCH_VALUES {
        (persistent(&VALUES, device, SCRATCH_VALUES)?, persistent(&SCALES, device, SCRATCH_VALUES / 32 * 4)?)
    } else {
        for bytes in [rows * k, rows * k / 32 * 4] {
            // SAFETY: the quantize kernel writes every value and scale.
            wide.push(unsafe { device.alloc::<u8>(bytes)? });
        }
        (wide[0].device_ptr(&stream).0, wide[1].device_ptr(&stream).0)
    };
    let k_i = k as i32;
    let cfg =
        LaunchConfig { grid_dim: ((k / 256) as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let quantize = function(device, "air_quantize_q8_32")?;
    let mut launch = stream.launch_builder(&quantize);
    launch.arg(&x).arg(&q).arg(&d).arg(&k_i);
    // SAFETY: the caller's promise; q and d hold rows × k values and rows × k / 32 scales.
    unsafe { launch.launch(cfg) }.w()?;
    let kind = if dtype == GgmlDType::Q4_0 { "q4_0" } else { "q4_k" };
    let gemv = function(device, &format!("air_gemv_{kind}_{rows}"))?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_i = n as i32;
    let mut launch = stream.launch_builder(&gemv);
    launch.arg(&weights).arg(&q).arg(&d).arg(&out).arg(&n_i).arg(&k_i);
    // SAFETY: as above; the grid covers the n weight rows.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

fn ptx() -> Result<&'static str, ModelError> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        // dp4a needs compute capability 6.1; CUDA 13 compiles for 7.5 and later.
        let options = cudarc::nvrtc::CompileOptions { arch: Some("compute_75"), ..Default::default() };
        let source = format!("{}{SOURCE}", super::kernels::F16_HELPERS);
        cudarc::nvrtc::compile_ptx_with_opts(source, options).map(|p| p.to_src()).map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| ModelError::Device(format!("compiling Air's GEMV kernels: {e}")))
}

fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction, ModelError> {
    Ok(device.get_or_load_custom_func(name, MODULE, ptx()?)?.into_cuda_function())
}

#[cfg(test)]
mod tests {
    //! The kernels against the dot product of the dequantized weights with the activations
    //! quantized as the kernels quantize them. They need a GPU: without one each test returns at
    //! once (CI builds no CUDA); on the GPU machine `gpu-suite.sh unit` runs them.

    use super::*;
    use crate::device::cuda::exact::tests::data;
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4K, GgmlType};
    use candle_core::quantized::{QMatMul, QStorage};
    use std::borrow::Cow;

    /// Per 32 values: the scale (f16 precision) and the rounded values, as the quantize kernel.
    fn quantized(x: &[f32]) -> Vec<f64> {
        x.chunks(32)
            .flat_map(|block| {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let d = half::f16::from_f32(amax / 127.0).to_f64();
                block.iter().map(move |v| (v * inverse).round_ties_even() as f64 * d)
            })
            .collect()
    }

    fn check<T: GgmlType>(dtype: GgmlDType, dev: &Device) {
        // One block row; Q4_0's 128-block stages with a partial last one (448 blocks); every
        // batch size from 1 to 8.
        for (k, n, rows) in [(256, 37, 1), (4096, 100, 3), (14_336, 9, 8), (1024, 70, 2), (512, 5, 5)] {
            let mut blocks = vec![T::zeros(); n * k / T::BLCK_SIZE];
            T::from_float(&data(n * k, 7, 1.0), &mut blocks);
            let mut weights = vec![0f32; n * k];
            T::to_float(&blocks, &mut weights);
            let x = data(rows * k, 9, 4.0);
            let xq = quantized(&x);
            // SAFETY: the blocks are plain bytes (repr(C) structs of integers and halves).
            let bytes =
                unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(&blocks[..])) };
            let w = QTensor::new(QStorage::from_data(Cow::Borrowed(bytes), dev, dtype).unwrap(), (n, k)).unwrap();
            let x = Tensor::from_vec(x, (rows, k), dev).unwrap();
            assert!(applies(&w, &x), "{dtype:?} k {k} rows {rows}: the kernels apply");
            let got = super::super::matmul::forward(&QMatMul::QTensor(w.into()), &x).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for r in 0..rows {
                for i in 0..n {
                    let terms = weights[i * k..(i + 1) * k].iter().zip(&xq[r * k..(r + 1) * k]);
                    let (want, magnitude) =
                        terms.fold((0f64, 0f64), |(s, m), (&w, &x)| (s + w as f64 * x, m + (w as f64 * x).abs()));
                    let g = got[r * n + i] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * magnitude + 1e-6,
                        "{dtype:?} k {k} n {n} rows {rows}: row {r} column {i} is {g}, the dot {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemv_matches_the_dequantized_dot() {
        if super::super::device_count() == 0 {
            eprintln!("no CUDA device: skipped");
            return;
        }
        let dev = Device::new_cuda(0).unwrap();
        check::<BlockQ4_0>(GgmlDType::Q4_0, &dev);
        check::<BlockQ4K>(GgmlDType::Q4K, &dev);
    }
}
