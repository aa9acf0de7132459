// The CPU pass's arithmetic on CUDA, operation for operation (see mod.rs). Compiled with
// contraction off: every fused multiply-add here is one the CPU (ggml's compiled C, or Air's
// Rust) fuses too, written out with the _rn intrinsics.

#define FULL 0xffffffffu

// h2f and f2h (exact conversions, and rounding to nearest even) come first, from kernels.rs.

// a * b + c in f16 with one rounding (AVX512-FP16's vfmadd231ph).
__device__ __forceinline__ unsigned short hfma(unsigned short a, unsigned short b, unsigned short c) {
    unsigned short r;
    asm("fma.rn.f16 %0, %1, %2, %3;" : "=h"(r) : "h"(a), "h"(b), "h"(c));
    return r;
}

// a * b in f16 (vmulph).
__device__ __forceinline__ unsigned short hmul(unsigned short a, unsigned short b) {
    unsigned short r;
    asm("mul.rn.f16 %0, %1, %2;" : "=h"(r) : "h"(a), "h"(b));
    return r;
}

// A little-endian u16 at any byte address.
__device__ __forceinline__ unsigned short ld16(const unsigned char* p) {
    return (unsigned short)(p[0] | (p[1] << 8));
}

// glibc's expf (2.27 and later): the algorithm of Air's libm_exp.rs, in f64.
__constant__ unsigned long long EXP2F_TABLE[32] = {
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

__device__ float glibc_expf(float x) {
    if (x != x) return x + x;
    if (x < __int_as_float(0xc2cff1b4)) return 0.0f;
    if (x > __int_as_float(0x42b17217)) return __int_as_float(0x7f800000);
    const double inv_ln2_n = __longlong_as_double(0x3ff71547652b82fell) * 32.0;
    const double shift = __longlong_as_double(0x4338000000000000ll);
    const double c0 = __longlong_as_double(0x3fac6af84b912394ll) / 32.0 / 32.0 / 32.0;
    const double c1 = __longlong_as_double(0x3fcebfce50fac4f3ll) / 32.0 / 32.0;
    const double c2 = __longlong_as_double(0x3fe62e42ff0c52d6ll) / 32.0;
    const double z = __dmul_rn(inv_ln2_n, (double)x);
    const double k = __dadd_rn(z, shift);
    const unsigned long long ki = (unsigned long long)__double_as_longlong(k);
    const double r = __dsub_rn(z, __dsub_rn(k, shift));
    const double s = __longlong_as_double((long long)(EXP2F_TABLE[ki % 32] + (ki << 47)));
    const double cubic = __fma_rn(c0, r, c1);
    const double r2 = __dmul_rn(r, r);
    double y = __fma_rn(c2, r, 1.0);
    y = __fma_rn(cubic, r2, y);
    return __double2float_rn(__dmul_rn(y, s));
}

// ggml's vectorized exponential (ggml_v_expf), lane by lane: Air's exp.rs.
__device__ float ggml_expf(float x) {
    const float round = 12582912.0f;
    const float z = __fmaf_rn(x, __int_as_float(0x3fb8aa3b), round);
    const float n = __fsub_rn(z, round);
    const float b = __fmaf_rn(-n, __int_as_float(0x35bfbe8e), __fmaf_rn(-n, __int_as_float(0x3f317200), x));
    const float u = __fmul_rn(b, b);
    const float j = __fmaf_rn(
        __fmaf_rn(__fmaf_rn(__int_as_float(0x3c072010), b, __int_as_float(0x3d2b9f17)), u,
                  __fmaf_rn(__int_as_float(0x3e2aaf33), b, __int_as_float(0x3efffedb))),
        u, __fmaf_rn(__int_as_float(0x3f7ffff6), b, 1.0f));
    if (n < -126.0f) return 0.0f;
    if (n > 127.0f) return __int_as_float(0x7f800000);
    return __fmul_rn(j, __int_as_float(((int)n + 127) << 23));
}

// RMSNorm of each row (d values) times w: the mean of squares summed in f64 in order, as ops.rs.
// One block per row.
extern "C" __global__ void air_x_rms_norm(const float* x, const float* w, float* y, int d, float eps) {
    const long long row = blockIdx.x;
    const float* xr = x + row * d;
    float* yr = y + row * d;
    __shared__ float scale;
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (int i = 0; i < d; i++) sum = __dadd_rn(sum, (double)__fmul_rn(xr[i], xr[i]));
        const float mean = __double2float_rn(__ddiv_rn(sum, (double)d));
        scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
}

// The 32-value block types: bytes per block, where the 4-bit values, the fifth bits and the
// minimum sit, and the offset subtracted from unsigned values. Q8_0 (T = 4) holds signed bytes.
template <int T> struct Fmt;
template <> struct Fmt<0> { enum { BYTES = 18, QS = 2, QH = -1, MIN = 0, OFFSET = 8 }; };   // Q4_0
template <> struct Fmt<1> { enum { BYTES = 20, QS = 4, QH = -1, MIN = 1, OFFSET = 0 }; };   // Q4_1
template <> struct Fmt<2> { enum { BYTES = 22, QS = 6, QH = 2, MIN = 0, OFFSET = 16 }; };   // Q5_0
template <> struct Fmt<3> { enum { BYTES = 24, QS = 8, QH = 4, MIN = 1, OFFSET = 0 }; };    // Q5_1
template <> struct Fmt<4> { enum { BYTES = 34, QS = 2, QH = -1, MIN = 0, OFFSET = 0 }; };   // Q8_0

// The integer dot product of values 4l..4l+3 of weight block b with activations x: one of the
// 8 i32 lanes of ggml's AVX2 block dot.
template <int T>
__device__ __forceinline__ int lane_dot(const unsigned char* b, const signed char* x, int l) {
    int s = 0;
#pragma unroll
    for (int t = 0; t < 4; t++) {
        const int p = 4 * l + t;
        int v;
        if (T == 4) {
            v = (signed char)b[Fmt<T>::QS + p];
        } else {
            const int byte = b[Fmt<T>::QS + (p & 15)];
            v = p < 16 ? (byte & 15) : (byte >> 4);
            if (Fmt<T>::QH >= 0) v |= ((b[Fmt<T>::QH + p / 8] >> (p % 8)) & 1) << 4;
            v -= Fmt<T>::OFFSET;
        }
        s += v * (int)x[p];
    }
    return s;
}

// out (rows, n) = x · Wᵀ with x quantized to block_q8_1 rows of k_padded values (d, d·Σq, 32
// int8). A group of 8 threads per (weight row, activation row), one thread per f32 lane of
// ggml's vec_dot: lane += (d_w · d_x) · Σ its 4 products, one FMA per block in block order; the
// lanes summed as hsum_float_8; plus Σ m_w · s_x (an FMA chain) for the types with a minimum.
// Grid (ceil(n · 8 / 256), rows), 256 threads.
template <int T>
__device__ void matmul(const unsigned char* w, const unsigned char* xq, float* out, int k, int n, int k_padded) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 8;
    const int l = threadIdx.x % 8;
    const long long r = blockIdx.y;
    const int kb = k / 32;
    const unsigned char* wr = w + (long long)(i < n ? i : n - 1) * kb * Fmt<T>::BYTES;
    const unsigned char* xr = xq + r * (k_padded / 32) * 36;
    float acc = 0.0f, mins = 0.0f;
    for (int b = 0; b < kb; b++) {
        const unsigned char* wb = wr + b * Fmt<T>::BYTES;
        const unsigned char* xb = xr + b * 36;
        const float scale = __fmul_rn(h2f(ld16(wb)), h2f(ld16(xb)));
        acc = __fmaf_rn(scale, __int2float_rn(lane_dot<T>(wb, (const signed char*)(xb + 4), l)), acc);
        if (Fmt<T>::MIN) mins = __fmaf_rn(h2f(ld16(wb + 2)), h2f(ld16(xb + 2)), mins);
    }
    float a = __fadd_rn(acc, __shfl_down_sync(FULL, acc, 4, 8));
    a = __fadd_rn(a, __shfl_down_sync(FULL, a, 2, 8));
    a = __fadd_rn(a, __shfl_down_sync(FULL, a, 1, 8));
    if (i < n && l == 0) out[r * n + i] = Fmt<T>::MIN ? __fadd_rn(a, mins) : a;
}

#define MATMUL(name, T) \
    extern "C" __global__ void name(const unsigned char* w, const unsigned char* xq, float* out, int k, int n, int kp) { \
        matmul<T>(w, xq, out, k, n, kp); \
    }
MATMUL(air_x_matmul_q4_0, 0)
MATMUL(air_x_matmul_q4_1, 1)
MATMUL(air_x_matmul_q5_0, 2)
MATMUL(air_x_matmul_q5_1, 3)
MATMUL(air_x_matmul_q8_0, 4)

// Activations quantized to Q8_K (292-byte blocks: f32 d, 256 int8, 16 int16 sums of 16) as
// activation_quant.rs: the scale from the first value of the largest magnitude, sign included;
// q = iscale · x rounded half to even, capped at 127. One block of 256 threads per (super-block,
// row); k a multiple of 256.
extern "C" __global__ void air_x_quantize_q8_k(const float* x, unsigned char* y, int k) {
    const long long row = blockIdx.y;
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    const float v = x[row * k + (long long)blockIdx.x * 256 + t];
    unsigned char* block = y + (row * (k / 256) + blockIdx.x) * 292;
    __shared__ float warp_max[8];
    __shared__ int warp_first[8];
    __shared__ float scale;
    float m = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
    if (lane == 0) warp_max[warp] = m;
    __syncthreads();
    float amax = 0.0f;
    for (int w = 0; w < 8; w++) amax = fmaxf(amax, warp_max[w]);
    int first = fabsf(v) == amax ? t : 256;
    for (int o = 16; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(FULL, first, o));
    if (lane == 0) warp_first[warp] = first;
    __syncthreads();
    if (t == 0) {
        int f = 256;
        for (int w = 0; w < 8; w++) f = min(f, warp_first[w]);
        scale = amax == 0.0f ? 0.0f : __fdiv_rn(-127.0f, x[row * k + (long long)blockIdx.x * 256 + f]);
        *(float*)block = amax == 0.0f ? 0.0f : __fdiv_rn(1.0f, scale);
    }
    __syncthreads();
    const int q = amax == 0.0f ? 0 : min(__float2int_rn(__fmul_rn(scale, v)), 127);
    ((signed char*)(block + 4))[t] = (signed char)q;
    int sum = q;
    for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o, 16);
    if (t % 16 == 0) ((short*)(block + 260))[t / 16] = (short)sum;
}

// Q4_K's 6-bit scale (j < 8) or minimum (j >= 8) j of its 12 bytes.
__device__ __forceinline__ int q4k_scale(const unsigned char* s, int j) {
    const int k = j % 4;
    if (j < 4) return s[k] & 63;
    if (j < 8) return (s[8 + k] & 0x0F) | ((s[k] >> 6) << 4);
    if (j < 12) return s[4 + k] & 63;
    return (s[8 + k] >> 4) | ((s[4 + k] >> 6) << 4);
}

// Value `byte` of 32-value chunk c of a K-quant super-block, unsigned (Q6_K's stored plus 32).
template <int T>
__device__ __forceinline__ int kquant_value(const unsigned char* b, int c, int byte) {
    if (T == 0) {  // Q4_K: qs at 16, chunk pairs share 32 bytes, low nibbles then high
        const int v = b[16 + 32 * (c / 2) + byte];
        return c % 2 == 0 ? (v & 15) : (v >> 4);
    }
    // Q6_K: ql at 0, qh at 128; half c / 4 of 128 values, part c % 4 of it.
    const int half = c / 4, part = c % 4;
    const int ql = b[64 * half + 32 * (part % 2) + byte];
    const int qh = b[128 + 32 * half + byte];
    return (part < 2 ? (ql & 15) : (ql >> 4)) | (((qh >> (2 * part)) & 3) << 4);
}

// out (rows, n) = x · Wᵀ for Q4_K (T = 0) or Q6_K (T = 1) weights with Q8_K activations, as
// x86_kquants.rs: thread l of a group of 8 holds i32 lane l of ggml's AVX2 block dot (Σ over
// the 8 chunks of scale · its 4 products at bytes 4l..4l+3; Q6_K less 32 · the scales times
// the activation sums of lane l's two sub-blocks; Q4_K's minimums in lanes 0..3). One-row rows
// fuse each lane into an f32 lane per super-block and sum the lanes at the end; rows flagged in
// `batched` (a u32 per row) take ggml's batched kernel: the exact super-block total to f32,
// times d, less dmin · the minimums' total (one fused op), fused with the activation's d into
// one f32 sum. Grid (ceil(n · 8 / 256), rows), 256 threads.
template <int T>
__device__ void kquant_matmul(const unsigned char* w, const unsigned char* xq, const unsigned int* batched,
        float* out, int k, int n) {
    const int bytes = T == 0 ? 144 : 210;
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 8;
    const int l = threadIdx.x % 8;
    const long long r = blockIdx.y;
    const int kb = k / 256;
    const bool flat = batched[r] != 0;
    const unsigned char* wr = w + (long long)(i < n ? i : n - 1) * kb * bytes;
    const unsigned char* xr = xq + r * kb * 292;
    float acc = 0.0f, acc_m = 0.0f, sums = 0.0f;
    for (int b = 0; b < kb; b++) {
        const unsigned char* wb = wr + b * bytes;
        const unsigned char* xb = xr + b * 292;
        const float dy = *(const float*)xb;
        const signed char* y = (const signed char*)(xb + 4);
        const short* bsums = (const short*)(xb + 260);
        int sumi = 0, mins = 0;
        for (int c = 0; c < 8; c++) {
            int dot = 0;
#pragma unroll
            for (int j = 0; j < 4; j++) dot += kquant_value<T>(wb, c, 4 * l + j) * (int)y[32 * c + 4 * l + j];
            const int scale = T == 0 ? q4k_scale(wb + 4, c) : (int)((const signed char*)(wb + 192))[2 * c + l / 4];
            sumi += scale * dot;
        }
        float d, dmin = 0.0f;
        if (T == 0) {
            d = h2f(ld16(wb));
            dmin = h2f(ld16(wb + 2));
            if (l < 4) {
                const int a = bsums[4 * l] + bsums[4 * l + 1], c2 = bsums[4 * l + 2] + bsums[4 * l + 3];
                mins = q4k_scale(wb + 4, 8 + 2 * l) * a + q4k_scale(wb + 4, 9 + 2 * l) * c2;
            }
        } else {
            d = h2f(ld16(wb + 208));
            const signed char* sc = (const signed char*)(wb + 192);
            sumi -= 32 * (bsums[2 * l] * sc[2 * l] + bsums[2 * l + 1] * sc[2 * l + 1]);
        }
        if (flat) {
            int total = sumi, min_total = mins;
            for (int o = 4; o > 0; o >>= 1) {
                total += __shfl_xor_sync(FULL, total, o, 8);
                min_total += __shfl_xor_sync(FULL, min_total, o, 8);
            }
            float block = __fmul_rn(__int2float_rn(total), d);
            if (T == 0) block = __fmaf_rn(-dmin, __int2float_rn(min_total), block);
            sums = __fmaf_rn(block, dy, sums);
        } else {
            if (T == 0) acc_m = __fmaf_rn(__fmul_rn(-dy, dmin), __int2float_rn(mins), acc_m);
            acc = __fmaf_rn(__fmul_rn(dy, d), __int2float_rn(sumi), acc);
        }
    }
    float a = __fadd_rn(acc, __shfl_down_sync(FULL, acc, 4, 8));
    a = __fadd_rn(a, __shfl_down_sync(FULL, a, 2, 8));
    a = __fadd_rn(a, __shfl_down_sync(FULL, a, 1, 8));
    float m = __fadd_rn(acc_m, __shfl_down_sync(FULL, acc_m, 2, 8));
    m = __fadd_rn(m, __shfl_down_sync(FULL, m, 1, 8));
    if (i < n && l == 0) out[r * n + i] = flat ? sums : T == 0 ? __fadd_rn(a, m) : a;
}

extern "C" __global__ void air_x_matmul_q4_k(const unsigned char* w, const unsigned char* xq,
        const unsigned int* batched, float* out, int k, int n) {
    kquant_matmul<0>(w, xq, batched, out, k, n);
}

extern "C" __global__ void air_x_matmul_q6_k(const unsigned char* w, const unsigned char* xq,
        const unsigned int* batched, float* out, int k, int n) {
    kquant_matmul<1>(w, xq, batched, out, k, n);
}

// RoPE of one sequence's n rows at positions start.. (q (n, heads, dim), k and v (n, kv_heads,
// dim)) as rope.rs rotates on the host: x0·cos − x1·sin is fma(x0, cos, −(x1·sin)), x0·sin +
// x1·cos is fma(x0, sin, x1·cos). Queries (times q_scale unless 1) to q_out; keys and values
// rounded to f16 into the caches (kv_heads, cap, dim). One block per (head of q, k or v, row).
extern "C" __global__ void air_x_rope_kv(const float* q, const float* k, const float* v,
        const float* cos, const float* sin, int rope_dim, int interleaved, float q_scale, float* q_out,
        unsigned short* kc, unsigned short* vc, int cap, int start, int heads, int kv_heads, int dim) {
    const int head = blockIdx.x, i = blockIdx.y;
    const int half = rope_dim / 2;
    const float* src;
    if (head < heads) src = q + ((long long)i * heads + head) * dim;
    else if (head < heads + kv_heads) src = k + ((long long)i * kv_heads + head - heads) * dim;
    else src = v + ((long long)i * kv_heads + head - heads - kv_heads) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float val = src[d];
        if (head < heads + kv_heads && d < rope_dim) {
            int p, other;
            bool first;
            if (interleaved) { p = d / 2; first = d % 2 == 0; other = first ? d + 1 : d - 1; }
            else { p = d % half; first = d < half; other = first ? d + half : d - half; }
            const float c = cos[(long long)i * half + p], s = sin[(long long)i * half + p];
            val = first ? __fmaf_rn(val, c, -__fmul_rn(src[other], s)) : __fmaf_rn(src[other], s, __fmul_rn(val, c));
        }
        if (head < heads) {
            q_out[((long long)i * heads + head) * dim + d] = q_scale != 1.0f ? __fmul_rn(val, q_scale) : val;
        } else if (head < heads + kv_heads) {
            kc[((long long)(head - heads) * cap + start + i) * dim + d] = f2h(val);
        } else {
            vc[((long long)(head - heads - kv_heads) * cap + start + i) * dim + d] = f2h(val);
        }
    }
}

// What an attention kernel's block (head blockIdx.x, row blockIdx.y of a sequence's rows at
// positions start..) attends with: the row's position, the first position it sees (the last
// `window` when window > 0), its KV head's cached keys and values, its query.
struct AttentionRow {
    int pos, first;
    const unsigned short *K, *V;
    const float* q;
};

__device__ __forceinline__ AttentionRow attention_row(const float* q, const unsigned short* kc,
        const unsigned short* vc, int cap, int start, int heads, int kv_heads, int dim, int window) {
    const int h = blockIdx.x, i = blockIdx.y;
    const int pos = start + i;
    const long long cache = (long long)(h / (heads / kv_heads)) * cap * dim;
    return AttentionRow{pos, window > 0 ? max(0, pos + 1 - window) : 0, kc + cache, vc + cache,
                        q + ((long long)i * heads + h) * dim};
}

// Attention of one sequence's n query rows (q (n, heads, dim), rotated) at positions start..,
// each over its cached positions, as the CPU's generation path (attention/mod.rs): the query
// rounded to f16, scores summed in the order of ggml's AVX-512 ggml_vec_dot_f16, an online
// softmax with glibc's expf, the value accumulator rounded to f16 after every update (in f16
// arithmetic over the leading multiple of 128 dims). One warp per (head, row); dim a multiple
// of 32, at most 256. out (n, heads · dim).
extern "C" __global__ void air_x_attention(const float* q, const unsigned short* kc, const unsigned short* vc,
        int cap, int start, int heads, int kv_heads, int dim, float scale, int window, float* out) {
    const int h = blockIdx.x, i = blockIdx.y, lane = threadIdx.x;
    const AttentionRow a = attention_row(q, kc, vc, cap, start, heads, kv_heads, dim, window);
    const int pos = a.pos, first = a.first;
    const unsigned short *K = a.K, *V = a.V;
    const float* qr = a.q;
    const int per_lane = dim / 32, whole = dim / 64 * 64, native = dim / 128 * 128;
    float qv[8];
    unsigned short acc[8];
#pragma unroll
    for (int c = 0; c < 8; c++) {
        qv[c] = c < per_lane ? h2f(f2h(qr[lane + 32 * c])) : 0.0f;
        acc[c] = 0;
    }
    float mx = __int_as_float(0xff800000), sum = 0.0f;
    for (int j = first; j <= pos; j++) {
        const unsigned short* kj = K + (long long)j * dim;
        // Chains lane and lane + 32 of the 64 (4 accumulators × 16 lanes) of ggml's dot.
        float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; c += 2) {
            if (32 * c < whole) {
                a0 = __fmaf_rn(h2f(kj[32 * c + lane]), qv[c], a0);
                a1 = __fmaf_rn(h2f(kj[32 * c + 32 + lane]), qv[c + 1], a1);
            }
        }
        float part = __fadd_rn(a0, a1);
        part = __fadd_rn(part, __shfl_down_sync(FULL, part, 16));
        part = __fadd_rn(part, __shfl_down_sync(FULL, part, 8));
        part = __fadd_rn(part, __shfl_down_sync(FULL, part, 4));
        part = __fadd_rn(part, __shfl_down_sync(FULL, part, 2));
        part = __fadd_rn(part, __shfl_down_sync(FULL, part, 1));
        float score = 0.0f;
        if (lane == 0) {
            double total = (double)part;
            for (int e = whole; e < dim; e++) total = __dadd_rn(total, (double)__fmul_rn(h2f(kj[e]), h2f(f2h(qr[e]))));
            score = __fmul_rn(__double2float_rn(total), scale);
        }
        score = __shfl_sync(FULL, score, 0);
        float rescale = 1.0f, weight;
        if (score > mx) {
            rescale = glibc_expf(__fsub_rn(mx, score));
            mx = score;
            weight = 1.0f;
            const unsigned short r16 = f2h(rescale);
#pragma unroll
            for (int c = 0; c < 8; c++) {
                const int e = lane + 32 * c;
                if (c < per_lane) acc[c] = e < native ? hmul(acc[c], r16) : f2h(__fmul_rn(h2f(acc[c]), rescale));
            }
        } else {
            weight = glibc_expf(__fsub_rn(score, mx));
        }
        const unsigned short w16 = f2h(weight);
        const unsigned short* vj = V + (long long)j * dim;
#pragma unroll
        for (int c = 0; c < 8; c++) {
            const int e = lane + 32 * c;
            if (c < per_lane) {
                const unsigned short val = vj[e];
                acc[c] = e < native ? hfma(val, w16, acc[c]) : f2h(__fmaf_rn(h2f(val), weight, h2f(acc[c])));
            }
        }
        sum = __fmaf_rn(sum, rescale, weight);
    }
    const float inverse = sum == 0.0f ? 0.0f : __fdiv_rn(1.0f, sum);
#pragma unroll
    for (int c = 0; c < 8; c++)
        if (c < per_lane) out[((long long)i * heads + h) * dim + lane + 32 * c] = __fmul_rn(h2f(acc[c]), inverse);
}

// Attention of one sequence's n query rows as the CPU's prompt path (attention/tiled.rs), which
// it takes for a call of 64 rows or more: per tile of 64 cached positions (aligned to absolute
// positions) the scores as FMA chains over the head dimension with the f32 query, then the
// scale; the tile's maximum; when it grows, the accumulator and the sum rescaled by glibc's
// expf; weights by ggml's exponential, their sum per 16 (sum16's order) added in f64; the
// weighted values as FMA chains over the tile's positions. One warp per (head, row); lane i
// holds positions i and i + 32 of a tile, and dims i + 32c. dim at most 256.
extern "C" __global__ void air_x_attention_tiled(const float* q, const unsigned short* kc, const unsigned short* vc,
        int cap, int start, int heads, int kv_heads, int dim, float scale, int window, float* out) {
    const int h = blockIdx.x, i = blockIdx.y, lane = threadIdx.x;
    const AttentionRow a = attention_row(q, kc, vc, cap, start, heads, kv_heads, dim, window);
    const int pos = a.pos, first = a.first;
    const unsigned short *K = a.K, *V = a.V;
    const float* qr = a.q;
    __shared__ float qs[256];
    for (int c = lane; c < dim; c += 32) qs[c] = qr[c];
    __syncwarp();
    const int per_lane = dim / 32;
    float acc[8];
#pragma unroll
    for (int c = 0; c < 8; c++) acc[c] = 0.0f;
    float mx = __int_as_float(0xff800000), sum = 0.0f;
    for (int tile = first / 64 * 64; tile <= pos; tile += 64) {
        float s[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int j = tile + lane + 32 * u;
            float t = 0.0f;
            if (j >= first && j <= pos) {
                const unsigned short* kj = K + (long long)j * dim;
                for (int c = 0; c < dim; c++) t = __fmaf_rn(qs[c], h2f(kj[c]), t);
                t = __fmul_rn(t, scale);
            } else {
                t = __int_as_float(0xff800000);
            }
            s[u] = t;
        }
        float tile_max = fmaxf(s[0], s[1]);
        for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL, tile_max, o));
        if (tile_max == __int_as_float(0xff800000)) continue;
        if (tile_max > mx) {
            const float rescale = glibc_expf(__fsub_rn(mx, tile_max));
#pragma unroll
            for (int c = 0; c < 8; c++) acc[c] = __fmul_rn(acc[c], rescale);
            sum = __fmul_rn(sum, rescale);
            mx = tile_max;
        }
        float w[2];
        double tile_sum = 0.0;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            w[u] = ggml_expf(__fsub_rn(s[u], mx));
            // sum16 of each 16 positions: halves, quarters, pairs, then the pair.
            float part = w[u];
            for (int o = 8; o > 0; o >>= 1) part = __fadd_rn(part, __shfl_down_sync(FULL, part, o, 16));
            const float low = __shfl_sync(FULL, part, 0), high = __shfl_sync(FULL, part, 16);
            tile_sum = __dadd_rn(__dadd_rn(tile_sum, (double)low), (double)high);
        }
        sum = __double2float_rn(__dadd_rn((double)sum, tile_sum));
        for (int t = 0; t < 64; t++) {
            const float wt = __shfl_sync(FULL, w[t / 32], t % 32);
            const unsigned short* vt = V + (long long)(tile + t) * dim;
            const bool inside = tile + t < cap;
#pragma unroll
            for (int c = 0; c < 8; c++)
                if (c < per_lane && inside) acc[c] = __fmaf_rn(wt, h2f(vt[lane + 32 * c]), acc[c]);
        }
    }
    const float inverse = sum == 0.0f ? 0.0f : __fdiv_rn(1.0f, sum);
#pragma unroll
    for (int c = 0; c < 8; c++)
        if (c < per_lane) out[((long long)i * heads + h) * dim + lane + 32 * c] = __fmul_rn(acc[c], inverse);
}

// silu(gate) · up as ggml_vec_swiglu_f32 (ops.rs): x / (1 + e^-x) with ggml's exponential in
// whole chunks of 16 of a row of ffn values, glibc's expf in the rest.
extern "C" __global__ void air_x_swiglu(const float* g, const float* u, float* out, int ffn, long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float x = g[i];
    const float e = (int)(i % ffn) < ffn / 16 * 16 ? ggml_expf(-x) : glibc_expf(-x);
    out[i] = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, e)), u[i]);
}

// gelu(gate) · up as ggml (ops.rs): the gate rounded to f16 looked up in a table of f16 GELU
// values, exact beyond ±10.
extern "C" __global__ void air_x_geglu(const float* g, const float* u, const unsigned short* table, float* out,
        long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float x = g[i];
    out[i] = x <= -10.0f ? 0.0f : x >= 10.0f ? __fmul_rn(x, u[i]) : __fmul_rn(h2f(table[f2h(x)]), u[i]);
}
