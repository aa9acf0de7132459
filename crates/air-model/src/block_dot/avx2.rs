//! AVX2 tile kernels for the 32-element block types.
//!
//! A weight block unpacks to one register of 32 8-bit values and its scales; an activation
//! block (Q8_0 or Q8_1) likewise. For signed weights (Q4_0, Q5_0, Q8_0) the 8-bit products use
//! the sign trick (|w| · (x signed as w), what `maddubs` needs); unsigned weights (Q4_1, Q5_1)
//! go to `maddubs` as they are and add their minimum times the activation block's sum.

use super::BlockDot;
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};
use half::f16;
use std::arch::x86_64::*;

/// A 32-element block unpacked into registers.
#[derive(Clone, Copy)]
pub(super) struct Unpacked {
    /// Scale.
    d: f32,
    /// Weights: the minimum (Q4_1/Q5_1). Activations: d · Σq (Q8_1).
    m: f32,
    /// The 32 quantized values, 8-bit.
    q: __m256i,
}

/// A block type the kernels can read.
pub(super) trait Block: Sized {
    /// For weights: values are signed (dot by the sign trick) rather than unsigned with a minimum.
    const SIGNED: bool;
    /// Unpacks the block at `p`.
    /// SAFETY (caller): `p` points to a whole block.
    unsafe fn unpack(p: *const Self) -> Unpacked;
}

/// SAFETY (caller): two readable bytes at `p`.
#[inline(always)]
unsafe fn half_at(p: *const u8) -> f32 {
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

/// 0xFF in byte i where bit i of the 32-bit little-endian word at `p` is set, 0 elsewhere.
/// SAFETY (caller): 4 readable bytes at `p`.
#[inline(always)]
unsafe fn bit_mask(p: *const u8) -> __m256i {
    unsafe {
        let word = _mm256_set1_epi32((p as *const i32).read_unaligned());
        // Byte i takes byte i / 8 of the word, then keeps bit i % 8 of it.
        let spread =
            _mm256_shuffle_epi8(word, _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
        let bits = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits)
    }
}

impl Block for BlockQ8_0 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, qs: [i8; 32]
        unsafe { Unpacked { d: half_at(p), m: 0.0, q: _mm256_loadu_si256(p.add(2) as *const __m256i) } }
    }
}

impl Block for BlockQ8_1 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, s: f16, qs: [i8; 32]
        unsafe { Unpacked { d: half_at(p), m: half_at(p.add(2)), q: _mm256_loadu_si256(p.add(4) as *const __m256i) } }
    }
}

impl Block for BlockQ4_0 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, qs: [u8; 16]; value = nibble - 8
        unsafe { Unpacked { d: half_at(p), m: 0.0, q: _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)) } }
    }
}

impl Block for BlockQ4_1 {
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        let p = p as *const u8; // d: f16, m: f16, qs: [u8; 16]; value = d · nibble + m
        unsafe { Unpacked { d: half_at(p), m: half_at(p.add(2)), q: nibbles(p.add(4)) } }
    }
}

impl Block for BlockQ5_0 {
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        // d: f16, qh: 32 fifth bits, qs: [u8; 16]; value = (nibble | bit << 4) - 16, which as a
        // byte is the nibble with 0xF0 set where the fifth bit is clear.
        let p = p as *const u8;
        unsafe {
            let high = _mm256_andnot_si256(bit_mask(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            Unpacked { d: half_at(p), m: 0.0, q: _mm256_or_si256(nibbles(p.add(6)), high) }
        }
    }
}

impl Block for BlockQ5_1 {
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn unpack(p: *const Self) -> Unpacked {
        // d: f16, m: f16, qh: 32 fifth bits, qs: [u8; 16]; value = d · (nibble | bit << 4) + m
        let p = p as *const u8;
        unsafe {
            let high = _mm256_and_si256(bit_mask(p.add(4)), _mm256_set1_epi8(0x10));
            Unpacked { d: half_at(p), m: half_at(p.add(2)), q: _mm256_or_si256(nibbles(p.add(8)), high) }
        }
    }
}

/// ggml's `hsum_float_8`.
#[inline(always)]
fn hsum(x: __m256) -> f32 {
    // SAFETY: register-only intrinsics of features enabled at compile time.
    unsafe {
        let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// Σ of u8 × i8 products in 8 lanes of 4 adjacent products, as f32.
#[inline(always)]
fn sum_u8_i8(u: __m256i, s: __m256i) -> __m256 {
    // SAFETY: register-only intrinsics of features enabled at compile time.
    unsafe { _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(u, s))) }
}

/// One tile: `RM` weight rows × `RN` activation rows, over `kb` blocks.
/// SAFETY (caller): `w` holds `RM` rows of `kb` blocks at stride `kb`, `x` likewise `RN` rows.
#[inline(always)]
unsafe fn tile<W: Block, X: Block, const RM: usize, const RN: usize>(
    kb: usize,
    w: *const W,
    x: *const X,
) -> [[f32; RM]; RN] {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); RM]; RN];
        let mut mins = [[0f32; RM]; RN];
        for b in 0..kb {
            let ws: [Unpacked; RM] = std::array::from_fn(|i| W::unpack(w.add(i * kb + b)));
            // Signed weights: |w| once per block, the activations take w's signs per pair.
            let magnitudes: [__m256i; RM] =
                std::array::from_fn(|i| if W::SIGNED { _mm256_sign_epi8(ws[i].q, ws[i].q) } else { ws[i].q });
            for j in 0..RN {
                let xb = X::unpack(x.add(j * kb + b));
                for i in 0..RM {
                    let signed = if W::SIGNED { _mm256_sign_epi8(xb.q, ws[i].q) } else { xb.q };
                    let d = _mm256_set1_ps(ws[i].d * xb.d);
                    acc[j][i] = _mm256_fmadd_ps(d, sum_u8_i8(magnitudes[i], signed), acc[j][i]);
                    if !W::SIGNED {
                        mins[j][i] = ws[i].m.mul_add(xb.m, mins[j][i]);
                    }
                }
            }
        }
        std::array::from_fn(|j| std::array::from_fn(|i| hsum(acc[j][i]) + mins[j][i]))
    }
}

/// Weight rows per tile.
const TILE_W: usize = 4;
/// Activation rows per tile.
const TILE_X: usize = 3;

/// [`BlockDot::dots`] by tiles of up to `TILE_W` × `TILE_X`.
pub(super) fn dots<W>(kb: usize, w: &[W], x: &[W::VecDotType], out: &mut [f32], out_stride: usize)
where
    W: BlockDot + Block,
    W::VecDotType: Block,
{
    let (rows_w, rows_x) = (w.len() / kb, x.len() / kb);
    assert!(rows_x == 0 || out.len() >= (rows_x - 1) * out_stride + rows_w);
    macro_rules! run {
        ($i:expr, $j:expr, $rm:literal, $rn:literal) => {{
            // SAFETY: rows i..i + rm of w and j..j + rn of x exist (checked by the caller's
            // loop bounds); blocks are read through their pointers only.
            let t = unsafe { tile::<W, W::VecDotType, $rm, $rn>(kb, w.as_ptr().add($i * kb), x.as_ptr().add($j * kb)) };
            for (r, row) in t.iter().enumerate() {
                out[($j + r) * out_stride + $i..][..$rm].copy_from_slice(row);
            }
        }};
    }
    for i in (0..rows_w).step_by(TILE_W) {
        let rm = TILE_W.min(rows_w - i);
        for j in (0..rows_x).step_by(TILE_X) {
            match (rm, TILE_X.min(rows_x - j)) {
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
                _ => unreachable!("tile sizes are bounded by TILE_W and TILE_X"),
            }
        }
    }
}
