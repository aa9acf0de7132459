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
use crate::host::RegionBuffer;
use candle_core::quantized::k_quants::{self, GgmlType};
use half::{bf16, f16};
use std::ops::Range;

/// A weight block type and how Air computes dot products of its rows with activation rows.
pub trait BlockDot: GgmlType {
    /// Activation rows, quantized for this type's kernel.
    type Activations: Send + Sync;
    /// [`Self::quantize_rows`] takes chunks of a multiple of this many rows.
    const QUANTIZE_ROWS: usize = 1;

    /// Space for `rows` rows of `k` values, quantized by [`Self::quantize_rows`].
    /// SAFETY (caller): every row is quantized before the activations are read.
    unsafe fn activations(rows: usize, k: usize) -> Self::Activations;

    /// Quantizes `values` (whole rows) as ggml does for this weight type, into `x`'s rows from
    /// `first`.
    /// SAFETY (caller): the rows are a chunk: from a multiple of [`Self::QUANTIZE_ROWS`], a
    /// multiple of it rows or up to `x`'s end; concurrent calls quantize other chunks; nothing
    /// reads `x` until every chunk is quantized.
    unsafe fn quantize_rows(x: &Self::Activations, first: usize, values: &[f32]);

    /// Quantizes `x`, rows of `k` values, on the calling thread (the tests' way).
    #[cfg(test)]
    fn quantize(x: &[f32], k: usize) -> Self::Activations {
        // SAFETY: every chunk, one after the other, before the activations are returned.
        unsafe {
            quantize_serially(
                x,
                k,
                Self::QUANTIZE_ROWS,
                |rows| Self::activations(rows, k),
                |a, first, values| Self::quantize_rows(a, first, values),
            )
        }
    }

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
            type Activations = RowBlocks<<$t as GgmlType>::VecDotType>;

            unsafe fn activations(rows: usize, k: usize) -> Self::Activations {
                unsafe { RowBlocks::new(rows, k) }
            }

            unsafe fn quantize_rows(x: &Self::Activations, first: usize, values: &[f32]) {
                unsafe { x.quantize_rows(first, values) }
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

/// [`BlockDot::quantize`] for any activation layout: `activations(rows)`, then
/// `quantize_rows(activations, first row, values)` over chunks of `chunk_rows` rows.
/// SAFETY (caller): the two are a layout's [`BlockDot::activations`] and
/// [`BlockDot::quantize_rows`] (or [`FastDot`]'s), with its chunk size.
#[cfg(test)]
pub(crate) unsafe fn quantize_serially<A>(
    x: &[f32],
    k: usize,
    chunk_rows: usize,
    activations: impl FnOnce(usize) -> A,
    quantize_rows: impl Fn(&A, usize, &[f32]),
) -> A {
    let rows = x.len() / k;
    let a = activations(rows);
    for (c, values) in x[..rows * k].chunks(chunk_rows * k).enumerate() {
        quantize_rows(&a, c * chunk_rows, values);
    }
    a
}

/// Activation rows in candle's blocks of `B`, for the row kernels: (row, block).
pub struct RowBlocks<B> {
    per_row: usize,
    blocks: RegionBuffer<B>,
}

impl<B: ActivationQuant> RowBlocks<B> {
    /// Space for `rows` rows of `k` values.
    /// SAFETY (caller): every row is quantized before the blocks are read.
    unsafe fn new(rows: usize, k: usize) -> Self {
        let per_row = k / B::BLCK_SIZE;
        Self { per_row, blocks: unsafe { RegionBuffer::uninit(rows * per_row) } }
    }

    /// Quantizes `values` into the rows from `first`.
    /// SAFETY (caller): no other thread writes or reads these rows meanwhile.
    unsafe fn quantize_rows(&self, first: usize, values: &[f32]) {
        let blocks = values.len() / (self.per_row * B::BLCK_SIZE) * self.per_row;
        assert!((first * self.per_row + blocks) <= self.blocks.len());
        // SAFETY: the rows' blocks are in bounds (asserted) and this call's alone.
        let rows = unsafe { std::slice::from_raw_parts_mut(self.blocks.slot(first * self.per_row), blocks) };
        ActivationQuant::quantize(values, rows);
    }
}

impl<B> std::ops::Deref for RowBlocks<B> {
    type Target = [B];
    fn deref(&self) -> &[B] {
        &self.blocks
    }
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
            type Activations = RowBlocks<k_quants::BlockQ8K>;

            unsafe fn activations(rows: usize, k: usize) -> Self::Activations {
                unsafe { RowBlocks::new(rows, k) }
            }

            unsafe fn quantize_rows(x: &Self::Activations, first: usize, values: &[f32]) {
                unsafe { x.quantize_rows(first, values) }
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
            const QUANTIZE_ROWS: usize = x86::QUANTIZE_ROWS;

            unsafe fn activations(rows: usize, k: usize) -> Self::Activations {
                unsafe { x86::Activations::new::<Self>(rows, k) }
            }

            unsafe fn quantize_rows(x: &Self::Activations, first: usize, values: &[f32]) {
                unsafe { x.quantize_rows::<Self>(first, values) }
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

            unsafe fn fast_activations(rows: usize, k: usize) -> Self::FastActivations {
                unsafe { x86_fast::Activations::new(rows, k) }
            }

            unsafe fn fast_quantize_rows(x: &Self::FastActivations, first: usize, values: &[f32]) {
                unsafe { x.quantize_rows::<Self>(first, values) }
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

    /// As [`BlockDot::activations`], one row a chunk.
    /// SAFETY (caller): every row is quantized before the activations are read.
    unsafe fn fast_activations(rows: usize, k: usize) -> Self::FastActivations;

    /// As [`BlockDot::quantize_rows`], one row a chunk.
    /// SAFETY (caller): as [`BlockDot::quantize_rows`]'s.
    unsafe fn fast_quantize_rows(x: &Self::FastActivations, first: usize, values: &[f32]);

    /// Quantizes `x`, rows of `k` values, on the calling thread (the tests' way).
    #[cfg(test)]
    fn fast_quantize(x: &[f32], k: usize) -> Self::FastActivations {
        // SAFETY: every row, one after the other, before the activations are returned.
        unsafe {
            quantize_serially(
                x,
                k,
                1,
                |rows| Self::fast_activations(rows, k),
                |a, first, values| Self::fast_quantize_rows(a, first, values),
            )
        }
    }

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
