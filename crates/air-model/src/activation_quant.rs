//! Quantization of activations (the left-hand side of a quantized matmul) into the block type
//! a weight type is dotted with, bit for bit as ggml's x86 CPU backend does it: `127/max`
//! scales, round-half-to-even, the Q8_1 sum taken in f32 before rounding to f16, and Q8_K's
//! signed-maximum scale. llama.cpp's logits depend on these details at the 0.1 level for small
//! models, so matching them is what makes Air's greedy tokens equal llama.cpp's.

use candle_core::quantized::k_quants::{BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType};
use half::{bf16, f16};

/// A block type activations can be quantized into the way ggml does.
pub trait ActivationQuant: GgmlType {
    /// Quantizes `xs` (a multiple of the block size) into `ys`.
    fn quantize(xs: &[f32], ys: &mut [Self]);
}

/// ggml's `nearest_int`: round half to even.
fn nearest(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Writes a repr(C) block from its bytes (candle keeps the fields crate-private).
fn write_block<T>(dst: &mut T, bytes: &[u8]) {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: T is a repr(C) block of plain integers/halves (size asserted above); every bit
    // pattern is valid and `dst` is exclusively borrowed.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut T as *mut u8, bytes.len()) }
}

/// One block of 32 activations as ggml's Q8_0/Q8_1 quantize it: the scale `d`, the 8-bit
/// values, and their sum.
pub(crate) fn quantize_q8_block(x: &[f32]) -> (f32, [i8; 32], i32) {
    let x: &[f32; 32] = x.try_into().expect("a block is 32 values");
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    // SAFETY: AVX2 is enabled for the whole build (cfg).
    return unsafe { quantize_q8_block_avx2(x) };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    quantize_q8_block_scalar(x)
}

/// [`quantize_q8_block`] one value at a time.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))]
fn quantize_q8_block_scalar(x: &[f32; 32]) -> (f32, [i8; 32], i32) {
    let max = max_abs(x);
    let d = max / 127.0;
    let id = if max != 0.0 { 127.0 / max } else { 0.0 };
    let q: [i8; 32] = std::array::from_fn(|i| nearest(x[i] * id) as i8);
    (d, q, q.iter().map(|&v| v as i32).sum())
}

/// [`quantize_q8_block`] in AVX2 registers, as ggml's x86 `quantize_row_q8_0`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
unsafe fn quantize_q8_block_avx2(x: &[f32; 32]) -> (f32, [i8; 32], i32) {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is enabled for the build; `x` holds 4 × 8 floats.
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let abs: [__m256; 4] = std::array::from_fn(|i| _mm256_andnot_ps(sign, v[i]));
        let m8 = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let mut m4 = _mm_max_ps(_mm256_extractf128_ps(m8, 1), _mm256_castps256_ps128(m8));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let max = _mm_cvtss_f32(m4);
        let d = max / 127.0;
        let id = _mm256_set1_ps(if max != 0.0 { 127.0 / max } else { 0.0 });
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
        });
        let sums = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
        let mut s4 = _mm_add_epi32(_mm256_extracti128_si256(sums, 1), _mm256_castsi256_si128(sums));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01));
        // Packing works within 128-bit halves; the permutation puts the values back in order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut q = [0i8; 32];
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
        (d, q, _mm_cvtsi128_si32(s4))
    }
}

/// Q8_1's `s`: d · Σq, computed in f32 and stored as f16.
pub(crate) fn q8_1_sum(d: f32, sum: i32) -> f16 {
    f16::from_f32(d * sum as f32)
}

impl ActivationQuant for BlockQ8_0 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        let mut buf = [0u8; 34];
        for (x, y) in xs.chunks_exact(32).zip(ys) {
            let (d, q, _) = quantize_q8_block(x);
            buf[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            buf[2..].copy_from_slice(&q.map(|v| v as u8));
            write_block(y, &buf);
        }
    }
}

impl ActivationQuant for BlockQ8_1 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        let mut buf = [0u8; 36];
        for (x, y) in xs.chunks_exact(32).zip(ys) {
            let (d, q, sum) = quantize_q8_block(x);
            buf[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            buf[2..4].copy_from_slice(&q8_1_sum(d, sum).to_le_bytes());
            buf[4..].copy_from_slice(&q.map(|v| v as u8));
            write_block(y, &buf);
        }
    }
}

impl ActivationQuant for BlockQ8K {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        let mut buf = [0u8; 4 + 256 + 32];
        for (x, y) in xs.chunks_exact(256).zip(ys) {
            let (d, q, sums) = quantize_q8k_block(x.try_into().expect("a block is 256 values"));
            buf[0..4].copy_from_slice(&d.to_le_bytes());
            buf[4..260].copy_from_slice(&q.map(|v| v as u8));
            for (j, sum) in sums.iter().enumerate() {
                buf[260 + 2 * j..262 + 2 * j].copy_from_slice(&sum.to_le_bytes());
            }
            write_block(y, &buf);
        }
    }
}

/// One Q8_K block as ggml's `quantize_row_q8_K` makes it: the scale `d`, the 8-bit values and
/// the sums of each 16 of them; all zero for a block of zeros.
fn quantize_q8k_block(x: &[f32; 256]) -> (f32, [i8; 256], [i16; 16]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    // SAFETY: AVX2 is enabled for the whole build (cfg).
    return unsafe { quantize_q8k_block_avx2(x) };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    quantize_q8k_block_scalar(x)
}

/// [`quantize_q8k_block`] one value at a time. The scale comes from the first value of the
/// largest magnitude, sign included.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))]
fn quantize_q8k_block_scalar(x: &[f32; 256]) -> (f32, [i8; 256], [i16; 16]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return (0.0, [0; 256], [0; 16]);
    }
    let iscale = -127.0 / max;
    let q: [i8; 256] = std::array::from_fn(|i| nearest(iscale * x[i]).min(127) as i8);
    let sums = std::array::from_fn(|j| q[j * 16..(j + 1) * 16].iter().map(|&v| v as i16).sum());
    (1.0 / iscale, q, sums)
}

/// [`quantize_q8k_block`] in AVX2 registers, with the scalar version's rounding.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
unsafe fn quantize_q8k_block_avx2(x: &[f32; 256]) -> (f32, [i8; 256], [i16; 16]) {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is enabled for the build; `x` holds 32 × 8 floats.
    unsafe {
        let v: [__m256; 32] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let amax8 = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_andnot_ps(sign, v)));
        let mut m4 = _mm_max_ps(_mm256_extractf128_ps(amax8, 1), _mm256_castps256_ps128(amax8));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        if amax == 0.0 {
            return (0.0, [0; 256], [0; 16]);
        }
        // The first value whose magnitude is the maximum gives the scale its sign.
        let wanted = _mm256_set1_ps(amax);
        let first = (0..32)
            .find_map(|i| {
                let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v[i]), wanted));
                (hits != 0).then(|| 8 * i + hits.trailing_zeros() as usize)
            })
            .expect("the maximum magnitude is one of the values");
        let iscale = -127.0 / x[first];
        let scale = _mm256_set1_ps(iscale);
        let mut q = [0i8; 256];
        let mut sums = [0i16; 16];
        for (j, sum) in sums.iter_mut().enumerate() {
            // 16 values: two vectors of 8, rounded half to even, capped at 127.
            let ints: [__m256i; 2] = std::array::from_fn(|h| {
                let scaled = _mm256_mul_ps(v[2 * j + h], scale);
                let rounded = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_min_epi32(_mm256_cvtps_epi32(rounded), _mm256_set1_epi32(127))
            });
            let total = _mm256_add_epi32(ints[0], ints[1]);
            let mut s4 = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01));
            *sum = _mm_cvtsi128_si32(s4) as i16;
            // Packing works within 128-bit halves: 16-bit lanes (0-3, 8-11, 4-7, 12-15) become
            // bytes in that order in each half.
            let words = _mm256_permute4x64_epi64(_mm256_packs_epi32(ints[0], ints[1]), 0b11_01_10_00);
            let bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
            _mm_storeu_si128(q.as_mut_ptr().add(16 * j) as *mut __m128i, bytes);
        }
        (1.0 / iscale, q, sums)
    }
}

impl ActivationQuant for f32 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        ys.copy_from_slice(xs);
    }
}

impl ActivationQuant for f16 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        ys.iter_mut().zip(xs).for_each(|(y, &x)| *y = f16::from_f32(x));
    }
}

impl ActivationQuant for bf16 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        ys.iter_mut().zip(xs).for_each(|(y, &x)| *y = bf16::from_f32(x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rounds_half_to_even_and_dequantizes_close() {
        let mut xs = [0f32; 32];
        xs[0] = 127.0;
        xs[1] = 2.5; // exactly half way: rounds to 2, as ggml's nearest_int
        xs[2] = -3.5; // rounds to -4
        xs[3] = 10.3;
        let mut ys = vec![BlockQ8_0::zeros(); 1];
        BlockQ8_0::quantize(&xs, &mut ys);
        let mut back = [0f32; 32];
        BlockQ8_0::to_float(&ys, &mut back);
        assert_eq!(&back[..4], &[127.0, 2.0, -4.0, 10.0]);
    }

    #[test]
    fn q8_block_quantizers_agree() {
        let mut seed = 3u32;
        let scales = [0.0, 1e-3, 1.0, 300.0].into_iter().cycle().take(4000);
        // With 127 the largest value the scale is 1 and the others lie half way between
        // integers: ties, rounded to even.
        let halves: [f32; 32] = std::array::from_fn(|i| if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 });
        for (i, scale) in scales.enumerate() {
            let x: [f32; 32] = std::array::from_fn(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
            });
            let x = if i == 0 { halves } else { x };
            let (d, q, sum) = quantize_q8_block(&x);
            let (d0, q0, sum0) = quantize_q8_block_scalar(&x);
            assert_eq!((d.to_bits(), q, sum), (d0.to_bits(), q0, sum0));
        }
    }

    #[test]
    fn q8_k_quantizers_agree() {
        let mut seed = 5u32;
        for scale in [0.0, 1e-3, 1.0, 300.0] {
            let mut x: [f32; 256] = std::array::from_fn(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
            });
            let check = |x: &[f32; 256]| {
                let (d, q, sums) = quantize_q8k_block(x);
                let (d0, q0, sums0) = quantize_q8k_block_scalar(x);
                assert_eq!((d.to_bits(), q, sums), (d0.to_bits(), q0, sums0));
            };
            check(&x);
            // Equal magnitudes of both signs: the first one sets the scale's sign.
            x[200] = 2.0 * scale;
            x[7] = -2.0 * scale;
            check(&x);
        }
    }

    #[test]
    fn q8_k_keeps_block_sums() {
        let xs: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 7.0).collect();
        let mut ys = vec![BlockQ8K::zeros(); 1];
        BlockQ8K::quantize(&xs, &mut ys);
        let mut back = vec![0f32; 256];
        BlockQ8K::to_float(&ys, &mut back);
        for (a, b) in xs.iter().zip(&back) {
            assert!((a - b).abs() < 0.11, "{a} {b}");
        }
    }
}
