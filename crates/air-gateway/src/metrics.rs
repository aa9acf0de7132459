//! `GET /metrics`: Prometheus counters, histograms and gauges of the API and the engine.
//!
//! Request-level figures (tokens, time to first token, inter-token latency, end-to-end latency,
//! how requests ended) are counted as each request's events pass through the gateway
//! ([`Metrics::observe`]); the engine's gauges and counters (running and waiting sequences, KV
//! blocks, preemptions, prefix-cache hits) are read from its schedulers at scrape time.

use crate::ApiError;
use air_engine::{Engine, Event, EventStream, SchedulerStats};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::core::{Atomic, Collector, GenericCounter};
use prometheus::{
    CounterVec, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

const TTFT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0];
const ITL_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0];
const E2E_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0];

/// The server's metrics, in their own registry.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    finished: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    kv_blocks: IntGaugeVec,
    kv_usage: GaugeVec,
    preemptions: IntCounterVec,
    prefix_queried: IntCounterVec,
    prefix_hits: IntCounterVec,
    steps: IntCounterVec,
    computed_tokens: IntCounterVec,
    forward_seconds: CounterVec,
    sampling_seconds: CounterVec,
    /// Serializes scrapes that move counters to the engine's totals.
    engine_sync: Mutex<()>,
}

/// Registers `metric` (made by `new`, which cannot fail for the fixed names and labels here).
fn register<M: Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<M>) -> M {
    let metric = metric.expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric name");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    register(registry, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["model"]))
}

/// Moves a counter that mirrors an engine total up to `total` (never down).
fn advance<P: Atomic>(counter: GenericCounter<P>, total: P::T) {
    let now = counter.get();
    if total > now {
        let mut more = total;
        more -= now;
        counter.inc_by(more);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let model = &["model"];
        let seconds = |name: &str, help: &str| register(&r, CounterVec::new(Opts::new(name, help), model));
        Self {
            http_requests: counter(
                &r,
                "air_http_requests_total",
                "HTTP requests answered, by route and status code",
                &["endpoint", "status"],
            ),
            prompt_tokens: counter(&r, "air_prompt_tokens_total", "Prompt tokens of accepted requests", model),
            generation_tokens: counter(&r, "air_generation_tokens_total", "Tokens generated", model),
            finished: counter(
                &r,
                "air_requests_finished_total",
                "Sequences (choices) ended, by reason: stop, length, cancelled (client gone), error",
                &["model", "finish_reason"],
            ),
            ttft: histogram(
                &r,
                "air_time_to_first_token_seconds",
                "From the arrival of the HTTP request to a sequence's first generated token",
                TTFT_BUCKETS,
            ),
            itl: histogram(
                &r,
                "air_inter_token_latency_seconds",
                "Between consecutive generated tokens of a sequence",
                ITL_BUCKETS,
            ),
            e2e: histogram(
                &r,
                "air_e2e_request_latency_seconds",
                "From the arrival of the HTTP request to a sequence's last token",
                E2E_BUCKETS,
            ),
            running: gauge(&r, "air_requests_running", "Sequences being computed", model),
            waiting: gauge(&r, "air_requests_waiting", "Sequences queued for admission", model),
            kv_blocks: gauge(
                &r,
                "air_kv_blocks",
                "KV-cache blocks by state: used (held by sequences), cached (kept for prefix reuse), free",
                &["model", "state"],
            ),
            kv_usage: register(
                &r,
                GaugeVec::new(
                    Opts::new("air_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by sequences (0..1)"),
                    model,
                ),
            ),
            preemptions: counter(
                &r,
                "air_preemptions_total",
                "Sequences that lost their KV blocks and were computed again",
                model,
            ),
            prefix_queried: counter(
                &r,
                "air_prefix_cache_queried_tokens_total",
                "Prompt tokens looked up in the prefix cache",
                model,
            ),
            prefix_hits: counter(
                &r,
                "air_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache (not computed)",
                model,
            ),
            steps: counter(&r, "air_engine_steps_total", "Batched forward passes run", model),
            computed_tokens: counter(
                &r,
                "air_engine_computed_tokens_total",
                "Tokens run through the model: prompt chunks, recomputation and decode tokens",
                model,
            ),
            forward_seconds: seconds(
                "air_engine_forward_seconds_total",
                "Compute-thread time in the model's batched passes (its rate is the busy fraction)",
            ),
            sampling_seconds: seconds("air_engine_sampling_seconds_total", "Compute-thread time sampling tokens"),
            registry: r,
            engine_sync: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// Wraps an accepted request's events so that they are counted as they pass; `received` is
    /// when its HTTP request arrived. Dropping the wrapper before the end counts a cancellation.
    pub(crate) fn observe(
        &self,
        model: &str,
        prompt_tokens: usize,
        received: Instant,
        events: EventStream,
    ) -> Observed {
        self.prompt_tokens.with_label_values(&[model]).inc_by(prompt_tokens as u64);
        Observed {
            events,
            model: model.to_string(),
            generation_tokens: self.generation_tokens.with_label_values(&[model]),
            finished: self.finished.clone(),
            ttft: self.ttft.with_label_values(&[model]),
            itl: self.itl.with_label_values(&[model]),
            e2e: self.e2e.with_label_values(&[model]),
            received,
            first_token: None,
            last_token: None,
            done: false,
        }
    }

    fn record_engine(&self, model: &str, s: &SchedulerStats) {
        let _serial = self.engine_sync.lock().unwrap_or_else(|e| e.into_inner());
        self.running.with_label_values(&[model]).set(s.running as i64);
        self.waiting.with_label_values(&[model]).set(s.waiting as i64);
        let free = s.kv_blocks_total.saturating_sub(s.kv_blocks_used + s.kv_blocks_cached);
        for (state, n) in [("used", s.kv_blocks_used), ("cached", s.kv_blocks_cached), ("free", free)] {
            self.kv_blocks.with_label_values(&[model, state]).set(n as i64);
        }
        let usage = if s.kv_blocks_total == 0 { 0.0 } else { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 };
        self.kv_usage.with_label_values(&[model]).set(usage);
        advance(self.preemptions.with_label_values(&[model]), s.preemptions);
        advance(self.prefix_queried.with_label_values(&[model]), s.prefix_query_tokens);
        advance(self.prefix_hits.with_label_values(&[model]), s.prefix_hit_tokens);
        advance(self.steps.with_label_values(&[model]), s.steps);
        advance(self.computed_tokens.with_label_values(&[model]), s.computed_tokens);
        advance(self.forward_seconds.with_label_values(&[model]), s.forward_time.as_secs_f64());
        advance(self.sampling_seconds.with_label_values(&[model]), s.sampling_time.as_secs_f64());
    }

    /// Every metric in Prometheus' text format, the engine's read now.
    async fn render(&self, engine: &Engine) -> Result<String, ApiError> {
        for info in engine.models() {
            let stats = engine.stats(Some(&info.name)).await?;
            self.record_engine(&info.name, &stats);
        }
        TextEncoder::new().encode_to_string(&self.registry.gather()).map_err(|e| ApiError {
            status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("cannot encode the metrics: {e}"),
            param: None,
            code: None,
        })
    }
}

/// One sequence's events, counted into the metrics as they pass.
pub(crate) struct Observed {
    events: EventStream,
    model: String,
    generation_tokens: IntCounter,
    finished: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    received: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    done: bool,
}

impl Observed {
    fn count(&mut self, event: &Event) {
        let now = Instant::now();
        match event {
            Event::Token { .. } => {
                self.generation_tokens.inc();
                match self.last_token {
                    None => {
                        self.ttft.observe((now - self.received).as_secs_f64());
                        self.first_token = Some(now);
                    }
                    Some(last) => self.itl.observe((now - last).as_secs_f64()),
                }
                self.last_token = Some(now);
            }
            Event::Finished { reason, usage, timings, .. } => {
                self.done = true;
                let name = match reason.as_str() {
                    "eos" => "stop",
                    other => other,
                };
                self.finished.with_label_values(&[&self.model, name]).inc();
                let seconds = (now - self.received).as_secs_f64();
                self.e2e.observe(seconds);
                let ttft_ms = self.first_token.map(|t| (t - self.received).as_secs_f64() * 1e3);
                if let air_engine::FinishReason::Error(error) = reason {
                    tracing::error!(model = %self.model, error, "completion failed");
                }
                tracing::info!(
                    model = %self.model,
                    finish_reason = name,
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    cached_tokens = usage.cached_tokens,
                    preemptions = timings.preemptions,
                    ttft_ms,
                    total_ms = seconds * 1e3,
                    "completion"
                );
            }
        }
    }
}

impl tokio_stream::Stream for Observed {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let poll = tokio_stream::Stream::poll_next(Pin::new(&mut self.events), cx);
        if let Poll::Ready(Some(event)) = &poll {
            self.count(event);
        }
        poll
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if !self.done {
            self.finished.with_label_values(&[&self.model, "cancelled"]).inc();
            let ms = self.received.elapsed().as_secs_f64() * 1e3;
            tracing::info!(model = %self.model, finish_reason = "cancelled", total_ms = ms, "completion");
        }
    }
}

/// Counts every answered request by route and status, and logs it (at `info`; the health and
/// metrics probes at `debug`) with the time to its response head.
pub(crate) async fn count_requests(State(g): State<Arc<crate::Gateway>>, request: Request, next: Next) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    g.metrics.http_requests.with_label_values(&[endpoint.as_str(), status.as_str()]).inc();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if matches!(endpoint.as_str(), "/health" | "/ready" | "/metrics") {
        tracing::debug!(%method, path, status = status.as_u16(), ms, "http");
    } else {
        tracing::info!(%method, path, status = status.as_u16(), ms, "http");
    }
    response
}

/// `GET /metrics`.
pub(crate) async fn scrape(State(g): State<Arc<crate::Gateway>>) -> Response {
    match g.metrics.render(&g.engine).await {
        Ok(text) => ([(header::CONTENT_TYPE, HeaderValue::from_static(prometheus::TEXT_FORMAT))], text).into_response(),
        Err(e) => e.into_response(),
    }
}
