//! `air check`: does a device compute what the CPU computes? Greedy decoding on the CPU for a
//! number of steps; those tokens through the device with the same calls (teacher forcing),
//! comparing the top-1 token and the logits at every step (and, reported beside, the CPU's and
//! the device's one pass over the tokens, which their prompt paths round); then greedy decoding
//! on the device, comparing the text.
//! Fails (non-zero exit) when top-1 agreement is under `--min-agreement`.

use crate::cli::{CheckArgs, Format};
use crate::loaded::{Loaded, start_threads};
use air_model::{ComputeDevice, DeviceNumerics, Logits, Model};
use anyhow::{Result, bail, ensure};
use serde_json::json;

fn argmax(xs: &[f32]) -> u32 {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best }) as u32
}

/// Decodes `steps` tokens after `prompt` one call per token, as generation does, taking at each
/// step the token `choose(step, logits)`; returns the tokens and every step's logits.
fn decode(
    model: &Model,
    prompt: &[u32],
    steps: usize,
    choose: impl Fn(usize, &[f32]) -> u32,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut cache = model.new_cache(prompt.len() + steps)?;
    let mut logits = model.forward(prompt, &mut cache, Logits::Last)?;
    let (mut ids, mut all) = (Vec::with_capacity(steps), Vec::with_capacity(steps * logits.len()));
    for step in 0..steps {
        let next = choose(step, &logits);
        ids.push(next);
        all.extend_from_slice(&logits);
        if step + 1 < steps {
            logits = model.forward(&[next], &mut cache, Logits::Last)?;
        }
    }
    Ok((ids, all))
}

/// Greedy ids after `prompt` for `steps` steps (end-of-generation tokens included, so every run
/// has the same length), with the logits of each step.
fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    decode(model, prompt, steps, |_, logits| argmax(logits))
}

/// How far the best logit is above the second: a small margin is a near-tie, which numeric
/// differences between devices may flip.
fn top_margin(logits: &[f32]) -> f32 {
    let best = argmax(logits) as usize;
    let second = logits.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &x)| x).fold(f32::MIN, f32::max);
    logits[best] - second
}

/// How two runs' logits (positions × vocab) compare.
struct Comparison {
    agree: usize,
    max_diff: f32,
    /// Positions whose top-1 differs, with the first run's top-two margin there.
    disagreements: Vec<serde_json::Value>,
}

fn compare(a: &[f32], b: &[f32], vocab: usize) -> Comparison {
    let mut c = Comparison { agree: 0, max_diff: 0.0, disagreements: Vec::new() };
    for (step, (x, y)) in a.chunks(vocab).zip(b.chunks(vocab)).enumerate() {
        if argmax(x) == argmax(y) {
            c.agree += 1;
        } else {
            c.disagreements.push(json!({"step": step, "cpu_margin": top_margin(x)}));
        }
        c.max_diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(c.max_diff, f32::max);
    }
    c
}

pub fn run(args: CheckArgs) -> Result<()> {
    ensure!(args.steps > 0, "--steps must be at least 1");
    ensure!((0.0..=1.0).contains(&args.min_agreement), "--min-agreement must be between 0 and 1");
    let device = args.runtime.compute.device.unwrap_or_else(ComputeDevice::preferred);
    if device == ComputeDevice::Cpu {
        bail!("--device names the device to check against the CPU: give cuda or cuda:N");
    }
    let on_device = |device| -> Result<Loaded> {
        let mut runtime = args.runtime.clone();
        runtime.compute.device = Some(device);
        if device == ComputeDevice::Cpu {
            // The GPU's settings do not apply to the CPU's copy.
            runtime.compute.vram_budget = None;
            runtime.compute.gpu_numerics = DeviceNumerics::Fast;
        }
        Loaded::open_path(&runtime.model, &runtime.compute, 1)
    };
    start_threads(&args.runtime.compute)?;
    let (on_device, on_cpu) = (on_device(device)?, on_device(ComputeDevice::Cpu)?);
    let prompt = on_cpu.tokenizer.encode(&args.prompt, true)?;
    ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    let ctx = on_cpu.model.config().context_length;
    ensure!(prompt.len() + args.steps <= ctx, "prompt and steps need more than the model's context of {ctx}");
    let vocab = on_cpu.model.vocab_size();

    let (cpu_ids, cpu_step_logits) = greedy(&on_cpu.model, &prompt, args.steps)?;
    // The device scores the CPU's tokens (teacher forcing) with the calls the CPU made: the
    // prompt, then a token at a time.
    let (_, device_logits) = decode(&on_device.model, &prompt, args.steps, |step, _| cpu_ids[step])?;
    let vs_steps = compare(&cpu_step_logits, &device_logits, vocab);
    // Beside: the prompt and the CPU's tokens in one pass on both (a prompt's arithmetic: from
    // 8 rows llama.cpp's batched K-quant matmul, from 64 its tiled attention).
    let mut forced = prompt.clone();
    forced.extend_from_slice(&cpu_ids[..args.steps - 1]);
    let one_pass = |model: &Model| -> Result<Vec<f32>> {
        let mut cache = model.new_cache(forced.len())?;
        Ok(model.forward(&forced, &mut cache, Logits::From(prompt.len() - 1))?)
    };
    let same_pass = compare(&one_pass(&on_cpu.model)?, &one_pass(&on_device.model)?, vocab);
    let agreement = vs_steps.agree as f64 / args.steps as f64;
    let (device_ids, _) = greedy(&on_device.model, &prompt, args.steps)?;
    let divergence = cpu_ids.iter().zip(&device_ids).position(|(a, b)| a != b);
    let report = json!({
        "model": args.runtime.model.display().to_string(),
        "device": on_device.model.compute_device().to_string(),
        "prompt_tokens": prompt.len(),
        "steps": args.steps,
        "top1_agreement": agreement,
        "max_logit_diff": vs_steps.max_diff,
        "disagreements": vs_steps.disagreements,
        "top1_agreement_one_pass": same_pass.agree as f64 / args.steps as f64,
        "max_logit_diff_one_pass": same_pass.max_diff,
        "greedy_identical": divergence.is_none(),
        "first_divergence": divergence,
        "cpu_text": on_cpu.tokenizer.decode(&cpu_ids),
        "device_text": on_cpu.tokenizer.decode(&device_ids),
    });
    match args.format {
        Format::Json => println!("{report}"),
        Format::Text => {
            println!("device          {}", report["device"].as_str().unwrap_or_default());
            println!("top-1 agreement {} of {} positions ({:.2}%)", vs_steps.agree, args.steps, agreement * 100.0);
            println!("max logit diff  {:.4}", vs_steps.max_diff);
            println!("one pass on both: {} positions agree", same_pass.agree);
            for d in &vs_steps.disagreements {
                println!("  differs at step {} where the CPU's top two are {:.3} apart", d["step"], d["cpu_margin"]);
            }
            match divergence {
                None => println!("greedy text     identical for {} steps", args.steps),
                Some(step) => println!("greedy text     diverges at step {step}"),
            }
        }
    }
    ensure!(
        agreement >= args.min_agreement,
        "top-1 agreement {:.2}% is under the required {:.2}%",
        agreement * 100.0,
        args.min_agreement * 100.0
    );
    Ok(())
}
