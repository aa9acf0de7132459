//! Every flag of every subcommand, in one place.

use air_gguf::TensorType;
use air_model::{ComputeDevice, CpuNumerics, DeviceNumerics};
use air_stream::ByteSize;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Air runs GGUF language models on the CPU, streaming layers from disk when the model is larger
/// than memory.
#[derive(Parser, Debug)]
#[command(name = "air", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout as it is produced.
    Generate(GenerateArgs),
    /// Describe a GGUF file: architecture, sizes, tokenizer, tensors by type.
    Info(InfoArgs),
    /// Measure prompt-processing and generation speed (tokens/s) and peak memory.
    Bench(BenchArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Serve models over an OpenAI-compatible HTTP API (chat and text completions, models,
    /// health probes, Prometheus metrics at /metrics).
    Serve(ServeArgs),
    /// Write a synthetic model (random weights, small vocabulary) of any shape, for scale tests.
    Synth(SynthArgs),
    /// Check a GPU against the CPU: top-1 agreement and logit differences over greedy steps.
    Check(CheckArgs),
}

/// Output format of a command.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object, for machines.
    Json,
}

/// Options shared by every command that runs a model.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Path to a GGUF model file.
    #[arg(short, long, env = "AIR_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Where and with how much memory models compute.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Compute threads (default: all cores).
    #[arg(short, long, env = "AIR_THREADS")]
    pub threads: Option<usize>,
    /// Memory the model's weights may keep resident, e.g. 512MiB, 4GiB, 30GB (default: the
    /// memory available when the command starts). Layers beyond it are streamed from the file
    /// on every forward pass; the KV cache comes on top.
    #[arg(long, env = "AIR_MEMORY_BUDGET", value_name = "SIZE")]
    pub memory_budget: Option<ByteSize>,
    /// Streamed layers read ahead of the one computing (from disk into RAM, or from RAM into
    /// VRAM on a GPU).
    #[arg(long, env = "AIR_PREFETCH_DEPTH", default_value_t = 2, value_name = "LAYERS")]
    pub prefetch_depth: usize,
    /// Where to compute: cpu, cuda or cuda:N (default: the first GPU when this build has CUDA
    /// and one is present, else the CPU).
    #[arg(long, env = "AIR_DEVICE", value_name = "DEVICE")]
    pub device: Option<ComputeDevice>,
    /// GPU memory the model may take, e.g. 4GiB (default: the free GPU memory less a margin).
    /// Layers beyond it stay in host memory and stream into VRAM over PCIe on every pass,
    /// overlapped with compute.
    #[arg(long, env = "AIR_VRAM_BUDGET", value_name = "SIZE")]
    pub vram_budget: Option<ByteSize>,
    /// How a GPU rounds: fast (llama.cpp's CUDA rounding; logits differ from the CPU's in the
    /// last bits) or cpu (the CPU's arithmetic bit for bit, so the same text as --device cpu;
    /// slower; Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights).
    #[arg(long, env = "AIR_GPU_NUMERICS", default_value = "fast", value_name = "fast|cpu")]
    pub gpu_numerics: DeviceNumerics,
    /// How the CPU rounds the matmuls of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights and
    /// generation attention: ggml (llama.cpp's CPU order: its logits bit for bit) or fast (each
    /// block summed in integers, 16 outputs per AVX-512 register or 8 per AVX2 one, and
    /// attention's sums of values kept in f32 rather than f16: faster, most of all on batches,
    /// for serving many requests; perplexity as llama.cpp's, but greedy text may part from
    /// llama.cpp's sooner; needs an x86-64 CPU with AVX2).
    #[arg(long, env = "AIR_CPU_NUMERICS", default_value = "ggml", value_name = "ggml|fast")]
    pub cpu_numerics: CpuNumerics,
}

/// How the engine batches requests and sizes its KV cache.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Memory for the KV cache (f16 keys and values in blocks), e.g. 256MiB, 2GiB (default:
    /// for generate and bench, what their requests can use at most; for serve, 1GiB). Requests
    /// beyond it wait, or are preempted and computed again later.
    #[arg(long, env = "AIR_KV_BUDGET", value_name = "SIZE")]
    pub kv_budget: Option<ByteSize>,
    /// Tokens per engine step over all requests: one per generating request plus chunks of
    /// new prompts, so a long prompt never stalls the others for long.
    #[arg(long, env = "AIR_MAX_BATCH_TOKENS", default_value_t = 512, value_name = "TOKENS")]
    pub max_batch_tokens: usize,
    /// Requests generating at once (vLLM's --max-num-seqs, llama-server's --parallel).
    #[arg(long, env = "AIR_MAX_SEQS", default_value_t = 64, visible_alias = "max-num-seqs")]
    pub max_seqs: usize,
    /// Requests that may wait for a slot; beyond it new ones are refused as overloaded.
    #[arg(long, env = "AIR_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
    /// Token positions per KV-cache block.
    #[arg(long, env = "AIR_KV_BLOCK_SIZE", default_value_t = 16, value_name = "TOKENS")]
    pub kv_block_size: usize,
    /// Compute every prompt in full instead of reusing the KV cache of prefixes seen before.
    #[arg(long, env = "AIR_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// The prompt the greedy continuation starts from.
    #[arg(short, long, default_value = "The capital of France is")]
    pub prompt: String,
    /// Greedy steps to compare.
    #[arg(long, default_value_t = 256)]
    pub steps: usize,
    /// Fail when the share of positions whose top-1 token agrees is below this.
    #[arg(long, default_value_t = 0.99)]
    pub min_agreement: f64,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompt text (special tokens such as <|im_start|> written in it are recognised).
    #[arg(short, long, required_unless_present = "prompt_file", conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file instead.
    #[arg(short = 'f', long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Context size in tokens (default: the model's, capped at prompt + max tokens).
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// Sampling temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (not printed); repeatable.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// `text` streams the generated text; `json` prints one object with token ids, text and timings.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Path to a GGUF file.
    pub path: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Serving test instead of the single-stream one: for each level N (comma-separated, e.g.
    /// 1,4,16), N requests of --prompt-tokens distinct tokens each generate --gen-tokens
    /// through the engine at once; reports per level the aggregate tokens/s of the decode phase
    /// (after every prompt is processed) and overall (prompt processing included), time to
    /// first token and inter-token latency percentiles.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// Prompt length to process in one pass (0 skips the prompt test).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate one at a time (0 skips the generation test).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions of each test; the median is reported. With --concurrency the levels run in
    /// turn, once per round (1, 16, 1, 16, ...), and each later level also reports its ratio to
    /// the first level's rate of the same round (median over the rounds).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Sequences decoded together in the generation test: each step runs one token of every
    /// sequence through a single pass over the weights (tokens/s counts all of them).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// The text file to score.
    #[arg(short, long)]
    pub file: PathBuf,
    /// Tokens per window; each window is scored on its second half.
    #[arg(short = 'c', long, default_value_t = 512)]
    pub ctx: usize,
    /// Tokens per forward pass within a window (default: the whole window).
    #[arg(short, long)]
    pub batch: Option<usize>,
    /// Score at most this many windows (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Architecture of the model (only the llama family is generated).
    #[arg(long, default_value = "llama", value_parser = ["llama"])]
    pub arch: String,
    /// Transformer layers.
    #[arg(long)]
    pub layers: usize,
    /// Hidden (embedding) size.
    #[arg(long)]
    pub hidden: usize,
    /// Feed-forward size.
    #[arg(long)]
    pub ffn: usize,
    /// Attention heads.
    #[arg(long)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention; default: as many as heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Vocabulary size (at least 259: 3 special tokens and 256 bytes).
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    /// Context length written in the file.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Type of the weight matrices: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k..q6_k.
    #[arg(long = "type", default_value = "q4_0", value_parser = parse_tensor_type)]
    pub ty: TensorType,
    /// Seed of the pseudo-random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the GGUF file.
    #[arg(short, long)]
    pub out: PathBuf,
}

fn parse_tensor_type(name: &str) -> Result<TensorType, String> {
    TensorType::from_name(name).ok_or_else(|| format!("unknown tensor type {name:?}"))
}

/// A model to serve: `NAME=PATH`, or `PATH` (named after the file).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, path) = match s.split_once('=') {
            Some((name, path)) if !name.is_empty() && !name.contains('/') => (name.to_string(), PathBuf::from(path)),
            _ => {
                let path = PathBuf::from(s);
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                (stem, path)
            }
        };
        if name.is_empty() || path.as_os_str().is_empty() {
            return Err(format!("expected [NAME=]PATH, got {s:?}"));
        }
        Ok(Self { name, path })
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A model to serve, as NAME=PATH (NAME is the `model` of requests) or PATH (named after
    /// the file); repeatable. The first is listed first. The memory budget is shared evenly.
    #[arg(short, long = "model", value_name = "[NAME=]PATH", required = true, env = "AIR_MODEL")]
    pub models: Vec<ModelSpec>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, env = "AIR_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "AIR_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Accept only requests with `Authorization: Bearer KEY`; repeatable. Health probes stay open.
    #[arg(long = "api-key", env = "AIR_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Read more API keys from a file, one per line.
    #[arg(long, env = "AIR_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// A Jinja chat template for every served model, instead of the one in the GGUF file.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, seconds to let requests in flight finish before stopping.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_timeout: u64,
    /// Log lines on stderr as text or as one JSON object per line (for log collectors). The
    /// level comes from AIR_LOG (e.g. `info`, `warn,air_gateway=debug`; default `info`): at
    /// `info`, one line per HTTP request and one per finished completion.
    #[arg(long, env = "AIR_LOG_FORMAT", value_enum, default_value_t = Format::Text)]
    pub log_format: Format,
}
