//! The paged KV cache: keys and values live in fixed-size blocks of a pool preallocated from a
//! byte budget; each sequence holds a block table (its blocks in position order) and attention
//! reads through it. Full blocks are content-addressed by the hash chain of their tokens, so a
//! request that shares a prefix with an earlier one reuses its blocks instead of recomputing.
//!
//! - [`KvStore`]: the data (f16 keys and values, per layer, per block).
//! - [`BlockPool`]: which blocks are free, in use (reference counts), or cached for reuse (LRU).
//! - [`BlockTable`]: one sequence's blocks, grown as it grows and registered in the prefix cache
//!   as they fill.
//!
//! ```
//! use air_kv::{BlockPool, BlockTable};
//! let mut pool = BlockPool::new(8, 4);
//! let prompt = [1, 2, 3, 4, 5, 6];
//! let mut first = BlockTable::new(0);
//! first.grow(&mut pool, prompt.len()).unwrap();
//! first.register_full(&mut pool, &prompt);
//! // A second sequence with the same first four tokens reuses the first block.
//! let mut second = BlockTable::new(0);
//! assert_eq!(second.reuse_prefix(&mut pool, &[1, 2, 3, 4, 9, 9]), 4);
//! assert_eq!(second.blocks()[0], first.blocks()[0]);
//! second.release(&mut pool);
//! first.release(&mut pool);
//! assert_eq!(pool.used(), 0);
//! ```

mod pool;
mod store;
mod table;

pub use pool::{BlockId, BlockPool, PoolStats};
pub use store::{KvShape, KvStore, LayerView};
pub use table::{BlockTable, OutOfBlocks};
