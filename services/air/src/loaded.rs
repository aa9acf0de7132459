//! Opening a model file for a command: the GGUF mapping, its tokenizer, the forward pass.

use crate::cli::{ComputeArgs, RuntimeArgs};
use air_gguf::GgufFile;
use air_model::{ComputeDevice, CpuNumerics, DeviceNumerics, LoadOptions, Model};
use air_stream::{ByteSize, available_memory};
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
        start_threads(&args.compute)?;
        Self::open_path(&args.model, &args.compute, 1)
    }

    /// Loads the model at `path` with a `1 / shares` part of the memory budget.
    pub fn open_path(path: &std::path::Path, args: &ComputeArgs, shares: u64) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let budget = args.memory_budget.or_else(available_memory).map(|b| ByteSize::new(b.bytes() / shares.max(1)));
        let device = args.device.unwrap_or_else(ComputeDevice::preferred);
        anyhow::ensure!(
            device != ComputeDevice::Cpu || args.vram_budget.is_none(),
            "--vram-budget limits GPU memory, but the model runs on the CPU (use --device cuda, or --memory-budget)"
        );
        anyhow::ensure!(
            device != ComputeDevice::Cpu || args.gpu_numerics == DeviceNumerics::Fast,
            "--gpu-numerics chooses how a GPU rounds, but the model runs on the CPU (use --device cuda)"
        );
        anyhow::ensure!(
            device == ComputeDevice::Cpu || args.cpu_numerics == CpuNumerics::Ggml,
            "--cpu-numerics chooses how the CPU rounds, but the model runs on {device} (use --device cpu)"
        );
        anyhow::ensure!(
            args.cpu_numerics.supported(),
            "--cpu-numerics fast needs an x86-64 CPU with AVX2, which this build is not for (use --cpu-numerics ggml)"
        );
        let options = LoadOptions {
            memory_budget: budget.map(ByteSize::bytes),
            prefetch_depth: args.prefetch_depth,
            device,
            vram_budget: args.vram_budget.map(ByteSize::bytes),
            device_numerics: args.gpu_numerics,
            cpu_numerics: args.cpu_numerics,
        };
        let model =
            Model::load_with(&file, options).with_context(|| format!("cannot load model {}", path.display()))?;
        if let Some(plan) = model.vram_plan().filter(|p| p.streamed_count() > 0) {
            eprintln!(
                "air: {device}: {} of {} layers resident in VRAM, {} streamed over PCIe ({} per pass, {} layers ahead)",
                plan.pinned_count(),
                plan.layers(),
                plan.streamed_count(),
                ByteSize::new(model.device_streamed_bytes_per_pass()),
                plan.depth()
            );
            if !plan.fits_budget() {
                eprintln!(
                    "air: warning: the VRAM budget leaves {} for layers (after the output head and a 512 MiB workspace), less than the streaming window of {}",
                    ByteSize::new(plan.budget()),
                    ByteSize::new(plan.window_bytes())
                );
            }
        }
        let plan = model.streamer().plan();
        if plan.streamed_count() > 0 {
            let budget = budget.map(|b| b.to_string()).unwrap_or_default();
            eprintln!(
                "air: memory budget {budget}: {} of {} layers resident, {} streamed ({} per pass, {} layers read ahead)",
                plan.pinned_count(),
                plan.layers(),
                plan.streamed_count(),
                ByteSize::new(model.streamer().streamed_bytes_per_pass()),
                plan.depth()
            );
            if !plan.fits_budget() {
                eprintln!(
                    "air: warning: the budget leaves {} for layers (after embeddings and output head), less than the streaming window of {}",
                    ByteSize::new(plan.budget()),
                    ByteSize::new(plan.window_bytes())
                );
            }
        }
        let tokenizer = Tokenizer::from_gguf(file.metadata())
            .with_context(|| format!("cannot load the tokenizer of {}", path.display()))?;
        Ok(Self { file, tokenizer, model })
    }

    /// The name requests use for this model: the file name without extension.
    pub fn file_stem(&self) -> String {
        self.file.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Threads the forward pass runs on.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}

/// Sizes the compute pool (`--threads`); call once, before loading models.
pub fn start_threads(args: &ComputeArgs) -> Result<()> {
    if let Some(n) = args.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot start compute threads")?;
    }
    Ok(())
}
