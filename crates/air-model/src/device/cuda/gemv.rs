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
//! shapes keep candle's kernels ([`super::matmul`]). The fused decode block ([`super::fused`])
//! quantizes into the kept activation buffers with RMSNorm, attention or the gated activation and
//! lets the kernels add the residual as they write.
//!
//! Tried and slower on the H200 (docs/benchmarks.md): double-buffering each warp's row chunks in
//! registers, and groups of four rows per warp sharing each activation load.

use super::kernels::address;
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

// Rows of k floats (k a multiple of 256). Grid (k / 256, rows), 256 threads.
extern "C" __global__ void air_quantize_q8_32(const float* __restrict__ x, signed char* __restrict__ q,
        float* __restrict__ d, int k) {
    const long long i = (long long)blockIdx.y * k + blockIdx.x * blockDim.x + threadIdx.x;
    quantize_warp(x[i], q, d, i);
}

// The gated activation act(gate) * up of rows of stacked gate and up values (rows, 2 ffn),
// quantized (rows, ffn); act is SiLU, or GELU (tanh) when `gelu`. Grid (ffn / 256, rows), 256
// threads.
extern "C" __global__ void air_gated_quantize(const float* __restrict__ gate_up, signed char* __restrict__ q,
        float* __restrict__ d, int ffn, int gelu) {
    const long long row = blockIdx.y;
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const float g = gate_up[row * 2 * ffn + col], u = gate_up[row * 2 * ffn + ffn + col];
    const float a = gelu ? 0.5f * g * (1.f + tanhf(0.7978845608f * g * (1.f + 0.044715f * g * g)))
                         : g / (1.f + expf(-g));
    quantize_warp(a * u, q, d, row * ffn + col);
}

// RMSNorm of rows of k floats (k a multiple of 256, at most 8 · NORM_ITERATIONS · blockDim.x)
// times w, quantized. A block per row; each thread holds 8 values (and their weights) per
// iteration in registers, so x is read once; 4 threads hold a block of 32.
#define NORM_ITERATIONS 4
extern "C" __global__ void air_norm_quantize(const float* __restrict__ x, const float* __restrict__ w, float eps,
        signed char* __restrict__ q, float* __restrict__ d, int k) {
    __shared__ float sums[32];
    __shared__ float total;
    const long long row = blockIdx.x;
    const float* xr = x + row * k;
    const int stride = blockDim.x * 8;
    float4 xa[NORM_ITERATIONS], xb[NORM_ITERATIONS], wa[NORM_ITERATIONS], wb[NORM_ITERATIONS];
    float squares = 0.0f;
    // A warp's 256 values are all in the row or all past it (k and the stride are multiples of
    // 256), so whole warps take part in the shuffles below.
    #pragma unroll
    for (int it = 0; it < NORM_ITERATIONS; it++) {
        const int c = threadIdx.x * 8 + it * stride;
        if (c < k) {
            xa[it] = *(const float4*)(xr + c);
            xb[it] = *(const float4*)(xr + c + 4);
            wa[it] = *(const float4*)(w + c);
            wb[it] = *(const float4*)(w + c + 4);
            const float4 a = xa[it], b = xb[it];
            squares += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
        }
    }
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffff, squares, o);
    if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = squares;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < blockDim.x / 32 ? sums[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
        if (threadIdx.x == 0) total = t;
    }
    __syncthreads();
    const float scale = 1.0f / sqrtf(total / (float)k + eps);
    #pragma unroll
    for (int it = 0; it < NORM_ITERATIONS; it++) {
        const int c = threadIdx.x * 8 + it * stride;
        if (c >= k) break;
        const float4 a = xa[it], b = xb[it], ga = wa[it], gb = wb[it];
        const float v[8] = { a.x * scale * ga.x, a.y * scale * ga.y, a.z * scale * ga.z, a.w * scale * ga.w,
                             b.x * scale * gb.x, b.y * scale * gb.y, b.z * scale * gb.z, b.w * scale * gb.w };
        float amax = 0.0f;
        #pragma unroll
        for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 2));
        const float inverse = q8_inverse(amax);
        unsigned int packed[2] = { 0, 0 };
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            packed[i / 4] |= ((unsigned int)__float2int_rn(__fmul_rn(v[i], inverse)) & 0xff) << (8 * (i % 4));
        }
        *(uint2*)(q + row * k + c) = make_uint2(packed[0], packed[1]);
        if (threadIdx.x % 4 == 0) d[row * (k / 32) + c / 32] = h2f(f2h(__fdiv_rn(amax, 127.0f)));
    }
}

// Nibbles 0..15 of four bytes as signed q - 8.
__device__ __forceinline__ int q4_0_low(unsigned int q) { return __vsub4(q & 0x0F0F0F0F, 0x08080808); }
__device__ __forceinline__ int q4_0_high(unsigned int q) { return __vsub4((q >> 4) & 0x0F0F0F0F, 0x08080808); }

// Sums each lane's R partial results over the warp; lane 0 writes them to y (R, n) at `row`,
// plus the residual's value there when there is one.
template <int R>
__device__ __forceinline__ void write_rows(float (&acc)[R], const float* __restrict__ residual, float* __restrict__ y,
        int n, int row) {
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x % 32 == 0) y[(size_t)r * n + row] = residual ? residual[(size_t)r * n + row] + v : v;
    }
}

// y (R, n) = x (R, k) · Wᵀ for Q4_0 weights W (n rows of k / 32 blocks of 18 bytes: f16 d, 16
// bytes of nibbles, value i low in byte i, value 16 + i high). A warp per weight row.
template <int R>
__device__ __forceinline__ void gemv_q4_0(const unsigned char* __restrict__ w, const signed char* __restrict__ xq,
        const float* __restrict__ xd, const float* __restrict__ residual, float* __restrict__ y, int n, int k) {
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
    write_rows<R>(acc, residual, y, n, row);
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
        const float* __restrict__ xd, const float* __restrict__ residual, float* __restrict__ y, int n, int k) {
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
    write_rows<R>(acc, residual, y, n, row);
}

// y = x · Wᵀ (+ residual, when not null).
#define AIR_GEMV(R) \
extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) air_gemv_q4_0_##R(const unsigned char* w, \
        const signed char* xq, const float* xd, const float* residual, float* y, int n, int k) { \
    gemv_q4_0<R>(w, xq, xd, residual, y, n, k); } \
extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS) air_gemv_q4_k_##R(const unsigned char* w, \
        const signed char* xq, const float* xd, const float* residual, float* y, int n, int k) { \
    gemv_q4_k<R>(w, xq, xd, residual, y, n, k); }
AIR_GEMV(1) AIR_GEMV(2) AIR_GEMV(3) AIR_GEMV(4) AIR_GEMV(5) AIR_GEMV(6) AIR_GEMV(7) AIR_GEMV(8)
"#;

/// Warps per block: the `GEMV_WARPS` of the source (one weight row each).
const WARPS: usize = 4;
/// The most activation rows a launch takes.
const MAX_ROWS: usize = 8;
/// The kept activation buffers cover rows of up to this many values; wider ones get their own
/// (the fused decode block needs its rows to fit).
const SCRATCH_VALUES: usize = MAX_ROWS * 65_536;
const MODULE: &str = "air_gemv";
/// The widest row [`norm_quantize`] takes: 1,024 threads × 8 values × the source's
/// `NORM_ITERATIONS`.
const NORM_WIDTH: usize = 1024 * 8 * 4;

/// Whether `x (rows, k) · Wᵀ` runs on these kernels: CUDA f32 activations of 1-8 rows, Q4_0 or
/// Q4_K weights with rows of a multiple of 256 values at a 16-byte aligned address.
pub(super) fn applies(w: &QTensor, x: &Tensor) -> bool {
    matches!(x.device(), Device::Cuda(_))
        && x.dtype() == DType::F32
        && x.dims2().is_ok_and(|(rows, k)| weights_fit(w, rows, k))
}

/// Whether weights `w` take `rows` activation rows of `k` values on these kernels.
fn weights_fit(w: &QTensor, rows: usize, k: usize) -> bool {
    (1..=MAX_ROWS).contains(&rows)
        && k.is_multiple_of(256)
        && matches!(w.dtype(), GgmlDType::Q4_0 | GgmlDType::Q4K)
        && w.shape().dims2().is_ok_and(|(_, wk)| wk == k)
        && w.device_ptr().is_ok_and(|p| (p as usize).is_multiple_of(16))
}

/// Whether the fused decode block can run `w` on `rows` activation rows quantized into the kept
/// buffers.
pub(super) fn fits_kept(w: &QTensor, rows: usize) -> bool {
    w.shape().dims2().is_ok_and(|(_, k)| rows * k <= SCRATCH_VALUES && weights_fit(w, rows, k))
}

/// Whether [`norm_quantize`] takes `x` (rows, k) and the norm's weights `w`: contiguous, at
/// 16-byte aligned addresses, k a multiple of 256 and at most [`NORM_WIDTH`].
pub(super) fn norm_applies(x: &Tensor, w: &Tensor) -> bool {
    let aligned = |t: &Tensor| t.is_contiguous() && address(t).is_ok_and(|a| a.is_multiple_of(16));
    x.dims2().is_ok_and(|(rows, k)| k.is_multiple_of(256) && k <= NORM_WIDTH && rows * k <= SCRATCH_VALUES)
        && aligned(x)
        && aligned(w)
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
        let device_error = |e: ModelError| candle_core::Error::Msg(e.to_string());
        let mut wide = Vec::new();
        let (q, d) = if rows * k <= SCRATCH_VALUES {
            kept(&device).map_err(device_error)?
        } else {
            for bytes in [rows * k, rows * k / 32 * 4] {
                // SAFETY: the quantize kernel writes every value and scale.
                wide.push(unsafe { device.alloc::<u8>(bytes)? });
            }
            (wide[0].device_ptr(&stream).0, wide[1].device_ptr(&stream).0)
        };
        // SAFETY: x holds rows × k floats, q and d the quantized rows, out rows × n floats; the
        // weights hold n rows of k values in their type (checked by `applies`).
        unsafe {
            quantize(&device, x_addr, q, d, rows, k).map_err(device_error)?;
            matvec(&device, self.w, q, d, 0, out_addr, rows).map_err(device_error)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from((rows, n))))
    }
}

/// The kept buffers of quantized activations (values, scales): addresses a captured decode
/// graph holds stay valid, and the fused decode block passes activations through them.
pub(super) fn kept(device: &CudaDevice) -> Result<(u64, u64), ModelError> {
    static VALUES: OnceLock<CudaSlice<u8>> = OnceLock::new();
    static SCALES: OnceLock<CudaSlice<u8>> = OnceLock::new();
    Ok((persistent(&VALUES, device, SCRATCH_VALUES)?, persistent(&SCALES, device, SCRATCH_VALUES / 32 * 4)?))
}

/// Quantizes `rows` rows of `k` floats at `x` into values at `q` and scales at `d`.
///
/// # Safety
/// `x`, `q` and `d` are live device buffers of those sizes; `k` is a multiple of 256.
unsafe fn quantize(device: &CudaDevice, x: u64, q: u64, d: u64, rows: usize, k: usize) -> Result<(), ModelError> {
    let k_i = k as i32;
    let cfg =
        LaunchConfig { grid_dim: ((k / 256) as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let func = function(device, "air_quantize_q8_32")?;
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x).arg(&q).arg(&d).arg(&k_i);
    // SAFETY: the caller's promise; the grid covers the values.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// `out (rows, n) = x · Wᵀ` (plus the rows at `residual` unless it is 0), `x` quantized at `q`
/// and `d`.
///
/// # Safety
/// `q`, `d` hold `rows` quantized rows of W's width, `out` (and `residual`) rows × n floats;
/// [`weights_fit`] holds.
unsafe fn matvec(
    device: &CudaDevice,
    w: &QTensor,
    q: u64,
    d: u64,
    residual: u64,
    out: u64,
    rows: usize,
) -> Result<(), ModelError> {
    let (n, k) = w.shape().dims2()?;
    let kind = if w.dtype() == GgmlDType::Q4_0 { "q4_0" } else { "q4_k" };
    let gemv = function(device, &format!("air_gemv_{kind}_{rows}"))?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let weights = w.device_ptr()? as u64;
    let (n_i, k_i) = (n as i32, k as i32);
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&gemv);
    launch.arg(&weights).arg(&q).arg(&d).arg(&residual).arg(&out).arg(&n_i).arg(&k_i);
    // SAFETY: the caller's promise; the grid covers the n weight rows.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// A new (rows, n) f32 tensor on `device` whose every element the caller's kernel writes.
fn output(device: &CudaDevice, rows: usize, n: usize) -> Result<(Tensor, u64), ModelError> {
    // SAFETY: the caller's kernel writes every element.
    let out = unsafe { device.alloc::<f32>(rows * n)? };
    let address = out.device_ptr(&device.cuda_stream()).0;
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device.clone()));
    Ok((Tensor::from_storage(storage, (rows, n), candle_core::op::BackpropOp::none(), false), address))
}

/// RMSNorm of the rows of `x` (rows, k) times `w`, quantized into the kept buffers for
/// [`kept_matvec`]; [`norm_applies`] holds.
pub(super) fn norm_quantize(x: &Tensor, w: &Tensor, eps: f32) -> Result<(), ModelError> {
    let (rows, k) = x.dims2()?;
    if !norm_applies(x, w) {
        return Err(ModelError::Device(format!("no fused RMSNorm for ({rows}, {k}) rows at this alignment")));
    }
    let device = x.device().as_cuda_device()?;
    let (q, d) = kept(device)?;
    let func = function(device, "air_norm_quantize")?;
    // 8 values a thread, at most 4 times (k / 32 threads), and at least 256 threads.
    let threads = (k / 32).next_multiple_of(32).clamp(256, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (x_addr, w_addr, k_i) = (address(x)?, address(w)?, k as i32);
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x_addr).arg(&w_addr).arg(&eps).arg(&q).arg(&d).arg(&k_i);
    // SAFETY: x holds rows × k floats and w k, 16-byte aligned; the kept buffers hold rows × k
    // values (checked above).
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// The gated activation of stacked gate/up rows (rows, 2 ffn), quantized into the kept buffers.
pub(super) fn gated_quantize(gate_up: &Tensor, ffn: usize, gelu: bool) -> Result<(), ModelError> {
    let rows = gate_up.dim(0)?;
    if !(ffn.is_multiple_of(256) && rows * ffn <= SCRATCH_VALUES && gate_up.dims2()? == (rows, 2 * ffn)) {
        return Err(ModelError::Device(format!("no fused gated activation for {rows} rows of {ffn}")));
    }
    let gate_up = gate_up.contiguous()?;
    let device = gate_up.device().as_cuda_device()?;
    let (q, d) = kept(device)?;
    let func = function(device, "air_gated_quantize")?;
    let cfg =
        LaunchConfig { grid_dim: ((ffn / 256) as u32, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (g, ffn_i, gelu) = (address(&gate_up)?, ffn as i32, i32::from(gelu));
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&g).arg(&q).arg(&d).arg(&ffn_i).arg(&gelu);
    // SAFETY: gate_up holds rows × 2 ffn floats; the kept buffers rows × ffn values.
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// `x · Wᵀ` for the `rows` activation rows in the kept buffers (plus `residual` (rows, n) when
/// given); [`fits_kept`] holds for `w`.
pub(super) fn kept_matvec(
    w: &QTensor,
    rows: usize,
    residual: Option<&Tensor>,
    device: &CudaDevice,
) -> Result<Tensor, ModelError> {
    let (n, _) = w.shape().dims2()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let residual_addr = match &residual {
        Some(r) if r.dims2()? == (rows, n) => address(r)?,
        Some(r) => return Err(ModelError::Device(format!("a residual of {:?} for ({rows}, {n}) outputs", r.shape()))),
        None => 0,
    };
    let (q, d) = kept(device)?;
    let (out, out_addr) = output(device, rows, n)?;
    // SAFETY: the kept buffers hold the rows (the caller's promise), residual and out rows × n
    // floats.
    unsafe { matvec(device, w, q, d, residual_addr, out_addr, rows)? };
    Ok(out)
}

fn ptx() -> Result<&'static str, ModelError> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    // dp4a needs compute capability 6.1; CUDA 13 compiles for 7.5 and later.
    let options = cudarc::nvrtc::CompileOptions { arch: Some("compute_75"), ..Default::default() };
    super::kernels::compiled(&PTX, SOURCE, options, "GEMV")
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
        // One block row; Q4_0's 128-block stages with a partial last one (448 and 136 blocks);
        // grids of thousands of blocks; batch sizes from 1 to 8.
        let shapes =
            [(256, 37, 1), (4096, 100, 3), (14_336, 9, 8), (1024, 70, 2), (512, 5, 5), (512, 9001, 2), (4352, 8500, 1)];
        for (k, n, rows) in shapes {
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

    /// The kept buffers' first `rows × k` values, dequantized.
    fn kept_values(dev: &Device, rows: usize, k: usize) -> Vec<f64> {
        dev.synchronize().unwrap();
        let (q, d) = kept(dev.as_cuda_device().unwrap()).unwrap();
        let (mut values, mut scales) = (vec![0i8; rows * k], vec![0f32; rows * k / 32]);
        // SAFETY: the kept buffers hold at least that many values and scales; the stream is idle.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_sync(&mut values, q).unwrap();
            cudarc::driver::result::memcpy_dtoh_sync(&mut scales, d).unwrap();
        }
        values.iter().enumerate().map(|(i, &v)| v as f64 * scales[i / 32] as f64).collect()
    }

    /// Each value within one quantization step (the block's scale) of `want`'s, and the scales
    /// alike.
    fn assert_quantized(got: &[f64], want: &[f32], what: &str) {
        let want = quantized(want);
        for (i, block) in want.chunks(32).enumerate() {
            let step = block.iter().fold(0f64, |m, v| m.max(v.abs())) / 127.0;
            for (j, w) in block.iter().enumerate() {
                let g = got[32 * i + j];
                assert!((g - w).abs() <= 1.01 * step + 1e-9, "{what}: value {} is {g}, want {w}", 32 * i + j);
            }
        }
    }

    #[test]
    fn gemv_feeding_kernels_match_the_host() {
        if super::super::device_count() == 0 {
            eprintln!("no CUDA device: skipped");
            return;
        }
        let dev = Device::new_cuda(0).unwrap();
        for (rows, k) in [(1, 4096), (3, 2304), (8, 256)] {
            let x = data(rows * k, 3, 8.0);
            let w = data(k, 4, 2.0);
            let eps = 1e-5;
            let want: Vec<f32> = x
                .chunks(k)
                .flat_map(|row| {
                    let mean = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / k as f64;
                    let scale = 1.0 / (mean + eps).sqrt();
                    row.iter().zip(&w).map(move |(v, w)| (*v as f64 * scale * *w as f64) as f32)
                })
                .collect();
            let xt = Tensor::from_vec(x, (rows, k), &dev).unwrap();
            norm_quantize(&xt, &Tensor::from_vec(w, k, &dev).unwrap(), eps as f32).unwrap();
            assert_quantized(&kept_values(&dev, rows, k), &want, &format!("RMSNorm ({rows}, {k})"));
        }
        for (rows, ffn, gelu) in [(2, 1024, false), (1, 768, true)] {
            let gate_up = data(rows * 2 * ffn, 5, 6.0);
            let want: Vec<f32> = gate_up
                .chunks(2 * ffn)
                .flat_map(|row| {
                    row[..ffn].iter().zip(&row[ffn..]).map(|(&g, &u)| {
                        let g = g as f64;
                        let a = if gelu {
                            0.5 * g * (1.0 + (0.7978845608 * g * (1.0 + 0.044715 * g * g)).tanh())
                        } else {
                            g / (1.0 + (-g).exp())
                        };
                        (a * u as f64) as f32
                    })
                })
                .collect();
            let t = Tensor::from_vec(gate_up, (rows, 2 * ffn), &dev).unwrap();
            gated_quantize(&t, ffn, gelu).unwrap();
            assert_quantized(&kept_values(&dev, rows, ffn), &want, &format!("gated ({rows}, {ffn}, gelu {gelu})"));
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
