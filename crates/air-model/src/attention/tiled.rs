//! The prompt path: f32 attention by tiles of 64 queries × 64 keys, in the arithmetic of ggml's
//! tiled flash-attention kernel (llama.cpp's for 64 query rows and more). Per key tile: scores
//! as FMA chains over the head dimension, then the scale; an online softmax (the running max
//! and sum rescaled when the max grows, weights by [`exp16`], sums in f64); the weighted values
//! added as FMA chains over the tile's keys. Rows are vectors over keys or head dimensions, so
//! the loops compile to SIMD. The f16 keys and values are widened once per head (keys transposed
//! per tile), not once per query tile.

use super::AttentionShape;
use crate::exp::{EXP_LANES, exp16, sum16};
use air_kv::LayerView;
use half::slice::HalfFloatSliceExt;

/// Query rows per tile.
const Q_TILE: usize = 64;
/// Keys per tile.
const KV_TILE: usize = 64;

/// Query head `h` over its KV head: `q` and the result are (n, head_dim). Key tiles are aligned
/// to absolute positions, so a row's result does not depend on the other rows of the call.
pub(super) fn head_attention(
    q: &[f32],
    kv: LayerView<'_>,
    start: usize,
    n: usize,
    h: usize,
    s: AttentionShape,
) -> Vec<f32> {
    let d = s.head_dim;
    let kv_head = s.kv_head(h);
    let mut out = vec![0f32; n * d];
    let visible = |row: usize| s.visible(start + row);
    // Every key tile any query row sees, widened to f32 once: keys transposed per tile
    // (tile, dimension, key), values (key, dimension); keys past the last position stay zero.
    let (first_tile, end_tile) = (visible(0).start / KV_TILE, visible(n - 1).end.div_ceil(KV_TILE));
    let tile_keys = |tile: usize| tile * KV_TILE..((tile + 1) * KV_TILE).min(start + n);
    let mut k_tiles = vec![0f32; (end_tile - first_tile) * d * KV_TILE];
    let mut v_tiles = vec![0f32; (end_tile - first_tile) * KV_TILE * d];
    let mut widened = vec![0f32; d];
    for tile in first_tile..end_tile {
        let k_t = &mut k_tiles[(tile - first_tile) * d * KV_TILE..][..d * KV_TILE];
        for (t, j) in tile_keys(tile).enumerate() {
            kv.key(kv_head, j).convert_to_f32_slice(&mut widened);
            for (c, &v) in widened.iter().enumerate() {
                k_t[c * KV_TILE + t] = v;
            }
        }
        let v_tile = &mut v_tiles[(tile - first_tile) * KV_TILE * d..][..KV_TILE * d];
        for (t, j) in tile_keys(tile).enumerate() {
            kv.value(kv_head, j).convert_to_f32_slice(&mut v_tile[t * d..(t + 1) * d]);
        }
    }
    let mut scores = vec![[0f32; KV_TILE]; Q_TILE];
    let mut acc = vec![0f32; Q_TILE * d];
    for first_row in (0..n).step_by(Q_TILE) {
        let rows = Q_TILE.min(n - first_row);
        let (mut max, mut sum) = ([f32::NEG_INFINITY; Q_TILE], [0f32; Q_TILE]);
        acc.fill(0.0);
        let visible = |r: usize| visible(first_row + r);
        let (first_key, end_key) = (visible(0).start, visible(rows - 1).end);
        for tile_start in (first_key / KV_TILE * KV_TILE..end_key).step_by(KV_TILE) {
            let keys_in_tile = KV_TILE.min(end_key - tile_start);
            let tile = tile_start / KV_TILE - first_tile;
            let k_t = &k_tiles[tile * d * KV_TILE..][..d * KV_TILE];
            let v_tile = &v_tiles[tile * KV_TILE * d..][..KV_TILE * d];
            scores_by_row_blocks(&q[first_row * d..(first_row + rows) * d], k_t, d, &mut scores[..rows]);
            for r in 0..rows {
                let row = &mut scores[r];
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
            add_weighted_values(&scores[..rows], v_tile, d, &mut acc[..rows * d]);
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

/// Keys (score loop) or head dimensions (value loop) per register block.
const LANE_BLOCK: usize = 32;
/// Query rows per register block: 2 rows × 32 f32 lanes are 8 AVX2 registers, so the rows' sums
/// stay in registers while each key (or value) vector is loaded once for both. Against a row at
/// a time, Gemma 3's prompt (head dimension 256) ran 1.3x faster; 4 rows × 16 lanes was no
/// better.
const ROW_BLOCK: usize = 2;

/// `scores[r][t]` = Σ_c q[r][c] · k_t[c][t], one FMA chain per score in order of c (as a row at a
/// time would), [`ROW_BLOCK`] query rows per pass.
fn scores_by_row_blocks(q: &[f32], k_t: &[f32], d: usize, scores: &mut [[f32; KV_TILE]]) {
    let blocks = scores.len() / ROW_BLOCK;
    for (p, out) in scores[..ROW_BLOCK * blocks].chunks_exact_mut(ROW_BLOCK).enumerate() {
        scores_block::<ROW_BLOCK>(&q[ROW_BLOCK * p * d..ROW_BLOCK * (p + 1) * d], k_t, d, out);
    }
    for r in ROW_BLOCK * blocks..scores.len() {
        scores_block::<1>(&q[r * d..(r + 1) * d], k_t, d, std::slice::from_mut(&mut scores[r]));
    }
}

#[inline(always)]
fn scores_block<const R: usize>(q: &[f32], k_t: &[f32], d: usize, out: &mut [[f32; KV_TILE]]) {
    for block in (0..KV_TILE).step_by(LANE_BLOCK) {
        let mut sums = [[0f32; LANE_BLOCK]; R];
        for c in 0..d {
            let k: &[f32; LANE_BLOCK] = k_t[c * KV_TILE + block..][..LANE_BLOCK].try_into().unwrap();
            for r in 0..R {
                let qc = q[r * d + c];
                for t in 0..LANE_BLOCK {
                    sums[r][t] = qc.mul_add(k[t], sums[r][t]);
                }
            }
        }
        for r in 0..R {
            out[r][block..block + LANE_BLOCK].copy_from_slice(&sums[r]);
        }
    }
}

/// `acc[r]` += Σ_t weights[r][t] · values[t], one FMA per key in order of t (as a row at a time
/// would), [`ROW_BLOCK`] rows per pass.
fn add_weighted_values(weights: &[[f32; KV_TILE]], values: &[f32], d: usize, acc: &mut [f32]) {
    let blocks = weights.len() / ROW_BLOCK;
    for p in 0..blocks {
        let rows = ROW_BLOCK * p..ROW_BLOCK * (p + 1);
        values_block::<ROW_BLOCK>(&weights[rows.clone()], values, d, &mut acc[rows.start * d..rows.end * d]);
    }
    for r in ROW_BLOCK * blocks..weights.len() {
        values_block::<1>(&weights[r..r + 1], values, d, &mut acc[r * d..(r + 1) * d]);
    }
}

#[inline(always)]
fn values_block<const R: usize>(weights: &[[f32; KV_TILE]], values: &[f32], d: usize, acc: &mut [f32]) {
    for block in (0..d).step_by(LANE_BLOCK) {
        if block + LANE_BLOCK > d {
            // A head dimension that is not a multiple of the block: the rest a lane at a time.
            for r in 0..R {
                for (t, v) in values.chunks_exact(d).enumerate() {
                    for c in block..d {
                        acc[r * d + c] = weights[r][t].mul_add(v[c], acc[r * d + c]);
                    }
                }
            }
            break;
        }
        let mut sums = [[0f32; LANE_BLOCK]; R];
        for r in 0..R {
            sums[r].copy_from_slice(&acc[r * d + block..][..LANE_BLOCK]);
        }
        for (t, v) in values.chunks_exact(d).enumerate() {
            let v: &[f32; LANE_BLOCK] = v[block..block + LANE_BLOCK].try_into().unwrap();
            for r in 0..R {
                let p = weights[r][t];
                for c in 0..LANE_BLOCK {
                    sums[r][c] = p.mul_add(v[c], sums[r][c]);
                }
            }
        }
        for r in 0..R {
            acc[r * d + block..][..LANE_BLOCK].copy_from_slice(&sums[r]);
        }
    }
}
