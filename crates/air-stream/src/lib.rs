//! S.L.I.P. (Slipstream Layer Inference Protocol) on the CPU: a model's weights stay in their
//! file mapping, and this crate decides which transformer layers stay resident within a memory
//! budget ([`ResidencyPlan`]) and streams the others through a prefetch window
//! ([`LayerStreamer`]): while layer N computes, the next D streamed layers are read in by a
//! background thread; after use, a streamed layer's pages are handed back to the kernel.
//!
//! ```no_run
//! use air_stream::{ByteSize, LayerStreamer, ResidencyPlan, StreamOptions};
//! # fn demo(map: std::sync::Arc<memmap2::Mmap>, layers: Vec<Vec<std::ops::Range<usize>>>) -> std::io::Result<()> {
//! let budget: ByteSize = "1GiB".parse().unwrap();
//! let sizes: Vec<u64> = layers.iter().map(|l| l.iter().map(|r| r.len() as u64).sum()).collect();
//! let plan = ResidencyPlan::new(&sizes, budget.bytes(), 2);
//! let streamer = LayerStreamer::new(map, layers, plan, StreamOptions::default())?;
//! for layer in 0..streamer.layers() {
//!     let _resident = streamer.acquire(layer)?; // waits until the layer's pages are in memory
//!     // ... compute with the layer's weights ...
//! } // each guard's drop releases a streamed layer
//! # Ok(()) }
//! ```

mod plan;
mod size;
mod streamer;

pub use plan::ResidencyPlan;
pub use size::{ByteSize, ByteSizeError, available_memory};
pub use streamer::{LayerGuard, LayerStreamer, Residency, StreamOptions, StreamStats};
