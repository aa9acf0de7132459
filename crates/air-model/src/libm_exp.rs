//! glibc's `expf` (the algorithm of glibc 2.27 and later, `sysdeps/ieee754/flt-32/e_expf.c`)
//! for 16 values at once in AVX-512 registers, bit for bit. ggml's one-row flash attention
//! calls `expf` once per cached position; Air's generation path computes the same values a
//! group of positions at a time (`attention::avx512`).
//!
//! The algorithm, in f64: x·32/ln 2 = k + r with k an integer (rounded by adding 1.5·2^52),
//! 2^(k/32) from a table of 32 entries whose exponent field takes k/32's integer part, and
//! 2^(r/32) by a cubic. The unit test compares against the platform's `expf`.

use std::arch::x86_64::*;

/// Values per call.
pub(crate) const LANES: usize = 16;

/// 2^(i/32) as f64 bits, less i << 47 (glibc's `__exp2f_data.tab`).
#[rustfmt::skip]
const TABLE: [u64; 32] = [
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
];
/// 32/ln 2.
const INV_LN2_N: f64 = f64::from_bits(0x3ff71547652b82fe) * 32.0;
/// Adding it rounds an f64 below 2^51 in magnitude to an integer, kept in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// The cubic's coefficients for 2^(r/32) - 1 (glibc's `poly_scaled`).
const C: [f64; 3] = [
    f64::from_bits(0x3fac6af84b912394) / 32.0 / 32.0 / 32.0,
    f64::from_bits(0x3fcebfce50fac4f3) / 32.0 / 32.0,
    f64::from_bits(0x3fe62e42ff0c52d6) / 32.0,
];
/// Below this e^x rounds to 0 in f32 (glibc returns 0 there); above the other, to infinity.
const UNDERFLOW: f32 = f32::from_bits(0xc2cff1b4); // -0x1.9fe368p6
const OVERFLOW: f32 = f32::from_bits(0x42b17217); // 0x1.62e42ep6

/// e^x of 8 values widened to f64, for the lanes inside glibc's main path.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp8(x: __m256) -> __m256 {
    let xd = _mm512_cvtps_pd(x);
    let z = _mm512_mul_pd(_mm512_set1_pd(INV_LN2_N), xd);
    let k = _mm512_add_pd(z, _mm512_set1_pd(SHIFT));
    let ki = _mm512_castpd_si512(k);
    let r = _mm512_sub_pd(z, _mm512_sub_pd(k, _mm512_set1_pd(SHIFT)));
    // TABLE[ki % 32], from two halves of 16 entries by bit 4 of the index.
    // SAFETY: TABLE holds 32 entries; the loads read 8 each.
    let table: [__m512i; 4] = std::array::from_fn(|i| unsafe { _mm512_loadu_si512(TABLE[8 * i..].as_ptr().cast()) });
    let low = _mm512_permutex2var_epi64(table[0], ki, table[1]);
    let high = _mm512_permutex2var_epi64(table[2], ki, table[3]);
    let upper_half = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
    let t = _mm512_add_epi64(_mm512_mask_blend_epi64(upper_half, low, high), _mm512_slli_epi64::<47>(ki));
    let s = _mm512_castsi512_pd(t);
    let cubic = _mm512_fmadd_pd(_mm512_set1_pd(C[0]), r, _mm512_set1_pd(C[1]));
    let r2 = _mm512_mul_pd(r, r);
    let y = _mm512_fmadd_pd(_mm512_set1_pd(C[2]), r, _mm512_set1_pd(1.0));
    let y = _mm512_fmadd_pd(cubic, r2, y);
    _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
}

/// `expf` of each of 16 values, as glibc computes it.
/// SAFETY (caller): the CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn expf16(x: &[f32; LANES]) -> [f32; LANES] {
    // SAFETY: `x` holds 16 values.
    let v = unsafe { _mm512_loadu_ps(x.as_ptr()) };
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let low_e = _mm512_castps_pd(_mm512_castps256_ps512(exp8(_mm512_castps512_ps256(v))));
    let mut e = _mm512_castpd_ps(_mm512_insertf64x4::<1>(low_e, _mm256_castps_pd(exp8(high))));
    // glibc's special cases: 0 below the underflow bound (and at -inf), infinity above the
    // overflow bound, x + x for NaN (and +inf).
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(UNDERFLOW));
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_set1_ps(OVERFLOW));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    e = _mm512_mask_mov_ps(e, under, _mm512_setzero_ps());
    e = _mm512_mask_mov_ps(e, over, _mm512_set1_ps(f32::INFINITY));
    e = _mm512_mask_mov_ps(e, nan, _mm512_add_ps(v, v));
    let mut out = [0f32; LANES];
    // SAFETY: `out` holds 16 values.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), e) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_the_platform_expf_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        // Every 997th float from the underflow bound up to the overflow bound (about 320,000),
        // then the edges.
        let mut xs: Vec<f32> =
            (0..=u32::MAX).step_by(997).map(f32::from_bits).filter(|x| (-105.0..89.0).contains(x)).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, UNDERFLOW, OVERFLOW, -87.5, -103.9, 88.7]);
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -200.0, 200.0, f32::MIN_POSITIVE]);
        for chunk in xs.chunks(LANES) {
            let mut lanes = [0f32; LANES];
            lanes[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: AVX-512F checked above.
            let got = unsafe { expf16(&lanes) };
            for (x, g) in chunk.iter().zip(got) {
                let want = x.exp();
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "e^{x}: {g} vs {want}");
            }
        }
    }
}
