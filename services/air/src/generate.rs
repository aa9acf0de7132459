//! `air generate`: text from a prompt, streamed to stdout.

use crate::cli::{Format, GenerateArgs};
use crate::generation::generate;
use crate::loaded::Loaded;
use crate::serving::with_engine;
use air_engine::Request;
use air_sampling::SamplingParams;
use air_tokenizer::{ChatMessage, ChatTemplate};
use anyhow::{Context, Result, bail};
use std::io::Write;

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        penalty_last_n: args.repeat_last_n,
        seed: args.seed,
        ..SamplingParams::default()
    };
    params.validate()?;
    let loaded = Loaded::open(&args.runtime)?;
    let prompt = prompt_tokens(&loaded, &args)?;
    let context_length = loaded.model.config().context_length;
    let ctx = args.ctx_size.unwrap_or(context_length);
    if ctx == 0 || ctx > context_length {
        bail!("--ctx-size {ctx} is outside 1..={context_length}, the model's context length");
    }
    if prompt.len() >= ctx {
        bail!("the prompt has {} tokens, which does not fit the context of {ctx} tokens", prompt.len());
    }
    let max_tokens = args.max_tokens.min(ctx - prompt.len());
    let stream = args.format == Format::Text;
    let positions = prompt.len() + max_tokens;
    let request = Request {
        sampling: params,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..Request::new(prompt, max_tokens)
    };
    let result = with_engine(loaded, &args.engine, 1, positions, async |engine| {
        let mut stdout = std::io::stdout().lock();
        generate(&engine, request, |piece| {
            if stream && !piece.is_empty() {
                // A closed stdout (e.g. `| head`) ends the output, not the process with a panic.
                let _ = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush());
            }
        })
        .await
    })?;
    let mut stdout = std::io::stdout().lock();
    if stream {
        let _ = writeln!(stdout);
    } else {
        serde_json::to_writer(&mut stdout, &result)?;
        writeln!(stdout)?;
    }
    Ok(())
}

fn prompt_text(args: &GenerateArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => Ok(text.clone()),
        (None, Some(path)) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display())),
        (None, None) => bail!("give a prompt with --prompt or --prompt-file"),
    }
}

fn prompt_tokens(loaded: &Loaded, args: &GenerateArgs) -> Result<Vec<u32>> {
    let tok = &loaded.tokenizer;
    let prompt = prompt_text(args)?;
    let ids = if args.chat {
        let template = ChatTemplate::from_gguf(loaded.file.metadata(), tok)?
            .context("this model has no chat template (tokenizer.chat_template); run without --chat")?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        template.encode(tok, &messages)?
    } else {
        tok.encode(&prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(ids)
}
