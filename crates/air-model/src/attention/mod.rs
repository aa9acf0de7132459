//! Causal grouped-query attention over an f16 KV cache, with the numerics of ggml's CPU
//! flash-attention kernel (what llama.cpp runs by default), so logits agree with llama.cpp's.
//!
//! Like ggml, two paths. For fewer than [`F32_QUERY_ROWS`] query rows (generation), one pass
//! per query row with an online softmax (running max, running sum), the query rounded to f16 and
//! the value accumulator kept in f16. For more (prompts), f32 tiles ([`tiled`]).

mod tiled;

use crate::exp::{EXP_LANES, sum16};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// From this many query rows on, ggml switches to its tiled f32 kernel.
pub const F32_QUERY_ROWS: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions the cache can hold (stride between KV heads, in rows).
    pub capacity: usize,
    /// Multiplier of the scores (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Sliding window: a query sees only the last `window` positions (itself included).
    pub window: Option<usize>,
}

impl AttentionShape {
    /// The rows of KV head serving query head `h` in a (kv_heads, capacity, head_dim) cache.
    fn kv_head<'a>(&self, cache: &'a [f16], h: usize) -> &'a [f16] {
        let kv = h / (self.heads / self.kv_heads);
        let rows = self.capacity * self.head_dim;
        &cache[kv * rows..(kv + 1) * rows]
    }

    /// The cached positions a query at `pos` attends to: all before it and itself, or only the
    /// last `window` of them.
    fn visible(&self, pos: usize) -> std::ops::Range<usize> {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))..pos + 1
    }
}

/// Attention of `n` query rows at positions `start..start + n` over cached positions
/// `0..start + n`. `q` is (heads, n, head_dim); `keys`/`values` are (kv_heads, capacity, head_dim);
/// the result is (n, heads * head_dim).
pub fn causal_attention(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    start: usize,
    n: usize,
    s: AttentionShape,
) -> Vec<f32> {
    use rayon::prelude::*;
    let d = s.head_dim;
    // Heads are independent: each worker computes one head's (n, d) block.
    let per_head: Vec<Vec<f32>> = (0..s.heads)
        .into_par_iter()
        .map(|h| {
            if n < F32_QUERY_ROWS {
                head_attention(q, keys, values, start, n, h, s)
            } else {
                tiled::head_attention(q, keys, values, start, n, h, s)
            }
        })
        .collect();
    let mut out = vec![0f32; n * s.heads * d];
    for (h, block) in per_head.iter().enumerate() {
        for (i, row) in block.chunks_exact(d).enumerate() {
            out[(i * s.heads + h) * d..(i * s.heads + h + 1) * d].copy_from_slice(row);
        }
    }
    out
}

/// One query head over its KV head, generation path: (n, head_dim). As ggml's kernel: the
/// query rounded to f16, scores by [`dot_f16`], the value accumulator kept in f16 (widened,
/// updated with one FMA, rounded back), the result times 1/sum.
fn head_attention(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    start: usize,
    n: usize,
    h: usize,
    s: AttentionShape,
) -> Vec<f32> {
    let d = s.head_dim;
    let (k_head, v_head) = (s.kv_head(keys, h), s.kv_head(values, h));
    let mut out = vec![0f32; n * d];
    let (mut q_row, mut acc, mut v_row, mut k_row) = (vec![0f32; d], vec![0f32; d], vec![0f32; d], vec![0f32; d]);
    let (mut q16, mut acc16) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
    for i in 0..n {
        q16.convert_from_f32_slice(&q[(h * n + i) * d..(h * n + i + 1) * d]);
        q16.convert_to_f32_slice(&mut q_row);
        acc16.fill(f16::ZERO);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        for j in s.visible(start + i) {
            k_head[j * d..(j + 1) * d].convert_to_f32_slice(&mut k_row);
            let score = dot_f16(&k_row, &q_row) * s.scale;
            // On a new maximum rescale the accumulator, then add the weighted value.
            let (rescale, weight) = if score > max {
                let r = (max - score).exp();
                max = score;
                acc16.convert_to_f32_slice(&mut acc);
                acc.iter_mut().for_each(|a| *a *= r);
                acc16.convert_from_f32_slice(&acc);
                (r, 1.0)
            } else {
                (1.0, (score - max).exp())
            };
            v_head[j * d..(j + 1) * d].convert_to_f32_slice(&mut v_row);
            acc16.convert_to_f32_slice(&mut acc);
            for (a, &v) in acc.iter_mut().zip(&v_row) {
                *a = v.mul_add(weight, *a);
            }
            acc16.convert_from_f32_slice(&acc);
            sum = sum * rescale + weight;
        }
        let inverse = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        acc16.convert_to_f32_slice(&mut acc);
        for (o, a) in out[i * d..(i + 1) * d].iter_mut().zip(&acc) {
            *o = a * inverse;
        }
    }
    out
}

/// Σ a·b as ggml's `ggml_vec_dot_f16` sums on AVX-512: four accumulators of 16 lanes over
/// steps of 64, added pairwise (0+2, 1+3, then together), the 16 lanes reduced as
/// [`sum16`], a remainder in f64.
fn dot_f16(a: &[f32], b: &[f32]) -> f32 {
    const STEP: usize = 4 * EXP_LANES;
    let mut acc = [[0f32; EXP_LANES]; 4];
    let whole = a.len() / STEP * STEP;
    for (sa, sb) in a[..whole].chunks_exact(STEP).zip(b[..whole].chunks_exact(STEP)) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, x) in lanes.iter_mut().enumerate() {
                *x = sa[j * EXP_LANES + l].mul_add(sb[j * EXP_LANES + l], *x);
            }
        }
    }
    let lanes: [f32; EXP_LANES] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let mut total = sum16(&lanes) as f64;
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        total += (x * y) as f64;
    }
    total as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention in f64 as the oracle.
    fn naive(q: &[f32], k: &[f16], v: &[f16], start: usize, n: usize, s: AttentionShape) -> Vec<f32> {
        let d = s.head_dim;
        let mut out = vec![0f32; n * s.heads * d];
        for h in 0..s.heads {
            let kv = h / (s.heads / s.kv_heads);
            for i in 0..n {
                let qr = &q[(h * n + i) * d..(h * n + i + 1) * d];
                let first = s.window.map_or(0, |w| (start + i + 1).saturating_sub(w));
                let scores: Vec<f64> = (0..=start + i)
                    .map(|j| {
                        let kr = &k[(kv * s.capacity + j) * d..(kv * s.capacity + j + 1) * d];
                        let dot = qr.iter().zip(kr).map(|(a, b)| *a as f64 * b.to_f64()).sum::<f64>();
                        if j < first { f64::NEG_INFINITY } else { dot * s.scale as f64 }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = w.iter().sum();
                for c in 0..d {
                    let val: f64 =
                        w.iter().enumerate().map(|(j, wj)| wj * v[(kv * s.capacity + j) * d + c].to_f64()).sum();
                    out[(i * s.heads + h) * d + c] = (val / total) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_plain_softmax_attention() {
        let s = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            capacity: 100,
            scale: 1.0 / 8f32.sqrt(),
            window: None,
        };
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let kv_len = s.kv_heads * s.capacity * 64;
        let k: Vec<f16> = (0..kv_len).map(|_| f16::from_f32(rnd() * 4.0)).collect();
        let v: Vec<f16> = (0..kv_len).map(|_| f16::from_f32(rnd())).collect();
        let windowed = AttentionShape { window: Some(4), ..s };
        let wide = AttentionShape { head_dim: 64, scale: 0.125, ..s };
        let cases = [
            (0, 1, s),
            (5, 3, s),
            (0, 70, s),
            (20, 1, s),
            (20, 1, windowed),
            (2, 70, windowed),
            (0, 98, wide),
            (1, 80, wide),
            (0, 90, AttentionShape { window: Some(70), ..wide }),
        ];
        for (start, n, s) in cases {
            let q: Vec<f32> = (0..s.heads * n * s.head_dim).map(|_| rnd() * 4.0).collect();
            let got = causal_attention(&q, &k, &v, start, n, s);
            let want = naive(&q, &k, &v, start, n, s);
            let tolerance = if n < F32_QUERY_ROWS { 2e-2 } else { 1e-5 };
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < tolerance, "start {start} n {n}: {g} vs {w}");
            }
        }
    }
}
