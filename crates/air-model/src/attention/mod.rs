//! Causal grouped-query attention over an f16 KV cache, with the numerics of ggml's CPU
//! flash-attention kernel (what llama.cpp runs by default), so logits agree with llama.cpp's.
//!
//! Like ggml, two paths. For generation, one pass per query row with an online softmax (running
//! max, running sum), the query rounded to f16 and the value accumulator kept in f16. For
//! prompts, f32 tiles ([`tiled`]). ggml picks by the rows of a call (tiles from
//! [`F32_QUERY_ROWS`] on); the caller picks here, per row, so that a row's result does not
//! depend on how a prompt was split into chunks or batched with others. Keys and values are read
//! through the sequence's block table ([`LayerView`]).

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
mod avx2;
mod f16_lanes;
mod tiled;

use crate::exp::{EXP_LANES, sum16};
use crate::host::SharedOutput;
use air_kv::LayerView;
use half::slice::HalfFloatSliceExt;

/// From this many query rows on, ggml switches to its tiled f32 kernel.
pub const F32_QUERY_ROWS: usize = 64;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of the scores (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Sliding window: a query sees only the last `window` positions (itself included).
    pub window: Option<usize>,
    /// How the generation path keeps its weighted sum of values.
    pub values: ValueSums,
}

/// The generation path's running weighted sum of values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ValueSums {
    /// In f16, rounded after every update, as ggml keeps it (llama.cpp's bits).
    #[default]
    F16,
    /// In f32 (`--cpu-numerics fast`): no rounding to f16 between updates, which took about a
    /// quarter of generation attention's time in a 16-row step of SmolLM2 (docs/numerics.md).
    F32,
}

impl AttentionShape {
    /// The KV head serving query head `h`.
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// The cached positions a query at `pos` attends to: all before it and itself, or only the
    /// last `window` of them.
    fn visible(&self, pos: usize) -> std::ops::Range<usize> {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))..pos + 1
    }
}

/// One sequence's query rows in a call of [`causal_attention`].
#[derive(Clone, Copy)]
pub struct QueryRows<'a> {
    /// The sequence's keys and values of this layer.
    pub kv: LayerView<'a>,
    /// Its first row among the call's rows.
    pub row: usize,
    /// Its rows, at positions `start..start + n`; they attend to cached positions
    /// `0..start + n`.
    pub n: usize,
    pub start: usize,
    /// The first `tiled_rows` rows by the prompt path, the rest by the generation path.
    pub tiled_rows: usize,
}

/// Attention of the query rows of several sequences, every (sequence, KV head) pair in one
/// parallel region. `q` is (heads, rows, head_dim) over all the call's rows; the result is
/// (rows, heads * head_dim).
pub fn causal_attention(q: &[f32], rows: usize, seqs: &[QueryRows<'_>], s: AttentionShape) -> Vec<f32> {
    use rayon::prelude::*;
    let d = s.head_dim;
    let group = s.heads / s.kv_heads;
    assert!(q.len() >= s.heads * rows * d && seqs.iter().all(|r| r.row + r.n <= rows), "query rows beyond the call's");
    let mut out = vec![0f32; rows * s.heads * d];
    let dst = SharedOutput::new(out.as_mut_ptr());
    // Each task writes the rows of its sequence and the heads of its KV head.
    (0..seqs.len() * s.kv_heads).into_par_iter().for_each(|task| {
        let (q_rows, kv_head) = (&seqs[task / s.kv_heads], task % s.kv_heads);
        let heads = kv_head * group..(kv_head + 1) * group;
        let (n, tiled) = (q_rows.n, q_rows.tiled_rows.min(q_rows.n));
        let q_of = |h: usize, seq_rows: std::ops::Range<usize>| {
            &q[(h * rows + q_rows.row + seq_rows.start) * d..(h * rows + q_rows.row + seq_rows.end) * d]
        };
        // SAFETY: row i of the sequence and head h lie inside `out` ((rows, heads, d)); no
        // other task writes them, and `out` outlives the region.
        let emit =
            |h: usize, i: usize, values: &[f32]| unsafe { dst.write(((q_rows.row + i) * s.heads + h) * d, values) };
        if tiled > 0 {
            for h in heads.clone() {
                let prompt = tiled::head_attention(q_of(h, 0..tiled), q_rows.kv, q_rows.start, tiled, h, s);
                for (i, values) in prompt.chunks_exact(d).enumerate() {
                    emit(h, i, values);
                }
            }
        }
        if tiled < n {
            let q_group: Vec<&[f32]> = heads.clone().map(|h| q_of(h, tiled..n)).collect();
            group_attention(&q_group, q_rows.kv, q_rows.start + tiled, kv_head, s, |g, i, values| {
                emit(heads.start + g, tiled + i, values)
            });
        }
    });
    out
}

/// The query heads of KV head `kv_head` (`q[g]`: head g's rows, (n, head_dim), at positions
/// from `start`), generation path, each head's result row handed to `emit(head in the group,
/// row, values)`. Per head as ggml's kernel: the query rounded to f16, scores by [`dot_f16`],
/// the value accumulator kept in f16 ([`accumulate`]; in f32 for [`ValueSums::F32`]), the
/// result times 1/sum. With AVX-512 and head dimension 64, up to four heads go through one
/// kernel that reads each key and value once for all of them.
fn group_attention(
    q: &[&[f32]],
    kv: LayerView<'_>,
    start: usize,
    kv_head: usize,
    s: AttentionShape,
    mut emit: impl FnMut(usize, usize, &[f32]),
) {
    use half::f16;
    let (d, heads) = (s.head_dim, q.len());
    let n = q.first().map_or(0, |rows| rows.len() / d);
    let mut row = vec![0f32; d];
    let mut q_rows = vec![0f32; heads * d];
    let mut q16 = vec![f16::ZERO; d];
    // Each head's sum of values; the f16 path's values are f16 numbers, held here in f32.
    let mut acc = vec![0f32; heads * d];
    let mut acc16 = vec![f16::ZERO; d];
    let mut sums = vec![0f32; heads];
    let mut scratch = Vec::new();
    let exact = s.values == ValueSums::F16;
    #[cfg(target_arch = "x86_64")]
    let avx512 = d.is_multiple_of(EXP_LANES) && std::is_x86_feature_detected!("avx512f");
    for i in 0..n {
        for (g, rows) in q.iter().enumerate() {
            q16.convert_from_f32_slice(&rows[i * d..(i + 1) * d]);
            q16.convert_to_f32_slice(&mut q_rows[g * d..(g + 1) * d]);
        }
        let range = s.visible(start + i);
        let mut g = 0;
        while g < heads {
            let (q_g, acc_g, sums_g) = (&q_rows[g * d..], &mut acc[g * d..], &mut sums[g..]);
            #[cfg(target_arch = "x86_64")]
            if avx512 && d == avx512::D64 {
                let together = (heads - g).min(4);
                let (q_g, acc_g, sums_g) = (&q_g[..together * d], &mut acc_g[..together * d], &mut sums_g[..together]);
                let r = range.clone();
                // SAFETY: AVX-512F is present; the slices hold `together` heads of 64.
                unsafe { avx512::heads_kernel(together, exact)(q_g, kv, kv_head, r, s.scale, acc_g, sums_g) };
                g += together;
                continue;
            }
            let (q_g, acc_g) = (&q_g[..d], &mut acc_g[..d]);
            if !exact {
                sums_g[0] = accumulate_f32(q_g, kv, kv_head, range.clone(), s.scale, acc_g, &mut scratch);
                g += 1;
                continue;
            }
            acc16.fill(f16::ZERO);
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F is present; `d` is a multiple of 16.
                sums_g[0] = unsafe { avx512::accumulate(q_g, kv, kv_head, range.clone(), s.scale, &mut acc16) };
                acc16.convert_to_f32_slice(acc_g);
                g += 1;
                continue;
            }
            sums_g[0] = accumulate(q_g, kv, kv_head, range.clone(), s.scale, &mut acc16, &mut scratch);
            acc16.convert_to_f32_slice(acc_g);
            g += 1;
        }
        for (g, &sum) in sums.iter().enumerate() {
            let inverse = if sum == 0.0 { 0.0 } else { 1.0 / sum };
            for (o, &a) in row.iter_mut().zip(&acc[g * d..(g + 1) * d]) {
                *o = a * inverse;
            }
            emit(g, i, &row);
        }
    }
}

/// [`accumulate`] with the sum of values in f32 ([`ValueSums::F32`]): the same scores,
/// maxima and weights, each update one fused multiply-add per lane, never rounded to f16.
/// `acc` receives the sum; `scratch` is working space, kept by the caller across rows.
fn accumulate_f32(
    q: &[f32],
    kv: LayerView<'_>,
    kv_head: usize,
    range: std::ops::Range<usize>,
    scale: f32,
    acc: &mut [f32],
    scratch: &mut Vec<f32>,
) -> f32 {
    let d = q.len();
    scratch.resize(2 * d, 0.0);
    let (v_row, k_row) = scratch.split_at_mut(d);
    acc.fill(0.0);
    online_softmax(kv, kv_head, range, scale, score(q, k_row), |rescale, value, weight| {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        if d.is_multiple_of(8) {
            // SAFETY: the build has AVX2, FMA and F16C (cfg); `acc` and the value hold `d`
            // values, a multiple of 8.
            unsafe { avx2::add_value(acc, rescale, value, weight) };
            return;
        }
        if let Some(r) = rescale {
            acc.iter_mut().for_each(|a| *a *= r);
        }
        value.convert_to_f32_slice(v_row);
        for (a, &v) in acc.iter_mut().zip(v_row.iter()) {
            *a = v.mul_add(weight, *a);
        }
    })
}

/// A key's score against `q` by [`dot_f16`]'s arithmetic: in AVX2 registers where the build and
/// the length allow, else converted into `k_row` (of `q`'s length) first.
fn score<'a>(q: &'a [f32], k_row: &'a mut [f32]) -> impl FnMut(&[half::f16]) -> f32 + 'a {
    move |key| {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        if q.len().is_multiple_of(avx2::DOT_STEP) {
            // SAFETY: the build has AVX2, FMA and F16C (cfg); the key holds `q.len()` values, a
            // multiple of the kernel's step.
            return unsafe { avx2::dot(key, q) };
        }
        key.convert_to_f32_slice(k_row);
        dot_f16(k_row, q)
    }
}

/// The online softmax of one query row over the cached positions `range` of KV head `kv_head`,
/// as ggml's generation kernel runs it: position after position, the score by `dot` (the key's
/// [`dot_f16`] with the query) times `scale`; on a new maximum
/// `update(Some(e^(old − new maximum)), value, 1)`, otherwise
/// `update(None, value, e^(score − maximum))`. Returns the sum of the weights, each added by
/// one FMA after the rescale.
fn online_softmax(
    kv: LayerView<'_>,
    kv_head: usize,
    range: std::ops::Range<usize>,
    scale: f32,
    mut dot: impl FnMut(&[half::f16]) -> f32,
    mut update: impl FnMut(Option<f32>, &[half::f16], f32),
) -> f32 {
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in range {
        let score = dot(kv.key(kv_head, j)) * scale;
        let (rescale, weight) = if score > max {
            let r = (max - score).exp();
            max = score;
            update(Some(r), kv.value(kv_head, j), 1.0);
            (r, 1.0)
        } else {
            let weight = (score - max).exp();
            update(None, kv.value(kv_head, j), weight);
            (1.0, weight)
        };
        sum = sum.mul_add(rescale, weight);
    }
    sum
}

/// The online softmax of one query row over the cached positions `range` of KV head `kv_head`:
/// the weighted sum of values into `acc16` (f16, rounded after every update; its leading
/// [`f16_lanes`] in f16 arithmetic, the rest in f32), and the returned sum of weights.
/// `scratch` is working space, kept by the caller across rows.
fn accumulate(
    q: &[f32],
    kv: LayerView<'_>,
    kv_head: usize,
    range: std::ops::Range<usize>,
    scale: f32,
    acc16: &mut [half::f16],
    scratch: &mut Vec<f32>,
) -> f32 {
    let d = q.len();
    let native = f16_lanes::count(d);
    scratch.resize(3 * d, 0.0);
    let (acc, rest) = scratch.split_at_mut(d);
    let (v_row, k_row) = rest.split_at_mut(d);
    let (acc, v_row) = (&mut acc[native..], &mut v_row[native..]);
    online_softmax(kv, kv_head, range, scale, score(q, k_row), |rescale, value, weight| {
        // On a new maximum rescale the accumulator, then add the weighted value.
        if let Some(r) = rescale {
            f16_lanes::scale(&mut acc16[..native], r);
            acc16[native..].convert_to_f32_slice(acc);
            acc.iter_mut().for_each(|a| *a *= r);
            acc16[native..].convert_from_f32_slice(acc);
        }
        f16_lanes::mad(&mut acc16[..native], value, weight);
        value[native..].convert_to_f32_slice(v_row);
        acc16[native..].convert_to_f32_slice(acc);
        for (a, &v) in acc.iter_mut().zip(v_row.iter()) {
            *a = v.mul_add(weight, *a);
        }
        acc16[native..].convert_from_f32_slice(acc);
    })
}

/// [`accumulate`] with AVX-512 conversions and FMAs, lane for lane the same arithmetic (the
/// conversions are exact or round to nearest even, the FMAs fused, the dot product summed in
/// [`dot_f16`]'s order), so the bits agree; it spends its time on the math instead of on slice
/// conversions. Profiled at 16 concurrent requests on SmolLM2, the portable version took about
/// a third of the CPU (docs/benchmarks.md).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{EXP_LANES, LayerView, f16_lanes, sum16};
    use crate::libm_exp;
    use half::f16;
    use std::arch::x86_64::*;

    /// Loads 16 f16 values as f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(x: &[f16]) -> __m512 {
        debug_assert!(x.len() >= EXP_LANES);
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(x.as_ptr().cast())) }
    }

    /// Rounds 16 f32 values to f16 (nearest even) into `x`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(x: &mut [f16], v: __m512) {
        debug_assert!(x.len() >= EXP_LANES);
        unsafe { _mm256_storeu_si256(x.as_mut_ptr().cast(), _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
    }

    /// `super::dot_f16` of an f16 key and an f32 query.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot(k: &[f16], q: &[f32]) -> f32 {
        const STEP: usize = 4 * EXP_LANES;
        let whole = q.len() / STEP * STEP;
        let mut acc = [_mm512_setzero_ps(); 4];
        for at in (0..whole).step_by(STEP) {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = at + j * EXP_LANES;
                unsafe { *a = _mm512_fmadd_ps(load(&k[o..]), _mm512_loadu_ps(q[o..].as_ptr()), *a) };
            }
        }
        let lanes = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
        let mut lanes_array = [0f32; EXP_LANES];
        unsafe { _mm512_storeu_ps(lanes_array.as_mut_ptr(), lanes) };
        let mut total = sum16(&lanes_array) as f64;
        for (x, y) in k[whole..].iter().zip(&q[whole..]) {
            total += (x.to_f32() * y) as f64;
        }
        total as f32
    }

    /// `super::accumulate`; `q.len()` (= `acc16.len()`) must be a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate(
        q: &[f32],
        kv: LayerView<'_>,
        kv_head: usize,
        range: std::ops::Range<usize>,
        scale: f32,
        acc16: &mut [f16],
    ) -> f32 {
        let d = q.len();
        assert!(d.is_multiple_of(EXP_LANES) && acc16.len() == d);
        let native = f16_lanes::count(d);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        // A group of positions at a time: their scores and the running maximum first, which
        // fix every exponential's argument, then the exponentials together (glibc's `expf`,
        // lane for lane), then the updates in order.
        let mut first = range.start;
        while first < range.end {
            let n = (range.end - first).min(libm_exp::LANES);
            let mut args = [0f32; libm_exp::LANES];
            let mut new_max = [false; libm_exp::LANES];
            for g in 0..n {
                let score = unsafe { dot(kv.key(kv_head, first + g), q) } * scale;
                if score > max {
                    (args[g], new_max[g], max) = (max - score, true, score);
                } else {
                    args[g] = score - max;
                }
            }
            let e = unsafe { libm_exp::expf16(&args) };
            for g in 0..n {
                let (rescale, weight) = if new_max[g] {
                    f16_lanes::scale(&mut acc16[..native], e[g]);
                    let r_lanes = _mm512_set1_ps(e[g]);
                    for o in (native..d).step_by(EXP_LANES) {
                        let scaled = unsafe { _mm512_mul_ps(load(&acc16[o..]), r_lanes) };
                        unsafe { store(&mut acc16[o..], scaled) };
                    }
                    (e[g], 1.0)
                } else {
                    (1.0, e[g])
                };
                let value = kv.value(kv_head, first + g);
                f16_lanes::mad(&mut acc16[..native], value, weight);
                let w = _mm512_set1_ps(weight);
                for o in (native..d).step_by(EXP_LANES) {
                    let updated = unsafe { _mm512_fmadd_ps(load(&value[o..]), w, load(&acc16[o..])) };
                    unsafe { store(&mut acc16[o..], updated) };
                }
                sum = sum.mul_add(rescale, weight);
            }
            first += n;
        }
        sum
    }

    /// One level of [`sum16_each`]: each value spans `2 · group` lanes of `v`; pairs of vectors
    /// become one, each value's two halves added, so `group` lanes per value.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn halve(v: &mut [__m512; EXP_LANES], count: usize, group: usize) {
        let lo: [i32; EXP_LANES] = std::array::from_fn(|i| ((i / group) * 2 * group + i % group) as i32);
        let hi: [i32; EXP_LANES] = std::array::from_fn(|i| lo[i] + group as i32);
        // SAFETY: the index arrays hold 16 values.
        let (lo, hi) = unsafe { (_mm512_loadu_si512(lo.as_ptr().cast()), _mm512_loadu_si512(hi.as_ptr().cast())) };
        for p in 0..count / 2 {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            v[p] = _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
        }
    }

    /// Lane t: the horizontal sum of `x[t]` in `sum16`'s order (halves, quarters, pairs), the
    /// same additions done for 16 vectors at once. Consumes `x`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum16_each(x: &mut [__m512; EXP_LANES]) -> __m512 {
        halve(x, 16, 8);
        halve(x, 8, 4);
        halve(x, 4, 2);
        halve(x, 2, 1);
        x[0]
    }

    /// Lane t: the running maximum through lane t, starting from `carry`, each lane kept
    /// unless a later one is strictly greater (`max_ps` keeps its second operand on ties).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn running_max(x: __m512, carry: __m512) -> __m512 {
        let mut m = x;
        for shift in [1, 2, 4, 8] {
            let from: [i32; EXP_LANES] = std::array::from_fn(|i| i.saturating_sub(shift) as i32);
            // SAFETY: 16 indices.
            let from = unsafe { _mm512_loadu_si512(from.as_ptr().cast()) };
            let earlier =
                _mm512_mask_permutexvar_ps(_mm512_set1_ps(f32::NEG_INFINITY), !((1u16 << shift) - 1), from, m);
            m = _mm512_max_ps(m, earlier);
        }
        _mm512_max_ps(m, carry)
    }

    /// Head dimension of [`accumulate_heads`]' specialized kernel.
    pub(super) const D64: usize = 64;

    /// [`accumulate_heads`]' signature.
    pub(super) type HeadsKernel =
        unsafe fn(&[f32], LayerView<'_>, usize, std::ops::Range<usize>, f32, &mut [f32], &mut [f32]);

    /// [`accumulate_heads`] for `heads` heads (1 to 4) at once, rounding to f16 when `round`.
    pub(super) fn heads_kernel(heads: usize, round: bool) -> HeadsKernel {
        fn of<const ROUND: bool>(heads: usize) -> HeadsKernel {
            match heads {
                4 => accumulate_heads::<4, ROUND>,
                3 => accumulate_heads::<3, ROUND>,
                2 => accumulate_heads::<2, ROUND>,
                _ => accumulate_heads::<1, ROUND>,
            }
        }
        if round { of::<true>(heads) } else { of::<false>(heads) }
    }

    /// `super::accumulate` for `G` query heads of head dimension 64 at once (the dimension ggml
    /// updates entirely in the f32-then-f16 tail), or `super::accumulate_f32` when not
    /// `ROUND`: `q` holds their rows (G × 64), `acc` receives their accumulators, `sums` their
    /// sums of weights. The accumulators stay in registers, each key and value is widened once
    /// for all the heads, and 16 positions' scores, running maxima and exponentials are
    /// computed as vectors; each head's arithmetic is the per-head loop's.
    // A position indexes several per-head arrays.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate_heads<const G: usize, const ROUND: bool>(
        q: &[f32],
        kv: LayerView<'_>,
        kv_head: usize,
        range: std::ops::Range<usize>,
        scale: f32,
        out: &mut [f32],
        sums: &mut [f32],
    ) {
        const N: usize = libm_exp::LANES;
        const CH: usize = D64 / EXP_LANES;
        assert!(q.len() == G * D64 && out.len() == G * D64 && sums.len() == G);
        let keep = |x: __m512| if ROUND { round16(x) } else { x };
        // SAFETY (all loads and stores below): every slice holds the 16 values read or written.
        let q: [[__m512; CH]; G] = std::array::from_fn(|g| {
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q[g * D64 + c * EXP_LANES..].as_ptr()) })
        });
        let mut acc = [[_mm512_setzero_ps(); CH]; G];
        let mut max = [f32::NEG_INFINITY; G];
        let mut sum = [0f32; G];
        let mut lanes = [[_mm512_setzero_ps(); N]; G];
        let (mut e, mut grows) = ([[0f32; N]; G], [0u16; G]);
        let back: [i32; N] = std::array::from_fn(|i| i.saturating_sub(1) as i32);
        let back = unsafe { _mm512_loadu_si512(back.as_ptr().cast()) };
        let mut first = range.start;
        while first < range.end {
            let n = (range.end - first).min(N);
            // The next group's keys and values, while this one computes: 2.1% off a 16-row
            // step of SmolLM2, 0.8% off a one-row step (passes alternating in one run).
            prefetch_positions(kv, kv_head, first + N..(first + 2 * N).min(range.end));
            for t in 0..n {
                let key = kv.key(kv_head, first + t);
                let k: [__m512; CH] = std::array::from_fn(|c| unsafe { load(&key[c * EXP_LANES..]) });
                for g in 0..G {
                    // ggml's order: four accumulators (one step of 64), added 0+2, 1+3.
                    let p: [__m512; CH] = std::array::from_fn(|c| _mm512_mul_ps(k[c], q[g][c]));
                    lanes[g][t] = _mm512_add_ps(_mm512_add_ps(p[0], p[2]), _mm512_add_ps(p[1], p[3]));
                }
            }
            let valid: u16 = if n == N { u16::MAX } else { (1u16 << n) - 1 };
            for g in 0..G {
                let s = _mm512_mul_ps(sum16_each(&mut lanes[g]), _mm512_set1_ps(scale));
                let s = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), valid, s);
                let carry = _mm512_set1_ps(max[g]);
                let through = running_max(s, carry);
                let before = _mm512_mask_permutexvar_ps(carry, !1, back, through);
                grows[g] = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, before) & valid;
                let args = _mm512_mask_sub_ps(_mm512_sub_ps(s, before), grows[g], before, s);
                let mut a = [0f32; N];
                unsafe { _mm512_storeu_ps(a.as_mut_ptr(), args) };
                e[g] = unsafe { libm_exp::expf16(&a) };
                let mut through_lanes = [0f32; N];
                unsafe { _mm512_storeu_ps(through_lanes.as_mut_ptr(), through) };
                max[g] = through_lanes[n - 1];
            }
            for t in 0..n {
                let value = kv.value(kv_head, first + t);
                let v: [__m512; CH] = std::array::from_fn(|c| unsafe { load(&value[c * EXP_LANES..]) });
                for g in 0..G {
                    let (rescale, weight) = if grows[g] >> t & 1 == 1 {
                        let r = _mm512_set1_ps(e[g][t]);
                        acc[g] = acc[g].map(|a| keep(_mm512_mul_ps(a, r)));
                        (e[g][t], 1.0)
                    } else {
                        (1.0, e[g][t])
                    };
                    let w = _mm512_set1_ps(weight);
                    for c in 0..CH {
                        acc[g][c] = keep(_mm512_fmadd_ps(v[c], w, acc[g][c]));
                    }
                    sum[g] = sum[g].mul_add(rescale, weight);
                }
            }
            first += n;
        }
        for g in 0..G {
            for c in 0..CH {
                unsafe { _mm512_storeu_ps(out[g * D64 + c * EXP_LANES..].as_mut_ptr(), acc[g][c]) };
            }
        }
        sums.copy_from_slice(&sum);
    }

    /// Asks for the keys and values of `positions` to be brought into cache ahead of use.
    #[inline]
    fn prefetch_positions(kv: LayerView<'_>, kv_head: usize, positions: std::ops::Range<usize>) {
        for p in positions {
            for row in [kv.key(kv_head, p), kv.value(kv_head, p)] {
                let bytes = std::mem::size_of_val(row);
                for line in (0..bytes).step_by(64) {
                    // SAFETY: a prefetch of an address inside the row.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().cast::<i8>().add(line)) };
                }
            }
        }
    }

    /// `x` rounded to f16 (nearest even) and back.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round16(x: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }
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
    use air_kv::{KvShape, KvStore};

    /// Plain softmax attention in f64 as the oracle.
    fn naive(q: &[f32], kv: LayerView<'_>, start: usize, n: usize, s: AttentionShape) -> Vec<f32> {
        let d = s.head_dim;
        let mut out = vec![0f32; n * s.heads * d];
        for h in 0..s.heads {
            let kvh = s.kv_head(h);
            for i in 0..n {
                let qr = &q[(h * n + i) * d..(h * n + i + 1) * d];
                let first = s.window.map_or(0, |w| (start + i + 1).saturating_sub(w));
                let scores: Vec<f64> = (0..=start + i)
                    .map(|j| {
                        let dot = qr.iter().zip(kv.key(kvh, j)).map(|(a, b)| *a as f64 * b.to_f64()).sum::<f64>();
                        if j < first { f64::NEG_INFINITY } else { dot * s.scale as f64 }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = w.iter().sum();
                for c in 0..d {
                    let val: f64 = w.iter().enumerate().map(|(j, wj)| wj * kv.value(kvh, j)[c].to_f64()).sum();
                    out[(i * s.heads + h) * d + c] = (val / total) as f32;
                }
            }
        }
        out
    }

    /// The AVX2 score and value update against the portable arithmetic, bit for bit, over
    /// values of mixed magnitudes (so that the order of the sums matters).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[test]
    fn the_avx2_lanes_give_the_portable_bits() {
        use half::f16;
        let mut seed = 11u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * [1.0, 30.0, 0.01][(seed % 3) as usize]
        };
        for d in [64, 128, 256] {
            for _ in 0..50 {
                let q: Vec<f32> = (0..d).map(|_| rnd()).collect();
                let key: Vec<f16> = (0..d).map(|_| f16::from_f32(rnd())).collect();
                let mut k_row = vec![0f32; d];
                key.convert_to_f32_slice(&mut k_row);
                // SAFETY: the build has the features (cfg); both hold d values, a multiple of 64.
                let simd = unsafe { avx2::dot(&key, &q) };
                assert_eq!(simd.to_bits(), dot_f16(&k_row, &q).to_bits(), "d = {d}");
                let (weight, rescale) = (rnd(), [None, Some(rnd().abs())][d % 3 % 2]);
                let mut acc = q.clone();
                // SAFETY: as above.
                unsafe { avx2::add_value(&mut acc, rescale, &key, weight) };
                for ((a, &q), k) in acc.iter().zip(&q).zip(&k_row) {
                    let want = k.mul_add(weight, q * rescale.unwrap_or(1.0));
                    assert_eq!(a.to_bits(), want.to_bits());
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_generation_path_gives_the_portable_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut seed = 7u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for d in [16, 64, 80, 256] {
            let shape = KvShape { layers: 1, kv_heads: 2, head_dim: d, block_size: 16 };
            let mut store = KvStore::new(shape, 6);
            let table = [4, 1, 5, 0];
            for kv in 0..2 {
                let k: Vec<f32> = (0..60 * d).map(|_| rnd() * 6.0).collect();
                let v: Vec<f32> = (0..60 * d).map(|_| rnd()).collect();
                store.write(0, &table, kv, 0, &k, &v);
            }
            let view = store.layer(0, &table);
            let q: Vec<f32> = (0..d).map(|_| half::f16::from_f32(rnd() * 3.0).to_f32()).collect();
            for range in [0..1, 0..60, 13..47] {
                let mut portable = vec![half::f16::ZERO; d];
                let mut fast = vec![half::f16::ZERO; d];
                let a = accumulate(&q, view, 1, range.clone(), 0.125, &mut portable, &mut Vec::new());
                let b = unsafe { avx512::accumulate(&q, view, 1, range.clone(), 0.125, &mut fast) };
                assert_eq!(a.to_bits(), b.to_bits(), "d {d} {range:?}");
                assert_eq!(portable, fast, "d {d} {range:?}");
            }
        }
        // Up to four heads of 64 at once, over ranges that end inside and at the end of a group
        // of 16 positions.
        let d = avx512::D64;
        let shape = KvShape { layers: 1, kv_heads: 2, head_dim: d, block_size: 16 };
        let mut store = KvStore::new(shape, 6);
        let table = [4, 1, 5, 0, 2];
        for kv in 0..2 {
            let k: Vec<f32> = (0..75 * d).map(|_| rnd() * 6.0).collect();
            let v: Vec<f32> = (0..75 * d).map(|_| rnd()).collect();
            store.write(0, &table, kv, 0, &k, &v);
        }
        let view = store.layer(0, &table);
        let q: Vec<f32> = (0..4 * d).map(|_| half::f16::from_f32(rnd() * 3.0).to_f32()).collect();
        for range in [0..1, 0..16, 0..75, 13..47, 30..31] {
            for exact in [true, false] {
                let mut together = [vec![0f32; 4 * d], vec![0f32; 3 * d]];
                let mut sums = [vec![0f32; 4], vec![0f32; 3]];
                unsafe {
                    let r = range.clone();
                    avx512::heads_kernel(4, exact)(&q, view, 1, r.clone(), 0.125, &mut together[0], &mut sums[0]);
                    avx512::heads_kernel(3, exact)(&q[d..], view, 1, r, 0.125, &mut together[1], &mut sums[1]);
                }
                for g in 0..4 {
                    let q_g = &q[g * d..(g + 1) * d];
                    let mut portable = vec![0f32; d];
                    let sum = if exact {
                        let mut acc16 = vec![half::f16::ZERO; d];
                        let sum = accumulate(q_g, view, 1, range.clone(), 0.125, &mut acc16, &mut Vec::new());
                        acc16.convert_to_f32_slice(&mut portable);
                        sum
                    } else {
                        accumulate_f32(q_g, view, 1, range.clone(), 0.125, &mut portable, &mut Vec::new())
                    };
                    let case = format!("{range:?} head {g}, f16 sums {exact}");
                    assert_eq!(sum.to_bits(), sums[0][g].to_bits(), "{case} of 4");
                    assert_eq!(portable, together[0][g * d..(g + 1) * d], "{case} of 4");
                    if g > 0 {
                        assert_eq!(sum.to_bits(), sums[1][g - 1].to_bits(), "{case} of 3");
                        assert_eq!(portable, together[1][(g - 1) * d..g * d], "{case} of 3");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_plain_softmax_attention_and_rows_do_not_depend_on_the_call() {
        let s = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 1.0 / 8f32.sqrt(),
            window: None,
            values: ValueSums::F16,
        };
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // 112 positions in 7 blocks of 16, scattered over a store of 9.
        let table = [5, 0, 8, 2, 7, 1, 3];
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
            let shape = KvShape { layers: 1, kv_heads: s.kv_heads, head_dim: s.head_dim, block_size: 16 };
            let mut store = KvStore::new(shape, 9);
            let len = (start + n) * s.head_dim;
            for kv in 0..s.kv_heads {
                let k: Vec<f32> = (0..len).map(|_| rnd() * 4.0).collect();
                let v: Vec<f32> = (0..len).map(|_| rnd()).collect();
                store.write(0, &table, kv, 0, &k, &v);
            }
            let kv = store.layer(0, &table);
            let q: Vec<f32> = (0..s.heads * n * s.head_dim).map(|_| rnd() * 4.0).collect();
            for values in [ValueSums::F16, ValueSums::F32] {
                let s = AttentionShape { values, ..s };
                let want = naive(&q, kv, start, n, s);
                let d = s.head_dim;
                // Rows of head h, rows..: (heads, n, d) -> (heads, rows, d).
                let rows_of = |range: std::ops::Range<usize>| -> Vec<f32> {
                    (0..s.heads).flat_map(|h| q[(h * n + range.start) * d..(h * n + range.end) * d].to_vec()).collect()
                };
                let call = |q: &[f32], start: usize, n: usize, tiled_rows: usize| {
                    causal_attention(q, n, &[QueryRows { kv, row: 0, n, start, tiled_rows }], s)
                };
                for (tiled_rows, tolerance) in [(0, 2e-2), (n, 1e-5)] {
                    let got = call(&q, start, n, tiled_rows);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < tolerance,
                            "start {start} n {n} tiled {tiled_rows} {values:?}: {g} vs {w}"
                        );
                    }
                    // The same rows split in two calls give the same bits...
                    let cut = n / 3;
                    let mut split = call(&rows_of(0..cut), start, cut, tiled_rows.min(cut));
                    let rest = tiled_rows.saturating_sub(cut);
                    split.extend(call(&rows_of(cut..n), start + cut, n - cut, rest));
                    assert_eq!(split, got, "start {start} n {n} tiled {tiled_rows} split at {cut}");
                    // ...and so do they as two sequences of one call.
                    let two = [
                        QueryRows { kv, row: 0, n: cut, start, tiled_rows: tiled_rows.min(cut) },
                        QueryRows { kv, row: cut, n: n - cut, start: start + cut, tiled_rows: rest },
                    ];
                    assert_eq!(causal_attention(&q, n, &two, s), got);
                }
            }
        }
    }
}
