//! Causal grouped-query attention over an f16 KV cache, with the numerics of ggml's CPU
//! flash-attention kernel (what llama.cpp runs by default), so logits agree with llama.cpp's.
//!
//! Like ggml, two paths. For fewer than [`F32_QUERY_ROWS`] query rows (generation), one pass
//! per query row with an online softmax (running max, running sum), the query rounded to f16 and
//! the value accumulator kept in f16. For more (prompts), f32 throughout: scores of a chunk of
//! queries against all the keys they see as one GEMM, a softmax per row, and the values as a
//! second GEMM.

use half::f16;

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
                head_attention_f32(q, keys, values, start, n, h, s)
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

/// Query rows per score GEMM of the f32 path: bounds the score block to this many rows of
/// the context.
const QUERY_CHUNK: usize = 128;

/// One query head over its KV head, f32 path: (n, head_dim).
fn head_attention_f32(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    start: usize,
    n: usize,
    h: usize,
    s: AttentionShape,
) -> Vec<f32> {
    let d = s.head_dim;
    let kv = h / (s.heads / s.kv_heads);
    let len = start + n;
    let widen = |cache: &[f16]| {
        let mut out = vec![0f32; len * d];
        convert(&cache[kv * s.capacity * d..(kv * s.capacity + len) * d], &mut out);
        out
    };
    let (k, v) = (widen(keys), widen(values));
    let q = &q[h * n * d..(h + 1) * n * d];
    let mut out = vec![0f32; n * d];
    let mut scores = vec![0f32; QUERY_CHUNK.min(n) * len];
    for first_row in (0..n).step_by(QUERY_CHUNK) {
        let rows = QUERY_CHUNK.min(n - first_row);
        // Keys seen by the chunk's last row; earlier rows mask the rest.
        let seen = start + first_row + rows;
        let scores = &mut scores[..rows * seen];
        // SAFETY: q holds rows × d from first_row, k holds seen × d, scores rows × seen; all
        // strides describe those row-major layouts.
        unsafe {
            gemm::gemm(
                rows,
                seen,
                d,
                scores.as_mut_ptr(),
                1,
                seen as isize,
                false,
                q[first_row * d..].as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                0.0,
                s.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        let mut sums = vec![0f32; rows];
        for (r, (row, sum)) in scores.chunks_exact_mut(seen).zip(&mut sums).enumerate() {
            let pos = start + first_row + r;
            let first = s.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let visible = &mut row[first..=pos];
            let max = visible.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for x in visible.iter_mut() {
                *x = (*x - max).exp();
            }
            *sum = visible.iter().sum();
            row[..first].fill(0.0);
            row[pos + 1..].fill(0.0);
        }
        let out = &mut out[first_row * d..(first_row + rows) * d];
        // SAFETY: scores rows × seen, v seen × d, out rows × d, row-major.
        unsafe {
            gemm::gemm(
                rows,
                d,
                seen,
                out.as_mut_ptr(),
                1,
                d as isize,
                false,
                scores.as_ptr(),
                1,
                seen as isize,
                v.as_ptr(),
                1,
                d as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        for (row, sum) in out.chunks_exact_mut(d).zip(&sums) {
            row.iter_mut().for_each(|x| *x /= sum);
        }
    }
    out
}

/// One query head over its KV head, generation path: (n, head_dim).
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
    let kv = h / (s.heads / s.kv_heads);
    let scale = s.scale;
    let f16_path = n < F32_QUERY_ROWS;
    let k_head = &keys[kv * s.capacity * d..(kv + 1) * s.capacity * d];
    let v_head = &values[kv * s.capacity * d..(kv + 1) * s.capacity * d];
    let mut out = vec![0f32; n * d];
    let (mut q_row, mut acc, mut v_row, mut k_row) = (vec![0f32; d], vec![0f32; d], vec![0f32; d], vec![0f32; d]);
    for i in 0..n {
        q_row.copy_from_slice(&q[(h * n + i) * d..(h * n + i + 1) * d]);
        if f16_path {
            round_f16(&mut q_row);
        }
        acc.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        let pos = start + i;
        let first = s.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for j in first..=pos {
            convert(&k_head[j * d..(j + 1) * d], &mut k_row);
            let score = dot(&k_row, &q_row) * scale;
            // As ggml: on a new maximum rescale the accumulator, then add the weighted value.
            let (rescale, weight) = if score > max {
                let r = (max - score).exp();
                max = score;
                acc.iter_mut().for_each(|a| *a *= r);
                if f16_path {
                    round_f16(&mut acc);
                }
                (r, 1.0)
            } else {
                (1.0, (score - max).exp())
            };
            convert(&v_head[j * d..(j + 1) * d], &mut v_row);
            for (a, &v) in acc.iter_mut().zip(&v_row) {
                *a = v.mul_add(weight, *a);
            }
            if f16_path {
                round_f16(&mut acc);
            }
            sum = sum * rescale + weight;
        }
        for (o, a) in out[i * d..(i + 1) * d].iter_mut().zip(&acc) {
            *o = a / sum;
        }
    }
    out
}

fn convert(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

fn round_f16(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
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
        let kv_len = s.kv_heads * s.capacity * s.head_dim;
        let k: Vec<f16> = (0..kv_len).map(|_| f16::from_f32(rnd() * 4.0)).collect();
        let v: Vec<f16> = (0..kv_len).map(|_| f16::from_f32(rnd())).collect();
        let windowed = AttentionShape { window: Some(4), ..s };
        for (start, n, s) in [(0, 1, s), (5, 3, s), (0, 70, s), (20, 1, s), (20, 1, windowed), (2, 70, windowed)] {
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
