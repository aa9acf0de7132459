//! The prompt path: f32 attention by tiles of 64 queries × 64 keys, in the arithmetic of ggml's
//! tiled flash-attention kernel (llama.cpp's for 64 query rows and more). Per key tile: scores
//! as FMA chains over the head dimension, then the scale; an online softmax (the running max
//! and sum rescaled when the max grows, weights by [`exp16`], sums in f64); the weighted values
//! added as FMA chains over the tile's keys. Rows are vectors over keys or head dimensions, so
//! the loops compile to SIMD.

use super::AttentionShape;
use crate::exp::{EXP_LANES, exp16, sum16};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Query rows per tile.
const Q_TILE: usize = 64;
/// Keys per tile.
const KV_TILE: usize = 64;

/// One query head over its KV head: (n, head_dim).
pub(super) fn head_attention(
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
    let q = &q[h * n * d..(h + 1) * n * d];
    let mut out = vec![0f32; n * d];
    // Keys transposed (dimension, key) and values (key, dimension), widened, zero-padded.
    let mut k_t = vec![0f32; d * KV_TILE];
    let mut v_tile = vec![0f32; KV_TILE * d];
    let mut scores = vec![[0f32; KV_TILE]; Q_TILE];
    let mut acc = vec![0f32; Q_TILE * d];
    let mut widened = vec![0f32; d];
    for first_row in (0..n).step_by(Q_TILE) {
        let rows = Q_TILE.min(n - first_row);
        let (mut max, mut sum) = ([f32::NEG_INFINITY; Q_TILE], [0f32; Q_TILE]);
        acc.fill(0.0);
        let visible = |r: usize| {
            let pos = start + first_row + r;
            s.window.map_or(0, |w| (pos + 1).saturating_sub(w))..pos + 1
        };
        let (first_key, end_key) = (visible(0).start, visible(rows - 1).end);
        for tile_start in (first_key / KV_TILE * KV_TILE..end_key).step_by(KV_TILE) {
            let keys_in_tile = KV_TILE.min(end_key - tile_start);
            for t in 0..keys_in_tile {
                let j = tile_start + t;
                k_head[j * d..(j + 1) * d].convert_to_f32_slice(&mut widened);
                for (c, &v) in widened.iter().enumerate() {
                    k_t[c * KV_TILE + t] = v;
                }
                v_head[j * d..(j + 1) * d].convert_to_f32_slice(&mut v_tile[t * d..(t + 1) * d]);
            }
            for t in keys_in_tile..KV_TILE {
                k_t.iter_mut().skip(t).step_by(KV_TILE).for_each(|v| *v = 0.0);
                v_tile[t * d..(t + 1) * d].fill(0.0);
            }
            for r in 0..rows {
                let row = &mut scores[r];
                *row = [0.0; KV_TILE];
                for (c, &qc) in q[(first_row + r) * d..(first_row + r + 1) * d].iter().enumerate() {
                    let k_c: &[f32; KV_TILE] = k_t[c * KV_TILE..(c + 1) * KV_TILE].try_into().unwrap();
                    for (x, &k) in row.iter_mut().zip(k_c) {
                        *x = qc.mul_add(k, *x);
                    }
                }
                let seen = visible(r);
                for (t, x) in row.iter_mut().enumerate() {
                    let j = tile_start + t;
                    *x = if t < keys_in_tile && seen.contains(&j) { *x * s.scale } else { f32::NEG_INFINITY };
                }
                let tile_max = row.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
                if tile_max == f32::NEG_INFINITY {
                    *row = [0.0; KV_TILE];
                    continue;
                }
                let row_acc = &mut acc[r * d..(r + 1) * d];
                if tile_max > max[r] {
                    let rescale = (max[r] - tile_max).exp();
                    row_acc.iter_mut().for_each(|a| *a *= rescale);
                    sum[r] *= rescale;
                    max[r] = tile_max;
                }
                let mut tile_sum = 0f64;
                for chunk in row.chunks_exact_mut(EXP_LANES) {
                    let shifted: [f32; EXP_LANES] = std::array::from_fn(|i| chunk[i] - max[r]);
                    let weights = exp16(&shifted);
                    tile_sum += sum16(&weights) as f64;
                    chunk.copy_from_slice(&weights);
                }
                sum[r] = (sum[r] as f64 + tile_sum) as f32;
            }
            for (r, row) in scores.iter().enumerate().take(rows) {
                let row_acc = &mut acc[r * d..(r + 1) * d];
                for (&p, v) in row.iter().zip(v_tile.chunks_exact(d)) {
                    for (a, &v) in row_acc.iter_mut().zip(v) {
                        *a = p.mul_add(v, *a);
                    }
                }
            }
        }
        for r in 0..rows {
            let inverse = if sum[r] == 0.0 { 0.0 } else { 1.0 / sum[r] };
            let dst = &mut out[(first_row + r) * d..(first_row + r + 1) * d];
            for (o, &a) in dst.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *o = a * inverse;
            }
        }
    }
    out
}
