//! `air serve`: the OpenAI-compatible HTTP server over the engine, for one or more models.

use crate::cli::ServeArgs;
use crate::loaded::{Loaded, start_threads};
use crate::serving::{engine_config, runtime};
use air_engine::{Engine, EngineModel};
use air_gateway::{Gateway, ServedModel};
use air_tokenizer::ChatTemplate;
use anyhow::{Context, Result, bail, ensure};
use std::sync::Arc;
use std::time::Duration;

/// KV-cache memory when `--kv-budget` is not given.
const DEFAULT_KV_BUDGET: u64 = 1 << 30;

pub fn run(args: ServeArgs) -> Result<()> {
    start_threads(&args.compute)?;
    let mut api_keys = args.api_keys.clone();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        api_keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
        ensure!(!api_keys.is_empty(), "{} holds no API key", path.display());
    }
    let template_source = args
        .chat_template
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    let shares = args.models.len() as u64;
    let (mut engine_models, mut served) = (Vec::new(), Vec::new());
    for spec in &args.models {
        if served.iter().any(|s: &ServedModel| s.name == spec.name) {
            bail!("two models are named {:?}; name them with NAME=PATH", spec.name);
        }
        let loaded = Loaded::open_path(&spec.path, &args.compute, shares)?;
        let tokenizer = Arc::new(loaded.tokenizer);
        let template = match &template_source {
            Some(source) => Some(ChatTemplate::for_tokenizer(source.as_str(), &tokenizer)?),
            None => ChatTemplate::from_gguf(loaded.file.metadata(), &tokenizer)?,
        };
        let context_length = loaded.model.config().context_length;
        served.push(ServedModel { name: spec.name.clone(), tokenizer: tokenizer.clone(), template, context_length });
        engine_models.push(EngineModel { name: spec.name.clone(), model: loaded.model, tokenizer });
    }
    let config = engine_config(&args.engine, DEFAULT_KV_BUDGET)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    runtime(workers)?.block_on(async move {
        let engine = Engine::start(engine_models, config).await?;
        let names: Vec<&str> = served.iter().map(|m| m.name.as_str()).collect();
        let names = names.join(", ");
        let app = air_gateway::router(Arc::new(Gateway::new(engine.clone(), served, api_keys)));
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        tracing::info!("serving {names} on http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            stopped.await.ok();
        });
        let server = tokio::spawn(std::future::IntoFuture::into_future(server));
        shutdown_signal().await;
        let deadline = args.shutdown_timeout;
        tracing::info!("stopping: no new connections; up to {deadline} s for requests in flight");
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(deadline), server).await.is_err() {
            tracing::warn!("requests still running after {deadline} s are stopped");
        }
        engine.shutdown().await;
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
