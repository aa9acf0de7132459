use crate::{BlockId, BlockPool};

/// The pool has too few blocks for what a sequence needs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache needs {needed} more blocks, {available} are available")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub available: usize,
}

/// One sequence's blocks in position order, and how far its full blocks are registered in the
/// prefix cache.
#[derive(Debug, Default)]
pub struct BlockTable {
    /// The root of the hash chain: sequences reuse each other's blocks only under the same seed
    /// (e.g. the numerics the blocks were computed with).
    seed: u64,
    blocks: Vec<BlockId>,
    /// Leading blocks registered (or found) in the prefix cache, and the hash through them.
    registered: usize,
    chain: u64,
}

impl BlockTable {
    /// An empty table whose prefix hashes start from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, blocks: Vec::new(), registered: 0, chain: seed }
    }

    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Takes the cached blocks holding the longest cached prefix of `tokens`, leaving at least
    /// one token to compute (its logits are needed). Returns how many tokens they hold. Only on
    /// an empty table.
    pub fn reuse_prefix(&mut self, pool: &mut BlockPool, tokens: &[u32]) -> usize {
        assert!(self.blocks.is_empty(), "prefix reuse starts a table");
        let bs = pool.block_size();
        let reusable = tokens.len().saturating_sub(1) / bs;
        for chunk in tokens.chunks_exact(bs).take(reusable) {
            let Some((block, hash)) = pool.lookup(self.chain, chunk) else { break };
            self.blocks.push(block);
            self.chain = hash;
        }
        self.registered = self.blocks.len();
        let hit = self.blocks.len() * bs;
        pool.count_lookup(tokens.len(), hit);
        hit
    }

    /// Makes the table hold at least `len` positions, taking blocks from `pool`: all of them,
    /// or none when the pool has too few.
    pub fn grow(&mut self, pool: &mut BlockPool, len: usize) -> Result<(), OutOfBlocks> {
        let needed = len.div_ceil(pool.block_size()).saturating_sub(self.blocks.len());
        if needed > pool.available() {
            return Err(OutOfBlocks { needed, available: pool.available() });
        }
        for _ in 0..needed {
            let block = pool.allocate().expect("checked available blocks");
            self.blocks.push(block);
        }
        Ok(())
    }

    /// Blocks more that [`Self::grow`] to `len` positions would take.
    pub fn blocks_needed(&self, pool: &BlockPool, len: usize) -> usize {
        len.div_ceil(pool.block_size()).saturating_sub(self.blocks.len())
    }

    /// Registers every full block of `written` (the tokens whose keys and values are now in
    /// the store, from position 0) in the prefix cache.
    pub fn register_full(&mut self, pool: &mut BlockPool, written: &[u32]) {
        let bs = pool.block_size();
        let full = (written.len() / bs).min(self.blocks.len());
        for i in self.registered..full {
            self.chain = pool.register(self.blocks[i], self.chain, &written[i * bs..(i + 1) * bs]);
        }
        self.registered = self.registered.max(full);
    }

    /// Gives every block back to `pool` and empties the table.
    pub fn release(&mut self, pool: &mut BlockPool) {
        for block in self.blocks.drain(..) {
            pool.release(block);
        }
        self.registered = 0;
        self.chain = self.seed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_prefix_is_reused_and_survives_its_first_owner() {
        let mut pool = BlockPool::new(6, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::new(1);
        assert_eq!(a.reuse_prefix(&mut pool, &prompt), 0);
        a.grow(&mut pool, prompt.len()).unwrap();
        assert_eq!(a.blocks().len(), 3);
        a.register_full(&mut pool, &prompt);
        a.release(&mut pool);
        assert_eq!((pool.used(), pool.cached()), (0, 2));

        // Same 8 leading tokens: two blocks reused; under another seed, none.
        let mut other = prompt[..8].to_vec();
        other.extend([50, 51, 52]);
        let mut b = BlockTable::new(1);
        assert_eq!(b.reuse_prefix(&mut pool, &other), 8);
        let mut c = BlockTable::new(2);
        assert_eq!(c.reuse_prefix(&mut pool, &other), 0);
        // Exactly two full blocks of prompt: the last block is computed again, not reused.
        let mut d = BlockTable::new(1);
        assert_eq!(d.reuse_prefix(&mut pool, &prompt[..8]), 4);
        assert_eq!(pool.stats().prefix_hit_tokens, 12);
        for t in [&mut b, &mut c, &mut d] {
            t.release(&mut pool);
        }
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn growing_past_the_pool_takes_nothing() {
        let mut pool = BlockPool::new(2, 4);
        let mut a = BlockTable::new(0);
        a.grow(&mut pool, 5).unwrap();
        assert_eq!(a.grow(&mut pool, 13), Err(OutOfBlocks { needed: 2, available: 0 }));
        assert_eq!(a.blocks().len(), 2);
        assert_eq!(a.blocks_needed(&pool, 13), 2);
    }
}
