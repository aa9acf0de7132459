//! e^x for a block of 16 values, by the polynomial ggml's vectorized `ggml_v_expf` evaluates
//! (range reduction by ln 2, a degree-5 polynomial, scaling by 2^n), so that softmax weights and
//! SiLU round as llama.cpp's do. Written lane-wise on arrays so that it compiles to SIMD.

/// Values per call: one AVX-512 register, the chunk ggml's softmax sums at a time.
pub const EXP_LANES: usize = 16;

/// e^x for each lane, within a few ulps where the result is a normal number; 0 below that
/// (ggml scales into subnormals there, a difference under 1e-38), infinity on overflow.
#[inline]
pub fn exp16(x: &[f32; EXP_LANES]) -> [f32; EXP_LANES] {
    const ROUND: f32 = 12582912.0; // 0x1.8p23: adding it rounds to an integer
    const LOG2_E: f32 = f32::from_bits(0x3fb8aa3b); // 0x1.715476p+0
    const LN2_HI: f32 = f32::from_bits(0x3f317200); // 0x1.62e4p-1
    const LN2_LO: f32 = f32::from_bits(0x35bfbe8e); // 0x1.7f7d1cp-20
    const C: [f32; 5] = [
        f32::from_bits(0x3c072010), // 0x1.0e4020p-7
        f32::from_bits(0x3d2b9f17), // 0x1.573e2ep-5
        f32::from_bits(0x3e2aaf33), // 0x1.555e66p-3
        f32::from_bits(0x3efffedb), // 0x1.fffdb6p-2
        f32::from_bits(0x3f7ffff6), // 0x1.ffffecp-1
    ];
    std::array::from_fn(|i| {
        let x = x[i];
        let z = x.mul_add(LOG2_E, ROUND);
        let n = z - ROUND;
        let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
        let u = b * b;
        let j = C[0].mul_add(b, C[1]).mul_add(u, C[2].mul_add(b, C[3])).mul_add(u, C[4].mul_add(b, 1.0));
        // j · 2^n, exact while 2^n is a normal number; beyond, 0 (x far below) or infinity.
        if n < -126.0 {
            0.0
        } else if n > 127.0 {
            f32::INFINITY
        } else {
            j * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
    })
}

/// Σ of 16 values in the order of an AVX-512 horizontal add (halves, then quarters, then pairs).
#[inline]
pub fn sum16(x: &[f32; EXP_LANES]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| x[i + 8] + x[i]);
    let q: [f32; 4] = std::array::from_fn(|i| h[i + 4] + h[i]);
    (q[2] + q[0]) + (q[3] + q[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_libm() {
        // Down to e^-87, where results stop being normal numbers (below, 0).
        let xs: Vec<f32> = (0..2900).map(|i| -(i as f32) * 0.03).collect();
        for chunk in xs.chunks_exact(EXP_LANES) {
            let got = exp16(chunk.try_into().unwrap());
            for (g, x) in got.iter().zip(chunk) {
                let want = x.exp();
                assert!((g - want).abs() <= 4e-7 * want.max(f32::MIN_POSITIVE), "e^{x}: {g} vs {want}");
            }
        }
        let edge = exp16(&[f32::NEG_INFINITY; EXP_LANES]);
        assert!(edge.iter().all(|&v| v == 0.0));
        assert_eq!(exp16(&[0.0; EXP_LANES])[0], 1.0);
    }
}
