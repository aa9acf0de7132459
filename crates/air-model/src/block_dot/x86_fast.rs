//! Per-block integer dot products for the 32-value block types ([`crate::CpuNumerics::Fast`]),
//! on x86 CPUs with AVX-512 VNNI (this module's kernels) or AVX2 ([`avx2`], the same bits).
//!
//! The arithmetic, for each output: over the blocks in order, the block's exact integer dot
//! product of weight and activation values, converted to f32 and added by one fused
//! multiply-add with d_w·d_x; for the types with a minimum (Q4_1, Q5_1), then m_w·s_x by a
//! second. ggml's order (x86.rs) keeps 8 partial sums per output in the lanes of a register,
//! one rounding per lane and block; summing each block in integers first needs one rounding per
//! block and frees a register's lanes for 16 different outputs:
//! - batches ([`batch_tile`]): 16 activation rows per register, one register per weight row;
//!   each weight block's 4-value groups are broadcast against the 16 rows' groups, laid out
//!   for that when the activations are quantized ([`LaneBlock`]);
//! - one to three rows ([`row_tile`]): 16 weight rows per register, two rows' blocks per
//!   dot-product instruction, the partial sums reduced across lanes in integers.
//!
//! Integer sums are exact and both kernels apply the same f32 operations to each output in the
//! same order, so they give the same bits: a row's result does not depend on its batch.

mod avx2;

use super::x86::{Encoding, Weight, lift, lifted, prefetch_rows};
use crate::activation_quant::{q8_1_sum, quantize_q8_block};
use crate::host::RegionBuffer;
use half::f16;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Outputs per 512-bit register: activation rows in [`batch_tile`], weight rows in [`row_tile`].
const LANES: usize = 16;
/// Weight rows per [`batch_tile`] (fewer for the last rows of a matrix).
const TILE_W: usize = LANES;
/// Activation rows per [`row_tile`]: it unpacks 16 weight rows' blocks once for them.
const ROW_TILE_X: usize = 3;
/// Fewest rows of a 16-row group that go through [`batch_tile`]; fewer go through [`row_tile`]
/// by threes. Single-thread, Q4_1 at k = 576, n = 1536, GMAC/s on 4 to 10 rows: [`batch_tile`]
/// 32, 39, 47, 54, 61, 69, 75 (its cost does not depend on the rows); [`row_tile`] 44, 48, 52,
/// 47, 50, 53, 49 (`fast_kernels_at_model_shapes` in block_dot/mod.rs). The AVX2 kernels
/// ([`avx2`]) share it: on a Zen 3 core their row tiles ran 32 GMAC/s on 6 rows, their batch
/// tile 28 on 7 and 63 on 16.
const MIN_BATCH_ROWS: usize = 7;
/// Where [`row_tile`]'s lane-crossing reduction leaves weight row `ROW_OF_LANE[lane]`.
const ROW_OF_LANE: [usize; LANES] = [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15];
/// The inverse of [`ROW_OF_LANE`]: the lane that holds weight row `row`.
const LANE_OF_ROW: [i32; LANES] = {
    let mut lanes = [0; LANES];
    let mut lane = 0;
    while lane < LANES {
        lanes[ROW_OF_LANE[lane]] = lane as i32;
        lane += 1;
    }
    lanes
};

/// Whether this CPU runs the 512-bit kernels (AVX-512 F/BW/DQ/VL and VNNI); others run the
/// same arithmetic on AVX2 ([`avx2`]).
fn avx512() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// One block of an activation row, as [`row_tile`] reads it.
#[derive(Clone, Copy, Default)]
struct RowBlock {
    /// The 8-bit values.
    q: [i8; 32],
    /// The scale (ggml's f16, widened).
    d: f32,
    /// For [`Encoding::Min`]: d · Σq as ggml's f16, widened.
    s: f32,
    /// The integer sum starts here: −[`lift`] · Σq.
    start: i32,
}

/// One block of 16 activation rows, as [`batch_tile`] reads it: group g (values 4g..4g + 4) of
/// every row side by side, then each row's `start`, `d` and `s` (as in [`RowBlock`]).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct LaneBlock {
    groups: [[i8; 4 * LANES]; 8],
    start: [i32; LANES],
    d: [f32; LANES],
    s: [f32; LANES],
}

impl LaneBlock {
    const ZERO: Self = Self { groups: [[0; 4 * LANES]; 8], start: [0; LANES], d: [0.0; LANES], s: [0.0; LANES] };
}

/// Activation rows quantized as ggml's Q8_0 (Q8_1 for [`Encoding::Min`]), in both kernels'
/// layouts.
pub struct Activations {
    kb: usize,
    /// (row, block).
    blocks: RegionBuffer<RowBlock>,
    /// (group of 16 rows, block); empty when there are too few rows for [`batch_tile`].
    lanes: RegionBuffer<LaneBlock>,
}

impl Activations {
    /// Space for `rows` rows of `k` values, quantized by [`Self::quantize_rows`].
    /// SAFETY (caller): every row is quantized before the activations are read.
    pub(super) unsafe fn new(rows: usize, k: usize) -> Self {
        let kb = k / 32;
        // The lanes of a last group's missing rows stay zero.
        let lanes = vec![LaneBlock::ZERO; if rows >= MIN_BATCH_ROWS { rows.div_ceil(LANES) * kb } else { 0 }];
        Self { kb, blocks: unsafe { RegionBuffer::uninit(rows * kb) }, lanes: lanes.into() }
    }

    /// Quantizes `values` (whole rows) for weights of type `W` into rows `first..`: each block
    /// once, into both layouts.
    /// SAFETY (caller): the rows exist; no other thread writes or reads them meanwhile.
    pub(super) unsafe fn quantize_rows<W: Weight>(&self, first: usize, values: &[f32]) {
        let (kb, k) = (self.kb, self.kb * 32);
        assert!((first + values.len() / k) * kb <= self.blocks.len());
        for (r, row) in values.chunks_exact(k).enumerate() {
            let (row_index, lane) = (first + r, (first + r) % LANES);
            for (b, values) in row.chunks_exact(32).enumerate() {
                let (d, q, sum) = quantize_q8_block(values);
                let s = if W::ENCODING == Encoding::Min { q8_1_sum(d, sum).to_f32() } else { 0.0 };
                let block = RowBlock { q, d: f16::from_f32(d).to_f32(), s, start: -lift::<W>() * sum };
                // SAFETY: the row's block and its lane's bytes of the group's block, in bounds
                // (asserted; the lanes exist for every row or none), are this call's alone:
                // written through raw pointers, as other rows write the block's other lanes.
                unsafe {
                    self.blocks.slot(row_index * kb + b).write(block);
                    if !self.lanes.is_empty() {
                        let to = self.lanes.slot(row_index / LANES * kb + b);
                        for g in 0..8 {
                            let group = std::ptr::addr_of_mut!((*to).groups[g]).cast::<i8>();
                            std::ptr::copy_nonoverlapping(block.q[4 * g..].as_ptr(), group.add(4 * lane), 4);
                        }
                        std::ptr::addr_of_mut!((*to).start[lane]).write(block.start);
                        std::ptr::addr_of_mut!((*to).d[lane]).write(block.d);
                        std::ptr::addr_of_mut!((*to).s[lane]).write(block.s);
                    }
                }
            }
        }
    }
}

/// `RM` (at most 16) weight rows from `w` × the 16 activation rows of lane group `group`, over
/// all blocks: register i holds weight row i's outputs for the 16 rows. Per block, one gather
/// takes the rows' scales; each row's values go through memory so that its 4-value groups
/// are broadcast by loads rather than by shuffles, which would compete with the dot products
/// for the vector ports; the `RM` rows' sums are independent chains.
/// SAFETY (caller): `w` points to `RM` rows of `x.kb` blocks; `x.lanes` holds the group; the
/// CPU has AVX-512 F/BW/DQ/VNNI.
#[inline(always)]
unsafe fn batch_tile<W: Weight, const RM: usize>(w: *const W, x: &Activations, group: usize) -> [__m512; RM] {
    /// One block of the tile's weight rows: values as the unsigned operand, d and m.
    #[repr(C, align(64))]
    struct Rows<const RM: usize> {
        values: [[i32; 8]; RM],
        d: [f32; LANES],
        m: [f32; LANES],
    }
    let kb = x.kb;
    unsafe {
        let offsets: [i32; LANES] = std::array::from_fn(|i| (i.min(RM - 1) * kb * size_of::<W>()) as i32);
        let offsets = _mm512_loadu_si512(offsets.as_ptr().cast());
        let mut rows = Rows::<RM> { values: [[0; 8]; RM], d: [0.0; LANES], m: [0.0; LANES] };
        let mut acc = [_mm512_setzero_ps(); RM];
        // Every block starts with d (and, for a minimum, m) as f16: one gather takes both, a
        // block ahead of its use (its latency stalled the kernel).
        let gather = |b: usize| _mm512_i32gather_epi32::<1>(offsets, w.add(b).cast());
        let mut next = gather(0);
        for b in 0..kb {
            // The next tile's rows, a tile ahead: a row of a model's matrix is a few hundred
            // bytes, so blocks ahead on the same row would mostly be this tile's.
            prefetch_rows::<W, _MM_HINT_T0>(w, RM..2 * RM, kb, b);
            let heads = next;
            if b + 1 < kb {
                next = gather(b + 1);
            }
            _mm512_storeu_ps(rows.d.as_mut_ptr(), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads)));
            if W::ENCODING == Encoding::Min {
                let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(heads)));
                _mm512_storeu_ps(rows.m.as_mut_ptr(), m);
            }
            for i in 0..RM {
                _mm256_store_si256(rows.values[i].as_mut_ptr().cast(), lifted::<W>(W::unpack(w.add(i * kb + b)).q));
            }
            // Opaque to the optimiser, which would otherwise forward the stores as shuffles.
            let rows = std::hint::black_box(&rows);
            let lane = x.lanes.get_unchecked(group * kb + b);
            let xs: [__m512i; 8] = std::array::from_fn(|g| _mm512_load_si512(lane.groups[g].as_ptr().cast()));
            let start = _mm512_load_si512(lane.start.as_ptr().cast());
            let dx = _mm512_load_ps(lane.d.as_ptr());
            for (i, acc) in acc.iter_mut().enumerate() {
                let mut sums = start;
                for (g, xs) in xs.iter().enumerate() {
                    sums = _mm512_dpbusd_epi32(sums, _mm512_set1_epi32(rows.values[i][g]), *xs);
                }
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(_mm512_set1_ps(rows.d[i]), dx), *acc);
                if W::ENCODING == Encoding::Min {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(rows.m[i]), _mm512_load_ps(lane.s.as_ptr()), *acc);
                }
            }
        }
        acc
    }
}

/// Sums each weight row's 8 partial sums: `pairs[p]` holds rows 2p (lanes 0-7) and 2p + 1
/// (lanes 8-15); the result holds row [`ROW_OF_LANE`]`[lane]` in each lane.
#[inline(always)]
unsafe fn reduce_rows(pairs: [__m512i; 8]) -> __m512i {
    unsafe {
        // Halve the partial sums per row and double the rows per register, three times.
        let quads: [__m512i; 4] = std::array::from_fn(|q| {
            let (a, b) = (pairs[2 * q], pairs[2 * q + 1]);
            _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
        });
        let octets: [__m512i; 2] = std::array::from_fn(|h| {
            let (a, b) = (quads[2 * h], quads[2 * h + 1]);
            _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
        });
        let even = _mm512_shuffle_i32x4::<0b10_00_10_00>(octets[0], octets[1]);
        let odd = _mm512_shuffle_i32x4::<0b11_01_11_01>(octets[0], octets[1]);
        _mm512_add_epi32(even, odd)
    }
}

/// 16 weight rows from `w` (the first `valid` of them real; the rest repeat the last) × `XR`
/// activation rows from `j0`, over all blocks: register j holds activation row j0 + j's
/// outputs, weight row [`ROW_OF_LANE`]`[lane]` in each lane.
/// SAFETY (caller): `w` points to `valid` (1 to 16) rows of `x.kb` blocks; rows `j0..j0 + XR`
/// exist in `x`; the CPU has AVX-512 F/BW/DQ/VNNI.
#[inline(always)]
unsafe fn row_tile<W: Weight, const XR: usize>(w: *const W, valid: usize, x: &Activations, j0: usize) -> [__m512; XR] {
    let kb = x.kb;
    let row = |i: usize| w.wrapping_add(i.min(valid - 1) * kb);
    unsafe {
        let offsets: [i32; LANES] =
            std::array::from_fn(|lane| (ROW_OF_LANE[lane].min(valid - 1) * kb * size_of::<W>()) as i32);
        let offsets = _mm512_loadu_si512(offsets.as_ptr().cast());
        let mut acc = [_mm512_setzero_ps(); XR];
        // The blocks' d and m, a block ahead as in [`batch_tile`].
        let gather = |b: usize| _mm512_i32gather_epi32::<1>(offsets, w.add(b).cast());
        let mut next = gather(0);
        for b in 0..kb {
            // The next tile's rows into L2. 128 blocks ahead within each row, as before,
            // mostly landed in this tile's rows (SmolLM2's are 18 blocks), and one sequence
            // decoded at 0.6-0.85x the speed of ggml's order on a Zen 4 core; a tile ahead, at
            // 1.28-1.31x (docs/benchmarks.md).
            prefetch_rows::<W, _MM_HINT_T1>(w, LANES..2 * LANES, kb, b);
            let heads = next;
            if b + 1 < kb {
                next = gather(b + 1);
            }
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads));
            let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(heads)));
            let pairs: [__m512i; 8] = std::array::from_fn(|p| {
                let low = lifted::<W>(W::unpack(row(2 * p).add(b)).q);
                let high = lifted::<W>(W::unpack(row(2 * p + 1).add(b)).q);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
            });
            for (j, acc) in acc.iter_mut().enumerate() {
                let xb = x.blocks.get_unchecked((j0 + j) * kb + b);
                let xq = _mm512_broadcast_i64x4(_mm256_loadu_si256(xb.q.as_ptr().cast()));
                let partial = pairs.map(|p| _mm512_dpbusd_epi32(_mm512_setzero_si512(), p, xq));
                let sums = _mm512_add_epi32(reduce_rows(partial), _mm512_set1_epi32(xb.start));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)), *acc);
                if W::ENCODING == Encoding::Min {
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), *acc);
                }
            }
        }
        acc
    }
}

/// The 16 × 16 transpose: lane j of register i becomes lane i of register j, so that a full
/// [`batch_tile`] leaves by 16 stores of 16 outputs. Its four rounds of 16 shuffles use a port
/// the dot products leave free; storing the tile one value at a time, as partial tiles do, made
/// the 16-row kernels about a tenth slower (`fast_kernels_at_model_shapes`).
#[inline(always)]
unsafe fn transpose(a: [__m512; LANES]) -> [__m512; LANES] {
    unsafe {
        // Within each 128-bit quarter c: t[2p] holds rows 2p, 2p + 1 of columns 4c, 4c + 1
        // interleaved, t[2p + 1] those of columns 4c + 2, 4c + 3.
        let mut t = [_mm512_setzero_ps(); LANES];
        for p in 0..LANES / 2 {
            t[2 * p] = _mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]);
        }
        // u[4q + s], quarter c: rows 4q..4q + 4 of column 4c + s.
        let mut u = [_mm512_setzero_ps(); LANES];
        for q in 0..LANES / 4 {
            let pd = |i: usize| _mm512_castps_pd(t[4 * q + i]);
            u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(0), pd(2)));
            u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(0), pd(2)));
            u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(1), pd(3)));
            u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(1), pd(3)));
        }
        // Column 4c + s gathers quarter c of u[s], u[4 + s], u[8 + s] and u[12 + s].
        let mut b = [_mm512_setzero_ps(); LANES];
        for s in 0..4 {
            let low01 = _mm512_shuffle_f32x4::<0x44>(u[s], u[4 + s]);
            let high01 = _mm512_shuffle_f32x4::<0xEE>(u[s], u[4 + s]);
            let low23 = _mm512_shuffle_f32x4::<0x44>(u[8 + s], u[12 + s]);
            let high23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + s], u[12 + s]);
            b[s] = _mm512_shuffle_f32x4::<0x88>(low01, low23);
            b[4 + s] = _mm512_shuffle_f32x4::<0xDD>(low01, low23);
            b[8 + s] = _mm512_shuffle_f32x4::<0x88>(high01, high23);
            b[12 + s] = _mm512_shuffle_f32x4::<0xDD>(high01, high23);
        }
        b
    }
}

/// For weight rows `w` (each `kb` blocks) and activation rows `rows` of `x`, writes the dot
/// product of activation row `rows.start + j` and weight row `i` to `out[j * stride + i]`.
pub(super) fn dots<W: Weight>(kb: usize, w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    dots_on(avx512(), kb, w, x, rows, out, stride)
}

/// [`dots`] by the 512-bit kernels where `avx512` (the CPU must have them), else by [`avx2`].
fn dots_on<W: Weight>(
    avx512: bool,
    kb: usize,
    w: &[W],
    x: &Activations,
    rows: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    assert!(!avx512 || self::avx512(), "the 512-bit kernels need AVX-512 VNNI");
    assert_eq!(kb, x.kb);
    let rows_w = w.len() / kb;
    assert!(rows.end * kb <= x.blocks.len() && (rows.is_empty() || out.len() >= (rows.len() - 1) * stride + rows_w));
    // SAFETY: the CPU has the instructions (asserted, and AVX2 and FMA for the whole build: this
    // module's cfg); the bounds are checked above.
    unsafe { if avx512 { dots_avx512(w, x, rows, out, stride) } else { avx2::dots(w, x, rows, out, stride) } }
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn dots_avx512<W: Weight>(w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    let kb = x.kb;
    let rows_w = w.len() / kb;
    // SAFETY: the table holds 16 i32.
    let lane_of_row = unsafe { _mm512_loadu_si512(LANE_OF_ROW.as_ptr().cast()) };
    let mut first = rows.start;
    while first < rows.end {
        let group = first / LANES;
        let end = ((group + 1) * LANES).min(rows.end);
        if end - first >= MIN_BATCH_ROWS {
            let mut i = 0;
            while i < rows_w {
                let mut store = |tile: &[__m512]| {
                    if let (Ok(&full), true) = (<&[__m512; LANES]>::try_from(tile), end - first == LANES) {
                        // SAFETY: the CPU has AVX-512 F (this function's features).
                        let by_row = unsafe { transpose(full) };
                        for (r, v) in by_row.into_iter().enumerate() {
                            // SAFETY: (first + r - rows.start) · stride + i + 16 ≤ (rows.len() - 1)
                            // · stride + rows_w ≤ out.len() (asserted by `dots`).
                            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((first + r - rows.start) * stride + i), v) };
                        }
                        return LANES;
                    }
                    let mut values = [0f32; LANES];
                    for (c, &acc) in tile.iter().enumerate() {
                        // SAFETY: `values` holds 16 f32.
                        unsafe { _mm512_storeu_ps(values.as_mut_ptr(), acc) };
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
                    TILE_W.. => tile!(16),
                    8.. => tile!(8),
                    4.. => tile!(4),
                    2.. => tile!(2),
                    _ => tile!(1),
                };
            }
        } else {
            for i in (0..rows_w).step_by(LANES) {
                let valid = LANES.min(rows_w - i);
                for j0 in (first..end).step_by(ROW_TILE_X) {
                    let mut store = |tile: &[__m512]| {
                        let mask = (u32::MAX >> (32 - valid)) as __mmask16;
                        for (j, &acc) in tile.iter().enumerate() {
                            // SAFETY: (j0 + j - rows.start) · stride + i + valid ≤ (rows.len() - 1)
                            // · stride + rows_w ≤ out.len() (asserted by `dots`).
                            unsafe {
                                let to = out.as_mut_ptr().add((j0 + j - rows.start) * stride + i);
                                _mm512_mask_storeu_ps(to, mask, _mm512_permutexvar_ps(lane_of_row, acc));
                            }
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

#[cfg(test)]
mod tests {
    use super::super::tests::data;
    use super::*;

    /// `x`, rows of `k` values, quantized for weights of type `W` on the calling thread.
    fn quantized<W: Weight>(x: &[f32], k: usize) -> Activations {
        // SAFETY: these activations and their quantizer, every row before the result is read.
        unsafe {
            super::super::quantize_serially(
                x,
                k,
                1,
                |rows| Activations::new(rows, k),
                |a, first, v| a.quantize_rows::<W>(first, v),
            )
        }
    }
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};

    /// The arithmetic one output at a time, in scalar code.
    fn scalar<W: Weight>(w: &[W], x: &Activations, row: usize) -> f32 {
        let mut acc = 0f32;
        for (b, block) in w.iter().enumerate() {
            let xb = &x.blocks[row * x.kb + b];
            // SAFETY: AVX2 is enabled for the build; `block` is a whole block.
            let (u, values) = unsafe {
                let u = W::unpack(block);
                let mut values = [0u8; 32];
                _mm256_storeu_si256(values.as_mut_ptr().cast(), lifted::<W>(u.q));
                (u, values)
            };
            let sum = xb.start + values.iter().zip(xb.q).map(|(&w, x)| w as i32 * x as i32).sum::<i32>();
            acc = (sum as f32).mul_add(u.d * xb.d, acc);
            if W::ENCODING == Encoding::Min {
                acc = u.m.mul_add(xb.s, acc);
            }
        }
        acc
    }

    /// Both kernels, over row ranges that mix them and weight row counts that leave partial
    /// tiles, give the scalar arithmetic's bits; and the result stays near the f32 dot product.
    fn same_bits_as_scalar<W: Weight>(avx512: bool) {
        let (k, rows_x) = (384, 45);
        let kb = k / 32;
        for rows_w in [37, 16, 5, 1] {
            let values = data(rows_w * k, 11);
            let mut w = vec![W::zeros(); rows_w * kb];
            W::from_float(&values, &mut w);
            let mut dequantized = vec![0f32; rows_w * k];
            W::to_float(&w, &mut dequantized);
            let xf = data(rows_x * k, 5);
            let x = quantized::<W>(&xf, k);
            for rows in [0..45, 0..1, 3..5, 14..19, 16..20, 5..37, 33..37, 36..37, 3..15, 20..32, 0..7, 32..45, 40..45]
            {
                let stride = rows_w + 2;
                let mut out = vec![f32::NAN; rows.len() * stride];
                dots_on(avx512, kb, &w, &x, rows.clone(), &mut out, stride);
                for (j, row) in rows.clone().enumerate() {
                    for i in 0..rows_w {
                        let got = out[j * stride + i];
                        let want = scalar(&w[i * kb..(i + 1) * kb], &x, row);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{:?} {rows:?} ({row}, {i}), AVX-512 {avx512}: {got} vs {want}",
                            W::DTYPE
                        );
                        let exact: f32 = dequantized[i * k..(i + 1) * k]
                            .iter()
                            .zip(&xf[row * k..(row + 1) * k])
                            .map(|(a, b)| a * b)
                            .sum();
                        assert!((got - exact).abs() < 0.05, "{:?} ({row}, {i}): {got} vs f32 {exact}", W::DTYPE);
                    }
                }
            }
        }
    }

    /// Rows quantized one at a time by the pool's threads, in any order, give the blocks and
    /// lanes of all rows quantized in order on one thread: rows of a lane group write their
    /// own bytes of its blocks.
    #[test]
    fn rows_quantized_apart_equal_rows_quantized_in_order() {
        use rayon::prelude::*;
        let (k, rows) = (384, 200);
        let x = data(rows * k, 3);
        let bytes = |v: &[u8]| v.to_vec();
        // SAFETY: both block types are plain old data of integers and floats.
        let as_bytes = |a: &Activations| unsafe {
            (
                bytes(std::slice::from_raw_parts(a.blocks.as_ptr().cast(), std::mem::size_of_val(&a.blocks[..]))),
                bytes(std::slice::from_raw_parts(a.lanes.as_ptr().cast(), std::mem::size_of_val(&a.lanes[..]))),
            )
        };
        let in_order = quantized::<BlockQ4_1>(&x, k);
        // SAFETY: every row is quantized, each by one call, before the bytes are read.
        let apart = unsafe {
            let a = Activations::new(rows, k);
            (0..rows).into_par_iter().rev().for_each(|r| a.quantize_rows::<BlockQ4_1>(r, &x[r * k..(r + 1) * k]));
            a
        };
        assert!(as_bytes(&in_order) == as_bytes(&apart));
    }

    /// Both instruction sets where the CPU has AVX-512, else the AVX2 kernels.
    #[test]
    fn kernels_give_the_scalar_arithmetic_bits() {
        for avx512 in [false, true].into_iter().filter(|&wide| !wide || avx512()) {
            same_bits_as_scalar::<BlockQ4_0>(avx512);
            same_bits_as_scalar::<BlockQ4_1>(avx512);
            same_bits_as_scalar::<BlockQ5_0>(avx512);
            same_bits_as_scalar::<BlockQ5_1>(avx512);
            same_bits_as_scalar::<BlockQ8_0>(avx512);
        }
    }
}
