//! `air synth`: a synthetic GGUF model of any shape, written as a stream.

use crate::cli::SynthArgs;
use air_model::SynthSpec;
use air_stream::ByteSize;
use anyhow::{Context, Result};
use std::io::{BufWriter, IsTerminal, Write};
use std::time::Instant;

pub fn run(args: SynthArgs) -> Result<()> {
    let spec = SynthSpec {
        layers: args.layers,
        hidden: args.hidden,
        ffn: args.ffn,
        heads: args.heads,
        kv_heads: args.kv_heads.unwrap_or(args.heads),
        vocab: args.vocab,
        context: args.ctx,
        ty: args.ty,
        seed: args.seed,
    };
    spec.validate()?;
    let total = spec.data_bytes();
    let out = &args.out;
    let file = std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let start = Instant::now();
    let show = std::io::stderr().is_terminal();
    let mut last = 0u64;
    let result = spec.write(BufWriter::with_capacity(8 << 20, file), |written| {
        if show && (written - last > 1 << 30 || written == total) {
            last = written;
            eprint!("\rair synth: {} of {}", ByteSize::new(written), ByteSize::new(total));
            let _ = std::io::stderr().flush();
        }
    });
    if show {
        eprintln!();
    }
    if let Err(e) = result {
        let _ = std::fs::remove_file(out);
        return Err(e).with_context(|| format!("cannot write {}", out.display()));
    }
    let size = std::fs::metadata(out)?.len();
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}: {} layers, hidden {}, ffn {}, {} heads ({} KV), vocabulary {}, {}: {} in {seconds:.1} s ({}/s)",
        out.display(),
        spec.layers,
        spec.hidden,
        spec.ffn,
        spec.heads,
        spec.kv_heads,
        spec.vocab,
        spec.ty,
        ByteSize::new(size),
        ByteSize::new((size as f64 / seconds) as u64)
    );
    Ok(())
}
