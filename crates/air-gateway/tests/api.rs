//! The gateway's routes on the real default model (SmolLM2-135M), through the router in
//! process. Needs the model: `scripts/fetch-models.sh`.

use air_engine::{Engine, EngineConfig, EngineModel};
use air_gateway::{Gateway, ServedModel, router};
use air_gguf::GgufFile;
use air_model::Model;
use air_tokenizer::{ChatTemplate, Tokenizer};
use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use tower::ServiceExt;

async fn app(api_keys: Vec<String>) -> axum::Router {
    let dir = std::env::var_os("AIR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let file = GgufFile::open(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("scripts/fetch-models.sh");
    let tokenizer = Arc::new(Tokenizer::from_gguf(file.metadata()).unwrap());
    let template = ChatTemplate::from_gguf(file.metadata(), &tokenizer).unwrap();
    let model = Model::load(&file).unwrap();
    let context_length = model.config().context_length;
    let config = EngineConfig { kv_budget: 64 << 20, ..EngineConfig::default() };
    let engine = Engine::start(vec![EngineModel { name: "smol".into(), model, tokenizer: tokenizer.clone() }], config)
        .await
        .unwrap();
    let served = ServedModel { name: "smol".into(), tokenizer, template, context_length };
    router(Arc::new(Gateway::new(engine, vec![served], api_keys)))
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
    let response = app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
    let status = response.status();
    (status, String::from_utf8(to_bytes(response.into_body(), 1 << 24).await.unwrap().to_vec()).unwrap())
}

async fn post(app: &axum::Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = call(app, "POST", uri, Some(body), None).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an event stream.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_answer_in_openai_shapes() {
    let app = app(Vec::new()).await;
    assert_eq!(call(&app, "GET", "/health", None, None).await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/ready", None, None).await.0, StatusCode::OK);
    let (status, models) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(call(&app, "GET", "/v1/models/smol", None, None).await.0, StatusCode::OK);

    let chat = json!({ "model": "smol", "messages": [{ "role": "user", "content": "What is the capital of France?" }],
                       "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 2 });
    let (status, answer) = post(&app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    let usage = &answer["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let lp = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len() as u64, usage["completion_tokens"].as_u64().unwrap());
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);

    // The same request streamed: the deltas add up to the same text; usage comes last.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let (status, text) = call(&app, "POST", "/v1/chat/completions", Some(streamed), None).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(joined, content);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][key], answer["usage"][key]);
    }
    // The second time, the prompt's full blocks came from the prefix cache.
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 32);
    assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|ch| !ch["finish_reason"].is_null())));

    // Text completions from token ids, two choices.
    let (status, answer) = post(&app, "/v1/completions",
        json!({ "model": "smol", "prompt": "Once upon a time", "max_tokens": 6, "n": 2, "temperature": 0, "logprobs": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "text_completion");
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy choices agree");
    assert_eq!(choices[0]["logprobs"]["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(choices[0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_openai_shape_with_the_right_status() {
    let app = app(vec!["secret".into()]).await;
    assert_eq!(call(&app, "GET", "/health", None, None).await.0, StatusCode::OK);
    let (status, body) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["type"], "authentication_error");
    assert_eq!(call(&app, "GET", "/v1/models", None, Some("wrong")).await.0, StatusCode::UNAUTHORIZED);
    let key = Some("secret");
    let cases = [
        (json!({ "model": "nope", "prompt": "hi" }), StatusCode::NOT_FOUND, "model"),
        (json!({ "model": "smol", "prompt": "hi", "temperature": 5 }), StatusCode::BAD_REQUEST, "temperature"),
        (json!({ "model": "smol", "prompt": "hi", "n": 0 }), StatusCode::BAD_REQUEST, "n"),
        (json!({ "model": "smol", "prompt": "hi", "max_tokens": 0 }), StatusCode::BAD_REQUEST, "max_tokens"),
        (json!({ "model": "smol", "prompt": "word ".repeat(9000) }), StatusCode::BAD_REQUEST, "messages"),
        (json!({ "model": "smol" }), StatusCode::BAD_REQUEST, ""),
    ];
    for (body, want, param) in cases {
        let (status, text) = call(&app, "POST", "/v1/completions", Some(body.clone()), key).await;
        assert_eq!(status, want, "{body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
        if !param.is_empty() {
            assert_eq!(error["error"]["param"], param, "{text}");
        }
    }
    let (status, _) =
        call(&app, "POST", "/v1/chat/completions", Some(json!({ "model": "smol", "messages": [] })), key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(call(&app, "GET", "/v1/nothing", None, key).await.0, StatusCode::NOT_FOUND);
    // A body over the 2 MB limit.
    let huge = json!({ "model": "smol", "prompt": "x".repeat(3 << 20) });
    let (status, text) = call(&app, "POST", "/v1/completions", Some(huge), key).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string(), "{text}");
}

/// The value of the series `name` whose labels include `labels`, in a Prometheus text scrape.
fn series(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        let (metric, rest) = key.split_once('{').unwrap_or((key, ""));
        let matches = metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_a_dropped_stream_frees_its_blocks() {
    use tokio_stream::StreamExt;
    let app = app(Vec::new()).await;
    let body = json!({ "model": "smol", "prompt": "The sky is", "max_tokens": 5, "temperature": 0, "n": 2 });
    assert_eq!(post(&app, "/v1/completions", body).await.0, StatusCode::OK);
    assert_eq!(
        post(&app, "/v1/completions", json!({ "model": "smol", "prompt": "" })).await.0,
        StatusCode::BAD_REQUEST
    );

    // A streaming client that reads one chunk and goes away.
    let long = json!({ "model": "smol", "prompt": "Write a long story.", "max_tokens": 2000, "stream": true,
                       "ignore_eos": true });
    let request = Request::post("/v1/completions").header("content-type", "application/json");
    let response = app.clone().oneshot(request.body(Body::from(long.to_string())).unwrap()).await.unwrap();
    let mut body = response.into_body().into_data_stream();
    assert!(body.next().await.is_some_and(|chunk| chunk.is_ok()));
    drop(body);

    let (ok, scrape) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(ok, StatusCode::OK);
    let smol = [("model", "smol")];
    assert_eq!(
        series(&scrape, "air_http_requests_total", &[("endpoint", "/v1/completions"), ("status", "200")]),
        Some(2.0)
    );
    assert_eq!(
        series(&scrape, "air_http_requests_total", &[("endpoint", "/v1/completions"), ("status", "400")]),
        Some(1.0)
    );
    assert_eq!(
        series(&scrape, "air_requests_finished_total", &[("model", "smol"), ("finish_reason", "length")]),
        Some(2.0)
    );
    assert!(series(&scrape, "air_generation_tokens_total", &smol).unwrap() >= 11.0, "{scrape}");
    assert_eq!(series(&scrape, "air_prompt_tokens_total", &smol), Some(2.0 * 3.0 + 5.0), "{scrape}");
    assert_eq!(series(&scrape, "air_time_to_first_token_seconds_count", &smol), Some(3.0));
    assert_eq!(series(&scrape, "air_inter_token_latency_seconds_count", &smol).map(|n| n >= 8.0), Some(true));
    assert_eq!(series(&scrape, "air_e2e_request_latency_seconds_count", &smol), Some(2.0));

    // The dropped stream is cancelled in the engine and its blocks come back.
    let mut scrape = scrape;
    for _ in 0..200 {
        if series(&scrape, "air_requests_running", &smol) == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        scrape = call(&app, "GET", "/metrics", None, None).await.1;
    }
    assert_eq!(series(&scrape, "air_requests_running", &smol), Some(0.0), "{scrape}");
    assert_eq!(series(&scrape, "air_kv_blocks", &[("model", "smol"), ("state", "used")]), Some(0.0), "{scrape}");
    assert_eq!(
        series(&scrape, "air_requests_finished_total", &[("model", "smol"), ("finish_reason", "cancelled")]),
        Some(1.0)
    );
    assert!(series(&scrape, "air_kv_blocks", &[("model", "smol"), ("state", "free")]).unwrap() > 0.0);
    assert!(series(&scrape, "air_engine_steps_total", &smol).unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_agree_with_the_completions() {
    let app = app(Vec::new()).await;
    let (status, t) = post(&app, "/tokenize", json!({ "model": "smol", "prompt": "Once upon a time" })).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    let (_, answer) = post(
        &app,
        "/v1/completions",
        json!({ "model": "smol", "prompt": "Once upon a time", "max_tokens": 1, "temperature": 0 }),
    )
    .await;
    assert_eq!(t["count"], answer["usage"]["prompt_tokens"]);
    assert_eq!(t["tokens"].as_array().unwrap().len() as u64, t["count"].as_u64().unwrap());
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    let (status, text) = post(&app, "/detokenize", json!({ "tokens": t["tokens"] })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text["prompt"], "Once upon a time");

    let messages = json!([{ "role": "user", "content": "Hello!" }]);
    let (_, chat_tokens) = post(&app, "/tokenize", json!({ "messages": messages })).await;
    let (_, chat) = post(
        &app,
        "/v1/chat/completions",
        json!({ "model": "smol", "messages": messages, "max_tokens": 1, "temperature": 0 }),
    )
    .await;
    assert_eq!(chat_tokens["count"], chat["usage"]["prompt_tokens"]);

    for (uri, body, want) in [
        ("/tokenize", json!({ "prompt": "a", "messages": messages }), StatusCode::BAD_REQUEST),
        ("/tokenize", json!({}), StatusCode::BAD_REQUEST),
        ("/tokenize", json!({ "model": "nope", "prompt": "a" }), StatusCode::NOT_FOUND),
        ("/detokenize", json!({ "tokens": [1, 99999999] }), StatusCode::BAD_REQUEST),
        ("/detokenize", json!({ "tokens": "abc" }), StatusCode::BAD_REQUEST),
    ] {
        let (status, error) = post(&app, uri, body.clone()).await;
        assert_eq!(status, want, "{uri} {body}: {error}");
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    let (status, version) = call(&app, "GET", "/version", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(version.contains("version"));
}
