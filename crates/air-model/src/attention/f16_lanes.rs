//! The part of the generation path's value accumulator that ggml updates in native f16
//! arithmetic. Built for a CPU with AVX512-FP16 (as llama.cpp's reference outputs were), ggml's
//! f16 vector loops step 128 lanes: in a row of 128 lanes or more (head_dim 128, 256) the
//! leading multiple of 128 is rescaled and accumulated in f16, the weight rounded to f16 and
//! each result rounded once; the rest takes its scalar tail (f32, then rounded). This module
//! computes the f16 part with the same bits on any x86 CPU: natively where the CPU has
//! AVX512-FP16, by exact emulation elsewhere.

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

    #[test]
    fn native_and_emulated_arithmetic_agree() {
        let mut state = 0x2545_f491u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f16::from_f32((state as f32 / u32::MAX as f32 - 0.5) * 40.0)
        };
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
