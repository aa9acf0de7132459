//! The two completion endpoints: a request becomes `n` engine requests; their events become one
//! JSON answer, or a stream of Server-Sent Events.

use crate::metrics::Observed;
use crate::openai::{ChatRequest, Common, CompletionRequest, Message, Prompt, top_logprobs};
use crate::{ApiError, Gateway, ServedModel, unix_now};
use air_engine::{Event, FinishReason, Request, TokenLogprobs, Usage};
use air_tokenizer::{ChatMessage, Tokenizer};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio_stream::{StreamExt, StreamMap};

/// Which endpoint: the shapes of its answers differ.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// A validated request, ready for the engine.
struct Job {
    kind: Kind,
    model: String,
    prompt: Vec<u32>,
    requests: Vec<Request>,
    stream: bool,
    include_usage: bool,
    tokenizer: Arc<Tokenizer>,
}

pub(crate) fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| ApiError { status: r.status(), message: r.body_text(), param: None, code: None })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

pub async fn chat(State(g): State<Arc<Gateway>>, body: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    respond(&g, received, chat_job(&g, parse(body))).await
}

pub async fn text(State(g): State<Arc<Gateway>>, body: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    respond(&g, received, text_job(&g, parse(body))).await
}

fn chat_job(g: &Gateway, request: Result<ChatRequest, ApiError>) -> Result<Job, ApiError> {
    let r = request?;
    let model = g.model(&r.common.model)?;
    let prompt = chat_prompt(model, &r.messages)?;
    let logprobs = match (r.logprobs, r.top_logprobs) {
        (true, top) => Some(top_logprobs(top.unwrap_or(0))?),
        (false, Some(_)) => return Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs"))),
        (false, None) => None,
    };
    job(Kind::Chat, model, prompt, &r.common, logprobs)
}

/// The prompt tokens of chat `messages` through the model's template (with the generation
/// prompt); a model without a template is a 400.
pub(crate) fn chat_prompt(model: &ServedModel, messages: &[Message]) -> Result<Vec<u32>, ApiError> {
    let template = model
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("this model has no chat template; use /v1/completions", Some("model")))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", Some("messages")));
    }
    let messages = messages
        .iter()
        .map(|m| match m.role.as_str() {
            "system" | "user" | "assistant" | "developer" => {
                Ok(ChatMessage::new(m.role.replace("developer", "system"), m.text()?))
            }
            other => Err(ApiError::invalid(format!("unsupported message role {other:?}"), Some("messages"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    template
        .encode(&model.tokenizer, &messages)
        .map_err(|e| ApiError::invalid(format!("cannot apply the chat template: {e}"), Some("messages")))
}

fn text_job(g: &Gateway, request: Result<CompletionRequest, ApiError>) -> Result<Job, ApiError> {
    let r = request?;
    let model = g.model(&r.common.model)?;
    if r.echo {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    let prompt = match &r.prompt {
        Prompt::Text(t) => {
            model.tokenizer.encode(t, true).map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?
        }
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Batch(texts) if texts.len() == 1 => {
            model.tokenizer.encode(&texts[0], true).map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?
        }
        Prompt::Batch(_) => {
            return Err(ApiError::invalid("one prompt per request (use n for several choices)", Some("prompt")));
        }
    };
    let logprobs = r.logprobs.map(top_logprobs).transpose()?;
    job(Kind::Text, model, prompt, &r.common, logprobs)
}

fn job(
    kind: Kind,
    model: &ServedModel,
    prompt: Vec<u32>,
    c: &Common,
    logprobs: Option<usize>,
) -> Result<Job, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= model.context_length {
        let message =
            format!("the prompt has {} tokens; this model's context is {} tokens", prompt.len(), model.context_length);
        return Err(ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid(message, Some("messages")) });
    }
    let room = model.context_length - prompt.len();
    let max_tokens = c.max_tokens()?.unwrap_or(room).min(room);
    let requests = (0..c.choices()?)
        .map(|i| {
            Ok(Request {
                model: Some(model.name.clone()),
                prompt: prompt.clone(),
                max_tokens,
                sampling: c.sampling(i)?,
                stop: c.stops(),
                logprobs,
                ignore_eos: c.ignore_eos,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Job {
        kind,
        model: model.name.clone(),
        prompt,
        requests,
        stream: c.stream,
        include_usage: c.include_usage(),
        tokenizer: model.tokenizer.clone(),
    })
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn respond(g: &Gateway, received: Instant, job: Result<Job, ApiError>) -> Response {
    let job = match job {
        Ok(job) => job,
        Err(e) => return e.into_response(),
    };
    let mut streams = StreamMap::new();
    for (i, request) in job.requests.iter().enumerate() {
        match g.engine.submit(request.clone()).await {
            Ok(events) => {
                streams.insert(i, g.metrics.observe(&job.model, job.prompt.len(), received, events));
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    let prefix = if job.kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let id = format!("{prefix}-{}-{}", unix_now(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let frame = Frame { kind: job.kind, id, created: unix_now(), model: job.model.clone() };
    if job.stream { stream(frame, job, streams) } else { collect(frame, job, streams).await }
}

/// The fields every answer and chunk carries.
#[derive(Clone)]
struct Frame {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Frame {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut v = json!({ "id": self.id, "object": self.object(chunk), "created": self.created,
                            "model": self.model, "choices": choices });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A choice with `text` (a delta when streaming).
    fn choice(&self, index: usize, text: &str, logprobs: Option<Value>, finish: Option<&str>, chunk: bool) -> Value {
        let mut c = match (self.kind, chunk) {
            (Kind::Chat, false) => json!({ "message": { "role": "assistant", "content": text } }),
            (Kind::Chat, true) if text.is_empty() && finish.is_some() => json!({ "delta": {} }),
            (Kind::Chat, true) => json!({ "delta": { "content": text } }),
            (Kind::Text, _) => json!({ "text": text }),
        };
        c["index"] = json!(index);
        c["logprobs"] = logprobs.unwrap_or(Value::Null);
        c["finish_reason"] = json!(finish);
        c
    }

    /// Log-probabilities of `tokens` in the endpoint's shape.
    fn logprobs(&self, tok: &Tokenizer, tokens: &[(u32, TokenLogprobs)]) -> Value {
        let text = |id: u32| String::from_utf8_lossy(tok.token_bytes(id)).into_owned();
        match self.kind {
            Kind::Chat => {
                let entry =
                    |id: u32, lp: f32| json!({ "token": text(id), "logprob": lp, "bytes": tok.token_bytes(id) });
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|(id, lp)| {
                        let mut e = entry(*id, lp.logprob);
                        e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Text => json!({
                "tokens": tokens.iter().map(|(id, _)| text(*id)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|(_, lp)| lp.top.iter().map(|&(t, l)| (text(t), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
            }),
        }
    }
}

fn finish_reason(reason: &FinishReason) -> Result<&'static str, String> {
    match reason {
        FinishReason::Stop | FinishReason::Eos => Ok("stop"),
        FinishReason::Length => Ok("length"),
        FinishReason::Cancelled => Ok("cancelled"),
        FinishReason::Error(e) => Err(e.clone()),
    }
}

fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": { "cached_tokens": cached } })
}

/// Waits for every choice and answers with one JSON object.
async fn collect(frame: Frame, job: Job, mut streams: StreamMap<usize, Observed>) -> Response {
    let n = job.requests.len();
    let mut texts = vec![String::new(); n];
    let mut logprobs: Vec<Vec<(u32, TokenLogprobs)>> = vec![Vec::new(); n];
    let mut finish = vec!["stop"; n];
    let mut usage = Usage::default();
    while let Some((i, event)) = streams.next().await {
        match event {
            Event::Token { id, text, logprobs: lp } => {
                texts[i].push_str(&text);
                logprobs[i].extend(lp.map(|lp| (id, lp)));
            }
            Event::Finished { reason, usage: u, text_tail, .. } => {
                texts[i].push_str(&text_tail);
                match finish_reason(&reason) {
                    Ok(r) => finish[i] = r,
                    Err(e) => {
                        return ApiError {
                            status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            message: e,
                            param: None,
                            code: None,
                        }
                        .into_response();
                    }
                }
                usage.completion_tokens += u.completion_tokens;
                usage.cached_tokens = usage.cached_tokens.max(u.cached_tokens);
            }
        }
    }
    let asked_logprobs = job.requests[0].logprobs.is_some();
    let choices = (0..n)
        .map(|i| {
            let lp = asked_logprobs.then(|| frame.logprobs(&job.tokenizer, &logprobs[i]));
            frame.choice(i, &texts[i], lp, Some(finish[i]), false)
        })
        .collect();
    let usage = usage_json(job.prompt.len(), usage.completion_tokens, usage.cached_tokens);
    axum::Json(frame.wrap(false, choices, Some(usage))).into_response()
}

/// Answers with Server-Sent Events: per choice a role chunk (chat), content chunks, a final
/// chunk with its finish reason; then a usage chunk when asked; then `[DONE]`. The events are
/// produced by a task that ends, cancelling the requests, when the client goes away.
fn stream(frame: Frame, job: Job, mut streams: StreamMap<usize, Observed>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).await.is_ok() }
        };
        if frame.kind == Kind::Chat {
            for i in 0..job.requests.len() {
                let mut first = frame.choice(i, "", None, None, true);
                first["delta"] = json!({ "role": "assistant", "content": "" });
                if !send(frame.wrap(true, vec![first], None)).await {
                    return;
                }
            }
        }
        let asked_logprobs = job.requests[0].logprobs.is_some();
        let mut completion_tokens = 0;
        let mut cached = 0;
        while let Some((i, event)) = streams.next().await {
            let chunk = match event {
                Event::Token { id, text, logprobs } => {
                    let lp = logprobs.filter(|_| asked_logprobs).map(|lp| frame.logprobs(&job.tokenizer, &[(id, lp)]));
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    frame.choice(i, &text, lp, None, true)
                }
                Event::Finished { reason, usage, text_tail, .. } => {
                    completion_tokens += usage.completion_tokens;
                    cached = cached.max(usage.cached_tokens);
                    let reason = match finish_reason(&reason) {
                        Ok(r) => r,
                        Err(e) => {
                            send(json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } })).await;
                            return;
                        }
                    };
                    if !text_tail.is_empty()
                        && !send(frame.wrap(true, vec![frame.choice(i, &text_tail, None, None, true)], None)).await
                    {
                        return;
                    }
                    frame.choice(i, "", None, Some(reason), true)
                }
            };
            if !send(frame.wrap(true, vec![chunk], None)).await {
                return; // The client left: dropping `streams` cancels the requests.
            }
        }
        if job.include_usage {
            let usage = usage_json(job.prompt.len(), completion_tokens, cached);
            if !send(frame.wrap(true, Vec::new(), Some(usage))).await {
                return;
            }
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
