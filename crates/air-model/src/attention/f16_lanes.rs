//! The part of the generation path's value accumulator that ggml updates in native f16
//! arithmetic. Built for a CPU with AVX512-FP16 (as llama.cpp's reference outputs were), ggml's
//! f16 vector loops step 128 lanes: in a row of 128 lanes or more (head_dim 128, 256) the
//! leading multiple of 128 is rescaled and accumulated in f16, the weight rounded to f16 and
//! each result rounded once; the rest takes its scalar tail (f32, then rounded). This module
//! computes the f16 part with the same bits on any x86 CPU: natively where the CPU has
//! AVX512-FP16, by exact emulation elsewhere (four lanes at a time in AVX2 registers where the
//! build has AVX2, FMA and F16C).

use half::f16;

/// Width of ggml's f16 vector loop (4 registers of 32 lanes).
const STEP: usize = 128;

/// Lanes of a row of `d` that ggml's f16 loops cover.
pub(super) fn count(d: usize) -> usize {
    d / STEP * STEP
}

/// `acc[i] ← acc[i] · r`, in f16 arithmetic (`ggml_vec_scale_f16`). `acc.len()` is a multiple
/// of 128.
pub(super) fn scale(acc: &mut [f16], r: f32) {
    let r = f16::from_f32(r);
    #[cfg(target_arch = "x86_64")]
    if native() {
        // SAFETY: the CPU has AVX512-FP16 (and so AVX512F).
        return unsafe { avx512fp16::scale(acc, r) };
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    // SAFETY: the build has the features (this cfg).
    return unsafe { emulated::scale(acc, r) };
    #[allow(unreachable_code, reason = "the scalar emulation serves builds without the vector one")]
    for a in acc {
        *a = round(a.to_f64() * r.to_f64());
    }
}

/// `acc[i] ← v[i] · w + acc[i]`, in f16 arithmetic with one rounding (`ggml_vec_mad_f16`).
/// `acc.len()` is a multiple of 128 and `v` at least as long.
pub(super) fn mad(acc: &mut [f16], v: &[f16], w: f32) {
    let w = f16::from_f32(w);
    #[cfg(target_arch = "x86_64")]
    if native() {
        // SAFETY: the CPU has AVX512-FP16 (and so AVX512F).
        return unsafe { avx512fp16::mad(acc, v, w) };
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    // SAFETY: the build has the features (this cfg).
    return unsafe { emulated::mad(acc, v, w) };
    #[allow(unreachable_code, reason = "the scalar emulation serves builds without the vector one")]
    for (a, x) in acc.iter_mut().zip(v) {
        *a = round(x.to_f64().mul_add(w.to_f64(), a.to_f64()));
    }
}

/// `x` rounded once to the nearest f16 (ties to even). Through f32 rounded to odd, which keeps
/// enough bits that the second rounding is exact; `half`'s own f64 conversion rounds twice.
fn round(x: f64) -> f16 {
    let nearest = x as f32;
    if nearest as f64 == x || x.is_nan() {
        return f16::from_f32(nearest);
    }
    let toward_zero = if (nearest as f64).abs() > x.abs() { f32::from_bits(nearest.to_bits() - 1) } else { nearest };
    f16::from_f32(f32::from_bits(toward_zero.to_bits() | 1))
}

/// The scalar emulation ([`round`] of an f64 product or fused multiply-add) four lanes at a
/// time: f16 to f64 is exact, the f64 operations are the scalar ones, and [`round`]'s steps
/// (nearest f32, toward zero where that overshot, the sticky bit where inexact, then nearest
/// f16) are each one vector operation. Gemma 3's head dimension of 256 runs entirely here on
/// CPUs without AVX512-FP16: one lane at a time, its decode spent 15% of the time in the
/// attention loop around it on a Zen 4 core (perf), and ran 1.36-1.40x faster with this
/// (docs/benchmarks.md).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
mod emulated {
    use half::f16;
    use std::arch::x86_64::*;

    const LANES: usize = 4;

    /// Four f16 values from `p`, widened to f64 (exactly).
    /// SAFETY (caller): 8 readable bytes at `p`.
    #[inline(always)]
    unsafe fn load(p: *const f16) -> __m256d {
        unsafe { _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(p.cast()))) }
    }

    /// [`super::round`] of four lanes, stored as f16 at `p`.
    /// SAFETY (caller): 8 writable bytes at `p`.
    #[inline(always)]
    unsafe fn round_store(x: __m256d, p: *mut f16) {
        unsafe {
            let nearest = _mm256_cvtpd_ps(x);
            let back = _mm256_cvtps_pd(nearest);
            let abs = |v: __m256d| _mm256_andnot_pd(_mm256_set1_pd(-0.0), v);
            // Lanes of all ones where the f32 overshot |x| (then one step toward zero), and
            // where it is inexact (then the sticky bit); a NaN compares unordered, so neither.
            let overshot =
                _mm256_cvtpd_epi32(_mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(abs(back), abs(x)), _mm256_set1_pd(1.0)));
            let inexact = _mm256_castpd_si256(_mm256_cmp_pd::<_CMP_NEQ_OQ>(back, x));
            let inexact =
                _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(inexact, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
            let toward_zero = _mm_sub_epi32(_mm_castps_si128(nearest), overshot);
            let odd = _mm_or_si128(toward_zero, _mm_and_si128(inexact, _mm_set1_epi32(1)));
            let halves = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_castsi128_ps(odd));
            _mm_storel_epi64(p.cast(), halves);
        }
    }

    /// `super::scale` for a multiple of 4 lanes.
    /// SAFETY (caller): the CPU has AVX2, FMA and F16C.
    pub(super) unsafe fn scale(acc: &mut [f16], r: f16) {
        // SAFETY: the CPU has AVX (the caller).
        let r = unsafe { _mm256_set1_pd(r.to_f64()) };
        for chunk in acc.chunks_exact_mut(LANES) {
            // SAFETY: 4 f16 values are 8 bytes.
            unsafe { round_store(_mm256_mul_pd(load(chunk.as_ptr()), r), chunk.as_mut_ptr()) };
        }
    }

    /// `super::mad` for a multiple of 4 lanes.
    /// SAFETY (caller): as [`scale`]; `v` at least as long as `acc`.
    pub(super) unsafe fn mad(acc: &mut [f16], v: &[f16], w: f16) {
        // SAFETY: as above.
        let w = unsafe { _mm256_set1_pd(w.to_f64()) };
        for (chunk, x) in acc.chunks_exact_mut(LANES).zip(v.chunks_exact(LANES)) {
            // SAFETY: as in `scale`.
            unsafe { round_store(_mm256_fmadd_pd(load(x.as_ptr()), w, load(chunk.as_ptr())), chunk.as_mut_ptr()) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn native() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| std::is_x86_feature_detected!("avx512fp16"))
}

/// The f16 instructions by inline assembly (their intrinsics are not stable Rust yet).
#[cfg(target_arch = "x86_64")]
mod avx512fp16 {
    use half::f16;
    use std::arch::asm;
    use std::arch::x86_64::*;

    const LANES: usize = 32;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale(acc: &mut [f16], r: f16) {
        let r = _mm512_set1_epi16(r.to_bits() as i16);
        for chunk in acc.chunks_exact_mut(LANES) {
            // SAFETY: 32 f16 values are 64 bytes; the caller checked AVX512-FP16.
            unsafe {
                let mut a = _mm512_loadu_si512(chunk.as_ptr().cast());
                asm!("vmulph {a}, {a}, {r}", a = inout(zmm_reg) a, r = in(zmm_reg) r, options(pure, nomem, nostack));
                _mm512_storeu_si512(chunk.as_mut_ptr().cast(), a);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn mad(acc: &mut [f16], v: &[f16], w: f16) {
        let w = _mm512_set1_epi16(w.to_bits() as i16);
        for (chunk, x) in acc.chunks_exact_mut(LANES).zip(v.chunks_exact(LANES)) {
            // SAFETY: as in `scale`.
            unsafe {
                let mut a = _mm512_loadu_si512(chunk.as_ptr().cast());
                let x = _mm512_loadu_si512(x.as_ptr().cast());
                asm!("vfmadd231ph {a}, {x}, {w}", a = inout(zmm_reg) a, x = in(zmm_reg) x, w = in(zmm_reg) w, options(pure, nomem, nostack));
                _mm512_storeu_si512(chunk.as_mut_ptr().cast(), a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_once_where_two_roundings_would_differ() {
        // 1 + 2^-11 + 2^-40: f32 drops the 2^-40 and leaves a tie that f16 rounds to even (1);
        // rounded once it is above the tie, so 1 + 2^-10.
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(f16::from_f32(x as f32), f16::ONE);
        assert_eq!(round(x), f16::from_f64(1.0 + 2f64.powi(-10)));
        assert_eq!(round(-x), -f16::from_f64(1.0 + 2f64.powi(-10)));
        assert_eq!(round(0.5), f16::from_f32(0.5));
        assert_eq!(round(1e-9), f16::ZERO);
    }

    /// A xorshift generator of 32-bit values from `state` (nonzero).
    fn xorshift(mut state: u32) -> impl FnMut() -> u32 {
        move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        }
    }

    /// `mad` and `scale` (native, or the vector emulation) against [`round`] lane by lane, over
    /// f16 values of every exponent, subnormals included.
    #[test]
    fn every_exponent_rounds_as_the_scalar_emulation() {
        let mut bits = xorshift(0x9e37_79b9);
        let mut finite = || loop {
            let v = f16::from_bits(bits() as u16);
            if v.is_finite() {
                return v;
            }
        };
        let v: Vec<f16> = (0..4096).map(|_| finite()).collect();
        let start: Vec<f16> = (0..4096).map(|_| finite()).collect();
        // (1 + 2^-10) + (1 + 2^-10)·w is 1 + 2^-11 + 2^-31: just above a tie, so it rounds up
        // to 1 + 2^-10; rounded to f32 first (toward zero or to nearest) it is the tie, and
        // goes to the even 1. The sticky bit is what keeps it.
        let odd = f16::from_f64(1.0 + 2f64.powi(-10));
        let mut acc = vec![odd; 128];
        mad(&mut acc, &[odd; 128], -(2f32.powi(-11) - 2f32.powi(-21)));
        assert!(acc.iter().all(|&a| a == odd), "{:?}", acc[0]);
        for w in [1.0f32, -0.5, 3.1e-5, 6.0e-8, 1.7e3, 0.333] {
            let w16 = f16::from_f32(w).to_f64();
            let mut ours = start.clone();
            mad(&mut ours, &v, w);
            let want: Vec<f16> =
                start.iter().zip(&v).map(|(a, x)| round(x.to_f64().mul_add(w16, a.to_f64()))).collect();
            assert_eq!(ours, want, "mad, w = {w}");
            let mut ours = start.clone();
            scale(&mut ours, w);
            let want: Vec<f16> = start.iter().map(|a| round(a.to_f64() * w16)).collect();
            assert_eq!(ours, want, "scale, w = {w}");
        }
    }

    #[test]
    fn native_and_emulated_arithmetic_agree() {
        let mut bits = xorshift(0x2545_f491);
        let mut next = || f16::from_f32((bits() as f32 / u32::MAX as f32 - 0.5) * 40.0);
        let v: Vec<f16> = (0..256).map(|_| next()).collect();
        let start: Vec<f16> = (0..256).map(|_| next()).collect();
        for w in [0.0791f32, 1.0, 3.7e-3, 0.9999] {
            let (mut ours, mut emulated) = (start.clone(), start.clone());
            mad(&mut ours, &v, w);
            scale(&mut ours, w);
            let w16 = f16::from_f32(w).to_f64();
            for (a, x) in emulated.iter_mut().zip(&v) {
                *a = round(x.to_f64() * w16 + a.to_f64());
                *a = round(a.to_f64() * w16);
            }
            assert_eq!(ours, emulated, "w = {w}");
        }
    }
}
