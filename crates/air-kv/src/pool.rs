use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Index of a block in the pool (and in the [`crate::KvStore`] beside it).
pub type BlockId = u32;

/// The tokens a cached block holds, and the hash of everything before them.
struct Content {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

/// Counters of the pool since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_query_tokens: u64,
    /// Of those, tokens found cached (not computed again).
    pub prefix_hit_tokens: u64,
    /// Cached blocks dropped to make room.
    pub evictions: u64,
}

/// Bookkeeping of a pool of KV blocks: reference counts, the free list, and the prefix cache.
///
/// A block is *in use* while some sequence holds it (reference count > 0). A full block whose
/// content was registered stays *cached* when released: it can be found again by the hash chain
/// of its tokens until the pool needs the room, least recently released first.
pub struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    content: Vec<Option<Content>>,
    by_hash: HashMap<u64, BlockId>,
    /// Unreferenced blocks without content.
    free: Vec<BlockId>,
    /// Unreferenced cached blocks by release time (oldest first), and each one's time.
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    clock: u64,
    used: usize,
    stats: PoolStats,
}

impl BlockPool {
    /// A pool of `blocks` blocks of `block_size` positions, all free.
    pub fn new(blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "blocks hold at least one position");
        Self {
            block_size,
            refs: vec![0; blocks],
            content: (0..blocks).map(|_| None).collect(),
            by_hash: HashMap::new(),
            free: (0..blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            used: 0,
            stats: PoolStats::default(),
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn capacity(&self) -> usize {
        self.refs.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Blocks that can be handed out now (free, or cached and unreferenced).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Unreferenced blocks kept for their cached content.
    pub fn cached(&self) -> usize {
        self.evictable.len()
    }

    /// Counters since the pool was made.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// A block for one sequence (reference count 1): a free one, else the least recently
    /// released cached one, whose content is forgotten. `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(c) = self.content[b as usize].take() {
                    self.by_hash.remove(&c.hash);
                }
                self.stats.evictions += 1;
                b
            }
        };
        self.refs[block as usize] = 1;
        self.used += 1;
        Some(block)
    }

    /// One more holder of `block`.
    fn retain(&mut self, block: BlockId) {
        let refs = &mut self.refs[block as usize];
        if *refs == 0 {
            self.evictable.remove(&self.released_at[block as usize]);
            self.used += 1;
        }
        *refs += 1;
    }

    /// One holder less of `block`; at zero it becomes cached (with content) or free.
    pub fn release(&mut self, block: BlockId) {
        let refs = &mut self.refs[block as usize];
        assert!(*refs > 0, "block {block} released more often than held");
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        self.used -= 1;
        if self.content[block as usize].is_some() {
            self.clock += 1;
            self.released_at[block as usize] = self.clock;
            self.evictable.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    /// The cached block holding `tokens` after the prefix hashed `parent`, retained for the
    /// caller, with its hash.
    pub(crate) fn lookup(&mut self, parent: u64, tokens: &[u32]) -> Option<(BlockId, u64)> {
        let hash = chain_hash(parent, tokens);
        let &block = self.by_hash.get(&hash)?;
        let c = self.content[block as usize].as_ref()?;
        // The hash only finds the candidate: the tokens and what came before must match.
        if c.parent != parent || *c.tokens != *tokens {
            return None;
        }
        self.retain(block);
        Some((block, hash))
    }

    /// Records that `block` (full, written) holds `tokens` after the prefix hashed `parent`;
    /// returns the hash of the prefix through it. A block with the same content already
    /// cached wins: this one stays uncached.
    pub(crate) fn register(&mut self, block: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        let hash = chain_hash(parent, tokens);
        if !self.by_hash.contains_key(&hash) && self.content[block as usize].is_none() {
            self.by_hash.insert(hash, block);
            self.content[block as usize] = Some(Content { hash, parent, tokens: tokens.into() });
        }
        hash
    }

    /// Counts a prefix lookup of `query` tokens of which `hit` were found.
    pub(crate) fn count_lookup(&mut self, query: usize, hit: usize) {
        self.stats.prefix_query_tokens += query as u64;
        self.stats.prefix_hit_tokens += hit as u64;
    }
}

/// The hash of a prefix: that of everything before (`parent`) chained with a block's tokens.
fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_evicted_least_recently_released_first() {
        let mut pool = BlockPool::new(3, 2);
        let blocks: Vec<_> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.used(), 3);
        let h0 = pool.register(blocks[0], 0, &[1, 2]);
        pool.register(blocks[1], h0, &[3, 4]);
        pool.release(blocks[1]);
        pool.release(blocks[0]);
        pool.release(blocks[2]);
        assert_eq!((pool.used(), pool.available(), pool.cached()), (0, 3, 2));
        // The uncached block goes first, then the cached one released first (blocks[1]).
        assert_eq!(pool.allocate(), Some(blocks[2]));
        assert_eq!(pool.allocate(), Some(blocks[1]));
        assert_eq!(pool.stats().evictions, 1);
        // blocks[0] is still found by its content; blocks[1]'s content is gone.
        assert_eq!(pool.lookup(0, &[1, 2]), Some((blocks[0], h0)));
        assert_eq!(pool.lookup(h0, &[3, 4]), None);
        // The same tokens after another prefix are another block.
        assert_eq!(pool.lookup(7, &[1, 2]), None);
    }

    #[test]
    #[should_panic(expected = "released more often than held")]
    fn releasing_a_free_block_is_a_bug() {
        let mut pool = BlockPool::new(1, 4);
        let b = pool.allocate().unwrap();
        pool.release(b);
        pool.release(b);
    }
}
