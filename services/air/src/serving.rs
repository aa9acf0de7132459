//! Starting the engine for a command: the async runtime, the model handed to its compute
//! thread, the KV budget.

use crate::cli::EngineArgs;
use crate::loaded::Loaded;
use air_engine::{Engine, EngineConfig, EngineModel, SchedulerConfig};
use air_stream::{ByteSize, available_memory};
use anyhow::{Context, Result, ensure};
use std::sync::Arc;

/// Runs `job` with an engine over `loaded`'s model. Without `--kv-budget`, the KV cache holds
/// `requests` requests of up to `tokens_each` positions at once (plus the one spare block per
/// running request that admission keeps free).
pub fn with_engine<T>(
    loaded: Loaded,
    args: &EngineArgs,
    requests: usize,
    tokens_each: usize,
    job: impl AsyncFnOnce(Engine) -> Result<T>,
) -> Result<T> {
    ensure!(args.kv_block_size > 0, "--kv-block-size must be at least 1");
    let block_bytes = loaded.model.config().kv_shape(args.kv_block_size).block_bytes();
    let needed = (requests * (tokens_each.div_ceil(args.kv_block_size) + 1)) as u64 * block_bytes;
    let config = engine_config(args, needed)?;
    let name = loaded.file_stem();
    let model = EngineModel { name, model: loaded.model, tokenizer: Arc::new(loaded.tokenizer) };
    runtime(1)?.block_on(async move {
        let engine = Engine::start(vec![model], config).await?;
        let info = &engine.models()[0];
        if args.kv_budget.is_some() {
            eprintln!(
                "air: KV cache {} ({} blocks of {} positions)",
                ByteSize::new(info.kv_blocks as u64 * block_bytes),
                info.kv_blocks,
                args.kv_block_size
            );
        }
        let result = job(engine.clone()).await;
        engine.shutdown().await;
        result
    })
}

/// The engine's settings from the flags; `default_kv_budget` when `--kv-budget` is not given.
/// A budget beyond the memory available now is refused: the cache is allocated up front.
pub fn engine_config(args: &EngineArgs, default_kv_budget: u64) -> Result<EngineConfig> {
    let kv_budget = args.kv_budget.map_or(default_kv_budget, ByteSize::bytes);
    if let Some(available) = available_memory() {
        ensure!(
            kv_budget <= available.bytes(),
            "the KV budget of {} is more than the memory available ({available}); lower --kv-budget",
            ByteSize::new(kv_budget)
        );
    }
    Ok(EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_seqs,
            max_waiting: args.max_queue,
            prefix_caching: !args.no_prefix_cache,
        },
        kv_budget,
        block_size: args.kv_block_size,
    })
}

/// The async runtime of the actors (and the HTTP server): `workers` threads; the math runs on
/// the engine's compute threads.
pub fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
