//! Times every matmul of one SmolLM2-shaped step (each layer's Q/K/V together, output,
//! gate/up together and down, then the output head) with each `--cpu-numerics` (ggml, then fast
//! where the CPU has it), at 1, 16 and 512 activation rows, on one thread and on two: the best
//! step of several and its GMAC/s.
//!
//! cargo run --release -p air-model --example matmul_step -- [MODEL.gguf]
//! (default models/SmolLM2-135M-Instruct.Q4_1.gguf)

use air_gguf::GgufFile;
use air_model::{CpuNumerics, Linear};
use candle_core::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let file = GgufFile::open(&path)?;
    for numerics in [CpuNumerics::Ggml, CpuNumerics::Fast] {
        if numerics.supported() {
            time_steps(&file, &path, numerics)?;
        }
    }
    Ok(())
}

/// Prints the best step's time at each row count and thread count for one numerics.
fn time_steps(file: &GgufFile, path: &str, numerics: CpuNumerics) -> Result<(), Box<dyn std::error::Error>> {
    let layers = file.tensors().iter().filter(|t| t.name.ends_with(".attn_q.weight")).count();
    let mut macs_per_row = 0usize;
    let mut linear = |name: String| -> Result<(Linear, usize), Box<dyn std::error::Error>> {
        let info = file.tensor(&name).ok_or_else(|| format!("{path} has no tensor {name}"))?;
        macs_per_row += info.dims.iter().product::<u64>() as usize;
        Ok((Linear::new(file, info, numerics)?, info.dims[0] as usize))
    };
    let mut blocks = Vec::new();
    for l in 0..layers {
        let names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
        let mut matrices = Vec::new();
        for n in names {
            matrices.push(linear(format!("blk.{l}.{n}.weight"))?);
        }
        blocks.push(matrices);
    }
    let (head, width) = linear("token_embd.weight".into())?;
    let down_width = blocks.first().map_or(width, |b| b[6].1);
    for (rows, steps) in [(1, 20), (16, 20), (512, 3)] {
        let x = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu)?;
        let x_down = Tensor::randn(0f32, 1.0, (rows, down_width), &Device::Cpu)?;
        let step = || -> Result<(), air_model::ModelError> {
            for b in &blocks {
                let [q, k, v, o, gate, up, down] = [0, 1, 2, 3, 4, 5, 6].map(|i| &b[i].0);
                Linear::forward_many([q, k, v], &x, &[])?;
                o.forward(&x, &[])?;
                Linear::forward_many([gate, up], &x, &[])?;
                down.forward(&x_down, &[])?;
            }
            head.forward_values(&x, &[])?;
            Ok(())
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
            let best = pool.install(|| -> Result<f64, air_model::ModelError> {
                step()?;
                let mut best = f64::MAX;
                for _ in 0..steps {
                    let t = std::time::Instant::now();
                    step()?;
                    best = best.min(t.elapsed().as_secs_f64());
                }
                Ok(best)
            })?;
            let gmacs = (rows * macs_per_row) as f64 / best / 1e9;
            println!("{numerics:?}, {rows} rows, {threads} threads: {:.2} ms, {gmacs:.1} GMAC/s", best * 1e3);
        }
    }
    Ok(())
}
