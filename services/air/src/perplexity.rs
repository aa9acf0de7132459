//! `air perplexity`: the text is tokenized once (with BOS as the model says), cut into
//! non-overlapping windows of `ctx` tokens, and each window is scored on its second half: the
//! negative log-likelihood of every token from position ctx/2 + 1 on, given all before it in the
//! window. Same windows, positions and estimate (with its ± error) as llama.cpp's llama-perplexity.

use crate::cli::{Format, PerplexityArgs};
use crate::loaded::Loaded;
use air_model::Logits;
use anyhow::{Context, Result, ensure};
use serde_json::json;
use std::io::Write;

pub fn run(args: PerplexityArgs) -> Result<()> {
    ensure!(args.ctx >= 4, "--ctx must be at least 4 tokens");
    let batch = args.batch.unwrap_or(args.ctx);
    ensure!(batch > 0, "--batch must be at least 1");
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let loaded = Loaded::open(&args.runtime)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    ensure!(
        args.ctx <= model.config().context_length,
        "--ctx {} is larger than the model's context ({})",
        args.ctx,
        model.config().context_length
    );
    let tokens = tokenizer.encode(&text, true)?;
    let available = tokens.len() / args.ctx;
    ensure!(available > 0, "the file has {} tokens, fewer than one window of {}", tokens.len(), args.ctx);
    let chunks = args.chunks.map_or(available, |c| c.min(available));
    let first = args.ctx / 2;
    let vocab = model.vocab_size();
    let mut cache = model.new_cache(args.ctx)?;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let text_out = args.format == Format::Text;
    let mut stdout = std::io::stdout().lock();
    for chunk in 0..chunks {
        let mut window = tokens[chunk * args.ctx..(chunk + 1) * args.ctx].to_vec();
        if let (true, Some(bos)) = (tokenizer.adds_bos(), tokenizer.bos()) {
            window[0] = bos;
        }
        cache.clear();
        // Logits of positions first.. only: rows of `logits` are positions first, first + 1, ...
        let mut logits = Vec::with_capacity((args.ctx - first) * vocab);
        for (index, part) in window.chunks(batch).enumerate() {
            let offset = index * batch;
            logits.extend(model.forward(part, &mut cache, Logits::From(first.saturating_sub(offset)))?);
        }
        for pos in first..args.ctx - 1 {
            let row = &logits[(pos - first) * vocab..(pos - first + 1) * vocab];
            let lp = -log_softmax_at(row, window[pos + 1] as usize);
            nll += lp;
            nll2 += lp * lp;
            count += 1;
        }
        if text_out {
            write!(stdout, "[{}]{:.4},", chunk + 1, (nll / count as f64).exp())?;
            stdout.flush()?;
        }
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let variance = nll2 / count as f64 - mean * mean;
    let error = if count > 1 && variance > 0.0 { (variance / (count - 1) as f64).sqrt() * ppl } else { 0.0 };
    if text_out {
        writeln!(stdout, "\nFinal estimate: PPL = {ppl:.4} +/- {error:.5}")?;
    } else {
        let report = json!({
            "ppl": ppl, "ppl_error": error, "chunks": chunks, "ctx": args.ctx,
            "tokens": tokens.len(), "tokens_scored": count,
        });
        writeln!(stdout, "{report}")?;
    }
    Ok(())
}

/// log softmax(row)[index], accumulated in f64.
fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}
