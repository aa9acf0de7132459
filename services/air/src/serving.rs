//! Starting the engine for a command: the async runtime, the model handed to its compute
//! thread, the KV budget.

use crate::cli::EngineArgs;
use crate::loaded::Loaded;
use air_engine::{Engine, EngineConfig, EngineModel, SchedulerConfig};
use air_stream::ByteSize;
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
    let kv_budget = match args.kv_budget {
        Some(b) => b.bytes(),
        None => (requests * (tokens_each.div_ceil(args.kv_block_size) + 1)) as u64 * block_bytes,
    };
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_seqs,
            max_waiting: args.max_queue,
            prefix_caching: !args.no_prefix_cache,
        },
        kv_budget,
        block_size: args.kv_block_size,
    };
    let name = loaded.file.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let model = EngineModel { name, model: loaded.model, tokenizer: Arc::new(loaded.tokenizer) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
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
