//! The scheduler's state machine, without actors or a model: waiting and running queues, KV
//! block accounting, and the plan of each step (plain data for the model runner).
//!
//! A request's lifecycle: waiting -> running (prompt chunks, then one token per step) ->
//! finished; a running sequence may be preempted (its blocks freed, back to the front of the
//! waiting queue, computed again on readmission) when the pool runs out of blocks.

use crate::request::EngineError;
use air_kv::{BlockId, BlockPool, BlockTable};
use air_model::{BATCHED_MATMUL_ROWS, F32_QUERY_ROWS};
use std::collections::VecDeque;
use std::time::Duration;

/// A request's number in its scheduler.
pub type SeqId = u64;

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per step over all sequences (decode tokens plus prompt chunks): the cap on a
    /// step's work, so a long prompt never stalls running decodes for long.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting for admission; beyond it submissions fail fast as overloaded.
    pub max_waiting: usize,
    /// Reuse the KV blocks of prompt prefixes computed before.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_batch_tokens: 512, max_running: 64, max_waiting: 1024, prefix_caching: true }
    }
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEntry {
    pub id: SeqId,
    /// Position of the first token (the ones before are in the cache).
    pub start: usize,
    pub tokens: Vec<u32>,
    /// The sequence's block table, covering `start + tokens.len()` positions.
    pub blocks: Vec<BlockId>,
    /// The sequence's prompt length (see `air_model::PagedSequence`).
    pub prompt_len: usize,
    /// This chunk reaches the sequence's last token: sample the next one from its logits.
    pub sample: bool,
}

/// The work of one step: plain data handed to the model runner.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub entries: Vec<StepEntry>,
    /// Sequences that ended since the last plan: the runner drops their state.
    pub finished: Vec<SeqId>,
}

/// A sequence as the scheduler sees it.
#[derive(Debug)]
struct Seq {
    id: SeqId,
    /// Prompt then generated tokens; while decoding, the last one is not computed yet.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
    /// Prompt tokens found in the prefix cache at first admission.
    cached_tokens: Option<usize>,
    preemptions: usize,
}

impl Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

/// Counters and gauges of a scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Unreferenced blocks kept for their prefix.
    pub kv_blocks_cached: usize,
    pub block_size: usize,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Tokens run through the model (prompt chunks, recomputation and decode tokens).
    pub computed_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Time the compute thread spent in the model's passes, and sampling, over all steps
    /// (filled in by the scheduler's actor).
    pub forward_time: Duration,
    pub sampling_time: Duration,
}

/// Waiting and running sequences over one block pool.
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    /// FIFO; preempted sequences go back to the front.
    waiting: VecDeque<Seq>,
    /// In admission order.
    running: Vec<Seq>,
    finished: Vec<SeqId>,
    computed_tokens: u64,
    preemptions: u64,
    steps: u64,
}

impl Scheduler {
    /// A scheduler over `kv_blocks` blocks of `block_size` positions.
    pub fn new(config: SchedulerConfig, kv_blocks: usize, block_size: usize) -> Self {
        Self {
            config,
            pool: BlockPool::new(kv_blocks, block_size),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            computed_tokens: 0,
            preemptions: 0,
            steps: 0,
        }
    }

    /// Positions the whole pool holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.pool.capacity() * self.pool.block_size()
    }

    /// Queues a request whose sequence may grow to `max_len` tokens.
    pub fn admit(&mut self, id: SeqId, prompt: Vec<u32>, max_len: usize) -> Result<(), EngineError> {
        if self.waiting.len() >= self.config.max_waiting {
            return Err(EngineError::Overloaded { waiting: self.waiting.len() });
        }
        // Alone, any admitted sequence can finish: preemption frees all the others' blocks.
        if max_len > self.kv_capacity_tokens() {
            return Err(EngineError::KvTooSmall { needed: max_len, capacity: self.kv_capacity_tokens() });
        }
        let prompt_len = prompt.len();
        // Cached blocks are shared only between prompts computed with the same arithmetic.
        let seed = (prompt_len >= F32_QUERY_ROWS) as u64 + (prompt_len >= BATCHED_MATMUL_ROWS) as u64;
        self.waiting.push_back(Seq {
            id,
            tokens: prompt,
            prompt_len,
            computed: 0,
            table: BlockTable::new(seed),
            cached_tokens: None,
            preemptions: 0,
        });
        Ok(())
    }

    /// True while some sequence waits or runs.
    #[cfg(test)]
    fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// The next step's work, or `None` when there is none.
    pub fn plan(&mut self) -> Option<StepPlan> {
        let mut budget = self.config.max_batch_tokens;
        let mut entries = Vec::new();
        // 1. One token for every decoding sequence; preempt the latest admitted ones while the
        //    pool cannot hold them all.
        loop {
            let needed: usize = self
                .running
                .iter()
                .filter(|s| s.pending() == 1)
                .map(|s| s.table.blocks_needed(&self.pool, s.computed + 1))
                .sum();
            if needed <= self.pool.available() || self.running.len() <= 1 {
                break;
            }
            self.preempt_last();
        }
        for i in 0..self.running.len() {
            if self.running[i].pending() == 1 && budget > 0 && self.grow(i, 1) {
                entries.push(self.entry(i, 1));
                budget -= 1;
            }
        }
        // 2. The next chunk of prompts already running, in admission order.
        for i in 0..self.running.len() {
            let pending = self.running[i].pending();
            if pending > 1 && budget > 0 {
                let n = self.fit(i, pending.min(budget), 0);
                if n > 0 && self.grow(i, n) {
                    entries.push(self.entry(i, n));
                    budget -= n;
                }
            }
        }
        // 3. Admit waiting sequences in order while the budget and the pool allow; keep one
        //    free block per running sequence so that admissions do not force preemptions.
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if self.config.prefix_caching && seq.table.blocks().is_empty() {
                let hit = seq.table.reuse_prefix(&mut self.pool, &seq.tokens[..seq.prompt_len]);
                seq.computed = hit;
                seq.cached_tokens.get_or_insert(hit);
            }
            seq.cached_tokens.get_or_insert(0);
            self.running.push(seq);
            let i = self.running.len() - 1;
            let headroom = self.running.len() - 1;
            let pending = self.running[i].pending();
            let n = self.fit(i, pending.min(budget), headroom);
            if n == 0 || !self.grow(i, n) {
                let mut seq = self.running.pop().expect("just pushed");
                seq.table.release(&mut self.pool);
                seq.computed = 0;
                self.waiting.push_front(seq);
                break;
            }
            entries.push(self.entry(i, n));
            budget -= n;
        }
        if entries.is_empty() {
            return None;
        }
        self.steps += 1;
        Some(StepPlan { entries, finished: std::mem::take(&mut self.finished) })
    }

    /// Tokens of a chunk of up to `n` for running sequence `i` that the free blocks can hold,
    /// leaving `headroom` blocks free.
    fn fit(&self, i: usize, n: usize, headroom: usize) -> usize {
        let s = &self.running[i];
        let bs = self.pool.block_size();
        let blocks = (s.table.blocks().len() + self.pool.available().saturating_sub(headroom)) * bs;
        n.min(blocks.saturating_sub(s.computed))
    }

    fn grow(&mut self, i: usize, n: usize) -> bool {
        let s = &mut self.running[i];
        s.table.grow(&mut self.pool, s.computed + n).is_ok()
    }

    fn entry(&self, i: usize, n: usize) -> StepEntry {
        let s = &self.running[i];
        let start = s.computed;
        StepEntry {
            id: s.id,
            start,
            tokens: s.tokens[start..start + n].to_vec(),
            blocks: s.table.blocks().to_vec(),
            prompt_len: s.prompt_len,
            sample: start + n == s.tokens.len(),
        }
    }

    /// Frees the blocks of the most recently admitted running sequence and queues it first.
    fn preempt_last(&mut self) {
        let Some(mut seq) = self.running.pop() else { return };
        seq.table.release(&mut self.pool);
        seq.computed = 0;
        seq.preemptions += 1;
        self.preemptions += 1;
        tracing::debug!(id = seq.id, "preempted: KV blocks ran out");
        self.waiting.push_front(seq);
    }

    /// Records that `plan` ran: its tokens are in the cache, and full prompt blocks are
    /// registered in the prefix cache.
    pub fn complete(&mut self, plan: &StepPlan) {
        for e in &plan.entries {
            let Some(s) = self.running.iter_mut().find(|s| s.id == e.id) else { continue };
            s.computed = e.start + e.tokens.len();
            self.computed_tokens += e.tokens.len() as u64;
            if self.config.prefix_caching {
                let written = s.computed.min(s.prompt_len);
                s.table.register_full(&mut self.pool, &s.tokens[..written]);
            }
        }
    }

    /// Appends a sampled token to running sequence `id`.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// Ends sequence `id` (running or waiting) and frees its blocks. Returns its prompt tokens
    /// found in the prefix cache and its preemptions, or `None` if it is unknown.
    pub fn finish(&mut self, id: SeqId) -> Option<(usize, usize)> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i).expect("found")
        };
        seq.table.release(&mut self.pool);
        self.finished.push(id);
        Some((seq.cached_tokens.unwrap_or(0), seq.preemptions))
    }

    /// Gauges and counters now.
    pub fn stats(&self) -> SchedulerStats {
        let pool = self.pool.stats();
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_total: self.pool.capacity(),
            kv_blocks_used: self.pool.used(),
            kv_blocks_cached: self.pool.cached(),
            block_size: self.pool.block_size(),
            prefix_query_tokens: pool.prefix_query_tokens,
            prefix_hit_tokens: pool.prefix_hit_tokens,
            computed_tokens: self.computed_tokens,
            preemptions: self.preemptions,
            steps: self.steps,
            forward_time: Duration::ZERO,
            sampling_time: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_batch_tokens: usize) -> SchedulerConfig {
        SchedulerConfig { max_batch_tokens, max_running: 8, max_waiting: 4, prefix_caching: true }
    }

    /// Runs `plan`, then appends token 7 to every sequence that sampled.
    fn step(s: &mut Scheduler) -> StepPlan {
        let plan = s.plan().expect("work");
        s.complete(&plan);
        for e in plan.entries.iter().filter(|e| e.sample) {
            s.push_token(e.id, 7);
        }
        plan
    }

    #[test]
    fn decodes_go_first_and_prompts_are_chunked_by_the_budget() {
        let mut s = Scheduler::new(config(8), 16, 4);
        s.admit(1, vec![1; 3], 10).unwrap();
        let p = step(&mut s);
        assert_eq!((p.entries.len(), p.entries[0].tokens.len(), p.entries[0].sample), (1, 3, true));
        s.admit(2, vec![2; 20], 30).unwrap();
        // Sequence 1 decodes one token; sequence 2 gets the other 7 of the budget.
        let p = step(&mut s);
        let shape: Vec<_> = p.entries.iter().map(|e| (e.id, e.start, e.tokens.len(), e.sample)).collect();
        assert_eq!(shape, [(1, 3, 1, true), (2, 0, 7, false)]);
        let p = step(&mut s);
        let shape: Vec<_> = p.entries.iter().map(|e| (e.id, e.start, e.tokens.len(), e.sample)).collect();
        assert_eq!(shape, [(1, 4, 1, true), (2, 7, 7, false)]);
        assert_eq!(p.entries.iter().map(|e| e.prompt_len).collect::<Vec<_>>(), [3, 20]);
        let p = step(&mut s);
        assert_eq!(p.entries[1].tokens.len(), 6);
        assert!(p.entries[1].sample);
        assert_eq!(s.stats().computed_tokens, 3 + 8 + 8 + 7);
    }

    #[test]
    fn the_queue_is_bounded_and_oversized_requests_are_refused() {
        let mut s = Scheduler::new(config(8), 4, 4);
        assert_eq!(s.admit(9, vec![1; 4], 17), Err(EngineError::KvTooSmall { needed: 17, capacity: 16 }));
        for id in 0..4 {
            s.admit(id, vec![1; 4], 8).unwrap();
        }
        assert_eq!(s.admit(4, vec![1; 4], 8), Err(EngineError::Overloaded { waiting: 4 }));
    }

    #[test]
    fn running_out_of_blocks_preempts_the_latest_and_everything_finishes() {
        // 4 blocks of 4: two sequences of 6 prompt tokens fit, but not both grown to 16.
        let mut s = Scheduler::new(config(64), 4, 4);
        s.admit(1, vec![1; 6], 14).unwrap();
        s.admit(2, vec![2; 6], 14).unwrap();
        let mut finished = Vec::new();
        for _ in 0..200 {
            if !s.has_work() {
                break;
            }
            let plan = step(&mut s);
            for e in &plan.entries {
                let len = s.running.iter().find(|q| q.id == e.id).map(|q| q.tokens.len());
                if e.sample && len == Some(14) {
                    s.finish(e.id);
                    finished.push(e.id);
                }
            }
            assert!(s.pool.used() <= 4);
        }
        finished.sort();
        assert_eq!(finished, [1, 2]);
        assert!(s.stats().preemptions > 0);
        assert_eq!(s.pool.used(), 0);
    }

    #[test]
    fn a_shared_prompt_prefix_is_computed_once() {
        let mut s = Scheduler::new(config(512), 64, 16);
        let prefix: Vec<u32> = (0..100).collect();
        s.admit(1, prefix.iter().copied().chain([500, 501]).collect(), 200).unwrap();
        step(&mut s);
        s.finish(1);
        s.admit(2, prefix.iter().copied().chain([600, 601, 602]).collect(), 200).unwrap();
        let p = step(&mut s);
        // 6 full blocks (96 tokens) reused; the second prompt's last 7 tokens computed.
        assert_eq!((p.entries[0].start, p.entries[0].tokens.len()), (96, 7));
        assert_eq!(p.entries[0].prompt_len, 103);
        assert_eq!(s.finish(2), Some((96, 0)));
        assert_eq!(s.pool.used(), 0);
    }
}
