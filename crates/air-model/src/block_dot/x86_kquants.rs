//! x86 (AVX2) kernels for the K-quant weight types Q4_K and Q6_K against Q8_K activations, by
//! tiles of up to [`TILE_W`] weight rows × [`TILE_X`] activation rows; with AVX512-VNNI, each
//! scale multiply-and-add is one `vpdpwssd`. Integer lanes and float order are those of ggml's AVX2
//! `vec_dot_q4_K_q8_K` / `vec_dot_q6_K_q8_K`: per 256-element super-block, 8 i32 lanes of
//! scaled 8-bit products, one FMA into 8 f32 lanes, and for Q4_K the minimums' 4 lanes.
//!
//! Activation rows flagged `batched` sum instead as ggml's tiled K-quant matmul (which llama.cpp
//! runs for matmuls of 8 rows or more): per super-block the exact integer total, converted to
//! f32 and times the weight's scale (for Q4_K minus the scaled minimums' total, fused), then
//! fused into one f32 sum with the activation's scale.

use super::x86::{half_at, hsum, prefetch_rows};
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K};
use std::arch::x86_64::*;
use std::ops::Range;

/// `acc` + the pairwise products of 16-bit lanes summed into 32-bit lanes (`madd`); exact
/// integer arithmetic, so both forms give the same lanes.
pub(super) trait MaddAdd {
    unsafe fn madd_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

/// AVX2: `madd`, then `add`.
struct Avx2;
impl MaddAdd for Avx2 {
    #[inline(always)]
    unsafe fn madd_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)) }
    }
}

/// AVX512-VNNI: one `vpdpwssd` (one instruction for the two).
struct Vnni;
impl MaddAdd for Vnni {
    #[inline(always)]
    unsafe fn madd_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        unsafe { _mm256_dpwssd_epi32(acc, a, b) }
    }
}

fn has_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"))
}

/// A K-quant weight type for [`tiles`]: how its super-blocks unpack and dot with Q8_K blocks.
pub(super) trait KTiles: Sized {
    /// A super-block unpacked into registers.
    type Unpacked;
    /// The block's size in bytes, which the unpacking assumes.
    const BYTES: usize;
    /// Whether blocks subtract scaled minimums (Q4_K), which ggml sums apart from the values.
    const MINS: bool;
    /// SAFETY (caller): `p` points to a whole block; AVX2 is enabled.
    unsafe fn unpack(p: *const Self) -> Self::Unpacked;
    /// The super-block's scale and its minimums' scale (0 without minimums).
    fn scales(w: &Self::Unpacked) -> (f32, f32);
    /// Σ scale · quant · activation of one Q8_K block against the tile's weight rows, as 8 i32
    /// lanes each, and with [`KTiles::MINS`] the minimums' products as 4 lanes.
    /// SAFETY (caller): `qy` and `bsums` point into a whole Q8_K block; AVX2 is enabled.
    unsafe fn block<M: MaddAdd>(
        ws: &[Self::Unpacked; TILE_W],
        rm: usize,
        qy: *const u8,
        bsums: *const u8,
    ) -> [(__m256i, __m128i); TILE_W];
}

/// K-quant rows `w` (each `kb` super-blocks) · Q8_K activation rows `rows` of `x`, with VNNI
/// where the CPU has it; rows flagged in `batched` (by row, empty for none) in the batched
/// arithmetic. Runs of rows with the same flag go through one tile loop each.
pub(super) fn dots<W: KTiles>(
    kb: usize,
    w: &[W],
    x: &[BlockQ8K],
    rows: Range<usize>,
    batched: &[bool],
    out: &mut [f32],
    stride: usize,
) {
    #[target_feature(enable = "avx512vnni,avx512vl")]
    unsafe fn vnni<W: KTiles, const BATCHED: bool>(
        kb: usize,
        w: &[W],
        x: &[BlockQ8K],
        rows: Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        tiles::<W, Vnni, BATCHED>(kb, w, x, rows, out, stride)
    }
    fn run<W: KTiles, const BATCHED: bool>(
        kb: usize,
        w: &[W],
        x: &[BlockQ8K],
        rows: Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        if has_vnni() {
            // SAFETY: the CPU has the features.
            unsafe { vnni::<W, BATCHED>(kb, w, x, rows, out, stride) }
        } else {
            tiles::<W, Avx2, BATCHED>(kb, w, x, rows, out, stride)
        }
    }
    let flag = |r: usize| batched.get(r).copied().unwrap_or(false);
    let mut from = rows.start;
    while from < rows.end {
        let to = (from..rows.end).find(|&r| flag(r) != flag(from)).unwrap_or(rows.end);
        let out = &mut out[(from - rows.start) * stride..];
        if flag(from) {
            run::<W, true>(kb, w, x, from..to, out, stride);
        } else {
            run::<W, false>(kb, w, x, from..to, out, stride);
        }
        from = to;
    }
}

/// i32 lane vectors that [`RowTotals`] folds: `hadd` (pairwise sums of adjacent lanes).
trait Lanes: Copy {
    unsafe fn zero() -> Self;
    unsafe fn hadd(a: Self, b: Self) -> Self;
}

impl Lanes for __m256i {
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm256_setzero_si256() }
    }
    #[inline(always)]
    unsafe fn hadd(a: Self, b: Self) -> Self {
        unsafe { _mm256_hadd_epi32(a, b) }
    }
}

impl Lanes for __m128i {
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { _mm_setzero_si128() }
    }
    #[inline(always)]
    unsafe fn hadd(a: Self, b: Self) -> Self {
        unsafe { _mm_hadd_epi32(a, b) }
    }
}

/// Per-row totals of a tile's rows, folded in pairs as the rows come: `pairs[k]` holds rows 2k
/// and 2k + 1 half-reduced (`hadd`), so a tile keeps 4 vectors per weight row, not 8.
struct RowTotals<V> {
    pairs: [V; TILE_X / 2],
    pending: V,
}

impl<V: Lanes> RowTotals<V> {
    #[inline(always)]
    unsafe fn new() -> Self {
        unsafe { Self { pairs: [V::zero(); TILE_X / 2], pending: V::zero() } }
    }

    /// Row `r`'s lanes.
    #[inline(always)]
    unsafe fn add(&mut self, r: usize, lanes: V) {
        unsafe {
            if r.is_multiple_of(2) {
                self.pending = lanes;
                self.pairs[r / 2] = V::hadd(lanes, V::zero());
            } else {
                self.pairs[r / 2] = V::hadd(self.pending, lanes);
            }
        }
    }
}

impl RowTotals<__m256i> {
    /// Lane r: row r's total of 8 lanes (exact).
    #[inline(always)]
    unsafe fn totals(&self) -> __m256i {
        unsafe {
            let p = &self.pairs;
            let (h0123, h4567) = (_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            // Each 128-bit half holds the rows' partial totals: add the halves.
            _mm256_add_epi32(
                _mm256_permute2x128_si256(h0123, h4567, 0x20),
                _mm256_permute2x128_si256(h0123, h4567, 0x31),
            )
        }
    }
}

impl RowTotals<__m128i> {
    /// Lane r: row r's total of 4 lanes (exact).
    #[inline(always)]
    unsafe fn totals(&self) -> __m256i {
        unsafe {
            let p = &self.pairs;
            _mm256_set_m128i(_mm_hadd_epi32(p[2], p[3]), _mm_hadd_epi32(p[0], p[1]))
        }
    }
}

/// The batched arithmetic's per-row sums, stored: lane r of `sums[i]` is row r's.
#[inline(always)]
fn lanes(sums: &[__m256; TILE_W]) -> [[f32; TILE_X]; TILE_W] {
    // SAFETY: 8 floats into arrays of 8.
    std::array::from_fn(|i| unsafe { std::mem::transmute::<__m256, [f32; TILE_X]>(sums[i]) })
}

/// Weight rows per tile: each activation block loaded serves all of them.
const TILE_W: usize = 2;
/// Activation rows per tile: each unpacked weight super-block serves all of them. 2 × 8 ran
/// Q4_K and Q6_K 1.2-1.3x faster than 1 × 8 and 2 × 4 here (`kernels_at_model_shapes` in
/// block_dot/mod.rs).
const TILE_X: usize = 8;
/// A Q8_K block's fields (repr(C): d: f32, qs: [i8; 256], bsums: [i16; 16]).
/// SAFETY (caller): `p` points to a whole block.
#[inline(always)]
unsafe fn q8k_parts(p: *const BlockQ8K) -> (f32, *const u8, *const u8) {
    let p = p as *const u8;
    unsafe { ((p as *const f32).read_unaligned(), p.add(4), p.add(260)) }
}

/// Q4_K's 12 bytes of 6-bit scales and minimums as 8 scales then 8 minimums.
fn q4k_scales_and_mins(bytes: &[u8; 12]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for k in 0..4 {
        out[k] = bytes[k] & 63;
        out[8 + k] = bytes[4 + k] & 63;
        out[4 + k] = (bytes[8 + k] & 0x0F) | ((bytes[k] >> 6) << 4);
        out[12 + k] = (bytes[8 + k] >> 4) | ((bytes[4 + k] >> 6) << 4);
    }
    out
}

/// Weight rows ahead of a tile's that it asks for (into the second-level cache) while it reads
/// its own: generation streams the weights from memory, and without it the kernel waited on
/// them. On a Zen 4 core one Qwen2.5 sequence decoded 20-44% faster with it, Gemma 3 at 56-66
/// tok/s instead of 42-58 (4 to 24 rows ahead gave the same within noise; docs/benchmarks.md).
/// The batched arithmetic's tiles are compute-bound.
const PREFETCH_ROWS: usize = 8;

/// Runs `tile(i, rm, j, rn)` over the (weight rows × activation rows) tiles of a matmul, with
/// `rm` ≤ [`TILE_W`] and `rn` ≤ `height`.
fn for_each_tile(rows_w: usize, rows: Range<usize>, height: usize, mut tile: impl FnMut(usize, usize, usize, usize)) {
    for i in (0..rows_w).step_by(TILE_W) {
        for j in rows.clone().step_by(height) {
            tile(i, TILE_W.min(rows_w - i), j, height.min(rows.end - j));
        }
    }
}

/// Activation rows per tile in the batched arithmetic: a row's state there is one f32 sum, so
/// a tile can hold many rows, and each weight super-block unpacked serves all of them (in
/// sub-tiles of [`TILE_X`]).
const BATCHED_TILE_X: usize = 6 * TILE_X;

/// The tile height of an arithmetic.
const fn tile_height(batched: bool) -> usize {
    if batched { BATCHED_TILE_X } else { TILE_X }
}

/// A Q4_K super-block unpacked: scales, then 8 chunks of 32 4-bit values with their scales as
/// 16-bit lanes, and the minimums' factors.
pub(super) struct Q4k {
    d: f32,
    dmin: f32,
    mins: __m128i,
    scales: [__m256i; 8],
    quants: [__m256i; 8],
}

/// SAFETY (caller): `p` points to a whole Q4_K block; AVX2 is enabled.
#[inline(always)]
unsafe fn unpack_q4k(p: *const BlockQ4K) -> Q4k {
    let p = p as *const u8; // d, dmin: f16; scales: 12; qs: 128
    unsafe {
        let sm = q4k_scales_and_mins(&*(p.add(4) as *const [u8; 12]));
        let low = _mm256_set1_epi8(0x0F);
        Q4k {
            d: half_at(p),
            dmin: half_at(p.add(2)),
            mins: _mm_cvtepu8_epi16(_mm_loadl_epi64(sm.as_ptr().add(8) as *const __m128i)),
            scales: std::array::from_fn(|c| _mm256_set1_epi16(sm[c] as i16)),
            quants: std::array::from_fn(|c| {
                let bits = _mm256_loadu_si256(p.add(16 + 32 * (c / 2)) as *const __m256i);
                if c % 2 == 0 { _mm256_and_si256(bits, low) } else { _mm256_and_si256(_mm256_srli_epi16(bits, 4), low) }
            }),
        }
    }
}

impl KTiles for BlockQ4K {
    type Unpacked = Q4k;
    const BYTES: usize = 144;
    const MINS: bool = true;

    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Q4k {
        unsafe { unpack_q4k(p) }
    }

    fn scales(w: &Q4k) -> (f32, f32) {
        (w.d, w.dmin)
    }

    #[inline(always)]
    unsafe fn block<M: MaddAdd>(
        ws: &[Q4k; TILE_W],
        rm: usize,
        qy: *const u8,
        bsums: *const u8,
    ) -> [(__m256i, __m128i); TILE_W] {
        unsafe {
            let q8sums = _mm256_loadu_si256(bsums as *const __m256i);
            let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1));
            let mut sumi = [_mm256_setzero_si256(); TILE_W];
            for c in 0..8 {
                let q8 = _mm256_loadu_si256(qy.add(32 * c) as *const __m256i);
                for (i, wi) in ws.iter().enumerate().take(rm) {
                    sumi[i] = M::madd_add(sumi[i], wi.scales[c], _mm256_maddubs_epi16(wi.quants[c], q8));
                }
            }
            std::array::from_fn(|i| (sumi[i], _mm_madd_epi16(ws[i].mins, q8s)))
        }
    }
}

/// The tile loop of every K-quant type: weight rows `w` (each `kb` super-blocks) · Q8_K
/// activation rows `rows` of `x` into `out`, in ggml's one-row arithmetic (8 f32 lanes per dot,
/// the minimums in 4 more, summed at the end) or, `BATCHED`, in its batched kernel's (per
/// super-block the exact integer total to f32, times the weight's scale, less the scaled
/// minimums in one `fnmadd`, fused with the activation's scale into one f32 sum).
#[inline(always)]
#[allow(clippy::needless_range_loop, reason = "r numbers activation rows and accumulators alike")]
fn tiles<W: KTiles, M: MaddAdd, const BATCHED: bool>(
    kb: usize,
    w: &[W],
    x: &[BlockQ8K],
    rows: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    assert!(size_of::<W>() == W::BYTES && size_of::<BlockQ8K>() == 292 && rows.end * kb <= x.len());
    let start = rows.start;
    for_each_tile(w.len() / kb, rows, tile_height(BATCHED), |i0, rm, j, rn| {
        let mut acc = [[unsafe { _mm256_setzero_ps() }; TILE_X]; TILE_W];
        let mut acc_m = [[unsafe { _mm_setzero_ps() }; TILE_X]; TILE_W];
        // The batched arithmetic: one f32 sum per row, each sub-tile's rows in the lanes.
        let mut sums = [[unsafe { _mm256_setzero_ps() }; TILE_W]; BATCHED_TILE_X / TILE_X];
        for b in 0..kb {
            // SAFETY: the assert above: whole blocks of the sizes the offsets assume; weight rows
            // i0..i0 + rm and activation rows j..j + rn exist; AVX2 is enabled for the build.
            unsafe {
                if !BATCHED {
                    let ahead = i0 + PREFETCH_ROWS;
                    prefetch_rows::<W, _MM_HINT_T1>(w.as_ptr(), ahead..ahead + TILE_W, kb, b);
                }
                let ws: [W::Unpacked; TILE_W] =
                    std::array::from_fn(|i| W::unpack(w.as_ptr().add((i0 + i.min(rm - 1)) * kb + b)));
                if BATCHED {
                    for (sub, sums) in (0..rn).step_by(TILE_X).zip(sums.iter_mut()) {
                        let mut totals = [RowTotals::<__m256i>::new(), RowTotals::new()];
                        let mut min_totals = [RowTotals::<__m128i>::new(), RowTotals::new()];
                        let mut dys = [0f32; TILE_X];
                        for r in 0..TILE_X.min(rn - sub) {
                            let (dy, qy, bsums) = q8k_parts(x.as_ptr().add((j + sub + r) * kb + b));
                            dys[r] = dy;
                            for (i, (sumi, mins)) in W::block::<M>(&ws, rm, qy, bsums).into_iter().enumerate() {
                                totals[i].add(r, sumi);
                                if W::MINS {
                                    min_totals[i].add(r, mins);
                                }
                            }
                        }
                        let dy = _mm256_loadu_ps(dys.as_ptr());
                        for (i, wi) in ws.iter().enumerate().take(rm) {
                            let (d, dmin) = W::scales(wi);
                            let mut block = _mm256_mul_ps(_mm256_cvtepi32_ps(totals[i].totals()), _mm256_set1_ps(d));
                            if W::MINS {
                                let mins = _mm256_cvtepi32_ps(min_totals[i].totals());
                                block = _mm256_fnmadd_ps(_mm256_set1_ps(dmin), mins, block);
                            }
                            sums[i] = _mm256_fmadd_ps(block, dy, sums[i]);
                        }
                    }
                } else {
                    for r in 0..rn {
                        let (dy, qy, bsums) = q8k_parts(x.as_ptr().add((j + r) * kb + b));
                        for (i, (sumi, mins)) in W::block::<M>(&ws, rm, qy, bsums).into_iter().enumerate().take(rm) {
                            let (d, dmin) = W::scales(&ws[i]);
                            if W::MINS {
                                acc_m[i][r] = _mm_fmadd_ps(_mm_set1_ps(-dy * dmin), _mm_cvtepi32_ps(mins), acc_m[i][r]);
                            }
                            acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(dy * d), _mm256_cvtepi32_ps(sumi), acc[i][r]);
                        }
                    }
                }
            }
        }
        let batched: [_; BATCHED_TILE_X / TILE_X] = std::array::from_fn(|sub| lanes(&sums[sub]));
        for i in 0..rm {
            for r in 0..rn {
                let total = if BATCHED {
                    batched[r / TILE_X][i][r % TILE_X]
                } else if W::MINS {
                    // SAFETY: register-only intrinsics of features enabled for the build.
                    unsafe {
                        let mut m = _mm_add_ps(acc_m[i][r], _mm_movehl_ps(acc_m[i][r], acc_m[i][r]));
                        m = _mm_add_ss(m, _mm_movehdup_ps(m));
                        hsum(acc[i][r]) + _mm_cvtss_f32(m)
                    }
                } else {
                    // SAFETY: as above.
                    unsafe { hsum(acc[i][r]) }
                };
                out[(j - start + r) * stride + i0 + i] = total;
            }
        }
    });
}

/// A Q6_K super-block unpacked: 8 chunks of 32 6-bit values (stored plus 32), their scales as
/// 16-bit lanes (two per chunk), and all 16 scales widened for the offset.
pub(super) struct Q6k {
    d: f32,
    scales16: __m256i,
    scales: [__m256i; 8],
    quants: [__m256i; 8],
}

/// SAFETY (caller): `p` points to a whole Q6_K block; AVX2 is enabled.
#[inline(always)]
unsafe fn unpack_q6k(p: *const BlockQ6K) -> Q6k {
    // ql: 128 (low nibbles), qh: 64 (2 high bits each), scales: [i8; 16], d: f16.
    let p = p as *const u8;
    unsafe {
        let sc: &[i8; 16] = &*(p.add(192) as *const [i8; 16]);
        let (m15, m3) = (_mm256_set1_epi8(15), _mm256_set1_epi8(3));
        let mut quants = [_mm256_setzero_si256(); 8];
        for half in 0..2 {
            let ql1 = _mm256_loadu_si256(p.add(64 * half) as *const __m256i);
            let ql2 = _mm256_loadu_si256(p.add(64 * half + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(12)), 2);
            let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(48));
            let h3 = _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(-64)), 2);
            quants[4 * half] = _mm256_or_si256(_mm256_and_si256(ql1, m15), h0);
            quants[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(ql2, m15), h1);
            quants[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m15), h2);
            quants[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql2, 4), m15), h3);
        }
        Q6k {
            d: half_at(p.add(208)),
            scales16: _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i)),
            // Chunk c (32 values) takes scale 2c for its first 16 values, 2c + 1 after.
            scales: std::array::from_fn(|c| {
                let (a, b) = (sc[2 * c] as i16, sc[2 * c + 1] as i16);
                _mm256_setr_epi16(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
            }),
            quants,
        }
    }
}

impl KTiles for BlockQ6K {
    type Unpacked = Q6k;
    const BYTES: usize = 210;
    const MINS: bool = false;

    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Q6k {
        unsafe { unpack_q6k(p) }
    }

    fn scales(w: &Q6k) -> (f32, f32) {
        (w.d, 0.0)
    }

    /// The values are stored plus 32: the block subtracts 32 · Σ scale · (sums of 16).
    #[inline(always)]
    unsafe fn block<M: MaddAdd>(
        ws: &[Q6k; TILE_W],
        rm: usize,
        qy: *const u8,
        bsums: *const u8,
    ) -> [(__m256i, __m128i); TILE_W] {
        unsafe {
            let q8sums = _mm256_loadu_si256(bsums as *const __m256i);
            let mut sumi = [_mm256_setzero_si256(); TILE_W];
            for pair in 0..4 {
                let (c0, c1) = (2 * pair, 2 * pair + 1);
                let q80 = _mm256_loadu_si256(qy.add(32 * c0) as *const __m256i);
                let q81 = _mm256_loadu_si256(qy.add(32 * c1) as *const __m256i);
                for (i, wi) in ws.iter().enumerate().take(rm) {
                    let p0 = M::madd_add(sumi[i], wi.scales[c0], _mm256_maddubs_epi16(wi.quants[c0], q80));
                    sumi[i] = M::madd_add(p0, wi.scales[c1], _mm256_maddubs_epi16(wi.quants[c1], q81));
                }
            }
            std::array::from_fn(|i| {
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, ws[i].scales16), 5);
                (_mm256_sub_epi32(sumi[i], offset), _mm_setzero_si128())
            })
        }
    }
}
