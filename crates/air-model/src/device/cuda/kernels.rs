//! Air's own CUDA kernels for the decode step's attention: candle has no attention op, and built
//! from its tensor ops attention costs about fifteen launches per sequence per layer, which
//! dominated decode time on an H200 (docs/benchmarks.md). Two kernels serve every sequence of a
//! step at once: one appends the new keys and values to each sequence's f16 cache, one computes
//! each (sequence, head)'s attention over its cache in a single pass (online softmax). Where the
//! projections come stacked, one kernel applies RoPE and appends to the caches, and one applies
//! the gated activation. Two quantize activations with the CPU's rounding for candle's
//! quantized matmul kernels ([`super::matmul`]).
//! Compiled at first use with NVRTC.

use crate::ModelError;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp1, DType, Layout, Shape, Tensor};
use cudarc::driver::{CudaFunction, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::OnceLock;

/// f16 conversions and the Q8 quantization of a warp's 32 values, which every kernel source
/// starts with.
pub(super) const F16_HELPERS: &str = r#"
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Quantization per 32 values as the CPU quantizes for Q8_0 dot products: d = amax / 127
// rounded to f16, q = x * (127 / amax) rounded half to even. Values go to q, scales to d (one
// per 32 values), both indexed as the values are in their rows (rows of a multiple of 32).
__device__ __forceinline__ float q8_inverse(float amax) { return amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f; }

// Value xi at index i of a warp's 32 consecutive values.
__device__ __forceinline__ void quantize_warp(float xi, signed char* __restrict__ q, float* __restrict__ d, long long i) {
    float amax = fabsf(xi);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    q[i] = (signed char)__float2int_rn(__fmul_rn(xi, q8_inverse(amax)));
    if (i % 32 == 0) d[i / 32] = h2f(f2h(__fdiv_rn(amax, 127.0f)));
}
"#;

const SOURCE: &str = r#"
#define WARPS 8
#define MAX_PER_LANE 8

// Each sequence b writes its new key and value (f32, (B, kv_heads, dim)) at positions[b] of its
// f16 caches (kv_heads, cap, dim), whose addresses are k_caches[b] and v_caches[b].
// Activations quantized as ggml's x86 CPU code quantizes them for Q8_0/Q8_1 weights' dot
// products, so the GPU's integer dot products equal the CPU's: per 32 values d = amax / 127,
// q = x * (127 / amax) rounded half to even, and the sum d * sum(q); d and the sum rounded to f16.
// candle's kernels divide by d, round halves away from zero and sum the unquantized values.
struct Q8Lanes { float d; int q; int sum; };

// One value per thread, block_q8_1 rows (f16 d and sum, 32 int8), kx_padded values per row:
// the layout of candle's MMVQ kernels. Grid (kx_padded / 256, rows), 256 threads.
extern "C" __global__ void air_quantize_q8_1(const float* x, unsigned char* y, int kx, int kx_padded) {
    const int ix = blockDim.x * blockIdx.x + threadIdx.x;
    const long long row = blockIdx.y;
    const float xi = ix < kx ? x[row * kx + ix] : 0.0f;
    float amax = fabsf(xi);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    const int q = __float2int_rn(__fmul_rn(xi, q8_inverse(amax)));
    int sum = q;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    const long long i = row * kx_padded + ix;
    unsigned char* block = y + (i / 32) * 36;
    ((signed char*)(block + 4))[i % 32] = (signed char)q;
    if (i % 32 == 0) {
        const float d = __fdiv_rn(amax, 127.0f);
        ((unsigned short*)block)[0] = f2h(d);
        ((unsigned short*)block)[1] = f2h(__fmul_rn(d, (float)sum));
    }
}

// Four values per thread, block_q8_1_mmq (16 bytes of scales, 128 int8; the blocks of one
// 128-value chunk of every row consecutive): the layout of candle's MMQ kernels. Scales as
// f16 (d, sum) pairs when `with_sums`, else d as f32 (rounded to f16 first, as the CPU keeps
// it). Grid (rows, kx_padded / 512), 128 threads.
extern "C" __global__ void air_quantize_q8_1_mmq(const float* x, unsigned char* y, int kx, int kx_padded, int rows, int with_sums) {
    const long long i0 = ((long long)blockDim.x * blockIdx.y + threadIdx.x) * 4;
    const long long row = blockIdx.x;
    float v[4];
    for (int j = 0; j < 4; j++) v[j] = i0 + j < kx ? x[row * kx + i0 + j] : 0.0f;
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    const float inverse = q8_inverse(amax);
    int q[4];
    for (int j = 0; j < 4; j++) q[j] = __float2int_rn(__fmul_rn(v[j], inverse));
    int sum = q[0] + q[1] + q[2] + q[3];
    for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    unsigned char* block = y + ((i0 / 128) * rows + row) * 144;
    const int iqs = (int)(i0 % 128);
    for (int j = 0; j < 4; j++) ((signed char*)(block + 16))[iqs + j] = (signed char)q[j];
    if (iqs % 32 != 0) return;
    const float d = __fdiv_rn(amax, 127.0f);
    if (with_sums) {
        ((unsigned short*)block)[2 * (iqs / 32)] = f2h(d);
        ((unsigned short*)block)[2 * (iqs / 32) + 1] = f2h(__fmul_rn(d, (float)sum));
    } else {
        ((float*)block)[iqs / 32] = h2f(f2h(d));
    }
}

extern "C" __global__ void air_kv_append(const float* k, const float* v,
        const unsigned long long* k_caches, const unsigned long long* v_caches,
        const unsigned int* positions, int cap, int kv_heads, int dim) {
    int b = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int n = kv_heads * dim;
    if (i >= n) return;
    int h = i / dim, d = i % dim;
    unsigned long long at = ((unsigned long long)h * cap + positions[b]) * dim + d;
    ((unsigned short*)k_caches[b])[at] = f2h(k[(unsigned long long)b * n + i]);
    ((unsigned short*)v_caches[b])[at] = f2h(v[(unsigned long long)b * n + i]);
}

// qkv: (B, (heads + 2 kv_heads) * dim) rows of each sequence's queries, keys and values.
// Rotates the queries (times q_scale) into q_out (B, heads, dim) and the keys into the f16 key
// caches at positions[b], and copies the values into the value caches. RoPE covers the first
// rope_dim dims of a head: pairs (2i, 2i+1) when interleaved, else (i, i + rope_dim/2); pair i's
// angle has cos[b * rope_dim/2 + i] and sin likewise. One block per (head, sequence).
extern "C" __global__ void air_rope_kv(const float* qkv, const float* cos, const float* sin,
        int rope_dim, int interleaved, float q_scale, float* q_out,
        const unsigned long long* k_caches, const unsigned long long* v_caches,
        const unsigned int* positions, int cap, int heads, int kv_heads, int dim) {
    int head = blockIdx.x, b = blockIdx.y;
    int total = heads + 2 * kv_heads;
    const float* src = qkv + ((unsigned long long)b * total + head) * dim;
    int half = rope_dim / 2;
    int pos = positions[b];
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float val = src[d];
        if (head < heads + kv_heads && d < rope_dim) {
            int i, other, first;
            if (interleaved) { i = d / 2; first = (d % 2 == 0); other = first ? d + 1 : d - 1; }
            else { i = d % half; first = d < half; other = first ? d + half : d - half; }
            float c = cos[b * half + i], s = sin[b * half + i];
            float y = src[other];
            val = first ? val * c - y * s : y * s + val * c;
        }
        if (head < heads) {
            q_out[((unsigned long long)b * heads + head) * dim + d] = val * q_scale;
        } else if (head < heads + kv_heads) {
            int h = head - heads;
            ((unsigned short*)k_caches[b])[((unsigned long long)h * cap + pos) * dim + d] = f2h(val);
        } else {
            int h = head - heads - kv_heads;
            ((unsigned short*)v_caches[b])[((unsigned long long)h * cap + pos) * dim + d] = f2h(val);
        }
    }
}

// The gated feed-forward activation over stacked gate/up rows (rows, 2 ffn): out (rows, ffn) =
// act(gate) * up, act SiLU or, when gelu, GELU (tanh form).
extern "C" __global__ void air_gated(const float* gate_up, float* out, int ffn, unsigned long long n, int gelu) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long row = i / ffn, col = i % ffn;
    float g = gate_up[row * 2 * ffn + col], u = gate_up[row * 2 * ffn + ffn + col];
    float a = gelu ? 0.5f * g * (1.f + tanhf(0.7978845608f * g * (1.f + 0.044715f * g * g)))
                   : g / (1.f + expf(-g));
    out[i] = a * u;
}

// Attention of one query per sequence (q: (B, heads, dim), f32) over its cached keys and values
// 0..=positions[b] (the last `window` of them when window > 0). One block per (head, sequence,
// split): the positions are cut into `splits` equal spans, one per block, so that long caches
// keep the GPU's multiprocessors busy (flash-decoding). In a block each warp runs an online
// softmax over groups of KEYS_PER_GROUP keys, every WARPS-th group, then the warps' partial
// results are merged. A group's keys and values are loaded together, so a warp waits for memory
// once per group rather than once per key: with one key at a time the loop was latency-bound
// and a decode step at position ~190 took 6.0 ms instead of 3.4 ms at position ~30 on the 8B
// shape (docs/benchmarks.md). With one split the block writes out (B, heads, dim); with more,
// its maximum, sum and unnormalized output go to partial ((B, heads, splits, dim + 2)) for
// air_attention_merge.
#define KEYS_PER_GROUP 4
extern "C" __global__ void air_decode_attention(const float* q,
        const unsigned long long* k_caches, const unsigned long long* v_caches,
        const unsigned int* positions, int cap, int heads, int kv_heads, int dim,
        float scale, int window, float* out, int splits, float* partial, signed char* q_out, float* d_out) {
    const float NEG_INF = __int_as_float(0xff800000);
    int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int kvh = h / (heads / kv_heads);
    int last = positions[b];
    int visible = window > 0 ? max(0, last + 1 - window) : 0;
    int span = (last + 1 - visible + splits - 1) / splits;
    int first = visible + split * span;
    int pos = min(first + span, last + 1) - 1;
    const unsigned short* K = (const unsigned short*)k_caches[b] + (unsigned long long)kvh * cap * dim;
    const unsigned short* V = (const unsigned short*)v_caches[b] + (unsigned long long)kvh * cap * dim;
    const float* qh = q + ((unsigned long long)b * heads + h) * dim;
    int per_lane = (dim + 31) / 32;
    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
    for (int c = 0; c < MAX_PER_LANE; c++) {
        int d = lane + 32 * c;
        qr[c] = (c < per_lane && d < dim) ? qh[d] * scale : 0.f;
        acc[c] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int j0 = first + warp * KEYS_PER_GROUP; j0 <= pos; j0 += WARPS * KEYS_PER_GROUP) {
        float s[KEYS_PER_GROUP];
        #pragma unroll
        for (int g = 0; g < KEYS_PER_GROUP; g++) {
            int j = j0 + g;
            float t = 0.f;
            if (j <= pos) {
                const unsigned short* kj = K + (unsigned long long)j * dim;
                #pragma unroll
                for (int c = 0; c < MAX_PER_LANE; c++) {
                    int d = lane + 32 * c;
                    if (c < per_lane && d < dim) t += qr[c] * h2f(kj[d]);
                }
            }
            s[g] = t;
        }
        #pragma unroll
        for (int g = 0; g < KEYS_PER_GROUP; g++)
            for (int o = 16; o > 0; o >>= 1) s[g] += __shfl_xor_sync(0xffffffff, s[g], o);
        float m_new = m;
        #pragma unroll
        for (int g = 0; g < KEYS_PER_GROUP; g++) if (j0 + g <= pos) m_new = fmaxf(m_new, s[g]);
        float corr = expf(m - m_new);
        float p[KEYS_PER_GROUP];
        l *= corr;
        #pragma unroll
        for (int g = 0; g < KEYS_PER_GROUP; g++) {
            p[g] = j0 + g <= pos ? expf(s[g] - m_new) : 0.f;
            l += p[g];
        }
        #pragma unroll
        for (int c = 0; c < MAX_PER_LANE; c++) {
            int d = lane + 32 * c;
            if (c < per_lane && d < dim) {
                float a = acc[c] * corr;
                #pragma unroll
                for (int g = 0; g < KEYS_PER_GROUP; g++)
                    if (j0 + g <= pos) a += p[g] * h2f(V[(unsigned long long)(j0 + g) * dim + d]);
                acc[c] = a;
            }
        }
        m = m_new;
    }
    __shared__ float sm[WARPS], sl[WARPS];
    __shared__ float sacc[WARPS][MAX_PER_LANE * 32];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    for (int c = 0; c < per_lane; c++) sacc[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    float top = NEG_INF;
    for (int w = 0; w < WARPS; w++) top = fmaxf(top, sm[w]);
    float total = 0.f;
    for (int w = 0; w < WARPS; w++) if (sm[w] != NEG_INF) total += sl[w] * expf(sm[w] - top);
    float* part = splits > 1 ? partial + (((unsigned long long)b * heads + h) * splits + split) * (dim + 2) : 0;
    if (part && threadIdx.x == 0) { part[0] = top; part[1] = total; }
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < WARPS; w++) if (sm[w] != NEG_INF) o += sacc[w][d] * expf(sm[w] - top);
        if (part) {
            part[2 + d] = o;
        } else {
            const long long at = ((long long)b * heads + h) * dim + d;
            out[at] = o / total;
            if (q_out) quantize_warp(o / total, q_out, d_out, at);
        }
    }
}

// Merges the splits of air_decode_attention: partial (B, heads, splits, dim + 2) of maximum,
// sum and unnormalized output per split into out (B, heads, dim). One block per (head, sequence).
extern "C" __global__ void air_attention_merge(const float* partial, int heads, int dim, int splits, float* out,
        signed char* q_out, float* d_out) {
    const float NEG_INF = __int_as_float(0xff800000);
    int h = blockIdx.x, b = blockIdx.y;
    const float* part = partial + ((unsigned long long)b * heads + h) * splits * (dim + 2);
    float top = NEG_INF;
    for (int s = 0; s < splits; s++) top = fmaxf(top, part[s * (dim + 2)]);
    float total = 0.f;
    for (int s = 0; s < splits; s++) {
        float m = part[s * (dim + 2)];
        if (m != NEG_INF) total += part[s * (dim + 2) + 1] * expf(m - top);
    }
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < splits; s++) {
            float m = part[s * (dim + 2)];
            if (m != NEG_INF) o += part[s * (dim + 2) + 2 + d] * expf(m - top);
        }
        const long long at = ((long long)b * heads + h) * dim + d;
        out[at] = o / total;
        if (q_out) quantize_warp(o / total, q_out, d_out, at);
    }
}
"#;

/// Largest head dimension the attention kernel handles (32 lanes × MAX_PER_LANE).
pub(crate) const MAX_HEAD_DIM: usize = 256;
/// Warps per attention block: the `WARPS` of the kernels' source.
const WARPS: u32 = 8;
/// Cache positions per split of the decode attention, and the most splits: a cache of 256
/// positions runs in one block per (head, sequence), one of 2,048 in eight.
const POSITIONS_PER_SPLIT: usize = 256;
const MAX_SPLITS: usize = 16;
const MODULE: &str = "air_attention";

fn ptx() -> Result<&'static str, ModelError> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    compiled(&PTX, SOURCE, Default::default(), "attention")
}

/// The PTX of `source` after the shared prelude ([`F16_HELPERS`]), compiled by NVRTC with
/// `options` at first use and kept in `cell`; `what` names the kernels in the error.
pub(super) fn compiled(
    cell: &'static OnceLock<Result<String, String>>,
    source: &str,
    options: cudarc::nvrtc::CompileOptions,
    what: &str,
) -> Result<&'static str, ModelError> {
    cell.get_or_init(|| {
        let source = format!("{F16_HELPERS}{source}");
        cudarc::nvrtc::compile_ptx_with_opts(source, options).map(|p| p.to_src()).map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| ModelError::Device(format!("compiling Air's {what} kernels: {e}")))
}

pub(crate) fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction, ModelError> {
    Ok(device.get_or_load_custom_func(name, MODULE, ptx()?)?.into_cuda_function())
}

/// The device address of a contiguous CUDA tensor's first element.
pub(crate) fn address(t: &Tensor) -> Result<u64, ModelError> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        return Err(ModelError::Device("expected a tensor on a CUDA device".into()));
    };
    let offset = (layout.start_offset() * t.dtype().size_in_bytes()) as u64;
    let base = match t.dtype() {
        DType::F16 => {
            let slice = s.as_cuda_slice::<half::f16>()?;
            slice.device_ptr(slice.stream()).0
        }
        DType::F32 => {
            let slice = s.as_cuda_slice::<f32>()?;
            slice.device_ptr(slice.stream()).0
        }
        DType::U32 => {
            let slice = s.as_cuda_slice::<u32>()?;
            slice.device_ptr(slice.stream()).0
        }
        DType::I64 => {
            let slice = s.as_cuda_slice::<i64>()?;
            slice.device_ptr(slice.stream()).0
        }
        other => return Err(ModelError::Device(format!("no address for {other:?} tensors"))),
    };
    Ok(base + offset)
}

/// What the decode kernels need about a batch's KV caches for one layer: the addresses of each
/// sequence's key and value caches (device arrays), and each sequence's new position.
#[derive(Clone, Copy)]
pub(crate) struct CacheTable {
    pub keys: u64,
    pub values: u64,
    pub positions: u64,
    pub sequences: usize,
    pub capacity: usize,
}

/// Writes `k` and `v` (B, kv_heads, dim; f32, contiguous) into each sequence's cache.
pub(crate) fn kv_append(
    k: &Tensor,
    v: &Tensor,
    table: CacheTable,
    kv_heads: usize,
    dim: usize,
) -> Result<(), ModelError> {
    let device = k.device().as_cuda_device()?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let (k_addr, v_addr) = (address(&k)?, address(&v)?);
    let func = function(device, "air_kv_append")?;
    let n = (kv_heads * dim) as u32;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256), table.sequences as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (cap, kv_heads, dim) = (table.capacity as i32, kv_heads as i32, dim as i32);
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&k_addr).arg(&v_addr).arg(&table.keys).arg(&table.values).arg(&table.positions);
    launch.arg(&cap).arg(&kv_heads).arg(&dim);
    // SAFETY: the addresses are live tensors of the sizes the kernel indexes (B × kv_heads ×
    // dim inputs; caches of kv_heads × capacity × dim, positions < capacity).
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}

/// RoPE for the queries and keys of a decode step, and their append (with the values) to the
/// KV caches, as a candle op on the stacked projections (B, (heads + 2 kv_heads) × dim): output
/// the rotated queries (B, heads, dim).
pub(crate) struct RopeKv {
    pub table: CacheTable,
    /// Addresses of the RoPE tables (B, rope_dim / 2), cos and sin.
    pub cos: u64,
    pub sin: u64,
    pub rope_dim: usize,
    pub interleaved: bool,
    pub q_scale: f32,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

impl CustomOp1 for RopeKv {
    fn name(&self) -> &'static str {
        "air-rope-kv"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("air-rope-kv runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("air-rope-kv needs contiguous projections")
        };
        let device = storage.device().clone();
        let qkv = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let b = self.table.sequences;
        // SAFETY: the kernel writes every element of the output.
        let out = unsafe { device.alloc::<f32>(b * self.heads * self.dim)? };
        let func = function(&device, "air_rope_kv").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let cfg = LaunchConfig {
            grid_dim: ((self.heads + 2 * self.kv_heads) as u32, b as u32, 1),
            block_dim: (self.dim.min(128) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rope_dim, interleaved) = (self.rope_dim as i32, i32::from(self.interleaved));
        let (cap, heads, kv_heads, dim) =
            (self.table.capacity as i32, self.heads as i32, self.kv_heads as i32, self.dim as i32);
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&qkv).arg(&self.cos).arg(&self.sin).arg(&rope_dim).arg(&interleaved).arg(&self.q_scale);
        launch.arg(&out).arg(&self.table.keys).arg(&self.table.values).arg(&self.table.positions);
        launch.arg(&cap).arg(&heads).arg(&kv_heads).arg(&dim);
        // SAFETY: qkv holds B rows of (heads + 2 kv_heads) × dim floats; the tables B × rope_dim/2;
        // the caches kv_heads × capacity × dim halves with positions < capacity.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from((b, self.heads, self.dim))))
    }
}

/// The gated feed-forward activation on stacked gate/up rows (rows, 2 × ffn) → (rows, ffn).
pub(crate) struct Gated {
    pub ffn: usize,
    pub gelu: bool,
}

impl CustomOp1 for Gated {
    fn name(&self) -> &'static str {
        "air-gated"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("air-gated runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("air-gated needs contiguous input")
        };
        let device = storage.device().clone();
        let gate_up = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let rows = (end - start) / (2 * self.ffn);
        let n = (rows * self.ffn) as u64;
        // SAFETY: the kernel writes every element of the output.
        let out = unsafe { device.alloc::<f32>(rows * self.ffn)? };
        let func = function(&device, "air_gated").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let cfg =
            LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (ffn, gelu) = (self.ffn as i32, i32::from(self.gelu));
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&gate_up).arg(&out).arg(&ffn).arg(&n).arg(&gelu);
        // SAFETY: gate_up holds rows × 2 ffn floats, out rows × ffn.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from((rows, self.ffn))))
    }
}

/// Decode attention as a candle op on the queries (B, heads, dim): output (B, heads * dim).
pub(crate) struct DecodeAttention {
    pub table: CacheTable,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// Device addresses of buffers of int8 values and f32 scales (a row per sequence, heads ×
    /// dim wide, dim a multiple of 32) to receive the output quantized as well, per 32 values
    /// with the CPU's rounding, for the output projection's GEMV.
    pub quantized: Option<(u64, u64)>,
}

impl CustomOp1 for DecodeAttention {
    fn name(&self) -> &'static str {
        "air-decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("air-decode-attention runs on CUDA only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("air-decode-attention needs contiguous queries")
        };
        let device = storage.device().clone();
        let q = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let elements = self.table.sequences * self.heads * self.dim;
        // The split count depends only on the capacity, so a captured decode graph (one per
        // capacity) always launches the grid it was captured with.
        let spanned = self.window.map_or(self.table.capacity, |w| w.min(self.table.capacity));
        let splits = spanned.div_ceil(POSITIONS_PER_SPLIT).clamp(1, MAX_SPLITS);
        // SAFETY: the kernels write every element of the output, and of the partial results
        // they read.
        let out = unsafe { device.alloc::<f32>(elements)? };
        // One split needs no partial results (the kernel ignores the buffer then).
        let partial_len = if splits > 1 { self.table.sequences * self.heads * splits * (self.dim + 2) } else { 1 };
        let partial = unsafe { device.alloc::<f32>(partial_len)? };
        let func = function(&device, "air_decode_attention").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let grid = (self.heads as u32, self.table.sequences as u32, splits as u32);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (32 * WARPS, 1, 1), shared_mem_bytes: 0 };
        let (cap, heads, kv_heads, dim) =
            (self.table.capacity as i32, self.heads as i32, self.kv_heads as i32, self.dim as i32);
        let window = self.window.map_or(0, |w| w as i32);
        let splits = splits as i32;
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&q).arg(&self.table.keys).arg(&self.table.values).arg(&self.table.positions);
        launch.arg(&cap).arg(&heads).arg(&kv_heads).arg(&dim).arg(&self.scale).arg(&window).arg(&out);
        let (q_out, d_out) = self.quantized.unwrap_or((0, 0));
        launch.arg(&splits).arg(&partial).arg(&q_out).arg(&d_out);
        // SAFETY: q holds B × heads × dim floats, out as many, partial B × heads × splits ×
        // (dim + 2); the cache table's addresses are live caches of kv_heads × capacity × dim
        // halves with positions < capacity.
        unsafe { launch.launch(cfg) }.w()?;
        if splits > 1 {
            let merge = function(&device, "air_attention_merge").map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let cfg = LaunchConfig {
                grid_dim: (self.heads as u32, self.table.sequences as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&merge);
            launch.arg(&partial).arg(&heads).arg(&dim).arg(&splits).arg(&out).arg(&q_out).arg(&d_out);
            // SAFETY: as above; the first kernel filled every split's partial result.
            unsafe { launch.launch(cfg) }.w()?;
        }
        let shape = Shape::from((self.table.sequences, self.heads * self.dim));
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}
