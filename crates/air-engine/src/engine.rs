//! The handle front ends hold: start the actors, submit requests, read their events.

use crate::actor::{SchedulerActor, SchedulerArgs, SchedulerMsg};
use crate::mux::{ModelMux, MuxMsg};
use crate::request::{EngineError, Event, Request};
use crate::runner::{KvMemory, Runner};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerStats, SeqId};
use air_kv::KvStore;
use air_model::Model;
use air_tokenizer::Tokenizer;
use ractor::{Actor, ActorRef};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A model for the engine: its name in requests, the model, its tokenizer.
pub struct EngineModel {
    pub name: String,
    pub model: Model,
    pub tokenizer: Arc<Tokenizer>,
}

/// Settings of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Bytes of KV cache, split evenly over the models.
    pub kv_budget: u64,
    /// Positions per KV block.
    pub block_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { scheduler: SchedulerConfig::default(), kv_budget: 1 << 30, block_size: 16 }
    }
}

/// What the engine knows of a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub context_length: usize,
    /// Blocks of its KV cache.
    pub kv_blocks: usize,
}

/// Could not start the engine.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no model to serve")]
    NoModels,
    #[error("two models are named {0:?}")]
    DuplicateName(String),
    #[error("the KV budget of {budget} bytes holds no block for model {model:?}; one takes {block_bytes} bytes")]
    KvBudget { model: String, budget: u64, block_bytes: u64 },
    #[error("invalid engine settings: {0}")]
    Config(String),
    #[error("cannot start an actor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
}

/// The engine: a model mux actor over one scheduler actor per model, each with its compute
/// thread. Cloning is cheap; every clone drives the same actors. Needs a tokio runtime.
#[derive(Clone)]
pub struct Engine {
    mux: ActorRef<MuxMsg>,
    models: Arc<Vec<ModelInfo>>,
}

impl Engine {
    /// Starts the actors for `models` (the first one is the default).
    pub async fn start(models: Vec<EngineModel>, config: EngineConfig) -> Result<Engine, StartError> {
        let s = config.scheduler;
        if s.max_batch_tokens == 0 || s.max_running == 0 || s.max_waiting == 0 || config.block_size == 0 {
            return Err(StartError::Config(
                "the batch token budget, running sequences, queue length and block size must be > 0".into(),
            ));
        }
        if s.max_running > s.max_batch_tokens {
            return Err(StartError::Config(format!(
                "{} running sequences cannot all decode within a batch of {} tokens",
                s.max_running, s.max_batch_tokens
            )));
        }
        if models.is_empty() {
            return Err(StartError::NoModels);
        }
        let share = config.kv_budget / models.len() as u64;
        let mut routes = Vec::new();
        let mut infos = Vec::new();
        for m in models {
            if infos.iter().any(|i: &ModelInfo| i.name == m.name) {
                return Err(StartError::DuplicateName(m.name));
            }
            let shape = m.model.config().kv_shape(config.block_size);
            let blocks = (share / shape.block_bytes()) as usize;
            if blocks == 0 {
                return Err(StartError::KvBudget { model: m.name, budget: share, block_bytes: shape.block_bytes() });
            }
            let context_length = m.model.config().context_length;
            let (kv, scheduler) = if m.model.supports_paged_kv() {
                (KvMemory::Paged(KvStore::new(shape, blocks)), s)
            } else {
                // Prefix reuse needs the shared paged store.
                (KvMemory::PerSequence, SchedulerConfig { prefix_caching: false, ..s })
            };
            let args = SchedulerArgs {
                scheduler: Scheduler::new(scheduler, blocks, config.block_size),
                vocab_size: m.model.vocab_size(),
                context_length,
                runner: Runner::new(m.model, kv),
                tokenizer: m.tokenizer,
            };
            let (actor, _) = Actor::spawn(None, SchedulerActor, args).await?;
            infos.push(ModelInfo { name: m.name.clone(), context_length, kv_blocks: blocks });
            routes.push((m.name, actor));
        }
        let (mux, _) = Actor::spawn(None, ModelMux, routes).await?;
        Ok(Engine { mux, models: Arc::new(infos) })
    }

    /// The loaded models, the default first.
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Queues `request`; its events arrive on the returned stream. Fails fast when the model is
    /// unknown, the request invalid, or the queue full. Dropping the stream cancels the request.
    pub async fn submit(&self, request: Request) -> Result<EventStream, EngineError> {
        let scheduler = self.route(request.model.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let id = ractor::call!(scheduler, SchedulerMsg::Submit, Box::new(request), tx)
            .map_err(|_| EngineError::Stopped)??;
        Ok(EventStream { events: rx, scheduler, id, finished: false })
    }

    /// The scheduler's gauges and counters of a model (`None`: the default one).
    pub async fn stats(&self, model: Option<&str>) -> Result<SchedulerStats, EngineError> {
        let scheduler = self.route(model.map(str::to_string)).await?;
        ractor::call!(scheduler, SchedulerMsg::Stats).map_err(|_| EngineError::Stopped)
    }

    async fn route(&self, model: Option<String>) -> Result<ActorRef<SchedulerMsg>, EngineError> {
        ractor::call!(self.mux, MuxMsg::Route, model).map_err(|_| EngineError::Stopped)?
    }

    /// Stops the actors and waits for the compute threads to release their models; requests
    /// in flight end with an error.
    pub async fn shutdown(&self) {
        self.mux.stop_and_wait(None, None).await.ok();
    }
}

/// The events of one request, ending with [`Event::Finished`]. Dropping it before the end
/// cancels the request.
pub struct EventStream {
    events: mpsc::UnboundedReceiver<Event>,
    scheduler: ActorRef<SchedulerMsg>,
    id: SeqId,
    finished: bool,
}

impl EventStream {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.events.recv().await;
        self.observe(&event);
        event
    }

    /// The next event, blocking the thread (not for use inside the async runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        let event = self.events.blocking_recv();
        self.observe(&event);
        event
    }

    fn observe(&mut self, event: &Option<Event>) {
        if matches!(event, Some(Event::Finished { .. }) | None) {
            self.finished = true;
        }
    }
}

impl tokio_stream::Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let poll = self.events.poll_recv(cx);
        if let Poll::Ready(event) = &poll {
            self.observe(event);
        }
        poll
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.scheduler.cast(SchedulerMsg::Cancel(self.id));
        }
    }
}
