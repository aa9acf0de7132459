//! The generation path's per-position work in AVX2 registers (with F16C and FMA, which the
//! build enables): the score ([`dot`], [`super::dot_f16`]'s arithmetic) and the f32 sum of values
//! ([`add_value`], [`super::accumulate_f32`]'s). Lane for lane the same operations as the
//! portable code (f16 to f32 conversions are exact, the FMAs fused, the sums in the same order),
//! so the same bits; the portable code spent most of its time converting slices one value at a
//! time.

use half::f16;
use std::arch::x86_64::*;

/// Values per step of [`dot`]: four accumulators of 16 lanes, as [`super::dot_f16`].
pub(super) const DOT_STEP: usize = 64;

/// Loads 8 f16 values as f32.
/// SAFETY (caller): 8 values at `p`.
#[inline(always)]
unsafe fn load8(p: *const f16) -> __m256 {
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// Σ key · q as [`super::dot_f16`] sums it, the key converted from f16 on the way.
/// SAFETY (caller): `key` and `q` have the same length, a multiple of [`DOT_STEP`].
#[inline]
pub(super) unsafe fn dot(key: &[f16], q: &[f32]) -> f32 {
    debug_assert!(key.len() == q.len() && key.len().is_multiple_of(DOT_STEP));
    unsafe {
        // acc[j][h]: lanes 8h..8h + 8 of accumulator j.
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for step in (0..q.len()).step_by(DOT_STEP) {
            for (j, lanes) in acc.iter_mut().enumerate() {
                for (h, lane) in lanes.iter_mut().enumerate() {
                    let at = step + 16 * j + 8 * h;
                    *lane = _mm256_fmadd_ps(load8(key.as_ptr().add(at)), _mm256_loadu_ps(q.as_ptr().add(at)), *lane);
                }
            }
        }
        // (0 + 2) + (1 + 3) per lane, then sum16's halves, quarters and pairs.
        let lanes: [__m256; 2] = std::array::from_fn(|h| {
            _mm256_add_ps(_mm256_add_ps(acc[0][h], acc[2][h]), _mm256_add_ps(acc[1][h], acc[3][h]))
        });
        let halves = _mm256_add_ps(lanes[1], lanes[0]);
        let quarters = _mm_add_ps(_mm256_extractf128_ps::<1>(halves), _mm256_castps256_ps128(halves));
        let pairs = _mm_add_ps(_mm_movehl_ps(quarters, quarters), quarters);
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs)))
    }
}

/// `acc` = `acc` · `rescale` (where given), then `acc` += `value` · `weight` by one FMA per lane.
/// SAFETY (caller): `acc` and `value` have the same length, a multiple of 8.
#[inline]
pub(super) unsafe fn add_value(acc: &mut [f32], rescale: Option<f32>, value: &[f16], weight: f32) {
    debug_assert!(acc.len() == value.len() && acc.len().is_multiple_of(8));
    unsafe {
        let w = _mm256_set1_ps(weight);
        for at in (0..acc.len()).step_by(8) {
            let mut a = _mm256_loadu_ps(acc.as_ptr().add(at));
            if let Some(r) = rescale {
                a = _mm256_mul_ps(a, _mm256_set1_ps(r));
            }
            a = _mm256_fmadd_ps(load8(value.as_ptr().add(at)), w, a);
            _mm256_storeu_ps(acc.as_mut_ptr().add(at), a);
        }
    }
}
