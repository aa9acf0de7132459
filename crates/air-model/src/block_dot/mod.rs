//! Dot products of weight rows with quantized activation rows, a tile at a time.
//!
//! The block types that dominate the real models (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) have Air's own
//! AVX2 kernels ([`avx2`]): a tile of weight rows × activation rows per pass over the blocks, so
//! each weight block is unpacked once for several activation rows and each activation block is
//! loaded once for several weight rows. Every dot in a tile sums in the lane order of ggml's
//! `vec_dot` and llamafile's tinyBLAS (8 f32 lanes, one fused multiply-add per block, the same
//! horizontal sum), so Air and llama.cpp round alike. candle 0.11's kernels for these types are
//! scalar, or dot one pair of rows at a time (docs/benchmarks.md). The other types use candle's
//! row kernels.

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2;

use candle_core::quantized::k_quants::{self, GgmlType};
use half::{bf16, f16};

/// A weight block type and how Air computes dot products of its rows with activation rows.
pub trait BlockDot: GgmlType {
    /// For weight rows `w` (each `kb` blocks) and activation rows `x` (each `kb` blocks), writes
    /// the dot product of activation row `j` and weight row `i` to `out[j * out_stride + i]`.
    fn dots(kb: usize, w: &[Self], x: &[Self::VecDotType], out: &mut [f32], out_stride: usize) {
        let k = kb * Self::BLCK_SIZE;
        for (j, xr) in x.chunks_exact(kb).enumerate() {
            for (i, wr) in w.chunks_exact(kb).enumerate() {
                out[j * out_stride + i] = Self::vec_dot(k, wr, xr);
            }
        }
    }
}

impl BlockDot for f32 {}
impl BlockDot for f16 {}
impl BlockDot for bf16 {}
impl BlockDot for k_quants::BlockQ2K {}
impl BlockDot for k_quants::BlockQ3K {}
impl BlockDot for k_quants::BlockQ4K {}
impl BlockDot for k_quants::BlockQ5K {}
impl BlockDot for k_quants::BlockQ6K {}

/// Types with an AVX2 tile kernel where the build has AVX2 and FMA, candle's otherwise.
macro_rules! tiled {
    ($($t:ident),*) => {$(
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        impl BlockDot for k_quants::$t {
            fn dots(kb: usize, w: &[Self], x: &[Self::VecDotType], out: &mut [f32], out_stride: usize) {
                avx2::dots(kb, w, x, out, out_stride)
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        impl BlockDot for k_quants::$t {}
    )*};
}

tiled!(BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation_quant::ActivationQuant;
    use k_quants::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every tile shape (rows not multiples of the tile) against candle's row-by-row dots.
    fn agrees_with_candle<T: BlockDot>()
    where
        T::VecDotType: ActivationQuant,
    {
        let (k, rows_w, rows_x) = (8 * 32, 11, 7);
        let kb = k / T::BLCK_SIZE;
        let mut w = vec![T::zeros(); rows_w * kb];
        T::from_float(&data(rows_w * k, 7), &mut w);
        let mut x = vec![T::VecDotType::zeros(); rows_x * kb];
        T::VecDotType::quantize(&data(rows_x * k, 9), &mut x);
        let stride = rows_w + 3;
        let mut out = vec![f32::NAN; rows_x * stride];
        T::dots(kb, &w, &x, &mut out, stride);
        for j in 0..rows_x {
            for i in 0..rows_w {
                let want = T::vec_dot(k, &w[i * kb..(i + 1) * kb], &x[j * kb..(j + 1) * kb]);
                let got = out[j * stride + i];
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{:?} ({j}, {i}): {got} vs {want}", T::DTYPE);
            }
        }
    }

    #[test]
    fn tile_kernels_agree_with_candle() {
        agrees_with_candle::<BlockQ4_0>();
        agrees_with_candle::<BlockQ4_1>();
        agrees_with_candle::<BlockQ5_0>();
        agrees_with_candle::<BlockQ5_1>();
        agrees_with_candle::<BlockQ8_0>();
    }
}
