//! `air info`: what a GGUF file holds.

use crate::cli::{Format, InfoArgs};
use air_gguf::{GgufFile, TensorType, Value};
use air_model::ModelConfig;
use anyhow::Result;
use serde_json::json;
use std::collections::BTreeMap;

pub fn run(args: InfoArgs) -> Result<()> {
    let file = GgufFile::open(&args.path)?;
    let md = file.metadata();
    let arch = md.get_str("general.architecture").unwrap_or("unknown");
    let name = md.opt(md.get_str("general.name"))?.unwrap_or("");
    let key = |k: &str| md.get(&format!("{arch}.{k}")).cloned();
    let tokens = md.get("tokenizer.ggml.tokens").and_then(Value::as_array).map_or(0, <[Value]>::len);
    let mut by_type: BTreeMap<TensorType, (usize, u64, u64)> = BTreeMap::new();
    for t in file.tensors() {
        let e = by_type.entry(t.ty).or_default();
        e.0 += 1;
        e.1 += t.size_bytes;
        e.2 += t.elements();
    }
    let params: u64 = file.tensors().iter().map(|t| t.elements()).sum();
    let tensor_bytes: u64 = file.tensors().iter().map(|t| t.size_bytes).sum();
    // Whether Air can run it: the model configuration must be complete and supported.
    let supported = ModelConfig::from_gguf(md).map(|_| ()).map_err(|e| e.to_string());
    let as_json = |v: Option<Value>| v.map_or(serde_json::Value::Null, |v| value_json(&v));
    let info = json!({
        "path": args.path.display().to_string(),
        "gguf_version": file.header().version,
        "file_size_bytes": file.file_size(),
        "architecture": arch,
        "name": name,
        "parameters": params,
        "tensor_bytes": tensor_bytes,
        "context_length": as_json(key("context_length")),
        "embedding_length": as_json(key("embedding_length")),
        "block_count": as_json(key("block_count")),
        "feed_forward_length": as_json(key("feed_forward_length")),
        "head_count": as_json(key("attention.head_count")),
        "head_count_kv": as_json(key("attention.head_count_kv")),
        "rope_freq_base": as_json(key("rope.freq_base")),
        "vocab_size": tokens,
        "tokenizer_model": as_json(md.get("tokenizer.ggml.model").cloned()),
        "tokenizer_pre": as_json(md.get("tokenizer.ggml.pre").cloned()),
        "chat_template": md.get("tokenizer.chat_template").is_some(),
        "supported": supported.is_ok(),
        "unsupported_reason": supported.err(),
        "tensor_count": file.tensors().len(),
        "tensors_by_type": by_type.iter().map(|(ty, (n, bytes, elems))| json!({
            "type": ty.to_string(), "count": n, "bytes": bytes, "elements": elems,
        })).collect::<Vec<_>>(),
    });
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        Format::Text => print_text(&info),
    }
    Ok(())
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::F32(_) | Value::F64(_) => json!(v.as_f64()),
        Value::Array(..) => json!(v.to_string()),
        _ => v.as_i64().map_or(json!(v.to_string()), |i| json!(i)),
    }
}

fn print_text(info: &serde_json::Value) {
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    for key in [
        "path",
        "gguf_version",
        "architecture",
        "name",
        "file_size_bytes",
        "parameters",
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "head_count",
        "head_count_kv",
        "rope_freq_base",
        "vocab_size",
        "tokenizer_model",
        "tokenizer_pre",
        "chat_template",
        "supported",
    ] {
        println!("{key:<22} {}", show(&info[key]));
    }
    if let Some(reason) = info["unsupported_reason"].as_str() {
        println!("{:<22} {reason}", "unsupported_reason");
    }
    println!("\n{:<10} {:>8} {:>14} {:>16}", "type", "tensors", "bytes", "elements");
    for row in info["tensors_by_type"].as_array().into_iter().flatten() {
        println!("{:<10} {:>8} {:>14} {:>16}", show(&row["type"]), row["count"], row["bytes"], row["elements"]);
    }
}
