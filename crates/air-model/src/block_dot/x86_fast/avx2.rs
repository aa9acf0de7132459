//! The per-block integer kernels ([`super`]) for CPUs with AVX2 but not AVX-512 VNNI: the same
//! exact integer sums and the same f32 operations per output, so the same bits, with 8-lane
//! registers and `maddubs` (u8 × i8 products, summed in pairs as i16) then `madd` (i16 pairs to
//! i32) for the dot-product instruction:
//! - batches ([`batch_tile`]): a lane group's 16 activation rows as two halves of 8, one
//!   register per weight row and half; each weight block's 4-value groups are broadcast against
//!   the rows' groups ([`super::LaneBlock`]), and for the 4- and 5-bit types several groups' i16 sums
//!   add up before they widen ([`i16_groups`]): 9 multiply instructions per 8 groups instead of 16;
//! - one to three rows ([`row_tile`]): 8 weight rows' blocks, each row's 8 partial sums reduced
//!   across lanes in integers ([`reduce_rows`]).
//!
//! Signed weights (Q8_0) cannot take the unsigned operand lifted by 128 here (a pair of products
//! would leave i16), so they go in as |w| against the activations carrying w's sign, from an
//! integer sum of 0 rather than the activation block's `start`.

use super::super::x86::{Encoding, Weight, prefetch_rows};
use super::{Activations, LANES};
use std::arch::x86_64::*;
use std::ops::Range;

/// Lanes of a 256-bit register.
const HALF: usize = LANES / 2;
/// Weight rows per [`batch_tile`] (fewer for the last rows of a matrix).
const TILE_W: usize = 4;
/// Activation rows per [`row_tile`].
const ROW_TILE_X: usize = 3;

/// 4-value groups whose `maddubs` results add up in i16 before `madd` widens them: a result is
/// at most 2 · (2^BITS − 1) · 128 in magnitude (activations are within ±127), and the sum of the
/// groups must stay within i16. Signed weights: one (|w| ≤ 128 alone fills half the range).
/// Always a divisor of 8.
const fn i16_groups<W: Weight>() -> usize {
    match W::ENCODING {
        Encoding::Signed => 1,
        _ => {
            let most = (i16::MAX as u32 / (2 * ((1 << W::BITS) - 1) * 128)) as usize;
            if most > 8 { 8 } else { most }
        }
    }
}

/// `u` (4 values per lane, the unsigned operand) · `x` (4 signed values per lane) in i16 pairs;
/// for signed weights `u` holds them as stored and goes in as |u| against x with u's signs.
#[inline(always)]
unsafe fn products<W: Weight>(u: __m256i, x: __m256i) -> __m256i {
    unsafe {
        match W::ENCODING {
            Encoding::Signed => _mm256_maddubs_epi16(_mm256_abs_epi8(u), _mm256_sign_epi8(x, u)),
            _ => _mm256_maddubs_epi16(u, x),
        }
    }
}

/// Whether the integer sums start from the activation block's `start` (the lifted encodings'
/// correction); signed weights go in unlifted, from 0.
const fn lifted<W: Weight>() -> bool {
    !matches!(W::ENCODING, Encoding::Signed)
}

/// `RM` weight rows from `w` × the 16 activation rows of lane group `group`, over all blocks:
/// `[i][h]` holds weight row i's outputs for rows 8h..8h + 8 of the group. As the AVX-512
/// [`super::batch_tile`], each weight row's values go through memory so that their groups are
/// broadcast by loads.
/// SAFETY (caller): `w` points to `RM` rows of `x.kb` blocks; `x.lanes` holds the group; the CPU
/// has AVX2 and FMA.
#[inline(always)]
unsafe fn batch_tile<W: Weight, const RM: usize>(w: *const W, x: &Activations, group: usize) -> [[__m256; 2]; RM] {
    /// One block of the tile's weight rows: values (as stored for signed weights, else as the
    /// unsigned operand), d and m.
    #[repr(C, align(32))]
    struct Rows<const RM: usize> {
        values: [[i32; 8]; RM],
        d: [f32; RM],
        m: [f32; RM],
    }
    let kb = x.kb;
    let chunk = i16_groups::<W>();
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut rows = Rows::<RM> { values: [[0; 8]; RM], d: [0.0; RM], m: [0.0; RM] };
        let mut acc = [[_mm256_setzero_ps(); 2]; RM];
        for b in 0..kb {
            // As in the 512-bit kernels.
            prefetch_rows::<W, _MM_HINT_T0>(w, RM..2 * RM, kb, b);
            for i in 0..RM {
                let block = W::unpack(w.add(i * kb + b));
                (rows.d[i], rows.m[i]) = (block.d, block.m);
                _mm256_store_si256(rows.values[i].as_mut_ptr().cast(), block.q);
            }
            // Opaque to the optimiser, which would otherwise forward the stores as shuffles.
            let rows = std::hint::black_box(&rows);
            let lane = x.lanes.get_unchecked(group * kb + b);
            for h in 0..2 {
                let xs: [__m256i; 8] =
                    std::array::from_fn(|g| _mm256_load_si256(lane.groups[g].as_ptr().add(32 * h).cast()));
                let begin = if lifted::<W>() {
                    _mm256_load_si256(lane.start.as_ptr().add(HALF * h).cast())
                } else {
                    _mm256_setzero_si256()
                };
                let dx = _mm256_load_ps(lane.d.as_ptr().add(HALF * h));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let mut sums = begin;
                    for (values, xs) in rows.values[i].chunks_exact(chunk).zip(xs.chunks_exact(chunk)) {
                        let mut pairs = products::<W>(_mm256_set1_epi32(values[0]), xs[0]);
                        for (&value, &x) in values[1..].iter().zip(&xs[1..]) {
                            pairs = _mm256_add_epi16(pairs, products::<W>(_mm256_set1_epi32(value), x));
                        }
                        sums = _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, ones));
                    }
                    let scale = _mm256_mul_ps(_mm256_set1_ps(rows.d[i]), dx);
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[h]);
                    if W::ENCODING == Encoding::Min {
                        let s = _mm256_load_ps(lane.s.as_ptr().add(HALF * h));
                        acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(rows.m[i]), s, acc[h]);
                    }
                }
            }
        }
        acc
    }
}

/// Sums each of 8 registers' lanes: lane i of the result is the sum of `v[i]`.
#[inline(always)]
unsafe fn reduce_rows(v: [__m256i; 8]) -> __m256i {
    unsafe {
        // Per 128-bit half: pairs of registers interleaved, then quads, each lane a sum of more.
        let pairs: [__m256i; 4] = std::array::from_fn(|p| {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
        });
        let quads: [__m256i; 2] = std::array::from_fn(|q| {
            let (a, b) = (pairs[2 * q], pairs[2 * q + 1]);
            _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
        });
        // quads[q] holds registers 4q..4q + 4 summed over the low half's lanes, then the high's.
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(quads[0], quads[1]),
            _mm256_permute2x128_si256::<0x31>(quads[0], quads[1]),
        )
    }
}

/// 8 weight rows from `w` (the first `valid` of them real; the rest repeat the last) × `XR`
/// activation rows from `j0`, over all blocks: register j holds activation row j0 + j's outputs,
/// weight row i in lane i.
/// SAFETY (caller): `w` points to `valid` (1 to 8) rows of `x.kb` blocks; rows `j0..j0 + XR`
/// exist in `x`; the CPU has AVX2 and FMA.
#[inline(always)]
unsafe fn row_tile<W: Weight, const XR: usize>(w: *const W, valid: usize, x: &Activations, j0: usize) -> [__m256; XR] {
    let kb = x.kb;
    let row = |i: usize| w.wrapping_add(i.min(valid - 1) * kb);
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); XR];
        for b in 0..kb {
            prefetch_rows::<W, _MM_HINT_T1>(w, HALF..2 * HALF, kb, b);
            let blocks: [_; HALF] = std::array::from_fn(|i| W::unpack(row(i).add(b)));
            let dw = _mm256_loadu_ps(blocks.map(|block| block.d).as_ptr());
            let mw = _mm256_loadu_ps(blocks.map(|block| block.m).as_ptr());
            for (j, acc) in acc.iter_mut().enumerate() {
                let xb = x.blocks.get_unchecked((j0 + j) * kb + b);
                let xq = _mm256_loadu_si256(xb.q.as_ptr().cast());
                let partial = blocks.map(|block| _mm256_madd_epi16(products::<W>(block.q, xq), ones));
                let sums =
                    _mm256_add_epi32(reduce_rows(partial), _mm256_set1_epi32(if lifted::<W>() { xb.start } else { 0 }));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, _mm256_set1_ps(xb.d)), *acc);
                if W::ENCODING == Encoding::Min {
                    *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.s), *acc);
                }
            }
        }
        acc
    }
}

/// [`super::dots`] on AVX2: for weight rows `w` and activation rows `rows` of `x`, the dot
/// product of activation row `rows.start + j` and weight row `i` to `out[j * stride + i]`.
/// SAFETY (caller): the bounds checks of [`super::dots`] hold; the CPU has AVX2 and FMA (this
/// module's build).
pub(super) unsafe fn dots<W: Weight>(w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    let kb = x.kb;
    let rows_w = w.len() / kb;
    let mut first = rows.start;
    while first < rows.end {
        let group = first / LANES;
        let end = ((group + 1) * LANES).min(rows.end);
        if end - first >= super::MIN_BATCH_ROWS {
            let mut i = 0;
            while i < rows_w {
                let mut store = |tile: &[[__m256; 2]]| {
                    for (c, halves) in tile.iter().enumerate() {
                        let mut values = [0f32; LANES];
                        // SAFETY: `values` holds 16 f32.
                        unsafe {
                            _mm256_storeu_ps(values.as_mut_ptr(), halves[0]);
                            _mm256_storeu_ps(values.as_mut_ptr().add(HALF), halves[1]);
                        }
                        for r in first..end {
                            out[(r - rows.start) * stride + i + c] = values[r - group * LANES];
                        }
                    }
                    tile.len()
                };
                macro_rules! tile {
                    ($rm:literal) => {
                        // SAFETY: weight rows i..i + rm exist; the group has ≥ MIN_BATCH_ROWS
                        // rows, so `x.lanes` holds it.
                        store(&unsafe { batch_tile::<W, $rm>(w.as_ptr().add(i * kb), x, group) })
                    };
                }
                i += match rows_w - i {
                    TILE_W.. => tile!(4),
                    2.. => tile!(2),
                    _ => tile!(1),
                };
            }
        } else {
            for i in (0..rows_w).step_by(HALF) {
                let valid = HALF.min(rows_w - i);
                for j0 in (first..end).step_by(ROW_TILE_X) {
                    let mut store = |tile: &[__m256]| {
                        for (j, &acc) in tile.iter().enumerate() {
                            let mut values = [0f32; HALF];
                            // SAFETY: `values` holds 8 f32.
                            unsafe { _mm256_storeu_ps(values.as_mut_ptr(), acc) };
                            out[(j0 + j - rows.start) * stride + i..][..valid].copy_from_slice(&values[..valid]);
                        }
                    };
                    macro_rules! tile {
                        ($xr:literal) => {
                            // SAFETY: weight rows i..i + valid and activation rows j0..j0 + xr exist.
                            store(&unsafe { row_tile::<W, $xr>(w.as_ptr().add(i * kb), valid, x, j0) })
                        };
                    }
                    match ROW_TILE_X.min(end - j0) {
                        1 => tile!(1),
                        2 => tile!(2),
                        _ => tile!(3),
                    }
                }
            }
        }
        first = end;
    }
}
