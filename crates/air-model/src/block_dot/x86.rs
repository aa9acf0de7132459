//! x86 tile kernels for the 32-element block types: AVX2 and FMA, with the VNNI dot-product
//! instruction where the CPU has it (chosen at run time; the integer sums are the same).
//!
//! A weight block unpacks to 32 8-bit values in one register and its scales. The 8-bit dot
//! products are u8 × i8 (`maddubs` or `dpbusd`), so each weight type says how its values get
//! there ([`Encoding`]). Activations are quantized once per matmul into [`Activations`], a layout
//! made for the tiles: scales as f32, transposed so that a tile reads its rows' scales as one
//! vector, and the lane sums the offset encodings start from.

use super::BlockDot;
use crate::activation_quant::{q8_1_sum, quantize_q8_block};
use crate::host::RegionBuffer;
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};
use half::f16;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

/// f32 lanes of a 256-bit register.
const LANES: usize = 8;
/// The padding of the transposed scale arrays: [`tile_columns`] reads 16 rows' scales at once.
const SCALE_PADDING: usize = 16;
/// How far ahead the kernel prefetches weights. A single activation row (generation) streams
/// them from memory: the same block [`STREAM_PREFETCH_ROWS`] rows later, into the second-level
/// cache (a row of a model's matrix is a few hundred bytes to a few KiB, and the tile reads its
/// rows side by side). On a Zen 4 core that decoded SmolLM2 14-27% faster than 128 blocks ahead
/// within each row into the first level (4 of 5 alternations), and a model with 4096-wide rows
/// 41-51% faster (docs/benchmarks.md).
const STREAM_PREFETCH_ROWS: usize = 24;
/// Wider tiles ask for the bytes this far ahead in their stream ([`prefetch_stream`]; about three
/// tiles of SmolLM2's rows). A 16-row step's matmuls (the `matmul_step` example, one thread) ran
/// about 10% faster than with each row's block 16 ahead, and 2 to 7 rows' decode steps (which
/// stream the model from memory) 1.3-1.8x as fast (docs/benchmarks.md, twentieth session).
const TILE_PREFETCH_BYTES: usize = 2048;
/// Blocks between two weight prefetches of a row: about one per 64-byte cache line.
const fn blocks_per_prefetch<W>() -> usize {
    let per_line = 64 / size_of::<W>();
    if per_line == 0 { 1 } else { per_line }
}

/// Asks for block `b` of weight rows `rows` (numbered from `w`, rows of `kb` blocks) into the
/// cache level `HINT`: every 64-byte line of a block, and blocks smaller than a line every
/// [`blocks_per_prefetch`]-th, so about one prefetch per line. The one weight prefetch of every
/// x86 kernel (each picks its rows and level). A prefetch never faults: rows past the matrix
/// are harmless.
#[inline(always)]
pub(super) fn prefetch_rows<W, const HINT: i32>(w: *const W, rows: Range<usize>, kb: usize, b: usize) {
    if b.is_multiple_of(blocks_per_prefetch::<W>()) {
        for i in rows {
            let block = w.wrapping_add(i * kb + b) as *const i8;
            for line in (0..size_of::<W>()).step_by(64) {
                // SAFETY: a prefetch reads nothing the program sees and never faults.
                unsafe { _mm_prefetch::<HINT>(block.wrapping_add(line)) };
            }
        }
    }
}

/// Asks for the weights [`TILE_PREFETCH_BYTES`] ahead of block `b` of a tile of `RM` weight
/// rows from `w`: the tile's rows lie side by side and the next tile's follow, so a tile reads
/// one stream of bytes, `RM` blocks a step. Every block, not once per cache line: the test for
/// a line's first block took more instructions than the repeated prefetches.
#[inline(always)]
fn prefetch_stream<W, const RM: usize>(w: *const W, b: usize) {
    let ahead = (w as *const u8).wrapping_add(RM * b * size_of::<W>() + TILE_PREFETCH_BYTES);
    for line in (0..RM * size_of::<W>()).step_by(64) {
        // SAFETY: a prefetch reads nothing the program sees and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// Weight rows per tile.
const TILE_W: usize = 4;
/// Activation rows per tile with 16 vector registers (AVX2), and with 32 (AVX-512VL, which runs
/// these tiles where [`column_rows`] is false). Each unpacked weight block serves every
/// row of the tile, so wider tiles amortise the unpacking, although 4 × 8's 32 accumulators
/// spill. At most [`LANES`]: a tile reads its rows' scales as one vector.
const TILE_X_16: usize = 3;
const TILE_X_32: usize = 8;
const _: () = assert!(TILE_X_16 <= LANES && TILE_X_32 <= LANES);

/// How a weight type's values enter the u8 × i8 products.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    /// Signed values (Q8_0): |w| times the activations given w's signs.
    Signed,
    /// value = u − offset, u unsigned (Q4_0: 8, Q5_0: 16): u times the activations, summed from
    /// −offset × Σx (exactly the signed sum, in integers).
    Offset(i32),
    /// value = d·u + m, u unsigned (Q4_1, Q5_1): u times the activations, plus m·s where the
    /// activation block's s is d_x · Σq_x (Q8_1).
    Min,
}

/// In [`tile_columns`] and the per-block integer kernels (x86_fast.rs), the unsigned operand of
/// the dot-product instruction holds the weights as `value + offset`: Q8_0's signed values
/// lifted by 128, Q4_0 and Q5_0 as stored (value + 8, value + 16), the types with a minimum as
/// stored. Each activation block carries `-offset · Σq` to start from.
pub(super) const fn lift<W: Weight>() -> i32 {
    match W::ENCODING {
        Encoding::Signed => 128,
        Encoding::Offset(offset) => offset,
        Encoding::Min => 0,
    }
}

/// A weight block's 32 values as the unsigned operand (see [`lift`]).
#[inline(always)]
pub(super) unsafe fn lifted<W: Weight>(q: __m256i) -> __m256i {
    match W::ENCODING {
        Encoding::Signed => unsafe { _mm256_xor_si256(q, _mm256_set1_epi8(-128)) },
        _ => q,
    }
}

/// A weight block unpacked into registers.
#[derive(Clone, Copy)]
pub(super) struct Unpacked {
    pub(super) d: f32,
    /// The minimum, for [`Encoding::Min`].
    pub(super) m: f32,
    /// The 32 values as the encoding has them.
    pub(super) q: __m256i,
}

/// A weight block type the kernels read.
pub(super) trait Weight: BlockDot + Sized {
    const ENCODING: Encoding;
    /// Bits per value: the unsigned values of [`Encoding::Offset`] and [`Encoding::Min`] are
    /// below `1 << BITS`.
    const BITS: u32;
    /// Unpacks the block at `p`.
    /// SAFETY (caller): `p` points to a whole block.
    unsafe fn unpack(p: *const Self) -> Unpacked;
}

/// SAFETY (caller): two readable bytes at `p`.
#[inline(always)]
pub(super) unsafe fn half_at(p: *const u8) -> f32 {
    f16::from_bits(unsafe { (p as *const u16).read_unaligned() }).to_f32()
}

/// 16 bytes of nibbles to 32 bytes: low nibbles first, then high nibbles (ggml's layout).
/// SAFETY (caller): 16 readable bytes at `p`.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    unsafe {
        let packed = _mm_loadu_si128(p as *const __m128i);
        _mm256_and_si256(_mm256_set1_epi8(0x0F), _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed))
    }
}

/// 0x10 in byte i where bit i of the 32-bit little-endian word at `p` is set (Q5's fifth bits).
/// SAFETY (caller): 4 readable bytes at `p`.
#[inline(always)]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    unsafe {
        let word = _mm256_set1_epi32((p as *const i32).read_unaligned());
        // Byte i takes byte i / 8 of the word, then tests bit i % 8 of it.
        let spread =
            _mm256_shuffle_epi8(word, _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
        let bits = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits), _mm256_set1_epi8(0x10))
    }
}

impl Weight for BlockQ8_0 {
    const ENCODING: Encoding = Encoding::Signed;
    const BITS: u32 = 8;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, qs: [i8; 32]
        unsafe { Unpacked { d: half_at(p), m: 0.0, q: _mm256_loadu_si256(p.add(2) as *const __m256i) } }
    }
}

impl Weight for BlockQ4_0 {
    const ENCODING: Encoding = Encoding::Offset(8);
    const BITS: u32 = 4;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, qs: [u8; 16]
        unsafe { Unpacked { d: half_at(p), m: 0.0, q: nibbles(p.add(2)) } }
    }
}

impl Weight for BlockQ4_1 {
    const ENCODING: Encoding = Encoding::Min;
    const BITS: u32 = 4;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, m: f16, qs: [u8; 16]
        unsafe { Unpacked { d: half_at(p), m: half_at(p.add(2)), q: nibbles(p.add(4)) } }
    }
}

impl Weight for BlockQ5_0 {
    const ENCODING: Encoding = Encoding::Offset(16);
    const BITS: u32 = 5;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, qh: 32 fifth bits, qs: [u8; 16]
        unsafe { Unpacked { d: half_at(p), m: 0.0, q: _mm256_or_si256(nibbles(p.add(6)), fifth_bits(p.add(2))) } }
    }
}

impl Weight for BlockQ5_1 {
    const ENCODING: Encoding = Encoding::Min;
    const BITS: u32 = 5;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, m: f16, qh: 32 fifth bits, qs: [u8; 16]
        unsafe {
            Unpacked {
                d: half_at(p),
                m: half_at(p.add(2)),
                q: _mm256_or_si256(nibbles(p.add(8)), fifth_bits(p.add(4))),
            }
        }
    }
}

/// Activation rows quantized as ggml's Q8_0 (or Q8_1 for [`Encoding::Min`]) in the tiles' layout.
pub struct Activations {
    kb: usize,
    /// Rows plus [`SCALE_PADDING`]: the row stride of the transposed arrays.
    padded: usize,
    /// The blocks, (row, block).
    blocks: RegionBuffer<QuantizedBlock>,
    /// Rows 2p and 2p + 1 side by side for [`tile_columns`], (block, p): a tile reads its pairs'
    /// blocks at fixed distances. Empty where it does not run (no AVX-512, or not
    /// [`column_rows`]).
    pairs: RegionBuffer<PairBlock>,
    /// The pairs per block in `pairs`.
    pair_count: usize,
    /// Each block's scale (ggml's f16, widened), (block, padded row).
    d: RegionBuffer<f32>,
    /// [`Encoding::Min`]: each block's s (d · Σq as ggml's f16, widened), (block, padded row).
    s: RegionBuffer<f32>,
}

/// One block of 32 activations.
#[derive(Clone, Copy, Default)]
struct QuantizedBlock {
    /// The 8-bit values.
    q: [i8; 32],
    /// [`Encoding::Offset`]: −offset × the sum of each lane's 4 values.
    offset_sums: [i32; LANES],
    /// The scale and, for [`Encoding::Min`], s, before they are transposed.
    d: f32,
    s: f32,
}

/// Quantization chunks are whole pairs of rows, which [`PairBlock`] interleaves.
pub(super) const QUANTIZE_ROWS: usize = 2;

impl Activations {
    /// Space for `rows` rows of `k` values for weights of type `W`, quantized by
    /// [`Self::quantize_rows`]. The blocks are written once each, not zeroed first: zeroing
    /// took about as long as quantizing (docs/benchmarks.md, eighteenth session).
    /// SAFETY (caller): every row is quantized before the activations are read.
    pub(super) unsafe fn new<W: Weight>(rows: usize, k: usize) -> Self {
        let (kb, padded) = (k / 32, rows + SCALE_PADDING);
        let pair_count =
            if matches!(instructions(), Instructions::Avx512Vnni) && column_rows(rows) { rows / 2 } else { 0 };
        Self {
            kb,
            padded,
            // SAFETY: the caller's.
            blocks: unsafe { RegionBuffer::uninit(rows * kb) },
            pairs: unsafe { RegionBuffer::uninit(pair_count * kb) },
            pair_count,
            // Small, and the padding is read: zeroed.
            d: vec![0.0; kb * padded].into(),
            s: vec![0.0; if W::ENCODING == Encoding::Min { kb * padded } else { 0 }].into(),
        }
    }

    /// Quantizes `values` (whole rows) into rows `first..`: their blocks, their scales in the
    /// transposed arrays, and their [`PairBlock`]s.
    /// SAFETY (caller): `first` is even and the rows exist; no other thread writes or reads
    /// them meanwhile.
    pub(super) unsafe fn quantize_rows<W: Weight>(&self, first: usize, values: &[f32]) {
        let k = self.kb * 32;
        assert!(first.is_multiple_of(QUANTIZE_ROWS) && (first + values.len() / k) * self.kb <= self.blocks.len());
        for (p, pair) in values.chunks(QUANTIZE_ROWS * k).enumerate() {
            // SAFETY: the caller's, for each pair of its rows.
            unsafe { self.quantize_pair::<W>(first + p * QUANTIZE_ROWS, pair) };
        }
    }

    /// [`Self::quantize_rows`] of one or two rows from `first` (even).
    /// SAFETY (caller): as [`Self::quantize_rows`]'s, the rows in bounds.
    unsafe fn quantize_pair<W: Weight>(&self, first: usize, values: &[f32]) {
        let (kb, k) = (self.kb, self.kb * 32);
        let n = values.len() / k;
        let pair = (n == QUANTIZE_ROWS && first / 2 < self.pair_count).then_some(first / 2);
        for b in 0..kb {
            let block = |r: usize| {
                let (d, q, sum) = quantize_q8_block(&values[r * k + b * 32..][..32]);
                let mut quantized = QuantizedBlock { q, d: f16::from_f32(d).to_f32(), ..Default::default() };
                match W::ENCODING {
                    Encoding::Min => quantized.s = q8_1_sum(d, sum).to_f32(),
                    Encoding::Offset(offset) => {
                        quantized.offset_sums = std::array::from_fn(|lane| {
                            -offset * q[lane * 4..lane * 4 + 4].iter().map(|&v| v as i32).sum::<i32>()
                        })
                    }
                    Encoding::Signed => {}
                }
                quantized
            };
            let rows = [block(0), if n == 2 { block(1) } else { QuantizedBlock::default() }];
            // SAFETY: these rows' elements, in bounds (asserted), are this call's alone.
            unsafe {
                for (r, quantized) in rows.iter().enumerate().take(n) {
                    self.blocks.slot((first + r) * kb + b).write(*quantized);
                    self.d.slot(b * self.padded + first + r).write(quantized.d);
                    if W::ENCODING == Encoding::Min {
                        self.s.slot(b * self.padded + first + r).write(quantized.s);
                    }
                }
                if let Some(p) = pair {
                    // SAFETY: AVX512-VNNI CPUs (the only ones with pairs) have AVX2.
                    self.pairs.slot(b * self.pair_count + p).write(PairBlock::of::<W>([&rows[0], &rows[1]]));
                }
            }
        }
    }
}

/// One block of two activation rows as [`tile_columns`] reads it: 32-bit lane 2g + c holds
/// values 4g..4g + 4 of row c.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PairBlock {
    q: [i8; 64],
    /// Where each lane's integer sum starts: −[`lift`] × the sum of the lane's 4 values.
    start: [i32; 2 * LANES],
}

impl PairBlock {
    /// One block of two rows, `[row 0, row 1]`.
    /// SAFETY (caller): the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn of<W: Weight>(rows: [&QuantizedBlock; 2]) -> Self {
        /// The 32-bit words of `a` and `b` alternating: a0 b0 a1 b1 … a7 b7.
        #[inline(always)]
        unsafe fn alternate(a: *const i8, b: *const i8, out: *mut i8) {
            unsafe {
                let (a, b) = (_mm256_loadu_si256(a.cast()), _mm256_loadu_si256(b.cast()));
                // a0 b0 a1 b1 | a4 b4 a5 b5 and a2 b2 a3 b3 | a6 b6 a7 b7.
                let (low, high) = (_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
                _mm256_storeu_si256(out.cast(), _mm256_permute2x128_si256::<0x20>(low, high));
                _mm256_storeu_si256(out.add(32).cast(), _mm256_permute2x128_si256::<0x31>(low, high));
            }
        }
        let mut pair = Self { q: [0; 64], start: [0; 2 * LANES] };
        // SAFETY: 32 bytes in each row's q and offset_sums, 64 in the pair's q and start.
        unsafe {
            alternate(rows[0].q.as_ptr(), rows[1].q.as_ptr(), pair.q.as_mut_ptr());
            match W::ENCODING {
                Encoding::Min => {}
                // The quantizer's offset sums are these (lift = offset).
                Encoding::Offset(_) => alternate(
                    rows[0].offset_sums.as_ptr().cast(),
                    rows[1].offset_sums.as_ptr().cast(),
                    pair.start.as_mut_ptr().cast(),
                ),
                Encoding::Signed => {
                    pair.start = std::array::from_fn(|i| {
                        -lift::<W>() * rows[i % 2].q[4 * (i / 2)..][..4].iter().map(|&v| v as i32).sum::<i32>()
                    })
                }
            }
        }
        pair
    }
}

/// An 8-bit dot-product instruction: per i32 lane, `acc` + Σ of its 4 u8 × i8 products.
trait Dot {
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// AVX2: `maddubs` (exact here: |values| ≤ 127 keep the i16 pair sums in range) and `madd`.
struct Maddubs;
impl Dot for Maddubs {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(u, s))) }
    }
}

/// AVX512-VNNI on 256-bit registers.
struct Avx512Vnni;
impl Dot for Avx512Vnni {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
}

/// AVX-VNNI (the VEX encoding, on CPUs without AVX-512).
struct AvxVnni;
impl Dot for AvxVnni {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_dpbusd_avx_epi32(acc, u, s) }
    }
}

/// ggml's `hsum_float_8`.
#[inline(always)]
pub(super) unsafe fn hsum(x: __m256) -> f32 {
    unsafe {
        let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// One tile: `RM` weight rows from `w` × `RN` activation rows from `j0`, over all blocks.
/// SAFETY (caller): `w` points to `RM` rows of `x.kb` blocks; rows `j0..j0 + RN` exist in `x`.
#[inline(always)]
unsafe fn tile<W: Weight, D: Dot, const RM: usize, const RN: usize>(
    w: *const W,
    x: &Activations,
    j0: usize,
) -> [[f32; RM]; RN] {
    let kb = x.kb;
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); RM]; RN];
        let mut mins = [_mm256_setzero_ps(); RM];
        let mut scales = [[0f32; LANES]; RM];
        for b in 0..kb {
            // Ask for weights ahead (see [`STREAM_PREFETCH_ROWS`]): the hardware prefetcher
            // alone leaves the kernel waiting (+8% on Qwen2.5's decode).
            if RN == 1 {
                prefetch_rows::<W, _MM_HINT_T1>(w, STREAM_PREFETCH_ROWS..STREAM_PREFETCH_ROWS + RM, kb, b);
            } else {
                prefetch_stream::<W, RM>(w, b);
            }
            let ws: [Unpacked; RM] = std::array::from_fn(|i| W::unpack(w.add(i * kb + b)));
            // d_w · d_x for the tile's pairs, one vector per weight row (lanes: activation rows);
            // for a single activation row, straight into a broadcast (the same f32 products).
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(b * x.padded + j0));
            let single = (RN == 1).then(|| -> [__m256; RM] {
                let dx = *x.d.get_unchecked(b * x.padded + j0);
                std::array::from_fn(|i| _mm256_set1_ps(ws[i].d * dx))
            });
            if single.is_none() {
                for i in 0..RM {
                    _mm256_storeu_ps(scales[i].as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(ws[i].d), dx));
                }
            }
            if W::ENCODING == Encoding::Min {
                let sx = _mm256_loadu_ps(x.s.as_ptr().add(b * x.padded + j0));
                for i in 0..RM {
                    mins[i] = _mm256_fmadd_ps(_mm256_set1_ps(ws[i].m), sx, mins[i]);
                }
            }
            let magnitudes: [__m256i; RM] = std::array::from_fn(|i| match W::ENCODING {
                Encoding::Signed => _mm256_sign_epi8(ws[i].q, ws[i].q),
                _ => ws[i].q,
            });
            for j in 0..RN {
                let at = (j0 + j) * kb + b;
                let xq = _mm256_loadu_si256(x.blocks.get_unchecked(at).q.as_ptr() as *const __m256i);
                let start = match W::ENCODING {
                    Encoding::Offset(_) => {
                        _mm256_loadu_si256(x.blocks.get_unchecked(at).offset_sums.as_ptr() as *const __m256i)
                    }
                    _ => _mm256_setzero_si256(),
                };
                for i in 0..RM {
                    let s = match W::ENCODING {
                        Encoding::Signed => _mm256_sign_epi8(xq, ws[i].q),
                        _ => xq,
                    };
                    let sums = _mm256_cvtepi32_ps(D::dot(start, magnitudes[i], s));
                    let scale = match single {
                        Some(scales) => scales[i],
                        None => _mm256_broadcast_ss(&scales[i][j]),
                    };
                    acc[j][i] = _mm256_fmadd_ps(scale, sums, acc[j][i]);
                }
            }
        }
        let mut min_sums = [[0f32; LANES]; RM];
        if W::ENCODING == Encoding::Min {
            for i in 0..RM {
                _mm256_storeu_ps(min_sums[i].as_mut_ptr(), mins[i]);
            }
        }
        std::array::from_fn(|j| {
            std::array::from_fn(|i| {
                let dot = hsum(acc[j][i]);
                if W::ENCODING == Encoding::Min { dot + min_sums[i][j] } else { dot }
            })
        })
    }
}

/// A weight block's values for [`tile_columns`]: each 4-value group in two adjacent 32-bit
/// lanes (one per activation row of a pair), as the unsigned operand ([`lifted`]; the integer
/// sums are exact, so they equal ggml's).
#[inline(always)]
unsafe fn column_values<W: Weight>(q: __m256i) -> __m512i {
    unsafe {
        let twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        _mm512_permutexvar_epi32(twice, _mm512_castsi256_si512(lifted::<W>(q)))
    }
}

/// One weight block's d_w · d_x for 16 activation rows, aligned for [`tile_columns`]' loads.
#[repr(align(64))]
struct Scales([f32; SCALE_PADDING]);

/// [`Scales`] of block `b` of `RM` weight rows, unpacked as `ws`, for activation rows from `j0`.
/// SAFETY (caller): as [`tile_columns`], `b` < `x.kb`.
#[inline(always)]
unsafe fn store_scales<const RM: usize>(scales: &mut [Scales; RM], ws: &[Unpacked; RM], x: &Activations, j0: usize, b: usize) {
    unsafe {
        let dx = _mm512_loadu_ps(x.d.as_ptr().add(b * x.padded + j0));
        for (scales, u) in scales.iter_mut().zip(ws) {
            _mm512_store_ps(scales.0.as_mut_ptr(), _mm512_mul_ps(_mm512_set1_ps(u.d), dx));
        }
    }
}

/// Block `b` (the last one past the end) of `RM` weight rows from `w`, and its values for
/// [`tile_columns`].
/// SAFETY (caller): `w` points to `RM` rows of `kb` blocks.
#[inline(always)]
unsafe fn unpack_columns<W: Weight, const RM: usize>(
    w: *const W,
    kb: usize,
    b: usize,
) -> ([Unpacked; RM], [__m512i; RM]) {
    let b = b.min(kb - 1);
    unsafe {
        let mut ws = [Unpacked { d: 0.0, m: 0.0, q: _mm256_setzero_si256() }; RM];
        let mut values = [_mm512_setzero_si512(); RM];
        for i in 0..RM {
            ws[i] = W::unpack(w.add(i * kb + b));
            values[i] = column_values::<W>(ws[i].q);
        }
        (ws, values)
    }
}

/// One tile: `RM` weight rows from `w` × `RP` pairs of activation rows from `j0` (even), over
/// all blocks, two outputs per 512-bit register: lane 2g + c carries lane g of [`tile`]'s
/// register for activation row j0 + 2p + c, with the same operations, so the results are the
/// same bits ([`store_columns`] finishes them). The `RM` × `RP` accumulators stay in registers,
/// where 4 × 8 tiles of [`tile`]'s 256-bit accumulators spilled. Returns them and, for
/// [`Encoding::Min`], each weight row's minimum terms (lane: activation row j0 + lane).
/// SAFETY (caller): `w` points to `RM` rows of `x.kb` blocks; rows `j0..j0 + 2 * RP` exist in
/// `x` and `x.pairs` holds them; the CPU has AVX512-F/BW/VNNI.
#[inline(always)]
unsafe fn tile_columns<W: Weight, const RM: usize, const RP: usize>(
    w: *const W,
    x: &Activations,
    j0: usize,
) -> ([[__m512; RP]; RM], [__m512; RM]) {
    debug_assert!(j0.is_multiple_of(2) && 2 * RP <= SCALE_PADDING);
    let kb = x.kb;
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); RP]; RM];
        let mut mins = [_mm512_setzero_ps(); RM];
        let pairs = x.pairs.as_ptr().add(j0 / 2);
        // d_w · d_x for the tile's outputs, (weight row, activation row), a block ahead and
        // through memory: each pair's two are then one broadcast load, where a product per
        // register would take the FMA ports from the sums.
        let [mut current, mut following] = [const { [const { Scales([0.0; SCALE_PADDING]) }; RM] }; 2];
        // The weight rows' blocks, unpacked a block ahead: every dot product of a block waits
        // for them (+3-6%; two blocks ahead gained 1-3% more until the steps took fewer
        // instructions, then spilled registers; `fast_kernels_at_model_shapes`).
        let mut now = unpack_columns::<W, RM>(w, kb, 0);
        store_scales(&mut current, &now.0, x, j0, 0);
        // Block b with its scales in `$scales`, storing block b + 1's in `$next_scales` if it
        // exists; block b + 1 unpacked. A macro, unrolled by two, so that the two buffers have
        // fixed places (not a closure: where the optimiser left a closure as a call, a tile
        // spilled every register around it).
        macro_rules! block {
            ($b:expr, $scales:expr, $next_scales:expr, $has_next:expr) => {{
                let b = $b;
                prefetch_stream::<W, RM>(w, b);
                let next = unpack_columns::<W, RM>(w, kb, b + 1);
                if $has_next {
                    store_scales(&mut $next_scales, &next.0, x, j0, b + 1);
                }
                let (ws, values) = now;
                if W::ENCODING == Encoding::Min {
                    let sx = _mm512_loadu_ps(x.s.as_ptr().add(b * x.padded + j0));
                    for (min, u) in mins.iter_mut().zip(&ws) {
                        *min = _mm512_fmadd_ps(_mm512_set1_ps(u.m), sx, *min);
                    }
                }
                column_steps::<W, RM, RP>(&mut acc, &values, pairs.add(b * x.pair_count), &$scales);
                next
            }};
        }
        let mut b = 0;
        while b + 1 < kb {
            now = block!(b, current, following, true);
            now = block!(b + 1, following, current, b + 2 < kb);
            b += 2;
        }
        if b < kb {
            block!(b, current, following, false);
        }
        (acc, mins)
    }
}

/// [`tile_columns`]' dot products of one block: for weight row r (its 32 values `values[r]`,
/// [`column_values`]) and pair p (the `RP` pairs' blocks consecutive at `pairs`), `acc[r][p]` +
/// the two scales at `scales[r].0[2p..]` (alternating across the lanes) × the integer sums.
///
/// Each step is assembly that addresses the pair block and the scales by fixed displacements
/// from the block's two pointers. As intrinsics, the optimiser computed every address into a
/// register of its own (two instructions per step: a sixth of the loop, which the front end
/// bounds), forwarded the scales' stores as shuffles, or hoisted a tile's 16 broadcasts to the
/// top of the block and spilled half of them (docs/benchmarks.md, twentieth session).
/// SAFETY (caller): `RP` pair blocks at `pairs`; the CPU has AVX512-F/VNNI.
#[inline(always)]
unsafe fn column_steps<W: Weight, const RM: usize, const RP: usize>(
    acc: &mut [[__m512; RP]; RM],
    values: &[__m512i; RM],
    pairs: *const PairBlock,
    scales: &[Scales; RM],
) {
    const { assert!(RP <= 8 && (RM == 1 || RM == 2), "column tiles are bounded by COLUMN_TILE_P and _W") };
    let scales = scales.as_ptr();
    macro_rules! steps {
        ($($p:literal)*) => {$(
            if $p < RP {
                // SAFETY: the caller's, pair $p < RP.
                unsafe {
                    if RM == 2 {
                        let (first, second) = acc.split_at_mut(1);
                        let (a0, a1) = (&mut first[0][$p], &mut second[0][$p]);
                        (*a0, *a1) = column_step_2::<W, $p>(values[0], values[1], pairs, scales, *a0, *a1);
                    } else {
                        acc[0][$p] = column_step::<W, $p>(values[0], pairs, scales, acc[0][$p]);
                    }
                }
            }
        )*};
    }
    steps!(0 1 2 3 4 5 6 7);
}

/// Where pair `p`'s block's values lie from the first pair block of [`column_steps`].
const fn pair_q_at(p: usize) -> usize {
    p * size_of::<PairBlock>() + std::mem::offset_of!(PairBlock, q)
}

/// Where pair `P`'s integer sums start: its block's starts, or zeros for [`Encoding::Min`]
/// (whose starts are not loaded).
/// SAFETY (caller): as [`column_steps`]', `P` < its `RP`.
#[inline(always)]
unsafe fn pair_start<W: Weight, const P: usize>(pairs: *const PairBlock) -> __m512i {
    match W::ENCODING {
        Encoding::Min => unsafe { _mm512_setzero_si512() },
        _ => unsafe { _mm512_load_si512((*pairs.add(P)).start.as_ptr().cast()) },
    }
}

/// One step of [`column_steps`] for one weight row: the sums from [`pair_start`] plus the dot
/// product, converted, added to `acc` times pair `P`'s two scales, one broadcast load.
/// SAFETY (caller): as [`column_steps`]', `P` < its `RP`.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn column_step<W: Weight, const P: usize>(
    values: __m512i,
    pairs: *const PairBlock,
    scales: *const Scales,
    acc: __m512,
) -> __m512 {
    let mut acc = acc;
    // SAFETY: the caller's; reads only.
    unsafe {
        std::arch::asm!(
            "vpdpbusd {sums:z}, {values:z}, zmmword ptr [{pairs} + {q}]",
            "vcvtdq2ps {sums:z}, {sums:z}",
            "vbroadcastsd {values:z}, qword ptr [{scales} + {scale_at}]",
            "vfmadd231ps {acc:z}, {values:z}, {sums:z}",
            pairs = in(reg) pairs,
            scales = in(reg) scales,
            // Read by the dot product, then the scales' register.
            values = inout(zmm_reg) values => _,
            acc = inout(zmm_reg) acc,
            sums = inout(zmm_reg) pair_start::<W, P>(pairs) => _,
            q = const pair_q_at(P),
            scale_at = const 8 * P,
            options(nostack, readonly, preserves_flags),
        );
    }
    acc
}

/// [`column_step`] for two weight rows: the pair block's values (and starts) loaded once.
/// SAFETY (caller): as [`column_steps`]', `P` < its `RP`, two rows.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn column_step_2<W: Weight, const P: usize>(
    values0: __m512i,
    values1: __m512i,
    pairs: *const PairBlock,
    scales: *const Scales,
    acc0: __m512,
    acc1: __m512,
) -> (__m512, __m512) {
    let (mut acc0, mut acc1) = (acc0, acc1);
    // A named output: LLVM printed an unnamed (`_`) 512-bit output as a byte register.
    let _x: __m512;
    // SAFETY: the caller's; reads only.
    unsafe {
        let start = pair_start::<W, P>(pairs);
        std::arch::asm!(
            "vmovdqa64 {x:z}, zmmword ptr [{pairs} + {q}]",
            "vpdpbusd {sums0:z}, {values0:z}, {x:z}",
            "vpdpbusd {sums1:z}, {values1:z}, {x:z}",
            "vcvtdq2ps {sums0:z}, {sums0:z}",
            "vcvtdq2ps {sums1:z}, {sums1:z}",
            // The block's values are read: x takes the scales.
            "vbroadcastsd {x:z}, qword ptr [{scales} + {scale0_at}]",
            "vfmadd231ps {acc0:z}, {x:z}, {sums0:z}",
            "vbroadcastsd {x:z}, qword ptr [{scales} + {scale1_at}]",
            "vfmadd231ps {acc1:z}, {x:z}, {sums1:z}",
            pairs = in(reg) pairs,
            scales = in(reg) scales,
            values0 = in(zmm_reg) values0,
            values1 = in(zmm_reg) values1,
            acc0 = inout(zmm_reg) acc0,
            acc1 = inout(zmm_reg) acc1,
            x = out(zmm_reg) _x,
            sums0 = inout(zmm_reg) start => _,
            sums1 = inout(zmm_reg) start => _,
            q = const pair_q_at(P),
            scale0_at = const 8 * P,
            scale1_at = const size_of::<Scales>() + 8 * P,
            options(nostack, readonly, preserves_flags),
        );
    }
    (acc0, acc1)
}

/// [`hsum`] of two [`tile_columns`] registers of one row pair, weight rows 0 (`a0`) and 1
/// (`a1`): (row 0, activation row 0), (1, 0), (0, 1), (1, 1) in the result's four lanes.
#[inline(always)]
unsafe fn row_pair_hsums(a0: __m512, a1: __m512) -> __m128 {
    unsafe {
        // The partial sums 8, 4 and 2 lanes apart, as [`hsum`] adds them, both registers at
        // once: a0's in the low half, a1's in the high half.
        let t = _mm512_add_ps(_mm512_shuffle_f32x4::<0xEE>(a0, a1), _mm512_shuffle_f32x4::<0x44>(a0, a1));
        let u = _mm512_add_ps(_mm512_shuffle_f32x4::<0xDD>(t, t), _mm512_shuffle_f32x4::<0x88>(t, t));
        let v = _mm512_add_ps(u, _mm512_permute_ps::<0xEE>(u));
        let order = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 1, 4, 0);
        _mm512_castps512_ps128(_mm512_permutexvar_ps(order, v))
    }
}

/// Writes a [`tile_columns`] result: output (weight row r, activation row 2p + c) at
/// `first + (2p + c) · stride + r`, its dot product plus, for [`Encoding::Min`], its minimum term.
/// SAFETY (caller): those `RM` × `2 * RP` places are writable; the CPU has AVX512-F.
#[inline(always)]
unsafe fn store_columns<W: Weight, const RM: usize, const RP: usize>(
    acc: [[__m512; RP]; RM],
    mins: [__m512; RM],
    first: *mut f32,
    stride: usize,
) {
    unsafe {
        if RM == 2 {
            // Both rows' outputs of an activation row side by side: one 64-bit store.
            let mut min_pairs = [[0f32; SCALE_PADDING]; 2];
            _mm512_storeu_ps(min_pairs[0].as_mut_ptr(), _mm512_unpacklo_ps(mins[0], mins[1]));
            _mm512_storeu_ps(min_pairs[1].as_mut_ptr(), _mm512_unpackhi_ps(mins[0], mins[1]));
            for p in 0..RP {
                let mut dots = row_pair_hsums(acc[0][p], acc[1][p]);
                if W::ENCODING == Encoding::Min {
                    dots = _mm_add_ps(dots, _mm_loadu_ps(min_pairs[p % 2].as_ptr().add(4 * (p / 2))));
                }
                _mm_storel_pd(first.add(2 * p * stride).cast(), _mm_castps_pd(dots));
                _mm_storeh_pd(first.add((2 * p + 1) * stride).cast(), _mm_castps_pd(dots));
            }
        } else {
            for (r, (pairs, mins)) in acc.into_iter().zip(mins).enumerate() {
                let mut min_sums = [0f32; SCALE_PADDING];
                _mm512_storeu_ps(min_sums.as_mut_ptr(), mins);
                for (p, pair) in pairs.into_iter().enumerate() {
                    let mut dots = [0f32; 4];
                    _mm_storeu_ps(dots.as_mut_ptr(), pair_hsum(pair));
                    for (c, dot) in dots[..2].iter().enumerate() {
                        let min = if W::ENCODING == Encoding::Min { min_sums[2 * p + c] } else { 0.0 };
                        *first.add((2 * p + c) * stride + r) = dot + min;
                    }
                }
            }
        }
    }
}

/// [`hsum`] of a [`tile_columns`] register's two outputs at once: lanes 0 and 1 of the result.
#[inline(always)]
unsafe fn pair_hsum(a: __m512) -> __m128 {
    unsafe {
        // The partial sums 8, 4 and 2 lanes apart, as [`hsum`] adds them.
        let t = _mm256_add_ps(_mm512_extractf32x8_ps::<1>(a), _mm512_castps512_ps256(a));
        let u = _mm_add_ps(_mm256_extractf128_ps::<1>(t), _mm256_castps256_ps128(t));
        _mm_add_ps(u, _mm_movehl_ps(u, u))
    }
}

/// [`BlockDot::dots`] by tiles of up to `TILE_W` × `TX`.
/// SAFETY (caller): the CPU has the features `D` needs.
#[inline(always)]
unsafe fn tiled_dots<W: Weight, D: Dot, const TX: usize>(
    w: &[W],
    x: &Activations,
    rows: Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let kb = x.kb;
    let rows_w = w.len() / kb;
    assert!(rows.end * kb <= x.blocks.len() && (rows.is_empty() || out.len() >= (rows.len() - 1) * stride + rows_w));
    macro_rules! run {
        ($i:expr, $j:expr, $rm:literal, $rn:literal) => {{
            // SAFETY: weight rows i..i + rm and activation rows j..j + rn exist (loop bounds).
            let t = unsafe { tile::<W, D, $rm, $rn>(w.as_ptr().add($i * kb), x, $j) };
            for (r, values) in t.iter().enumerate() {
                out[($j - rows.start + r) * stride + $i..][..$rm].copy_from_slice(values);
            }
        }};
    }
    for i in (0..rows_w).step_by(TILE_W) {
        let rm = TILE_W.min(rows_w - i);
        for j in rows.clone().step_by(TX) {
            let rn = TX.min(rows.end - j);
            match (rm, rn) {
                (4, 8) => run!(i, j, 4, 8),
                (3, 8) => run!(i, j, 3, 8),
                (2, 8) => run!(i, j, 2, 8),
                (1, 8) => run!(i, j, 1, 8),
                (4, 7) => run!(i, j, 4, 7),
                (3, 7) => run!(i, j, 3, 7),
                (2, 7) => run!(i, j, 2, 7),
                (1, 7) => run!(i, j, 1, 7),
                (4, 6) => run!(i, j, 4, 6),
                (3, 6) => run!(i, j, 3, 6),
                (2, 6) => run!(i, j, 2, 6),
                (1, 6) => run!(i, j, 1, 6),
                (4, 5) => run!(i, j, 4, 5),
                (3, 5) => run!(i, j, 3, 5),
                (2, 5) => run!(i, j, 2, 5),
                (1, 5) => run!(i, j, 1, 5),
                (4, 4) => run!(i, j, 4, 4),
                (3, 4) => run!(i, j, 3, 4),
                (2, 4) => run!(i, j, 2, 4),
                (1, 4) => run!(i, j, 1, 4),
                (4, 3) => run!(i, j, 4, 3),
                (4, 2) => run!(i, j, 4, 2),
                (4, 1) => run!(i, j, 4, 1),
                (3, 3) => run!(i, j, 3, 3),
                (3, 2) => run!(i, j, 3, 2),
                (3, 1) => run!(i, j, 3, 1),
                (2, 3) => run!(i, j, 2, 3),
                (2, 2) => run!(i, j, 2, 2),
                (2, 1) => run!(i, j, 2, 1),
                (1, 3) => run!(i, j, 1, 3),
                (1, 2) => run!(i, j, 1, 2),
                (1, 1) => run!(i, j, 1, 1),
                _ => unreachable!("tile sizes are bounded by TILE_W and TILE_X_32"),
            }
        }
    }
}

/// Whether `rows` activation rows go through [`tile_columns`]: 8 or more, or an even 4 or 6
/// (all in pairs); others through [`tile`], whose single-row tiles also prefetch a generation
/// step's weights rows ahead. Single-thread, Q4_1 at k = 576, n = 1536, as shares of the fast
/// kernel's rate in the same run (`fast_kernels_at_model_shapes` in block_dot/mod.rs, 5 rounds
/// alternated): on 4 rows column tiles 0.97-1.08, [`tile`]'s 4 × 4 tiles 0.60-0.98 (median
/// 0.84); on 6 rows 0.78-1.09 (median 1.02) against 0.63-0.89 (0.77). On 5 and 7 rows the row
/// left without a pair cost the column tiles more than they gained (35-57 GMAC/s against
/// 53-63), as it did before their steps took fewer instructions on 8 rows and more.
fn column_rows(rows: usize) -> bool {
    rows >= 8 || (rows >= 4 && rows.is_multiple_of(2))
}
/// Weight rows and activation row pairs per [`tile_columns`].
const COLUMN_TILE_W: usize = 2;
const COLUMN_TILE_P: usize = 8;

/// [`BlockDot::dots`] by [`tile_columns`] tiles, an activation row without a pair (the last of
/// an odd count, or the first of an odd start) by [`tile`].
/// SAFETY (caller): the CPU has AVX512-F/BW/VNNI/VL; `x.pairs` is built.
#[inline(always)]
unsafe fn column_pair_dots<W: Weight>(w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    let kb = x.kb;
    let rows_w = w.len() / kb;
    assert!(rows.end * kb <= x.blocks.len() && (rows.is_empty() || out.len() >= (rows.len() - 1) * stride + rows_w));
    assert!(x.pair_count >= rows.end / 2);
    macro_rules! single {
        ($i:expr, $j:expr, $rm:literal) => {{
            // SAFETY: weight rows i..i + rm and activation row j exist (loop bounds).
            let t = unsafe { tile::<W, Avx512Vnni, $rm, 1>(w.as_ptr().add($i * kb), x, $j) };
            out[($j - rows.start) * stride + $i..][..$rm].copy_from_slice(&t[0]);
        }};
    }
    macro_rules! columns {
        ($i:expr, $j:expr, $rm:literal, $rp:literal) => {{
            // SAFETY: weight rows i..i + rm and activation rows j..j + 2 rp exist (loop bounds),
            // j is even and the caller built the pairs.
            let (acc, mins) = unsafe { tile_columns::<W, $rm, $rp>(w.as_ptr().add($i * kb), x, $j) };
            let first = out[($j - rows.start) * stride + $i..].as_mut_ptr();
            // SAFETY: the outputs of weight rows i..i + rm for activation rows j..j + 2 rp, at
            // `stride`, lie in `out` (the assertion above).
            unsafe { store_columns::<W, $rm, $rp>(acc, mins, first, stride) };
        }};
    }
    for i in (0..rows_w).step_by(COLUMN_TILE_W) {
        let rm = COLUMN_TILE_W.min(rows_w - i);
        let mut j = rows.start;
        while j < rows.end {
            if j % 2 == 1 || j + 1 == rows.end {
                match rm {
                    2 => single!(i, j, 2),
                    1 => single!(i, j, 1),
                    _ => unreachable!("column tiles are bounded by COLUMN_TILE_W"),
                }
                j += 1;
                continue;
            }
            let rp = COLUMN_TILE_P.min((rows.end - j) / 2);
            macro_rules! pairs {
                ($rm:literal) => {
                    match rp {
                        8 => columns!(i, j, $rm, 8),
                        7 => columns!(i, j, $rm, 7),
                        6 => columns!(i, j, $rm, 6),
                        5 => columns!(i, j, $rm, 5),
                        4 => columns!(i, j, $rm, 4),
                        3 => columns!(i, j, $rm, 3),
                        2 => columns!(i, j, $rm, 2),
                        1 => columns!(i, j, $rm, 1),
                        _ => unreachable!("column tiles are bounded by COLUMN_TILE_P"),
                    }
                };
            }
            match rm {
                2 => pairs!(2),
                1 => pairs!(1),
                _ => unreachable!("column tiles are bounded by COLUMN_TILE_W"),
            }
            j += 2 * rp;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx512vl")]
unsafe fn dots_avx512vnni<W: Weight>(w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    if !column_rows(rows.len()) || x.pair_count < rows.end / 2 {
        unsafe { tiled_dots::<W, Avx512Vnni, TILE_X_32>(w, x, rows, out, stride) }
    } else {
        unsafe { column_pair_dots::<W>(w, x, rows, out, stride) }
    }
}

#[target_feature(enable = "avxvnni")]
unsafe fn dots_avxvnni<W: Weight>(w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    unsafe { tiled_dots::<W, AvxVnni, TILE_X_16>(w, x, rows, out, stride) }
}

/// The dot-product instruction this CPU has.
#[derive(Clone, Copy)]
enum Instructions {
    Avx512Vnni,
    AvxVnni,
    Avx2,
}

fn instructions() -> Instructions {
    static DETECTED: OnceLock<Instructions> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
        {
            Instructions::Avx512Vnni
        } else if is_x86_feature_detected!("avxvnni") {
            Instructions::AvxVnni
        } else {
            Instructions::Avx2
        }
    })
}

/// [`BlockDot::dots`] for the tiled types.
pub(super) fn dots<W: Weight>(kb: usize, w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
    assert_eq!(kb, x.kb);
    // SAFETY: each variant runs only where the CPU reported its features; AVX2 and FMA are
    // enabled for the whole build (this module's cfg).
    unsafe {
        match instructions() {
            Instructions::Avx512Vnni => dots_avx512vnni(w, x, rows, out, stride),
            Instructions::AvxVnni => dots_avxvnni(w, x, rows, out, stride),
            Instructions::Avx2 => tiled_dots::<W, Maddubs, TILE_X_16>(w, x, rows, out, stride),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x`, rows of `k` values, quantized for weights of type `W` on the calling thread.
    fn quantized<W: Weight>(x: &[f32], k: usize) -> Activations {
        // SAFETY: x86's activations and quantizer, every chunk before the result is read.
        unsafe {
            super::super::quantize_serially(
                x,
                k,
                QUANTIZE_ROWS,
                |rows| Activations::new::<W>(rows, k),
                |a, first, v| a.quantize_rows::<W>(first, v),
            )
        }
    }

    /// The 256-bit tiles of the CPUs without AVX-512, here with its dot-product instruction.
    #[target_feature(enable = "avx512vnni,avx512vl")]
    unsafe fn ymm_tiles<W: Weight>(w: &[W], x: &Activations, rows: Range<usize>, out: &mut [f32], stride: usize) {
        unsafe { tiled_dots::<W, Avx512Vnni, TILE_X_16>(w, x, rows, out, stride) }
    }

    fn same_bits<W: Weight>() {
        let (k, rows_w, rows_x) = (512, 11, 14);
        let mut seed = 3u32;
        let mut data = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let kb = k / 32;
        let mut w = vec![W::zeros(); rows_w * kb];
        W::from_float(&data(rows_w * k), &mut w);
        let x = quantized::<W>(&data(rows_x * k), k);
        // Odd starts and ends leave rows without a pair; ranges that are not `column_rows`
        // (2 rows, 5 rows) take the 4 × 8 tiles; even 4 and 6 rows the column tiles.
        for rows in [0..14, 3..12, 0..1, 5..7, 0..9, 2..4, 2..6, 4..10, 1..5, 6..11] {
            let mut columns = vec![0f32; rows.len() * rows_w];
            let mut ymm = vec![0f32; rows.len() * rows_w];
            // SAFETY: the caller checked the CPU's features.
            unsafe {
                dots_avx512vnni(&w, &x, rows.clone(), &mut columns, rows_w);
                ymm_tiles(&w, &x, rows.clone(), &mut ymm, rows_w);
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&columns), bits(&ymm), "{:?} rows {rows:?}", W::DTYPE);
        }
    }

    #[test]
    fn column_tiles_give_the_bits_of_256_bit_tiles() {
        if !matches!(instructions(), Instructions::Avx512Vnni) {
            return;
        }
        same_bits::<BlockQ4_0>();
        same_bits::<BlockQ5_0>();
        same_bits::<BlockQ8_0>();
        same_bits::<BlockQ4_1>();
        same_bits::<BlockQ5_1>();
    }
}
