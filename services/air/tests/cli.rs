//! The `air` binary end to end on the default model (fetch it with scripts/fetch-models.sh).

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(file: &str) -> String {
    let dir = std::env::var_os("AIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("models"));
    let path = dir.join(file);
    assert!(path.exists(), "{} is missing: run scripts/fetch-models.sh all", path.display());
    path.display().to_string()
}

fn smollm2() -> String {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn air(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_air")).args(args).output().unwrap()
}

/// `air generate -m MODEL ARGS... --format json`, parsed.
fn generate_json(model: &str, args: &[&str]) -> Value {
    json(&air(&[&["generate", "-m", model], args, &["--format", "json"]].concat()))
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A failure: non-zero exit and exactly one line on stderr that contains `needle`.
fn assert_fails(args: &[&str], needle: &str) {
    let out = air(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn greedy_generation_matches_llamacpp_text() {
    let m = smollm2();
    let out = generate_json(&m, &["-p", "The capital of France is", "-n", "8", "--temperature", "0"]);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/reference/public_SmolLM2-135M-Instruct.Q4_1.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["prompts"][0];
    assert_eq!(out["prompt_tokens"], case["prompt_ids"]);
    // Through the engine, the same ids as llama.cpp (crates/air-model/tests/llamacpp_greedy.rs
    // checks every prompt and step of the model pass itself).
    let expected: Vec<Value> = case["output_ids"].as_array().unwrap()[..8].to_vec();
    assert_eq!(&out["tokens"].as_array().unwrap()[..8], &expected);
    assert!(out["text"].as_str().unwrap().starts_with(" Paris."), "{}", out["text"]);
    for key in ["prompt_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms"] {
        assert!(out["timings"][key].as_f64().unwrap() > 0.0, "{key}");
    }
}

#[test]
fn text_output_streams_the_same_text() {
    let m = smollm2();
    let args = ["generate", "-m", &m, "-p", "Once upon a time", "-n", "12", "--temperature", "0"];
    let text = air(&args);
    assert!(text.status.success());
    let json = json(&air(&[&args[..], &["--format", "json"]].concat()));
    assert_eq!(String::from_utf8(text.stdout).unwrap().trim_end_matches('\n'), json["text"].as_str().unwrap());
}

#[test]
fn chat_renders_the_model_template() {
    let m = smollm2();
    let chat = generate_json(&m, &["-p", "What is the capital of France?", "--chat", "-n", "4"]);
    // The same conversation written out by hand in SmolLM2's template (with its default system line).
    let rendered = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                    <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let plain = generate_json(&m, &["-p", rendered, "-n", "4"]);
    assert_eq!(chat["prompt_tokens"], plain["prompt_tokens"]);
    assert_eq!(chat["prompt_tokens"][0], 1, "starts with <|im_start|>");
}

#[test]
fn generation_stops_at_end_of_generation_token() {
    // llama.cpp's greedy answer to this prompt is <|im_end|> at once (tests/reference).
    let m = smollm2();
    let out = generate_json(
        &m,
        &["-p", "Explain, step by step, how a bicycle stays upright.", "-n", "16", "--temperature", "0"],
    );
    assert_eq!(out["finish_reason"], "eos");
    assert_eq!(out["tokens"].as_array().unwrap().len(), 0);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = smollm2();
    let args = [
        "generate",
        "-m",
        &m,
        "-p",
        "Once upon a time",
        "-n",
        "16",
        "--temperature",
        "1",
        "--seed",
        "42",
        "--format",
        "json",
    ];
    assert_eq!(json(&air(&args))["tokens"], json(&air(&args))["tokens"]);
}

#[test]
fn info_describes_the_file() {
    let out = json(&air(&["info", &smollm2(), "--format", "json"]));
    assert_eq!(out["architecture"], "llama");
    assert_eq!(out["block_count"], 30);
    assert_eq!(out["vocab_size"], 49152);
    assert_eq!(out["chat_template"], true);
    assert_eq!(out["supported"], true);
    let types: Vec<&str> =
        out["tensors_by_type"].as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["F32", "Q4_1", "Q8_0"]);
}

#[test]
fn bench_reports_speed_and_memory() {
    let out = json(&air(&[
        "bench",
        "-m",
        &smollm2(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--format",
        "json",
    ]));
    for key in ["prompt_tokens_per_s", "decode_tokens_per_s"] {
        assert!(out[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(out["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
}

#[test]
fn bench_concurrency_reports_every_level() {
    let out = air(&[
        "bench",
        "-m",
        &smollm2(),
        "--concurrency",
        "1,3",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--runs",
        "2",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let levels: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(levels.iter().map(|l| l["concurrency"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3]);
    for level in &levels {
        assert_eq!(level["generated_tokens"].as_u64(), Some(4 * level["concurrency"].as_u64().unwrap()));
        for key in [
            "aggregate_decode_tokens_per_s",
            "aggregate_tokens_per_s",
            "ttft_ms_p50",
            "ttft_ms_p99",
            "itl_ms_p50",
            "itl_ms_p99",
        ] {
            assert!(level[key].as_f64().unwrap() > 0.0, "{key}: {level}");
        }
        assert!(level["ttft_ms_p99"].as_f64() >= level["ttft_ms_p50"].as_f64());
        // Two rounds, each level's rates in each; the median is one of them.
        for key in ["aggregate_decode_tokens_per_s", "aggregate_tokens_per_s"] {
            let rates: Vec<f64> =
                level[format!("{key}_runs")].as_array().unwrap().iter().map(|r| r.as_f64().unwrap()).collect();
            assert_eq!((level["runs"].as_u64(), rates.len()), (Some(2), 2));
            assert!(rates.contains(&level[key].as_f64().unwrap()));
        }
    }
    // The ratios to the first level, per round, beside every later level.
    for key in ["decode_ratio_to_first_level", "overall_ratio_to_first_level"] {
        assert!(levels[0][key].is_null());
        let ratios = levels[1][format!("{key}_runs")].as_array().unwrap();
        assert_eq!(ratios.len(), 2);
        assert!(ratios.iter().all(|r| r.as_f64().unwrap() > 0.0));
    }
    assert_fails(&["bench", "-m", &smollm2(), "--concurrency", "0"], "--concurrency levels must be at least 1");
    assert_fails(&["bench", "-m", &smollm2(), "--concurrency", "1", "--runs", "0"], "--runs must be at least 1");
}

#[test]
fn generate_stops_at_a_stop_string_and_checks_engine_flags() {
    let m = smollm2();
    let args = ["-p", "The capital of France is", "-n", "16", "--temperature", "0"];
    let full = generate_json(&m, &args);
    let text = full["text"].as_str().unwrap();
    // Cut at the first "." of the greedy text: the text ends before it.
    let cut = generate_json(&m, &[&args[..], &["--stop", "."]].concat());
    assert_eq!(cut["text"].as_str().unwrap(), &text[..text.find('.').unwrap()]);
    assert_eq!(cut["finish_reason"], "stop");
    assert_fails(&["generate", "-m", &m, "-p", "hi", "--max-seqs", "600"], "cannot all decode within a batch");
    assert_fails(&["generate", "-m", &m, "-p", "hi", "--kv-budget", "1KiB"], "KV budget");
    assert_fails(&["generate", "-m", &m, "-p", "hi", "--kv-budget", "900TB"], "more than the memory available");
    assert_fails(&["generate", "-m", &m, "-p", "hi", "--max-queue", "0"], "queue length");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let m = smollm2();
    assert_fails(&["generate", "-m", "/nonexistent.gguf", "-p", "hi"], "cannot read /nonexistent.gguf");
    let cargo_toml = root().join("Cargo.toml").display().to_string();
    assert_fails(&["generate", "-m", &cargo_toml, "-p", "hi"], "not a GGUF file");
    assert_fails(&["info", &cargo_toml], "not a GGUF file");
    // A valid GGUF of an architecture Air does not implement.
    let dir = tempfile::tempdir().unwrap();
    let mamba = dir.path().join("mamba.gguf");
    let md = [("general.architecture".to_string(), air_gguf::Value::String("mamba".into()))];
    std::fs::write(&mamba, air_gguf::GgufWriter::new(Vec::new(), &md, vec![]).unwrap().finish().unwrap()).unwrap();
    assert_fails(&["generate", "-m", mamba.to_str().unwrap(), "-p", "hi"], "unsupported architecture \"mamba\"");
    let info = json(&air(&["info", mamba.to_str().unwrap(), "--format", "json"]));
    assert_eq!(info["supported"], false);
    assert_fails(
        &["generate", "-m", &m, "-p", "one two three four", "-c", "3"],
        "does not fit the context of 3 tokens",
    );
    assert_fails(&["generate", "-m", &m, "-p", "hi", "--temperature", "-1"], "temperature");
    assert_fails(&["generate", "-m", &m, "-p", ""], "the prompt is empty");
    assert_fails(&["bench", "-m", &m, "--runs", "0"], "--runs");
    assert_fails(&["perplexity", "-m", &m, "-f", "/nonexistent.txt"], "cannot read /nonexistent.txt");
    assert_fails(&["perplexity", "-m", &m, "-f", &cargo_toml, "-c", "100000"], "larger than the model's context");
}

#[test]
fn truncated_model_is_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(smollm2()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&["generate", "-m", cut.to_str().unwrap(), "-p", "hi"], "lies outside the file");
}

/// `air perplexity` on tests/reference/GPL-3.txt against llama.cpp's value for the same settings
/// (512-token windows over the whole text, 14 of them). The acceptance asks for 0.5%; Air
/// computes as llama.cpp does, so the value equals the reference's four printed decimals.
fn check_perplexity(model_name: &str) {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference/perplexity.json")).unwrap())
            .unwrap();
    let case = reference
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["model"] == model_name && c["ctx"] == 512 && c["chunks"] == 14)
        .unwrap();
    let text = root().join("tests/reference/GPL-3.txt").display().to_string();
    let m = model(&format!("{model_name}.gguf"));
    let out = json(&air(&["perplexity", "-m", &m, "-f", &text, "-c", "512", "--format", "json"]));
    let (ours, theirs) = (out["ppl"].as_f64().unwrap(), case["ppl"].as_f64().unwrap());
    assert!((ours - theirs).abs() < 1e-4, "{model_name}: air {ours} vs llama.cpp {theirs}");
    assert_eq!(out["tokens_scored"], 14 * 255);
}

#[test]
fn perplexity_matches_llamacpp_smollm2() {
    check_perplexity("SmolLM2-135M-Instruct.Q4_1");
}

#[test]
fn perplexity_matches_llamacpp_qwen2() {
    check_perplexity("qwen2.5-coder-0.5b-instruct-q4_k_m");
}

#[test]
fn perplexity_matches_llamacpp_gemma3() {
    check_perplexity("gemma-3-270m-q4_k_m");
}

#[test]
fn prompt_file_is_read_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompt.txt");
    std::fs::write(&path, "The capital of France is").unwrap();
    let m = smollm2();
    let from_file = generate_json(&m, &["-f", path.to_str().unwrap(), "-n", "1"]);
    let inline = generate_json(&m, &["-p", "The capital of France is", "-n", "1"]);
    assert_eq!(from_file["prompt_tokens"], inline["prompt_tokens"]);
}

/// Writes a small synthetic model with `air synth` and returns its path (inside `dir`).
fn synth(dir: &tempfile::TempDir, ty: &str) -> String {
    let path = dir.path().join(format!("synth-{ty}.gguf")).display().to_string();
    let args = [
        "synth",
        "--layers",
        "6",
        "--hidden",
        "256",
        "--ffn",
        "768",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--vocab",
        "600",
        "--ctx",
        "256",
        "--type",
        ty,
        "-o",
        &path,
    ];
    let out = air(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    path
}

#[test]
fn synth_writes_a_model_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    for ty in ["q4_0", "q4_k", "q6_k", "f16"] {
        let path = synth(&dir, ty);
        let info = json(&air(&["info", &path, "--format", "json"]));
        assert_eq!(info["architecture"], "llama");
        assert_eq!(info["block_count"], 6);
        assert_eq!(info["vocab_size"], 600);
        assert_eq!(info["supported"], true);
        let out = generate_json(&path, &["-p", "hello synthetic world", "-n", "5", "--temperature", "0"]);
        assert_eq!(out["tokens"].as_array().unwrap().len(), 5, "{ty}");
    }
    // Same seed, same bytes; another seed, other weights.
    let again = dir.path().join("again.gguf").display().to_string();
    let args =
        ["--layers", "6", "--hidden", "256", "--ffn", "768", "--heads", "4", "--kv-heads", "2", "--vocab", "600"];
    air(&[&["synth"], &args[..], &["--ctx", "256", "--type", "q4_0", "-o", &again]].concat());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(dir.path().join("synth-q4_0.gguf")).unwrap());
    air(&[&["synth"], &args[..], &["--ctx", "256", "--type", "q4_0", "--seed", "1", "-o", &again]].concat());
    assert_ne!(std::fs::read(&again).unwrap(), std::fs::read(dir.path().join("synth-q4_0.gguf")).unwrap());
}

#[test]
fn synth_rejects_shapes_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.gguf").display().to_string();
    let base = ["synth", "--layers", "2", "--heads", "4", "-o", &out];
    assert_fails(&[&base[..], &["--hidden", "48", "--ffn", "256"]].concat(), "multiples of 32");
    assert_fails(&[&base[..], &["--hidden", "320", "--ffn", "256", "--type", "q4_k"]].concat(), "multiples of 256");
    assert_fails(&[&base[..], &["--hidden", "256", "--ffn", "256", "--kv-heads", "3"]].concat(), "KV heads");
    assert_fails(&[&base[..], &["--hidden", "256", "--ffn", "256", "--vocab", "100"]].concat(), "at least 259");
    assert_fails(&[&base[..], &["--hidden", "256", "--ffn", "256", "--type", "iq2_xs"]].concat(), "not supported");
    assert_fails(&[&base[..], &["--hidden", "256", "--ffn", "256", "--ctx", "4294967296"]].concat(), "32-bit");
    assert!(!std::path::Path::new(&out).exists());
}

#[test]
fn a_memory_budget_streams_layers_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(&dir, "q4_0");
    let bench = |budget: &str, batch: &str| {
        let args = ["bench", "-m", &path, "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1"];
        let out = air(&[&args[..], &["--memory-budget", budget, "--batch", batch, "--format", "json"]].concat());
        (json(&out), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (resident, note) = bench("1GiB", "1");
    assert_eq!(resident["streamed_layers"], 0);
    assert_eq!(resident["resident_layers"], 6);
    assert!(resident["streamed_bytes_per_step"].as_u64() == Some(0), "{resident}");
    assert!(note.is_empty(), "{note}");

    let (streamed, note) = bench("1MiB", "1");
    assert_eq!(streamed["streamed_layers"], 6);
    assert!(note.contains("6 streamed"), "{note}");
    // Each step reads every layer once: 6 layers of Q4_0 matrices and two f32 norms.
    let layer_bytes = (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768) / 32 * 18 + 2 * 256 * 4;
    assert_eq!(streamed["streamed_bytes_per_step"].as_u64(), Some(6 * layer_bytes));
    for key in ["peak_rss_bytes", "steady_rss_bytes", "stream_bytes_per_s", "decode_step_ms"] {
        assert!(streamed[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {streamed}");
    }
    let wait = streamed["io_wait_fraction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&wait), "{wait}");

    let (batched, _) = bench("1MiB", "4");
    assert_eq!(batched["batch"], 4);
    // Four sequences share each pass: one read of the layers per step, not four.
    assert_eq!(batched["streamed_bytes_per_step"], streamed["streamed_bytes_per_step"]);

    // The same greedy text either way.
    let text = |budget: &str| {
        generate_json(&path, &["-p", "streaming", "-n", "6", "--temperature", "0", "--memory-budget", budget])["tokens"]
            .clone()
    };
    assert_eq!(text("1MiB"), text("1GiB"));
}

#[test]
fn bad_streaming_flags_are_reported() {
    let m = smollm2();
    // A flag's value is checked by the argument parser, whose first line names the problem.
    let out = air(&["bench", "-m", &m, "--memory-budget", "12parsecs"]);
    assert!(!out.status.success());
    let first = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default().to_string();
    assert!(first.contains("\"12parsecs\" is not a size"), "{first}");
    assert_fails(&["bench", "-m", &m, "--batch", "0"], "--batch");
}

#[test]
fn device_flags_are_checked() {
    let m = smollm2();
    // The argument parser rejects unknown devices, naming the problem on its first line.
    let out = air(&["generate", "-m", &m, "-p", "Hi", "--device", "tpu"]);
    assert!(!out.status.success());
    let first = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default().to_string();
    assert!(first.contains("unknown device \"tpu\""), "{first}");
    let out = air(&["bench", "-m", &m, "--vram-budget", "lots"]);
    assert!(!out.status.success());
    assert_fails(&["bench", "-m", &m, "--device", "cpu", "--vram-budget", "1GiB"], "--vram-budget limits GPU memory");
    assert_fails(&["bench", "-m", &m, "--device", "cpu", "--gpu-numerics", "cpu"], "--gpu-numerics chooses how a GPU");
    let out = air(&["bench", "-m", &m, "--gpu-numerics", "exactish"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected fast or cpu"));
    let out = air(&["bench", "-m", &m, "--cpu-numerics", "exactish"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected ggml or fast"));
    // `air check` compares a GPU with the CPU: the CPU against itself is a mistake.
    assert_fails(&["check", "-m", &m, "--device", "cpu"], "give cuda or cuda:N");
    assert_fails(&["check", "-m", &m, "--device", "cuda", "--steps", "0"], "--steps");
    if cfg!(not(feature = "cuda")) {
        assert_fails(&["generate", "-m", &m, "-p", "Hi", "--device", "cuda:1"], "no CUDA support");
    }
    // Explicitly on the CPU, generation is the default build's (greedy: the default temperature
    // samples, and may sample the end of generation before the fourth token).
    let args = ["-p", "The capital of France is", "--max-tokens", "4", "--temperature", "0", "--device", "cpu"];
    let text = generate_json(&m, &args);
    assert_eq!(text["tokens"].as_array().map(Vec::len), Some(4));
    // The per-block integer kernels give the same greedy start here (a wide top-1 margin).
    let fast = [&args[..], &["--cpu-numerics", "fast"]].concat();
    if air_model::CpuNumerics::Fast.supported() {
        assert_eq!(generate_json(&m, &fast)["text"], text["text"]);
    } else {
        assert_fails(
            &[&["generate", "-m", &m][..], &fast].concat(),
            "--cpu-numerics fast needs an x86-64 CPU with AVX2",
        );
    }
}

/// One HTTP/1.1 exchange over a fresh connection: the status line and the body.
fn http(port: u16, request: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

#[test]
fn serve_answers_http_and_stops_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let model = format!("smol={}", smollm2());
    let mut server = Command::new(env!("CARGO_BIN_EXE_air"))
        .args(["serve", "-m", &model, "--port", &port.to_string(), "--kv-budget", "64MiB"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let health = "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let up = (0..300).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        http(port, health).is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    });
    assert!(up, "the server did not come up");
    let body = r#"{"model":"smol","prompt":"The capital of France is","max_tokens":8,"temperature":0}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = http(port, &request).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json: Value = serde_json::from_str(&answer[answer.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    // The same greedy text as `air generate` gives for the prompt.
    let generated = generate_json(&smollm2(), &["-p", "The capital of France is", "-n", "8", "--temperature", "0"]);
    assert_eq!(json["choices"][0]["text"], generated["text"]);
    let unknown = request.replace("\"smol\"", "\"nope\"");
    assert!(http(port, &unknown).unwrap().starts_with("HTTP/1.1 404"));
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    // The log: a line per HTTP request and per finished completion.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("http method=POST path=\"/v1/completions\" status=200"), "{log}");
    assert!(log.contains("status=404"), "{log}");
    assert!(
        log.contains("completion model=smol finish_reason=\"length\" prompt_tokens=5 completion_tokens=8"),
        "{log}"
    );
}
