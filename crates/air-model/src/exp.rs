//! e^x for a block of 16 values, by the polynomial ggml's vectorized `ggml_v_expf` evaluates
//! (range reduction by ln 2, a degree-5 polynomial, scaling by 2^n), so that softmax weights and
//! SiLU round as llama.cpp's do. Written lane-wise on arrays so that it compiles to SIMD.

/// Values per call: one AVX-512 register, the chunk ggml's softmax sums at a time.
pub const EXP_LANES: usize = 16;

const ROUND: f32 = 12582912.0; // 0x1.8p23: adding it rounds to an integer
const LOG2_E: f32 = f32::from_bits(0x3fb8aa3b); // 0x1.715476p+0
const LN2_HI: f32 = f32::from_bits(0x3f317200); // 0x1.62e4p-1
const LN2_LO: f32 = f32::from_bits(0x35bfbe8e); // 0x1.7f7d1cp-20
const C: [f32; 5] = [
    f32::from_bits(0x3c072010), // 0x1.0e4020p-7
    f32::from_bits(0x3d2b9f17), // 0x1.573e2ep-5
    f32::from_bits(0x3e2aaf33), // 0x1.555e66p-3
    f32::from_bits(0x3efffedb), // 0x1.fffdb6p-2
    f32::from_bits(0x3f7ffff6), // 0x1.ffffecp-1
];

/// e^x for each lane, within a few ulps where the result is a normal number; 0 below that
/// (ggml scales into subnormals there, a difference under 1e-38), infinity on overflow.
#[inline]
pub fn exp16(x: &[f32; EXP_LANES]) -> [f32; EXP_LANES] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // SAFETY: AVX2 and FMA are enabled at compile time.
        unsafe { avx2::exp16(x) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    exp16_lanewise(x)
}

/// [`exp16`] lane by lane: the definition, and the fallback where the vector version is not
/// built. Branches per lane keep the compiler from vectorizing it.
#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))))]
#[inline]
fn exp16_lanewise(x: &[f32; EXP_LANES]) -> [f32; EXP_LANES] {
    std::array::from_fn(|i| {
        let x = x[i];
        let z = x.mul_add(LOG2_E, ROUND);
        let n = z - ROUND;
        let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
        let u = b * b;
        let j = C[0].mul_add(b, C[1]).mul_add(u, C[2].mul_add(b, C[3])).mul_add(u, C[4].mul_add(b, 1.0));
        // j · 2^n, exact while 2^n is a normal number; beyond, 0 (x far below) or infinity.
        if n < -126.0 {
            0.0
        } else if n > 127.0 {
            f32::INFINITY
        } else {
            j * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
    })
}

/// [`exp16_lanewise`]'s operations on eight lanes at a time, the lane branches as blends.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2 {
    use super::{C, EXP_LANES, LN2_HI, LN2_LO, LOG2_E, ROUND};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let c = |v: f32| _mm256_set1_ps(v);
        let n = _mm256_sub_ps(_mm256_fmadd_ps(x, c(LOG2_E), c(ROUND)), c(ROUND));
        let b = _mm256_fnmadd_ps(n, c(LN2_LO), _mm256_fnmadd_ps(n, c(LN2_HI), x));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_fmadd_ps(c(C[0]), b, c(C[1])), u, _mm256_fmadd_ps(c(C[2]), b, c(C[3]))),
            u,
            _mm256_fmadd_ps(c(C[4]), b, c(1.0)),
        );
        let exponent = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)));
        let scaled = _mm256_mul_ps(j, _mm256_castsi256_ps(exponent));
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(n, c(-126.0));
        let overflow = _mm256_cmp_ps::<_CMP_GT_OQ>(n, c(127.0));
        let finite = _mm256_andnot_ps(underflow, scaled);
        _mm256_blendv_ps(finite, c(f32::INFINITY), overflow)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp16(x: &[f32; EXP_LANES]) -> [f32; EXP_LANES] {
        let mut out = [0f32; EXP_LANES];
        for half in 0..2 {
            // SAFETY: both arrays hold 16 values; each half is 8.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(8 * half));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * half), exp8(v));
            }
        }
        out
    }
}

/// Σ of 16 values in the order of an AVX-512 horizontal add (halves, then quarters, then pairs).
#[inline]
pub fn sum16(x: &[f32; EXP_LANES]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| x[i + 8] + x[i]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i + 4] + h[i]);
    (q[2] + q[0]) + (q[3] + q[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_version_gives_the_lanewise_bits() {
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let special =
            [0.0, -0.0, 1e-30, -87.3, -88.7, -103.0, -150.0, 88.7, 89.0, 200.0, f32::NEG_INFINITY, f32::INFINITY];
        for round in 0..20_000 {
            let x: [f32; EXP_LANES] = std::array::from_fn(|i| match round {
                0 => special[i % special.len()],
                _ => (next() as f32 / u32::MAX as f32 - 0.5) * if round % 2 == 0 { 220.0 } else { 20.0 },
            });
            let (got, want) = (exp16(&x), exp16_lanewise(&x));
            for i in 0..EXP_LANES {
                assert_eq!(got[i].to_bits(), want[i].to_bits(), "e^{}", x[i]);
            }
        }
    }

    #[test]
    fn close_to_libm() {
        // Down to e^-87, where results stop being normal numbers (below, 0).
        let xs: Vec<f32> = (0..2900).map(|i| -(i as f32) * 0.03).collect();
        for chunk in xs.chunks_exact(EXP_LANES) {
            let got = exp16(chunk.try_into().unwrap());
            for (g, x) in got.iter().zip(chunk) {
                let want = x.exp();
                assert!((g - want).abs() <= 4e-7 * want.max(f32::MIN_POSITIVE), "e^{x}: {g} vs {want}");
            }
        }
        let edge = exp16(&[f32::NEG_INFINITY; EXP_LANES]);
        assert!(exp16(&[f32::NAN; EXP_LANES])[0].is_nan());
        assert_eq!(exp16(&[f32::INFINITY; EXP_LANES])[0], f32::INFINITY);
        assert!(edge.iter().all(|&v| v == 0.0));
        assert_eq!(exp16(&[0.0; EXP_LANES])[0], 1.0);
    }
}
