//! Small CPU ops whose rounding must follow ggml's for logits to agree with llama.cpp.

use crate::Activation;
use crate::host::{for_row_chunks, with_f32};
use candle_core::{Device, Tensor};

/// RMSNorm of each row of `x` (m, d) times `weight` (d), as ggml computes it: the mean of
/// squares accumulated in f64, `scale = 1 / sqrt(mean + eps)` in f32, then `(x * scale) * w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let (m, d) = x.dims2()?;
    let out = with_f32(x, |xs| {
        with_f32(weight, |w| {
            if w.len() != d {
                candle_core::bail!("RMSNorm weight of {} values for rows of {d}", w.len());
            }
            Ok(map_rows(xs, d, |first, out| {
                out.copy_from_slice(&xs[first * d..][..out.len()]);
                rms_norm_in_place(out, w, eps);
            }))
        })?
    })??;
    Tensor::from_vec(out, (m, d), &Device::Cpu)
}

/// [`rms_norm`] of `rows` (whole rows of `weight.len()` values) in place, groups of 8, 4, 2
/// or 1 rows at a time (see [`sums_of_squares`]).
pub(crate) fn rms_norm_in_place(rows: &mut [f32], weight: &[f32], eps: f32) {
    fn norm_group<const N: usize>(group: &mut [f32], weight: &[f32], eps: f32) {
        let d = weight.len();
        let sums = sums_of_squares::<N>(group, d);
        for (row, sum) in group.chunks_exact_mut(d).zip(sums) {
            let scale = 1.0 / ((sum / d as f64) as f32 + eps).sqrt();
            for (v, &wi) in row.iter_mut().zip(weight) {
                *v = (*v * scale) * wi;
            }
        }
    }
    let d = weight.len();
    if d == 0 {
        return;
    }
    let mut rest = rows;
    while rest.len() >= d {
        let n = match rest.len() / d {
            8.. => 8,
            4..8 => 4,
            2..4 => 2,
            _ => 1,
        };
        let (group, tail) = std::mem::take(&mut rest).split_at_mut(n * d);
        match n {
            8 => norm_group::<8>(group, weight, eps),
            4 => norm_group::<4>(group, weight, eps),
            2 => norm_group::<2>(group, weight, eps),
            _ => norm_group::<1>(group, weight, eps),
        }
        rest = tail;
    }
}

/// Σ v² of each of `N` rows of `d` values in f64, value after value as ggml adds them. One
/// row's sum is a chain of dependent f64 additions; the rows' chains are interleaved so that
/// they overlap: 16 rows of 576 values took 3.7 µs in groups of 8 against 6.5 a row at a time.
fn sums_of_squares<const N: usize>(rows: &[f32], d: usize) -> [f64; N] {
    let mut sums = [0f64; N];
    let rows: [&[f32]; N] = std::array::from_fn(|r| &rows[r * d..(r + 1) * d]);
    for i in 0..d {
        for (sum, row) in sums.iter_mut().zip(rows) {
            *sum += (row[i] * row[i]) as f64;
        }
    }
    sums
}

/// `a + b` for `a` (…, d) and `b` of `a`'s shape or one row (d): the residual and bias
/// additions of the pass, on the compute pool (candle's own elementwise pool would spin a
/// thread beside it).
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    combine_rows(a, b, |x, y| x.iter_mut().zip(y).for_each(|(x, y)| *x += y))
}

/// GELU-gated product `gelu(gate) * up` as ggml computes it on the CPU: the gate rounded to f16
/// and looked up in a table of GELU (tanh form) results rounded to f16, exact beyond ±10.
/// (The pass gates rows inside the down matmul's region, [`gate_in_place`]; the GPU's exact
/// kernels are tested against this.)
#[cfg(all(test, feature = "cuda"))]
pub fn geglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    combine_rows(gate, up, gelu_gate)
}

/// The feed-forward's gated activation of one row in place: `x ← act(x) · up`, as [`swiglu`]
/// or [`geglu`].
pub(crate) fn gate_in_place(activation: Activation, x: &mut [f32], up: &[f32]) {
    match activation {
        Activation::Silu => silu_gate(x, up),
        Activation::GeluTanh => gelu_gate(x, up),
    }
}

/// [`geglu`] of one row in place.
fn gelu_gate(x: &mut [f32], up: &[f32]) {
    use half::f16;
    let table = gelu_f16_table();
    for (x, &u) in x.iter_mut().zip(up) {
        *x = if *x <= -10.0 {
            0.0
        } else if *x >= 10.0 {
            *x * u
        } else {
            table[f16::from_f32(*x).to_bits() as usize].to_f32() * u
        };
    }
}

/// `a` (…, d) combined with `b`, of `a`'s shape or one row (d), by `f(row of the result,
/// row of b)` on a copy of each row of `a`; rows spread over the compute pool, each copied
/// there. Copying all of `a` on the calling thread first (and [`rms_norm`] its input) made
/// SmolLM2's 481-row prompt steps 6% slower (steps alternating in one run).
fn combine_rows(a: &Tensor, b: &Tensor, f: impl Fn(&mut [f32], &[f32]) + Sync) -> candle_core::Result<Tensor> {
    let shape = a.shape().clone();
    let d = shape.dims().last().copied().unwrap_or(1);
    let out = with_f32(a, |a| {
        with_f32(b, |b| {
            if b.len() != d && b.len() != a.len() {
                candle_core::bail!("cannot combine {} values with a tensor of shape {shape:?}", b.len());
            }
            Ok(map_rows(a, d, |first, rows| {
                for (r, row) in rows.chunks_exact_mut(d).enumerate() {
                    row.copy_from_slice(&a[(first + r) * d..(first + r + 1) * d]);
                    f(row, if b.len() == d { b } else { &b[(first + r) * d..(first + r + 1) * d] });
                }
            }))
        })?
    })??;
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// A new buffer of `x`'s length, rows of `d`, filled by `fill(first row, rows)` over chunks
/// of whole rows spread across the compute pool.
fn map_rows(x: &[f32], d: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for_row_chunks(&mut out, d, d, fill);
    out
}

/// GELU (tanh form) of every f16 value, rounded to f16, indexed by the value's bits (ggml's
/// `ggml_table_gelu_f16`), built on first use; `1 + a·x·x` is one fused multiply-add, as GCC
/// contracts it in ggml's `ggml_gelu_f32`.
pub(crate) fn gelu_f16_table() -> &'static [half::f16] {
    use half::f16;
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const COEF_A: f32 = 0.044715;
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                f16::from_f32(0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (COEF_A * x).mul_add(x, 1.0)).tanh()))
            })
            .collect()
    })
}

/// SiLU-gated product `silu(gate) * up` as ggml's `ggml_vec_swiglu_f32` computes it:
/// `x / (1 + e^-x)` with ggml's vectorized exponential, 16 values at a time, libm's `expf` for
/// a remainder. (As [`geglu`], for the GPU's tests.)
#[cfg(all(test, feature = "cuda"))]
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    combine_rows(gate, up, silu_gate)
}

/// [`swiglu`] of one row in place.
fn silu_gate(g: &mut [f32], u: &[f32]) {
    use crate::exp::{EXP_LANES, exp16};
    let mut chunks = g.chunks_exact_mut(EXP_LANES);
    let mut ups = u.chunks_exact(EXP_LANES);
    for (x, up) in (&mut chunks).zip(&mut ups) {
        let negated: [f32; EXP_LANES] = std::array::from_fn(|i| -x[i]);
        let e = exp16(&negated);
        for i in 0..EXP_LANES {
            x[i] = x[i] / (1.0 + e[i]) * up[i];
        }
    }
    for (x, up) in chunks.into_remainder().iter_mut().zip(ups.remainder()) {
        *x = *x / (1.0 + (-*x).exp()) * up;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_sums_each_row_value_after_value() {
        // 23 rows (groups of 8, 8, 4, 2 and 1) of a wide range of magnitudes, bit for bit
        // against a row at a time.
        let (m, d, eps) = (23, 37, 1e-5f32);
        let x: Vec<f32> =
            (0..m * d).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 1.7f32.powi((i % 23) as i32 - 11)).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / 16.0).collect();
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
        let got =
            rms_norm(&t(&x, &[m, d]), &t(&w, &[d]), eps).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (row, got) in x.chunks_exact(d).zip(got.chunks_exact(d)) {
            let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
            let scale = 1.0 / ((sum / d as f64) as f32 + eps).sqrt();
            let want: Vec<f32> = row.iter().zip(&w).map(|(&v, &wi)| (v * scale) * wi).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn add_takes_a_whole_tensor_or_one_row_and_rejects_other_shapes() {
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let row = Tensor::new(&[10f32, 20.0, 30.0], &Device::Cpu).unwrap();
        let sum = |b: &Tensor| add(&a, b).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(sum(&row), [10., 21., 32., 13., 24., 35.]);
        assert_eq!(sum(&a), [0., 2., 4., 6., 8., 10.]);
        let wrong = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(add(&a, &wrong).is_err());
        assert!(rms_norm(&a, &wrong, 1e-6).is_err());
    }
}
