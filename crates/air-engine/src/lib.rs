//! The engine every front end (CLI, HTTP gateway, cluster nodes, Python) drives.
//!
//! [`Engine::submit`] queues a tokenized [`Request`] and returns its [`EventStream`]: tokens
//! with their text as they are generated, then a final event with usage, timings and why it
//! ended. Behind the handle, actors (ractor) coordinate and a compute thread per model does the
//! math:
//!
//! - `ModelMux` routes requests by model name to
//! - a scheduler actor per model, which keeps waiting and running queues over a paged KV cache
//!   ([`air_kv`]) and builds each step's [`StepPlan`]: one token of every decoding sequence plus
//!   prompt chunks of new ones, within a token budget (continuous batching, chunked prefill,
//!   prefix caching, preemption by recompute when blocks run out);
//! - the model runner, on its own thread, runs the plan as one batched pass and samples.

mod actor;
mod engine;
mod mux;
mod request;
mod runner;
mod scheduler;
mod stop;

pub use engine::{Engine, EngineConfig, EngineModel, EventStream, ModelInfo, StartError};
pub use request::{EngineError, Event, FinishReason, Request, RequestTimings, TokenLogprobs, Usage};
pub use scheduler::{SchedulerConfig, SchedulerStats, SeqId, StepEntry, StepPlan};
