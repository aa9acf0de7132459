//! Transformer architectures and their quantized forward pass on candle tensors.
//!
//! Weights stay in the GGUF memory map in their block format: no weight is copied at load, a
//! layer's bytes are read from the page cache when its matmuls run ([`Linear`]). Activations
//! are quantized exactly as ggml does and dotted with candle's block kernels; attention runs
//! over an f16 KV cache with ggml's flash-attention numerics. Other ops are candle tensor ops.

mod activation_quant;
mod attention;
mod block_dot;
mod config;
mod device;
mod error;
mod exp;
mod host;
mod kv_cache;
#[cfg(target_arch = "x86_64")]
mod libm_exp;
mod linear;
mod mapped;
mod model;
mod ops;
mod rope;
mod synth;
mod weights;

pub use attention::F32_QUERY_ROWS;
pub use config::{Activation, Architecture, ModelConfig, RopeScaling, RopeStyle, SlidingWindow};
pub use device::{ComputeDevice, DeviceNumerics, UploadStats};
pub use error::ModelError;
pub use kv_cache::KvCache;
pub use linear::{BATCHED_MATMUL_ROWS, CpuNumerics, Input, Linear};
pub use model::{LoadOptions, Logits, Model, PagedSequence, Sequence};
pub use synth::{SYNTH_TYPES, SynthSpec};
pub use weights::{LayerWeights, Weights};
