//! One generation through the engine: the request's events turned into text as it streams, and
//! a summary with token ids, why it ended, and timings.

use air_engine::{Engine, Event, Request};
use anyhow::{Result, bail};
use serde::Serialize;
use std::time::Instant;

/// Speed figures of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub prompt_ms: f64,
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated ids; an end-of-generation token that stopped it is not included.
    pub tokens: Vec<u32>,
    pub text: String,
    /// stop, length or eos.
    pub finish_reason: &'static str,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub timings: Timings,
}

/// Runs `request` to its end, calling `on_text` with each piece of text as it is released.
pub async fn generate(engine: &Engine, request: Request, mut on_text: impl FnMut(&str)) -> Result<Generation> {
    let prompt_tokens = request.prompt.clone();
    let started = Instant::now();
    let mut stream = engine.submit(request).await?;
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut first_token_at = None;
    while let Some(event) = stream.next().await {
        match event {
            Event::Token { id, text: piece, .. } => {
                first_token_at.get_or_insert_with(|| started.elapsed());
                tokens.push(id);
                on_text(&piece);
                text.push_str(&piece);
            }
            Event::Finished { reason, usage, timings, text_tail } => {
                if let air_engine::FinishReason::Error(e) = &reason {
                    bail!("generation failed: {e}");
                }
                on_text(&text_tail);
                text.push_str(&text_tail);
                let total = started.elapsed().as_secs_f64();
                let first = first_token_at.map_or(timings.time_to_first_token.as_secs_f64(), |t| t.as_secs_f64());
                let decode = total - first;
                let per_s = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
                // Each token after the first took one decode pass.
                let decode_passes = tokens.len().saturating_sub(1);
                return Ok(Generation {
                    timings: Timings {
                        prompt_ms: first * 1e3,
                        decode_ms: decode * 1e3,
                        time_to_first_token_ms: first * 1e3,
                        prompt_tokens_per_s: per_s(prompt_tokens.len() - usage.cached_tokens, first),
                        decode_tokens_per_s: per_s(decode_passes, decode),
                    },
                    prompt_tokens,
                    tokens,
                    text,
                    finish_reason: reason.as_str(),
                    cached_tokens: usage.cached_tokens,
                });
            }
        }
    }
    bail!("the engine stopped before the generation ended")
}
