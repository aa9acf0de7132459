//! Quantization of activations (the left-hand side of a quantized matmul) into the block type
//! a weight type is dotted with, bit for bit as ggml's x86 CPU backend does it: `127/max`
//! scales, round-half-to-even, the Q8_1 sum taken in f32 before rounding to f16, and Q8_K's
//! signed-maximum scale. llama.cpp's logits depend on these details at the 0.1 level for small
//! models, so matching them is what makes Air's greedy tokens equal llama.cpp's.

use candle_core::quantized::k_quants::{BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType};
use half::{bf16, f16};

/// A block type activations can be quantized into the way ggml does.
pub trait ActivationQuant: GgmlType {
    /// Quantizes `xs` (a multiple of the block size) into `ys`.
    fn quantize(xs: &[f32], ys: &mut [Self]);
}

/// ggml's `nearest_int`: round half to even.
fn nearest(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Writes a repr(C) block from its bytes (candle keeps the fields crate-private).
fn write_block<T>(dst: &mut T, bytes: &[u8]) {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: T is a repr(C) block of plain integers/halves (size asserted above); every bit
    // pattern is valid and `dst` is exclusively borrowed.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut T as *mut u8, bytes.len()) }
}

impl ActivationQuant for BlockQ8_0 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        let mut buf = [0u8; 34];
        for (x, y) in xs.chunks_exact(32).zip(ys) {
            let max = max_abs(x);
            let d = max / 127.0;
            let id = if max != 0.0 { 127.0 / max } else { 0.0 };
            buf[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (b, &v) in buf[2..].iter_mut().zip(x) {
                *b = nearest(v * id) as i8 as u8;
            }
            write_block(y, &buf);
        }
    }
}

impl ActivationQuant for BlockQ8_1 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        let mut buf = [0u8; 36];
        for (x, y) in xs.chunks_exact(32).zip(ys) {
            let max = max_abs(x);
            let d = max / 127.0;
            let id = if max != 0.0 { 127.0 / max } else { 0.0 };
            let mut sum = 0i32;
            for (b, &v) in buf[4..].iter_mut().zip(x) {
                let q = nearest(v * id);
                sum += q;
                *b = q as i8 as u8;
            }
            buf[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            buf[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
            write_block(y, &buf);
        }
    }
}

impl ActivationQuant for BlockQ8K {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        let mut buf = [0u8; 4 + 256 + 32];
        for (x, y) in xs.chunks_exact(256).zip(ys) {
            buf.fill(0);
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in x {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax != 0.0 {
                let iscale = -127.0 / max;
                for (b, &v) in buf[4..260].iter_mut().zip(x) {
                    *b = nearest(iscale * v).min(127) as i8 as u8;
                }
                for j in 0..16 {
                    let sum: i16 = buf[4 + j * 16..4 + (j + 1) * 16].iter().map(|&b| b as i8 as i16).sum();
                    buf[260 + 2 * j..262 + 2 * j].copy_from_slice(&sum.to_le_bytes());
                }
                buf[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
            }
            write_block(y, &buf);
        }
    }
}

impl ActivationQuant for f32 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        ys.copy_from_slice(xs);
    }
}

impl ActivationQuant for f16 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        ys.iter_mut().zip(xs).for_each(|(y, &x)| *y = f16::from_f32(x));
    }
}

impl ActivationQuant for bf16 {
    fn quantize(xs: &[f32], ys: &mut [Self]) {
        ys.iter_mut().zip(xs).for_each(|(y, &x)| *y = bf16::from_f32(x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rounds_half_to_even_and_dequantizes_close() {
        let mut xs = [0f32; 32];
        xs[0] = 127.0;
        xs[1] = 2.5; // exactly half way: rounds to 2, as ggml's nearest_int
        xs[2] = -3.5; // rounds to -4
        xs[3] = 10.3;
        let mut ys = vec![BlockQ8_0::zeros(); 1];
        BlockQ8_0::quantize(&xs, &mut ys);
        let mut back = [0f32; 32];
        BlockQ8_0::to_float(&ys, &mut back);
        assert_eq!(&back[..4], &[127.0, 2.0, -4.0, 10.0]);
    }

    #[test]
    fn q8_k_keeps_block_sums() {
        let xs: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 7.0).collect();
        let mut ys = vec![BlockQ8K::zeros(); 1];
        BlockQ8K::quantize(&xs, &mut ys);
        let mut back = vec![0f32; 256];
        BlockQ8K::to_float(&ys, &mut back);
        for (a, b) in xs.iter().zip(&back) {
            assert!((a - b).abs() < 0.11, "{a} {b}");
        }
    }
}
