//! Dot products of weight rows with quantized activation rows, a tile at a time.
//!
//! The block types that dominate the real models (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) have Air's own
//! x86 kernels ([`x86`]): a tile of weight rows × activation rows per pass over the blocks, so
//! each weight block is unpacked once for several activation rows and each activation block is
//! loaded once for several weight rows, with the VNNI dot-product instruction where the CPU has
//! it. Every dot in a tile sums in the lane order of ggml's `vec_dot` and llamafile's tinyBLAS
//! (8 f32 lanes, one fused multiply-add per block, the same horizontal sum), so Air and
//! llama.cpp round alike. candle 0.11's kernels for these types are scalar, or dot one pair of
//! rows at a time (docs/benchmarks.md). Q4_K and Q6_K have AVX2 kernels in ggml's lane order
//! too ([`x86_kquants`]); the other types use candle's row kernels.

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod x86;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod x86_fast;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod x86_kquants;

use crate::activation_quant::ActivationQuant;
use candle_core::quantized::k_quants::{self, GgmlType};
use half::{bf16, f16};
use std::ops::Range;

/// A weight block type and how Air computes dot products of its rows with activation rows.
pub trait BlockDot: GgmlType {
    /// Activation rows, quantized for this type's kernel.
    type Activations: Send + Sync;

    /// Quantizes `x`, rows of `k` values, as ggml does for this weight type.
    fn quantize(x: &[f32], k: usize) -> Self::Activations;

    /// For weight rows `w` (each `kb` blocks) and activation rows `rows` of `x`, writes the dot
    /// product of activation row `rows.start + j` and weight row `i` to `out[j * out_stride + i]`.
    /// Rows flagged in `batched` (by row; empty: none) sum as ggml's batched matmul kernel where
    /// the type has one that rounds differently from its one-row dot product (the K-quants).
    fn dots(
        kb: usize,
        w: &[Self],
        x: &Self::Activations,
        rows: Range<usize>,
        batched: &[bool],
        out: &mut [f32],
        out_stride: usize,
    );
}

/// candle's row kernels over candle's activation blocks.
macro_rules! candle_rows {
    ($($t:ty),*) => {$(
        impl BlockDot for $t {
            type Activations = Vec<<$t as GgmlType>::VecDotType>;

            fn quantize(x: &[f32], k: usize) -> Self::Activations {
                candle_activations::<Self>(x, k)
            }

            fn dots(
                kb: usize,
                w: &[Self],
                x: &Self::Activations,
                rows: Range<usize>,
                _batched: &[bool],
                out: &mut [f32],
                out_stride: usize,
            ) {
                let k = kb * Self::BLCK_SIZE;
                let x = &x[rows.start * kb..rows.end * kb];
                for (j, xr) in x.chunks_exact(kb).enumerate() {
                    for (i, wr) in w.chunks_exact(kb).enumerate() {
                        out[j * out_stride + i] = Self::vec_dot(k, wr, xr);
                    }
                }
            }
        }
    )*};
}

/// Quantizes rows of `k` values into candle's activation blocks for `T`.
fn candle_activations<T: GgmlType>(x: &[f32], k: usize) -> Vec<T::VecDotType>
where
    T::VecDotType: ActivationQuant,
{
    let per_row = k / T::VecDotType::BLCK_SIZE;
    let mut q = vec![T::VecDotType::zeros(); x.len() / k * per_row];
    crate::host::for_row_chunks(&mut q, per_row, k, |first, rows| {
        ActivationQuant::quantize(&x[first * k..first * k + rows.len() / per_row * k], rows);
    });
    q
}

candle_rows!(f32, f16, bf16, k_quants::BlockQ2K, k_quants::BlockQ3K, k_quants::BlockQ5K);
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
candle_rows!(
    k_quants::BlockQ4_0,
    k_quants::BlockQ4_1,
    k_quants::BlockQ5_0,
    k_quants::BlockQ5_1,
    k_quants::BlockQ8_0,
    k_quants::BlockQ4K,
    k_quants::BlockQ6K
);

/// K-quants with an AVX2 kernel over candle's Q8_K activation blocks.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
macro_rules! k_tiled {
    ($($t:ident),*) => {$(
        impl BlockDot for k_quants::$t {
            type Activations = Vec<k_quants::BlockQ8K>;

            fn quantize(x: &[f32], k: usize) -> Self::Activations {
                candle_activations::<Self>(x, k)
            }

            fn dots(
                kb: usize,
                w: &[Self],
                x: &Self::Activations,
                range: Range<usize>,
                batched: &[bool],
                out: &mut [f32],
                out_stride: usize,
            ) {
                x86_kquants::dots(kb, w, x, range, batched, out, out_stride)
            }
        }
    )*};
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
k_tiled!(BlockQ4K, BlockQ6K);

/// The 32-value block types: Air's tile kernels in ggml's order, and the per-block integer
/// kernels.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
macro_rules! tiled {
    ($($t:ident),*) => {$(
        impl BlockDot for k_quants::$t {
            type Activations = x86::Activations;

            fn quantize(x: &[f32], k: usize) -> Self::Activations {
                x86::Activations::new::<Self>(x, k)
            }

            fn dots(
                kb: usize,
                w: &[Self],
                x: &Self::Activations,
                rows: Range<usize>,
                _batched: &[bool],
                out: &mut [f32],
                out_stride: usize,
            ) {
                x86::dots(kb, w, x, rows, out, out_stride)
            }
        }

        impl FastDot for k_quants::$t {
            type FastActivations = x86_fast::Activations;

            fn fast_quantize(x: &[f32], k: usize) -> Self::FastActivations {
                x86_fast::Activations::new::<Self>(x, k)
            }

            fn fast_dots(
                kb: usize,
                w: &[Self],
                x: &Self::FastActivations,
                rows: Range<usize>,
                out: &mut [f32],
                out_stride: usize,
            ) {
                x86_fast::dots(kb, w, x, rows, out, out_stride)
            }
        }
    )*};
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
tiled!(BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0);

/// A block type with per-block integer kernels ([`crate::CpuNumerics::Fast`], [`x86_fast`]).
pub trait FastDot: GgmlType + Sync {
    /// Activation rows, quantized for the kernels.
    type FastActivations: Send + Sync;

    /// Quantizes `x`, rows of `k` values, as ggml does for this weight type.
    fn fast_quantize(x: &[f32], k: usize) -> Self::FastActivations;

    /// As [`BlockDot::dots`], by the per-block integer arithmetic.
    fn fast_dots(
        kb: usize,
        w: &[Self],
        x: &Self::FastActivations,
        rows: Range<usize>,
        out: &mut [f32],
        out_stride: usize,
    );
}

/// Whether this build has the [`FastDot`] kernels (x86 with AVX2 and FMA).
pub fn fast_supported() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return true;
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use k_quants::{BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0};

    /// `n` values in [-0.5, 0.5) from a linear congruential generator seeded by `seed`.
    pub(super) fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every tile shape (rows not multiples of the tile, a row range not from 0) against
    /// candle's row-by-row dots over candle's activation blocks. Not bit for bit: candle's
    /// scalar kernels (Q4_1, Q5_0, Q5_1) and its Q6_K kernel (an older ggml version, which
    /// subtracts Q6_K's offset in other lanes) sum in other orders.
    fn agrees_with_candle<T: BlockDot>()
    where
        T::VecDotType: ActivationQuant,
    {
        // Weight rows 11 = 4+4+3, 6 = 4+2 and 1; activation row ranges of every length up to
        // 14 (every remainder of the tile widths), some not starting at row 0.
        for rows_w in [11, 6, 1] {
            for len in 1..=14 {
                check_dots::<T>(rows_w, 0..len);
            }
            check_dots::<T>(rows_w, 2..13);
            check_dots::<T>(rows_w, 5..14);
        }
    }

    fn check_dots<T: BlockDot>(rows_w: usize, rows: std::ops::Range<usize>)
    where
        T::VecDotType: ActivationQuant,
    {
        let (k, rows_x) = (2 * 256, 14);
        let kb = k / T::BLCK_SIZE;
        let mut w = vec![T::zeros(); rows_w * kb];
        T::from_float(&data(rows_w * k, 7), &mut w);
        let x = data(rows_x * k, 9);
        let mut xq = vec![T::VecDotType::zeros(); rows_x * kb];
        ActivationQuant::quantize(&x, &mut xq);
        let activations = T::quantize(&x, k);
        let stride = rows_w + 3;
        let mut out = vec![f32::NAN; rows.len() * stride];
        T::dots(kb, &w, &activations, rows.clone(), &[], &mut out, stride);
        // Every third row by the batched arithmetic: close to candle too, and the other rows'
        // bits do not depend on their neighbours' flags.
        let batched: Vec<bool> = (0..rows_x).map(|r| r % 3 == 1).collect();
        let mut mixed = vec![f32::NAN; rows.len() * stride];
        T::dots(kb, &w, &activations, rows.clone(), &batched, &mut mixed, stride);
        for (j, row) in rows.enumerate() {
            for i in 0..rows_w {
                let want = T::vec_dot(k, &w[i * kb..(i + 1) * kb], &xq[row * kb..(row + 1) * kb]);
                for (got, how) in [(out[j * stride + i], "alone"), (mixed[j * stride + i], "mixed")] {
                    let close = (got - want).abs() <= 1e-4 * want.abs().max(1.0);
                    assert!(close, "{:?} {how} ({j}, {i}): {got} vs {want}", T::DTYPE);
                }
                if !batched[row] {
                    assert_eq!(out[j * stride + i].to_bits(), mixed[j * stride + i].to_bits());
                }
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
        agrees_with_candle::<BlockQ4K>();
        agrees_with_candle::<BlockQ6K>();
    }
}

/// The kernels at the shapes of the real models: Qwen2.5-0.5B's FFN with a matmul task's 48
/// activation rows, and a generation step (one row) over Gemma 3's 178 MB output head. Each
/// result is checked against candle on a sample of outputs; the single-thread throughput is
/// printed (`cargo test --release -p air-model --lib kernels_at_model_shapes -- --nocapture`),
/// never asserted.
#[cfg(test)]
mod model_shapes {
    use super::*;
    use k_quants::{BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ6K, BlockQ8_0};
    use std::time::Instant;

    fn check<T: BlockDot>(k: usize, n: usize, m: usize)
    where
        T::VecDotType: ActivationQuant,
    {
        let kb = k / T::BLCK_SIZE;
        // 64 distinct weight rows repeated: the full size without quantizing it all.
        let distinct = 64.min(n);
        let values: Vec<f32> = (0..distinct * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut pattern = vec![T::zeros(); distinct * kb];
        T::from_float(&values, &mut pattern);
        let w: Vec<T> = pattern.iter().cycle().take(n * kb).cloned().collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let activations = T::quantize(&x, k);
        let mut out = vec![0f32; m * n];
        let batched = vec![true; m];
        let mut best = [f64::MAX; 2];
        for _ in 0..3 {
            for (flags, best) in [&[][..], &batched[..]].into_iter().zip(&mut best) {
                let t = Instant::now();
                T::dots(kb, &w, &activations, 0..m, flags, &mut out, n);
                *best = best.min(t.elapsed().as_secs_f64());
            }
        }
        let mut xq = vec![T::VecDotType::zeros(); m * kb];
        for (src, dst) in x.chunks_exact(k).zip(xq.chunks_exact_mut(kb)) {
            ActivationQuant::quantize(src, dst);
        }
        for (row, col) in [(0, 0), (m - 1, n - 1), (m / 2, n / 3), (m / 3, n - 5)] {
            let want = T::vec_dot(k, &w[col * kb..(col + 1) * kb], &xq[row * kb..(row + 1) * kb]);
            let got = out[row * n + col];
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{:?} ({row}, {col}): {got} vs {want}", T::DTYPE);
        }
        let bytes = (w.len() * std::mem::size_of::<T>()) as f64;
        println!(
            "{:?} k={k} n={n} m={m}: {:.1} GMAC/s (batched arithmetic {:.1}), weights at {:.1} GB/s",
            T::DTYPE,
            (m * n * k) as f64 / best[0] / 1e9,
            (m * n * k) as f64 / best[1] / 1e9,
            bytes / best[0] / 1e9
        );
    }

    /// ggml's order against the per-block integer kernels ([`FastDot`]), same shapes and data.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    fn compare_fast<T: BlockDot + FastDot>(k: usize, n: usize, m: usize) {
        if !fast_supported() {
            return;
        }
        let kb = k / T::BLCK_SIZE;
        let distinct = 64.min(n);
        let values: Vec<f32> = (0..distinct * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut pattern = vec![T::zeros(); distinct * kb];
        T::from_float(&values, &mut pattern);
        let w: Vec<T> = pattern.iter().cycle().take(n * kb).cloned().collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let (ggml, fast) = (T::quantize(&x, k), T::fast_quantize(&x, k));
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        T::dots(kb, &w, &ggml, 0..m, &[], &mut a, n);
        T::fast_dots(kb, &w, &fast, 0..m, &mut b, n);
        for (got, want) in b.iter().zip(&a) {
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{:?}: {got} vs {want}", T::DTYPE);
        }
        // Timed as the pass calls them: a compact tile of outputs per slice of weight rows (a
        // whole row of outputs, at a stride of n, would time the scattered stores).
        const COLUMNS: usize = crate::linear::TILE_COLUMNS;
        let mut tile = vec![0f32; m * COLUMNS];
        let mut best = [f64::MAX; 2];
        for _ in 0..if cfg!(debug_assertions) { 1 } else { 20 } {
            let t = Instant::now();
            for c in (0..n).step_by(COLUMNS) {
                let cols = c..(c + COLUMNS).min(n);
                T::dots(kb, &w[cols.start * kb..cols.end * kb], &ggml, 0..m, &[], &mut tile, cols.len());
            }
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for c in (0..n).step_by(COLUMNS) {
                let cols = c..(c + COLUMNS).min(n);
                T::fast_dots(kb, &w[cols.start * kb..cols.end * kb], &fast, 0..m, &mut tile, cols.len());
            }
            best[1] = best[1].min(t.elapsed().as_secs_f64());
        }
        let gmacs = |s: f64| (m * n * k) as f64 / s / 1e9;
        println!("{:?} k={k} n={n} m={m}: ggml {:.1} GMAC/s, fast {:.1}", T::DTYPE, gmacs(best[0]), gmacs(best[1]));
    }

    #[test]
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    fn fast_kernels_at_model_shapes() {
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 48] {
            compare_fast::<BlockQ4_1>(576, 1536, m);
        }
        compare_fast::<BlockQ4_1>(1536, 576, 16);
        compare_fast::<BlockQ8_0>(576, 49152, 16);
        compare_fast::<BlockQ8_0>(576, 49152, 1);
        compare_fast::<BlockQ5_0>(896, 4864, 48);
    }

    #[test]
    fn kernels_at_model_shapes() {
        check::<BlockQ4_1>(576, 1536, 16);
        check::<BlockQ5_0>(896, 4864, 48);
        check::<BlockQ8_0>(896, 4864, 48);
        check::<BlockQ5_0>(4864, 896, 48);
        check::<BlockQ4K>(4864, 896, 48);
        check::<BlockQ6K>(4864, 896, 48);
        check::<BlockQ8_0>(640, 262144, 1);
        check::<BlockQ5_0>(896, 4864, 1);
    }
}
