//! The engine on the real default model (SmolLM2-135M): batching, prefix caching, preemption
//! and cancellation change nothing in what a request generates. Needs the model:
//! `scripts/fetch-models.sh`.

use air_engine::{Engine, EngineConfig, EngineError, EngineModel, Event, FinishReason, Request, SchedulerConfig};
use air_gguf::GgufFile;
use air_model::{CpuNumerics, LoadOptions, Logits, Model};
use air_sampling::SamplingParams;
use air_tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_file() -> GgufFile {
    let dir = std::env::var_os("AIR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    GgufFile::open(dir.join(MODEL)).unwrap_or_else(|e| panic!("{e} (fetch the model with scripts/fetch-models.sh)"))
}

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_gguf(model_file().metadata()).unwrap())
}

async fn engine(config: EngineConfig) -> Engine {
    engine_with(config, CpuNumerics::Ggml).await
}

async fn engine_with(config: EngineConfig, numerics: CpuNumerics) -> Engine {
    let model = EngineModel { name: "smol".into(), model: load(numerics), tokenizer: tokenizer() };
    Engine::start(vec![model], config).await.unwrap()
}

fn load(numerics: CpuNumerics) -> Model {
    Model::load_with(&model_file(), LoadOptions { cpu_numerics: numerics, ..LoadOptions::default() }).unwrap()
}

fn config(max_batch_tokens: usize, kv_budget: u64) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig { max_batch_tokens, max_running: 32, ..SchedulerConfig::default() },
        kv_budget,
        block_size: 16,
    }
}

/// Prompts of many lengths (a few tokens to well over 64, where attention switches paths).
fn prompts() -> Vec<Vec<u32>> {
    let tok = tokenizer();
    let base = "The history of the printing press begins in the fifteenth century, when Johannes \
        Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Books became \
        cheaper, literacy spread across Europe, and scholars could share identical copies of texts.";
    (0..16)
        .map(|i| {
            let words: Vec<&str> = base.split(' ').collect();
            let take = 2 + (i * 7) % words.len();
            let text = format!("{} Question {i}: what happened next?", words[..take].join(" "));
            let text = if i % 5 == 4 { format!("{text} {base} {base}") } else { text };
            tok.encode(&text, true).unwrap()
        })
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request { sampling: SamplingParams::greedy(), ..Request::new(prompt, max_tokens) }
}

/// Runs a request to its end: the generated ids and the final event's reason and cached tokens.
async fn run(engine: &Engine, request: Request) -> (Vec<u32>, FinishReason, usize) {
    let mut stream = engine.submit(request).await.unwrap();
    let mut ids = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Event::Token { id, .. } => ids.push(id),
            Event::Finished { reason, usage, .. } => {
                assert_eq!(usage.completion_tokens, ids.len());
                return (ids, reason, usage.cached_tokens);
            }
        }
    }
    panic!("the stream ended without a Finished event");
}

/// Greedy ids straight from the model, one sequence, no engine.
fn direct_greedy(model: &Model, prompt: &[u32], max_tokens: usize, eog: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut cache = model.new_cache(prompt.len() + max_tokens).unwrap();
    let mut logits = model.forward(prompt, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let next = logits.iter().enumerate().fold(0, |b, (i, &x)| if x > logits[b] { i } else { b }) as u32;
        if eog(next) {
            break;
        }
        out.push(next);
        logits = model.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    out
}

async fn wait_until_idle(engine: &Engine) -> air_engine::SchedulerStats {
    for _ in 0..500 {
        let stats = engine.stats(None).await.unwrap();
        if stats.running == 0 && stats.waiting == 0 {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine did not become idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_generates_the_same_alone_and_in_a_batch_of_sixteen() {
    same_alone_and_in_a_batch(CpuNumerics::Ggml).await
}

/// The per-block integer kernels switch between their one-row and batch forms by the rows of
/// a step: the same bits either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fast_cpu_numerics_a_request_generates_the_same_alone_and_in_a_batch() {
    if !CpuNumerics::Fast.supported() {
        return;
    }
    same_alone_and_in_a_batch(CpuNumerics::Fast).await
}

async fn same_alone_and_in_a_batch(numerics: CpuNumerics) {
    let max_tokens = 20;
    let prompts = prompts();
    let tok = tokenizer();
    let model = load(numerics);
    let direct: Vec<Vec<u32>> =
        prompts.iter().map(|p| direct_greedy(&model, p, max_tokens, |t| tok.is_end_of_generation(t))).collect();
    // A small token budget: long prompts are split into chunks and share steps with decodes.
    let engine = engine_with(config(96, 64 << 20), numerics).await;
    for (p, want) in prompts.iter().zip(&direct) {
        let (alone, _, _) = run(&engine, greedy(p.clone(), max_tokens)).await;
        assert_eq!(&alone, want, "alone through the engine vs the model directly, prompt of {} tokens", p.len());
    }
    let batch = prompts.iter().map(|p| {
        let engine = engine.clone();
        let request = greedy(p.clone(), max_tokens);
        tokio::spawn(async move { run(&engine, request).await })
    });
    let batch: Vec<_> = futures_join(batch.collect()).await;
    for ((ids, _, _), want) in batch.iter().zip(&direct) {
        assert_eq!(ids, want);
    }
    let stats = wait_until_idle(&engine).await;
    assert_eq!(stats.kv_blocks_used, 0);
    assert!(stats.steps > 0);
}

async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_computed_once_with_the_same_output() {
    let tok = tokenizer();
    let long = "You are a helpful assistant who answers questions about astronomy with care. ".repeat(20);
    let prefix: Vec<u32> = tok.encode(&long, true).unwrap()[..200].to_vec();
    let with_tail = |tail: &str| {
        let mut p = prefix.clone();
        p.extend(tok.encode(tail, false).unwrap());
        p
    };
    let (first, second) = (with_tail(" What is a comet?"), with_tail(" Why is Mars red?"));
    let max_tokens = 12;
    let cold = engine(EngineConfig {
        scheduler: SchedulerConfig { prefix_caching: false, ..SchedulerConfig::default() },
        ..EngineConfig::default()
    })
    .await;
    let (want, _, cached) = run(&cold, greedy(second.clone(), max_tokens)).await;
    assert_eq!(cached, 0);

    let warm = engine(EngineConfig::default()).await;
    run(&warm, greedy(first, max_tokens)).await;
    let before = warm.stats(None).await.unwrap();
    let (got, _, cached) = run(&warm, greedy(second.clone(), max_tokens)).await;
    let after = warm.stats(None).await.unwrap();
    assert_eq!(got, want);
    // 12 full blocks of the shared 200 tokens were reused; only the rest was computed (plus
    // one token per generated token but the last).
    assert_eq!(cached, 192);
    let computed = after.computed_tokens - before.computed_tokens;
    assert_eq!(computed as usize, second.len() - 192 + got.len() - 1);
    assert_eq!(after.prefix_hit_tokens - before.prefix_hit_tokens, 192);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_tiny_kv_cache_thirty_two_requests_all_finish_correctly() {
    let max_tokens = 24;
    let prompts: Vec<Vec<u32>> = prompts().into_iter().filter(|p| p.len() < 40).cycle().take(32).collect();
    let tok = tokenizer();
    let file = model_file();
    let model = Model::load(&file).unwrap();
    // 12 blocks of 16 positions: room for three or four of the requests at a time.
    let block_bytes = model.config().kv_shape(16).block_bytes();
    let engine = engine(config(256, 12 * block_bytes)).await;
    let handles = prompts.iter().map(|p| {
        let engine = engine.clone();
        let request = greedy(p.clone(), max_tokens);
        tokio::spawn(async move { run(&engine, request).await })
    });
    let results = futures_join(handles.collect()).await;
    for (p, (ids, reason, _)) in prompts.iter().zip(&results) {
        let want = direct_greedy(&model, p, max_tokens, |t| tok.is_end_of_generation(t));
        assert_eq!(ids, &want, "prompt of {} tokens", p.len());
        assert!(matches!(reason, FinishReason::Length | FinishReason::Eos));
    }
    let stats = wait_until_idle(&engine).await;
    assert!(stats.preemptions > 0, "the cache was large enough not to preempt: {stats:?}");
    assert_eq!(stats.kv_blocks_used, 0);
    // A request that cannot fit even alone is refused up front.
    let too_long = greedy(prompts[0].clone(), 12 * 16);
    assert!(matches!(engine.submit(too_long).await, Err(EngineError::KvTooSmall { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_and_frees_the_blocks() {
    let engine = engine(config(512, 64 << 20)).await;
    let prompt = prompts()[3].clone();
    let mut stream = engine.submit(greedy(prompt.clone(), 500)).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(stream.next().await, Some(Event::Token { .. })));
    }
    assert!(engine.stats(None).await.unwrap().kv_blocks_used > 0);
    drop(stream);
    let stats = wait_until_idle(&engine).await;
    assert_eq!(stats.kv_blocks_used, 0);
    // Still serving afterwards.
    let (ids, _, _) = run(&engine, greedy(prompt, 4)).await;
    assert_eq!(ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_bad_requests_fail_fast_with_a_clear_error() {
    let engine = engine(EngineConfig {
        scheduler: SchedulerConfig { max_running: 1, max_waiting: 2, ..SchedulerConfig::default() },
        kv_budget: 64 << 20,
        block_size: 16,
    })
    .await;
    let prompt = prompts()[0].clone();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(engine.submit(greedy(prompt.clone(), 400)).await.unwrap());
    }
    let overloaded = engine.submit(greedy(prompt.clone(), 4)).await;
    assert!(matches!(overloaded, Err(EngineError::Overloaded { waiting: 2 })), "{:?}", overloaded.err());
    let unknown = Request { model: Some("nope".into()), ..greedy(prompt.clone(), 4) };
    assert_eq!(engine.submit(unknown).await.err(), Some(EngineError::UnknownModel("nope".into())));
    assert_eq!(engine.submit(greedy(vec![], 4)).await.err(), Some(EngineError::EmptyPrompt));
    let out_of_range = engine.submit(greedy(vec![1, 999_999], 4)).await.err();
    assert!(matches!(out_of_range, Some(EngineError::TokenOutOfRange { id: 999_999, .. })));
    let too_long = engine.submit(greedy(vec![1; 9000], 4)).await.err();
    assert!(matches!(too_long, Some(EngineError::PromptTooLong { prompt: 9000, .. })));
    drop(streams);
    let stats = wait_until_idle(&engine).await;
    assert_eq!(stats.kv_blocks_used, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_logprobs_rank_the_greedy_choice_first() {
    let engine = engine(config(512, 64 << 20)).await;
    let prompt = prompts()[2].clone();
    let text_of = async |request: Request| {
        let mut stream = engine.submit(request).await.unwrap();
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        loop {
            match stream.next().await.unwrap() {
                Event::Token { id, text: piece, logprobs: lp } => {
                    text.push_str(&piece);
                    logprobs.push((id, lp));
                }
                Event::Finished { reason, text_tail, .. } => return (text + &text_tail, reason, logprobs),
            }
        }
    };
    let (full, _, logprobs) = text_of(Request { logprobs: Some(3), ..greedy(prompt.clone(), 24) }).await;
    for (id, lp) in &logprobs {
        let lp = lp.as_ref().expect("logprobs asked for");
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, *id, "greedy picks the most likely token");
        assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
        assert!(lp.top[1].1 <= lp.top[0].1 && lp.top[2].1 <= lp.top[1].1);
    }
    // A stop string from the middle of that text: the text ends right before it.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let (cut, reason, _) = text_of(Request { stop: vec![stop.clone()], ..greedy(prompt, 24) }).await;
    assert_eq!((cut.as_str(), reason), (want, FinishReason::Stop), "stop {stop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mux_routes_requests_by_model_name() {
    let file = model_file();
    let load =
        |name: &str| EngineModel { name: name.into(), model: Model::load(&file).unwrap(), tokenizer: tokenizer() };
    let config = config(512, 64 << 20);
    let engine = Engine::start(vec![load("first"), load("second")], config).await.unwrap();
    let names: Vec<_> = engine.models().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    // The KV budget is shared: each model gets half.
    let half = engine.models()[0].kv_blocks;
    assert_eq!(engine.models()[1].kv_blocks, half);
    assert_eq!(half as u64, (32 << 20) / Model::load(&file).unwrap().config().kv_shape(16).block_bytes());
    let prompt = prompts()[1].clone();
    let (second, _, _) = run(&engine, Request { model: Some("second".into()), ..greedy(prompt.clone(), 6) }).await;
    let (default, _, _) = run(&engine, greedy(prompt, 6)).await;
    assert_eq!(second, default);
    assert_eq!(
        engine.stats(Some("second")).await.unwrap().computed_tokens,
        engine.stats(None).await.unwrap().computed_tokens
    );
    let duplicate = Engine::start(vec![load("same"), load("same")], config).await;
    assert!(matches!(duplicate, Err(air_engine::StartError::DuplicateName(n)) if n == "same"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_requests_in_flight_and_waits_for_the_compute_thread() {
    let engine = engine(config(512, 64 << 20)).await;
    let mut stream = engine.submit(greedy(prompts()[0].clone(), 1000)).await.unwrap();
    assert!(matches!(stream.next().await, Some(Event::Token { .. })));
    engine.shutdown().await;
    let mut last = None;
    while let Some(event) = stream.next().await {
        last = Some(event);
    }
    assert!(matches!(last, Some(Event::Finished { reason: FinishReason::Error(_), .. })), "{last:?}");
    assert_eq!(engine.submit(greedy(prompts()[0].clone(), 4)).await.err(), Some(EngineError::Stopped));
}
