//! `air bench --concurrency N,...`: the serving test. For each level N, N requests (distinct
//! random prompts, greedy, end-of-generation ignored so that each generates exactly
//! --gen-tokens) go through the engine at once; reported per level: the aggregate rates of
//! [`Throughput`], time to first token and inter-token latency percentiles.
//! With --runs R the levels run R times in turn (1, 16, 1, 16, ...): each level reports the
//! median of its rates and, beside the first level, the median of their ratios to the first
//! level's rates in the same round, so that a shared machine's slow spells weigh on both sides
//! of a ratio alike.

use crate::bench::{bench_tokens, median};
use crate::cli::{BenchArgs, Format};
use crate::loaded::Loaded;
use crate::serving::with_engine;
use air_engine::{Engine, Event, FinishReason, Request, SchedulerStats};
use air_sampling::SamplingParams;
use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use std::time::Instant;

/// What one request saw.
struct Trace {
    /// Seconds from submission to the first token.
    ttft: f64,
    /// When each token came.
    arrivals: Vec<Instant>,
}

impl Trace {
    /// Seconds between consecutive tokens.
    fn gaps(&self) -> impl Iterator<Item = f64> + '_ {
        self.arrivals.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())
    }
}

/// The aggregate rates a level reports, all requests together.
#[derive(Clone, Copy)]
enum Throughput {
    /// Generated tokens over the level's wall time, prompt processing included (what vLLM's
    /// serving benchmark calls output token throughput).
    Overall,
    /// The decode phase, as llama-batched-bench's S_TG counts it: from the moment every request
    /// has its first token (the step that completed the prompts) to the level's last token, the
    /// tokens of the steps after that one. A step's tokens come out together, steps apart, so a
    /// request's token of that step is the one that came nearest that moment, and the tokens
    /// after it are the phase's. Undefined with one token per request.
    Decode,
}

impl Throughput {
    const ALL: [Self; 2] = [Self::Decode, Self::Overall];

    /// The JSON key of the rate.
    fn key(self) -> &'static str {
        match self {
            Self::Overall => "aggregate_tokens_per_s",
            Self::Decode => "aggregate_decode_tokens_per_s",
        }
    }

    /// The JSON key of its ratio to the first level's rate.
    fn ratio_key(self) -> &'static str {
        match self {
            Self::Overall => "overall_ratio_to_first_level",
            Self::Decode => "decode_ratio_to_first_level",
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let levels = args.concurrency.clone();
    ensure!(levels.iter().all(|&n| n > 0), "--concurrency levels must be at least 1");
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(
        args.prompt_tokens > 0 && args.gen_tokens > 0,
        "the serving test needs --prompt-tokens and --gen-tokens > 0"
    );
    let loaded = Loaded::open(&args.runtime)?;
    let ctx = loaded.model.config().context_length;
    ensure!(
        args.prompt_tokens + args.gen_tokens <= ctx,
        "a request needs {} positions but the model's context is {ctx}",
        args.prompt_tokens + args.gen_tokens
    );
    let vocab = loaded.model.vocab_size();
    let device = loaded.model.compute_device().to_string();
    let threads = loaded.threads();
    let max_level = levels.iter().copied().max().unwrap_or(1);
    let model_path = args.runtime.model.display().to_string();
    with_engine(loaded, &args.engine, max_level, args.prompt_tokens + args.gen_tokens, async |engine| {
        // Untimed: warms the page cache and the compute threads.
        let warm = Request { prompt: bench_tokens(vocab, 16, u64::MAX), ..request(Vec::new(), 4) };
        trace(&engine, warm).await?;
        // rounds[r][level]; every request of every round has its own prompt, so that no round
        // finds another's in the prefix cache.
        let mut rounds: Vec<Vec<LevelRun>> = Vec::with_capacity(args.runs);
        for round in 0..args.runs {
            let mut runs = Vec::with_capacity(levels.len());
            for (level_index, &n) in levels.iter().enumerate() {
                let before = engine.stats(None).await?;
                let started = Instant::now();
                let seed = (round * levels.len() + level_index) * 1_000_003;
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let prompt = bench_tokens(vocab, args.prompt_tokens, (seed + i) as u64);
                        let engine = engine.clone();
                        let request = request(prompt, args.gen_tokens);
                        tokio::spawn(async move { trace(&engine, request).await })
                    })
                    .collect();
                let mut traces = Vec::new();
                for task in tasks {
                    traces.push(task.await??);
                }
                let wall = started.elapsed().as_secs_f64();
                let after = engine.stats(None).await?;
                runs.push(LevelRun { traces, wall, before, after });
            }
            rounds.push(runs);
        }
        for (level_index, &n) in levels.iter().enumerate() {
            let runs: Vec<&LevelRun> = rounds.iter().map(|round| &round[level_index]).collect();
            let firsts: Vec<&LevelRun> = rounds.iter().map(|round| &round[0]).collect();
            let report = level_report(n, &runs, (level_index > 0).then_some(&firsts));
            let report = json!({ "model": model_path, "device": device, "threads": threads,
                "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "level": report });
            print_level(&report, args.format);
        }
        Ok(())
    })
}

/// One run of one level: what its requests saw, its wall time, and the engine's counters
/// around it.
struct LevelRun {
    traces: Vec<Trace>,
    wall: f64,
    before: SchedulerStats,
    after: SchedulerStats,
}

impl LevelRun {
    /// Tokens generated, all requests together.
    fn tokens(&self) -> usize {
        self.traces.iter().map(|t| t.arrivals.len()).sum()
    }

    /// Tokens per second, all requests together.
    fn rate(&self, throughput: Throughput) -> Option<f64> {
        match throughput {
            Throughput::Overall => Some(self.tokens() as f64 / self.wall),
            Throughput::Decode => {
                let start = self.traces.iter().map(|t| t.arrivals.first()).max()??;
                let end = self.traces.iter().filter_map(|t| t.arrivals.last()).max()?;
                let decoded: usize = self
                    .traces
                    .iter()
                    .filter_map(|t| {
                        let (nearest, _) =
                            t.arrivals.iter().enumerate().min_by_key(|&(_, &a)| a.max(*start) - a.min(*start))?;
                        Some(t.arrivals.len() - 1 - nearest)
                    })
                    .sum();
                let seconds = (*end - *start).as_secs_f64();
                (decoded > 0 && seconds > 0.0).then(|| decoded as f64 / seconds)
            }
        }
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request { sampling: SamplingParams::greedy(), ignore_eos: true, ..Request::new(prompt, max_tokens) }
}

/// Runs one request, timing its tokens.
async fn trace(engine: &Engine, request: Request) -> Result<Trace> {
    let started = Instant::now();
    let mut stream = engine.submit(request).await?;
    let mut arrivals = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Event::Token { .. } => arrivals.push(Instant::now()),
            Event::Finished { reason: FinishReason::Error(e), .. } => bail!("a request failed: {e}"),
            Event::Finished { .. } => {
                let ttft = arrivals.first().map_or(0.0, |first| (*first - started).as_secs_f64());
                return Ok(Trace { ttft, arrivals });
            }
        }
    }
    bail!("the engine stopped during the test")
}

/// The figures of one level over its runs as JSON: per [`Throughput`], the median rate and
/// each run's, and where the first level's runs are given, the median ratio to its rate (each
/// round's own) and each round's; latency percentiles over every run's requests, and the
/// engine's counters: steps, and the compute thread's mean time per step in the model's pass
/// and in sampling (the rest of a token's latency is the engine's own work and the hand-offs).
fn level_report(n: usize, runs: &[&LevelRun], firsts: Option<&[&LevelRun]>) -> Value {
    let traces = || runs.iter().flat_map(|r| &r.traces);
    let mut walls: Vec<f64> = runs.iter().map(|r| r.wall).collect();
    let counter = |f: fn(&SchedulerStats) -> u64| runs.iter().map(|r| f(&r.after) - f(&r.before)).sum::<u64>();
    let steps = counter(|s| s.steps);
    let time = |f: fn(&SchedulerStats) -> std::time::Duration| {
        let total: std::time::Duration = runs.iter().map(|r| f(&r.after) - f(&r.before)).sum();
        (steps > 0).then(|| total.as_secs_f64() * 1e3 / steps as f64)
    };
    let mut ttft: Vec<f64> = traces().map(|t| t.ttft * 1e3).collect();
    let mut gaps: Vec<f64> = traces().flat_map(|t| t.gaps().map(|g| g * 1e3)).collect();
    let mut report = json!({
        "concurrency": n,
        "requests": n,
        "runs": runs.len(),
        "generated_tokens": runs.first().map_or(0, |r| r.tokens()),
        "wall_s": median(&mut walls),
        "ttft_ms_p50": percentile(&mut ttft, 50.0),
        "ttft_ms_p99": percentile(&mut ttft, 99.0),
        "itl_ms_p50": percentile(&mut gaps, 50.0),
        "itl_ms_p99": percentile(&mut gaps, 99.0),
        "preemptions": counter(|s| s.preemptions),
        "steps": steps,
        "forward_ms_per_step": time(|s| s.forward_time),
        "sampling_ms_per_step": time(|s| s.sampling_time),
    });
    for throughput in Throughput::ALL {
        let each: Vec<Option<f64>> = runs.iter().map(|r| r.rate(throughput)).collect();
        report[throughput.key()] = json!(median(&mut each.iter().flatten().copied().collect::<Vec<_>>()));
        report[format!("{}_runs", throughput.key())] = json!(each);
        if let Some(firsts) = firsts {
            let ratios: Vec<Option<f64>> = runs
                .iter()
                .zip(firsts)
                .map(|(run, first)| Some(run.rate(throughput)? / first.rate(throughput)?))
                .collect();
            report[throughput.ratio_key()] = json!(median(&mut ratios.iter().flatten().copied().collect::<Vec<_>>()));
            report[format!("{}_runs", throughput.ratio_key())] = json!(ratios);
        }
    }
    report
}

/// Nearest-rank percentile.
fn percentile(xs: &mut [f64], p: f64) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len().max(1));
    xs.get(rank - 1).copied()
}

fn print_level(report: &Value, format: Format) {
    let level = &report["level"];
    match format {
        Format::Json => {
            let mut flat = level.clone();
            for key in ["model", "device", "threads", "prompt_tokens", "gen_tokens"] {
                flat[key] = report[key].clone();
            }
            println!("{flat}");
        }
        Format::Text => {
            let f = |key: &str| level[key].as_f64().unwrap_or(f64::NAN);
            let rate = |throughput: Throughput| {
                let ratio = level[throughput.ratio_key()].as_f64().map_or(String::new(), |r| format!(" ({r:.2}x)"));
                // Streamed models larger than memory make tenths of a token per second; one
                // token per request has no decode phase.
                let Some(rate) = level[throughput.key()].as_f64() else { return "n/a".to_string() };
                let digits = if rate < 10.0 { 3 } else { 1 };
                format!("{rate:.digits$} tokens/s{ratio}")
            };
            println!(
                "concurrency {:>3}: decode {} | overall {} | TTFT p50 {:.0} ms p99 {:.0} ms | ITL p50 {:.1} ms p99 {:.1} ms | {} preemptions | per step: pass {:.2} ms, sampling {:.2} ms | median of {} runs",
                level["concurrency"],
                rate(Throughput::Decode),
                rate(Throughput::Overall),
                f("ttft_ms_p50"),
                f("ttft_ms_p99"),
                f("itl_ms_p50"),
                f("itl_ms_p99"),
                level["preemptions"],
                f("forward_ms_per_step"),
                f("sampling_ms_per_step"),
                level["runs"]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The first request's prompt runs alone (its first token at 10 ms); the next step
    /// completes the second's prompt (100 ms: the first's second token, then the second's
    /// first), and two decode steps follow (130 and 160 ms). The decode phase is those two
    /// steps: 4 tokens in 60 ms, whichever of a step's tokens came first.
    #[test]
    fn the_decode_phase_is_the_steps_after_the_last_prompt() {
        let zero = Instant::now();
        let at = |ms: f64| zero + Duration::from_secs_f64(ms / 1e3);
        let trace = |times: &[f64]| Trace { ttft: 0.0, arrivals: times.iter().map(|&t| at(t)).collect() };
        for (first, second) in [(100.0, 100.001), (100.001, 100.0)] {
            let run = LevelRun {
                traces: vec![trace(&[10.0, first, 130.0, 160.0]), trace(&[second, 130.001, 160.001])],
                wall: 0.2,
                before: SchedulerStats::default(),
                after: SchedulerStats::default(),
            };
            let phase = (160.001 - second) / 1e3;
            assert!((run.rate(Throughput::Decode).unwrap() - 4.0 / phase).abs() < 1e-6);
            assert!((run.rate(Throughput::Overall).unwrap() - 7.0 / 0.2).abs() < 1e-9);
        }
        // One token per request: no decode phase.
        let single = LevelRun {
            traces: vec![trace(&[10.0]), trace(&[20.0])],
            wall: 0.1,
            before: SchedulerStats::default(),
            after: SchedulerStats::default(),
        };
        assert_eq!(single.rate(Throughput::Decode), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut xs, 50.0), Some(50.0));
        assert_eq!(percentile(&mut xs, 99.0), Some(99.0));
        assert_eq!(percentile(&mut [7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
