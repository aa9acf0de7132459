//! `air bench`: prompt-processing and generation speed, measured the way llama-bench does
//! (a prompt of N tokens in one pass; N tokens generated one at a time from an empty context),
//! median of several runs, plus the process's peak resident memory and, for a model whose layers
//! are streamed (S.L.I.P.), what streaming costs: bytes read per step, the read bandwidth, and the
//! share of the step spent waiting for weights. On a GPU it also reports what streaming layers
//! into VRAM costs: bytes uploaded per step, the upload bandwidth (and the pinned-memory upload
//! bandwidth measured on its own), the time compute waited for uploads, and the peak VRAM taken.

use crate::cli::{BenchArgs, Format};
use crate::loaded::Loaded;
use air_model::{Logits, Model, Sequence, UploadStats};
use air_stream::{ByteSize, StreamStats};
use anyhow::{Result, ensure};
use serde_json::json;
use std::time::Instant;

pub fn run(args: BenchArgs) -> Result<()> {
    if !args.concurrency.is_empty() {
        return crate::serving_bench::run(args);
    }
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(args.batch > 0, "--batch must be at least 1");
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
    let tokens = bench_tokens(model.vocab_size(), args.prompt_tokens.max(args.batch), 0);

    // One untimed pass warms the page cache and the thread pool.
    let mut cache = model.new_cache(args.prompt_tokens.max(tokens.len().min(16)))?;
    model.forward(&tokens[..tokens.len().min(16)], &mut cache, Logits::Last)?;

    let mut caches: Vec<_> =
        (0..args.batch).map(|_| model.new_cache(args.gen_tokens.max(1))).collect::<Result<_, _>>()?;
    let mut prompt_rates = Vec::new();
    let mut decode_rates = Vec::new();
    let mut decode = Decode::default();
    for _ in 0..args.runs {
        if args.prompt_tokens > 0 {
            cache.clear();
            let t = Instant::now();
            model.forward(&tokens[..args.prompt_tokens], &mut cache, Logits::Last)?;
            prompt_rates.push(args.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
        if args.gen_tokens > 0 {
            let (seconds, stats, uploads) = decode_run(model, &mut caches, &tokens, args.gen_tokens)?;
            decode_rates.push((args.batch * args.gen_tokens) as f64 / seconds);
            decode.add(seconds, args.gen_tokens, stats, uploads);
        }
    }
    let plan = model.streamer().plan();
    let pinned_upload = model.measure_pinned_upload()?;
    let report = json!({
        "model": args.runtime.model.display().to_string(),
        "device": model.compute_device().to_string(),
        "threads": loaded.threads(),
        "runs": args.runs,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "batch": args.batch,
        "prompt_tokens_per_s": median(&mut prompt_rates),
        "decode_tokens_per_s": median(&mut decode_rates),
        "decode_step_ms": decode.step_seconds().map(|s| s * 1e3),
        "peak_rss_bytes": rss_bytes("VmHWM:"),
        "steady_rss_bytes": decode.steady_rss,
        "resident_layers": plan.pinned_count(),
        "streamed_layers": plan.streamed_count(),
        "streamed_bytes_per_step": decode.bytes_per_step(),
        "stream_bytes_per_s": decode.read_bandwidth(),
        "io_wait_fraction": decode.wait_fraction(),
        "peak_vram_bytes": model.peak_device_memory(),
        "vram_streamed_layers": model.device_streamed_layers(),
        "uploaded_bytes_per_step": decode.uploaded_per_step(),
        "upload_bytes_per_s": decode.upload_bandwidth(),
        "upload_wait_ms_per_step": decode.upload_wait_per_step().map(|s| s * 1e3),
        "pinned_upload_bytes_per_s": pinned_upload,
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
            if let Some(r) = report["decode_tokens_per_s"].as_f64().filter(|_| args.batch > 1) {
                println!("batch        {} sequences, {:.1} tokens/s each", args.batch, r / args.batch as f64);
            }
            let bytes = |key: &str| report[key].as_f64().map(|b| ByteSize::new(b as u64));
            if let Some(b) = bytes("peak_rss_bytes") {
                println!("peak RSS     {b}");
            }
            if let Some(b) = bytes("steady_rss_bytes") {
                println!("steady RSS   {b} (after generation)");
            }
            println!("device       {}", report["device"].as_str().unwrap_or_default());
            if let Some(b) = bytes("peak_vram_bytes") {
                println!("peak VRAM    {b}");
            }
            if model.device_streamed_layers() > 0 {
                let layers = model.config().n_layer;
                let streamed = model.device_streamed_layers();
                println!("VRAM layers  {} resident, {streamed} streamed over PCIe", layers - streamed);
                if let (Some(step), Some(ms)) = (bytes("uploaded_bytes_per_step"), report["decode_step_ms"].as_f64()) {
                    let rate = bytes("upload_bytes_per_s").map(|b| format!(" at {b}/s")).unwrap_or_default();
                    let wait = report["upload_wait_ms_per_step"].as_f64().unwrap_or(0.0);
                    println!("uploads      {step} per step of {ms:.2} ms{rate}, compute waited {wait:.2} ms for them");
                }
                if let Some(b) = bytes("pinned_upload_bytes_per_s") {
                    println!("pinned copy  {b}/s host to device (measured alone)");
                }
            }
            if plan.streamed_count() > 0 {
                println!("layers       {} resident, {} streamed", plan.pinned_count(), plan.streamed_count());
                if let (Some(step), Some(bandwidth), Some(wait), Some(ms)) = (
                    bytes("streamed_bytes_per_step"),
                    bytes("stream_bytes_per_s"),
                    report["io_wait_fraction"].as_f64(),
                    report["decode_step_ms"].as_f64(),
                ) {
                    println!(
                        "streaming    {step} per step of {ms:.1} ms, read at {bandwidth}/s, {:.0}% of the step waiting for weights",
                        wait * 100.0
                    );
                }
            }
        }
    }
    Ok(())
}

/// A fixed pseudo-random sequence of token ids (like llama-bench's random prompt); each `seed`
/// gives another.
pub fn bench_tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut state = 0x2545F4914F6CDD1Du64 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
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

/// The median (the upper one of an even count); `None` when empty.
pub(crate) fn median(xs: &mut [f64]) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    (!xs.is_empty()).then(|| xs[xs.len() / 2])
}

/// One generation test: every sequence of the batch decodes `steps` tokens from an empty cache,
/// one pass per step. Returns the time taken and what the streamers (disk to RAM, RAM to VRAM)
/// did meanwhile.
fn decode_run(
    model: &Model,
    caches: &mut [air_model::KvCache],
    tokens: &[u32],
    steps: usize,
) -> Result<(f64, StreamStats, UploadStats)> {
    let before = model.streamer().stats();
    let uploads_before = model.upload_stats();
    let mut next: Vec<u32> = (0..caches.len()).map(|i| tokens[i % tokens.len()]).collect();
    caches.iter_mut().for_each(|c| c.clear());
    let vocab = model.vocab_size();
    let t = Instant::now();
    for _ in 0..steps {
        let step: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut batch: Vec<_> =
            step.iter().zip(caches.iter_mut()).map(|(t, cache)| Sequence { tokens: t, cache }).collect();
        let logits = model.forward_batch(&mut batch, Logits::Last)?;
        next = logits.chunks(vocab).map(argmax).collect();
    }
    let seconds = t.elapsed().as_secs_f64();
    let stats = model.streamer().stats() - before;
    Ok((seconds, stats, model.upload_stats() - uploads_before))
}

/// Totals over the generation tests.
#[derive(Default)]
struct Decode {
    seconds: f64,
    steps: usize,
    streamed: StreamStats,
    uploads: UploadStats,
    steady_rss: Option<u64>,
}

impl Decode {
    fn add(&mut self, seconds: f64, steps: usize, stats: StreamStats, uploads: UploadStats) {
        self.seconds += seconds;
        self.steps += steps;
        self.streamed += stats;
        self.uploads += uploads;
        self.steady_rss = rss_bytes("VmRSS:");
    }

    fn step_seconds(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.seconds / self.steps as f64)
    }

    fn bytes_per_step(&self) -> Option<u64> {
        (self.steps > 0).then(|| self.streamed.bytes_streamed / self.steps as u64)
    }

    /// Bytes per second of the prefetch thread's reading time.
    fn read_bandwidth(&self) -> Option<f64> {
        (self.streamed.read_seconds > 0.0).then(|| self.streamed.bytes_read as f64 / self.streamed.read_seconds)
    }

    /// Bytes uploaded into VRAM per step (uploads the GPU finished during the tests).
    fn uploaded_per_step(&self) -> Option<u64> {
        (self.steps > 0 && self.uploads.layers > 0).then(|| self.uploads.bytes / self.steps as u64)
    }

    /// Bytes per second of the copy engine's time on uploads.
    fn upload_bandwidth(&self) -> Option<f64> {
        (self.uploads.copy_seconds > 0.0).then(|| self.uploads.bytes as f64 / self.uploads.copy_seconds)
    }

    /// Seconds per step the compute stream stood waiting for uploads.
    fn upload_wait_per_step(&self) -> Option<f64> {
        (self.steps > 0 && self.uploads.layers > 0).then(|| self.uploads.wait_seconds / self.steps as f64)
    }

    fn wait_fraction(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.streamed.wait_seconds / self.seconds)
    }
}

/// A memory figure of /proc/self/status (`VmHWM:` the most resident memory the process has had,
/// `VmRSS:` what is resident now), in bytes.
fn rss_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
