//! `air bench`: prompt-processing and generation speed, measured the way llama-bench does
//! (a prompt of N tokens in one pass; N tokens generated one at a time from an empty context),
//! median of several runs, plus the process's peak resident memory.

use crate::cli::{BenchArgs, Format};
use crate::loaded::Loaded;
use air_model::Logits;
use anyhow::{Result, ensure};
use serde_json::json;
use std::time::Instant;

pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(
        args.prompt_tokens + args.gen_tokens > 0,
        "nothing to measure: --prompt-tokens and --gen-tokens are both 0"
    );
    let loaded = Loaded::open(&args.runtime)?;
    let model = &loaded.model;
    let ctx = model.config().context_length;
    ensure!(
        args.prompt_tokens.max(args.gen_tokens) <= ctx,
        "the test needs {} positions but the model's context is {ctx}",
        args.prompt_tokens.max(args.gen_tokens)
    );
    let tokens = bench_tokens(model.vocab_size(), args.prompt_tokens.max(1));

    // One untimed pass warms the page cache and the thread pool.
    let mut cache = model.new_cache(args.prompt_tokens.max(args.gen_tokens).max(1))?;
    model.forward(&tokens[..tokens.len().min(16)], &mut cache, Logits::Last)?;

    let mut prompt_rates = Vec::new();
    let mut decode_rates = Vec::new();
    for _ in 0..args.runs {
        if args.prompt_tokens > 0 {
            cache.clear();
            let t = Instant::now();
            model.forward(&tokens[..args.prompt_tokens], &mut cache, Logits::Last)?;
            prompt_rates.push(args.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
        if args.gen_tokens > 0 {
            cache.clear();
            let mut token = tokens[0];
            let t = Instant::now();
            for _ in 0..args.gen_tokens {
                let logits = model.forward(&[token], &mut cache, Logits::Last)?;
                token = argmax(&logits);
            }
            decode_rates.push(args.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let report = json!({
        "model": args.runtime.model.display().to_string(),
        "threads": loaded.threads(),
        "runs": args.runs,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prompt_tokens_per_s": median(&mut prompt_rates),
        "decode_tokens_per_s": median(&mut decode_rates),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    match args.format {
        Format::Json => println!("{report}"),
        Format::Text => {
            println!("model        {}", report["model"].as_str().unwrap_or_default());
            println!("threads      {}", report["threads"]);
            if let Some(r) = report["prompt_tokens_per_s"].as_f64() {
                println!("prompt       {r:.1} tokens/s ({} tokens, median of {})", args.prompt_tokens, args.runs);
            }
            if let Some(r) = report["decode_tokens_per_s"].as_f64() {
                println!("generation   {r:.1} tokens/s ({} tokens, median of {})", args.gen_tokens, args.runs);
            }
            if let Some(b) = report["peak_rss_bytes"].as_u64() {
                println!("peak RSS     {:.1} MiB", b as f64 / (1 << 20) as f64);
            }
        }
    }
    Ok(())
}

/// A fixed pseudo-random sequence of token ids (like llama-bench's random prompt).
fn bench_tokens(vocab: usize, n: usize) -> Vec<u32> {
    let mut state = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab as u64) as u32
        })
        .collect()
}

fn argmax(xs: &[f32]) -> u32 {
    xs.iter().enumerate().fold(0, |best, (i, &x)| if x > xs[best] { i } else { best }) as u32
}

fn median(xs: &mut [f64]) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    (!xs.is_empty()).then(|| xs[xs.len() / 2])
}

/// VmHWM from /proc/self/status: the most resident memory the process has had.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
