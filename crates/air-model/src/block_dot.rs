//! Dot products of a weight row with a quantized activation row: candle's block kernels, except
//! where a benchmark showed candle's is the bottleneck. candle 0.11's Q4_1 x Q8_1 kernel is
//! scalar (64% of SmolLM2's decode time, docs/benchmarks.md); Air's AVX2 kernel replaces it,
//! summing in the lane order of ggml's, so the two engines also round alike.

use candle_core::quantized::k_quants::{self, GgmlType};
use half::{bf16, f16};

/// A weight block type and how Air dots a row of it with activations.
pub trait BlockDot: GgmlType {
    /// Σ w·x over `k` elements.
    fn dot(k: usize, w: &[Self], x: &[Self::VecDotType]) -> f32;
}

macro_rules! candle_dot {
    ($($t:ty),*) => {$(
        impl BlockDot for $t {
            fn dot(k: usize, w: &[Self], x: &[Self::VecDotType]) -> f32 {
                <$t as GgmlType>::vec_dot(k, w, x)
            }
        }
    )*};
}

candle_dot!(
    f32,
    f16,
    bf16,
    k_quants::BlockQ4_0,
    k_quants::BlockQ5_0,
    k_quants::BlockQ5_1,
    k_quants::BlockQ8_0,
    k_quants::BlockQ2K,
    k_quants::BlockQ3K,
    k_quants::BlockQ4K,
    k_quants::BlockQ5K,
    k_quants::BlockQ6K
);

impl BlockDot for k_quants::BlockQ4_1 {
    fn dot(k: usize, w: &[Self], x: &[Self::VecDotType]) -> f32 {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            // SAFETY: the target features are enabled at compile time; the slices hold whole
            // repr(C) blocks (Q4_1: 20 bytes, Q8_1: 36 bytes), as many as `k` needs.
            let nb = k / 32;
            assert!(w.len() >= nb && x.len() >= nb);
            unsafe { avx2::dot_q4_1_q8_1(nb, w.as_ptr() as *const u8, x.as_ptr() as *const u8) }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            <Self as GgmlType>::vec_dot(k, w, x)
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    unsafe fn half_at(p: *const u8) -> f32 {
        // SAFETY (caller): two readable bytes at p.
        f16::from_bits(unsafe { (p as *const u16).read_unaligned() }).to_f32()
    }

    /// ggml's `hsum_float_8`.
    unsafe fn hsum(x: __m256) -> f32 {
        // SAFETY: register-only intrinsics of features enabled at compile time.
        unsafe {
            let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
            r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            r = _mm_add_ss(r, _mm_movehdup_ps(r));
            _mm_cvtss_f32(r)
        }
    }

    /// Q4_1 (d, m: f16; 16 bytes of nibbles) · Q8_1 (d, s: f16; 32 i8), `nb` blocks.
    pub unsafe fn dot_q4_1_q8_1(nb: usize, w: *const u8, x: *const u8) -> f32 {
        // SAFETY (caller): nb blocks readable at w and x.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_ps();
            let mut summs = 0f32;
            for b in 0..nb {
                let (wb, xb) = (w.add(b * 20), x.add(b * 36));
                summs = half_at(wb.add(2)).mul_add(half_at(xb.add(2)), summs);
                let d = _mm256_set1_ps(half_at(wb) * half_at(xb));
                let packed = _mm_loadu_si128(wb.add(4) as *const __m128i);
                let nibbles = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
                let qy = _mm256_loadu_si256(xb.add(4) as *const __m256i);
                let pairs = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(nibbles, qy));
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(pairs), acc);
            }
            hsum(acc) + summs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation_quant::ActivationQuant;
    use k_quants::{BlockQ4_1, BlockQ8_1};

    #[test]
    fn q4_1_kernel_agrees_with_candle() {
        let k = 576;
        let mut s = 7u32;
        let mut data = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                    (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let (w, x) = (data(k), data(k));
        let mut wq = vec![BlockQ4_1::zeros(); k / 32];
        BlockQ4_1::from_float(&w, &mut wq);
        let mut xq = vec![BlockQ8_1::zeros(); k / 32];
        BlockQ8_1::quantize(&x, &mut xq);
        let (ours, candle) = (BlockQ4_1::dot(k, &wq, &xq), BlockQ4_1::vec_dot(k, &wq, &xq));
        assert!((ours - candle).abs() < 1e-4 * candle.abs().max(1.0), "{ours} {candle}");
    }
}
