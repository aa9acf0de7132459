//! Opening a model file for a command: the GGUF mapping, its tokenizer, the forward pass.

use crate::cli::RuntimeArgs;
use air_gguf::GgufFile;
use air_model::Model;
use air_tokenizer::Tokenizer;
use anyhow::{Context, Result};

/// A model ready to run.
pub struct Loaded {
    pub file: GgufFile,
    pub tokenizer: Tokenizer,
    pub model: Model,
}

impl Loaded {
    /// Sets up the compute threads and loads the model named in `args`.
    pub fn open(args: &RuntimeArgs) -> Result<Self> {
        if let Some(n) = args.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot start compute threads")?;
        }
        let path = &args.model;
        let file = GgufFile::open(path)?;
        let model = Model::load(&file).with_context(|| format!("cannot load model {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(file.metadata())
            .with_context(|| format!("cannot load the tokenizer of {}", path.display()))?;
        Ok(Self { file, tokenizer, model })
    }

    /// Threads the forward pass runs on.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}
