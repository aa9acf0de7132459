//! The model runner: a dedicated compute thread that owns the model and the KV store, runs each
//! step's plan as one batched pass and samples the next tokens. The async runtime never computes.

use crate::request::TokenLogprobs;
use crate::scheduler::{SeqId, StepPlan};
use air_kv::KvStore;
use air_model::{KvCache, Logits, Model, PagedSequence, Sequence};
use air_sampling::{Sampler, SamplingParams};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A token sampled for a sequence in a step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sampled {
    pub id: SeqId,
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// What a step took on the compute thread: the model's pass, then sampling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepTimes {
    pub forward: Duration,
    pub sampling: Duration,
}

/// The outcome of a step: a token for each sequence that sampled, and the times.
pub(crate) type StepResult = Result<(Vec<Sampled>, StepTimes), String>;

/// What the runner needs to know of a sequence before its first step.
pub(crate) struct SeqSetup {
    pub id: SeqId,
    /// The most positions the sequence may reach.
    pub max_len: usize,
    pub sampling: SamplingParams,
    pub logprobs: Option<usize>,
}

/// Work for the compute thread.
pub(crate) enum RunnerMsg {
    /// A new sequence's sampler.
    Setup(SeqSetup),
    /// A step; the result goes to the callback.
    Step(StepPlan),
}

/// Where keys and values live.
pub(crate) enum KvMemory {
    /// Blocks of one paged store, through each step's block tables (host models).
    Paged(KvStore),
    /// A cache per sequence, sized for its longest length (models on a GPU, until the paged
    /// cache runs there); the scheduler's blocks only account for it.
    PerSequence,
}

/// A sequence's state on the compute thread.
struct RunnerSeq {
    /// Its own cache, under [`KvMemory::PerSequence`].
    cache: Option<KvCache>,
    max_len: usize,
    sampler: Sampler,
    /// Every token so far (for penalties), rebuilt from the chunks the plans carry.
    history: Vec<u32>,
    logprobs: Option<usize>,
}

/// The model, its KV store and the samplers of the sequences.
pub(crate) struct Runner {
    model: Model,
    kv: KvMemory,
    seqs: HashMap<SeqId, RunnerSeq>,
}

impl Runner {
    pub fn new(model: Model, kv: KvMemory) -> Self {
        Self { model, kv, seqs: HashMap::new() }
    }

    /// Starts the compute thread; each step's plan and result go to `done`. The thread ends,
    /// dropping the model, when the sender is dropped or `done` returns false.
    pub fn spawn(
        mut self,
        done: impl Fn(StepPlan, StepResult) -> bool + Send + 'static,
    ) -> std::io::Result<(mpsc::Sender<RunnerMsg>, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<RunnerMsg>();
        let thread = std::thread::Builder::new().name("air-compute".into()).spawn(move || {
            while let Ok(msg) = rx.recv() {
                match msg {
                    RunnerMsg::Setup(setup) => self.setup(setup),
                    RunnerMsg::Step(plan) => {
                        let result = self.step(&plan);
                        if !done(plan, result) {
                            break;
                        }
                    }
                }
            }
        })?;
        Ok((tx, thread))
    }

    fn setup(&mut self, s: SeqSetup) {
        // Parameters were validated at submission.
        if let Ok(sampler) = Sampler::new(s.sampling) {
            let seq = RunnerSeq { cache: None, max_len: s.max_len, sampler, history: Vec::new(), logprobs: s.logprobs };
            self.seqs.insert(s.id, seq);
        }
    }

    /// One batched pass over the plan's chunks, then a token for each sequence that samples.
    fn step(&mut self, plan: &StepPlan) -> StepResult {
        for id in &plan.finished {
            self.seqs.remove(id);
        }
        let started = Instant::now();
        let logits = match &mut self.kv {
            KvMemory::Paged(store) => {
                let batch: Vec<PagedSequence<'_>> = plan
                    .entries
                    .iter()
                    .map(|e| PagedSequence {
                        tokens: &e.tokens,
                        start: e.start,
                        blocks: &e.blocks,
                        prompt_len: e.prompt_len,
                    })
                    .collect();
                self.model.forward_paged(store, &batch, Logits::Last)
            }
            KvMemory::PerSequence => forward_per_sequence(&self.model, &mut self.seqs, plan),
        }
        .map_err(|e| e.to_string())?;
        let forwarded = Instant::now();
        let vocab = self.model.vocab_size();
        let mut to_sample = Vec::new();
        for (e, row) in plan.entries.iter().zip(logits.chunks_exact(vocab)) {
            let seq = self.seqs.get_mut(&e.id).ok_or_else(|| format!("sequence {} has no sampler", e.id))?;
            seq.history.truncate(e.start);
            seq.history.extend_from_slice(&e.tokens);
            if e.sample {
                to_sample.push((e.id, row));
            }
        }
        // Sequences sample independently: in parallel over the compute pool (a 128k-token
        // vocabulary takes a fraction of a millisecond per sequence).
        let order: HashMap<SeqId, usize> = to_sample.iter().enumerate().map(|(i, &(id, _))| (id, i)).collect();
        let mut work: Vec<(usize, &[f32], &mut RunnerSeq)> =
            self.seqs.iter_mut().filter_map(|(id, seq)| order.get(id).map(|&i| (i, to_sample[i].1, seq))).collect();
        work.sort_by_key(|w| w.0);
        let sampled = work
            .into_par_iter()
            .map(|(i, row, seq)| {
                let token = seq.sampler.sample(row, &seq.history);
                let logprobs = seq.logprobs.map(|top| token_logprobs(row, token, top));
                Sampled { id: to_sample[i].0, token, logprobs }
            })
            .collect();
        Ok((sampled, StepTimes { forward: forwarded - started, sampling: forwarded.elapsed() }))
    }
}

/// One pass over the plan with a cache per sequence, made at its first step and cleared when
/// it is computed again from the start (after a preemption).
fn forward_per_sequence(
    model: &Model,
    seqs: &mut HashMap<SeqId, RunnerSeq>,
    plan: &StepPlan,
) -> Result<Vec<f32>, air_model::ModelError> {
    let mut caches = Vec::with_capacity(plan.entries.len());
    for e in &plan.entries {
        let seq =
            seqs.get_mut(&e.id).ok_or_else(|| air_model::ModelError::Config(format!("unknown sequence {}", e.id)))?;
        let mut cache = match seq.cache.take() {
            Some(cache) => cache,
            None => model.new_cache(cache_capacity(seq.max_len, model.config().context_length))?,
        };
        if e.start == 0 {
            cache.clear();
        }
        caches.push(cache);
    }
    let mut batch: Vec<Sequence<'_>> =
        plan.entries.iter().zip(caches.iter_mut()).map(|(e, cache)| Sequence { tokens: &e.tokens, cache }).collect();
    let logits = model.forward_batch(&mut batch, Logits::Last);
    drop(batch);
    for (e, cache) in plan.entries.iter().zip(caches) {
        if let Some(seq) = seqs.get_mut(&e.id) {
            seq.cache = Some(cache);
        }
    }
    logits
}

/// Positions of a per-sequence cache for a sequence of up to `max_len`: a power of two (at
/// least 256, at most the context), so that sequences of similar lengths share a capacity and
/// their decode steps can take the GPU's captured decode graphs, made per (batch, capacity).
fn cache_capacity(max_len: usize, context_length: usize) -> usize {
    max_len.next_power_of_two().max(256).min(context_length).max(max_len)
}

/// The log-probability of `token` under the softmax of `logits`, with the `top` most likely.
fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let log_sum = max + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, y)| y >= x);
                best.insert(at, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    TokenLogprobs {
        logprob: logits[token as usize] - log_sum,
        top: best.into_iter().map(|(i, x)| (i, x - log_sum)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_sequence_caches_come_in_few_sizes() {
        assert_eq!(cache_capacity(20, 8192), 256);
        assert_eq!(cache_capacity(300, 8192), 512);
        assert_eq!(cache_capacity(300, 400), 400);
        assert_eq!(cache_capacity(8192, 8192), 8192);
    }

    #[test]
    fn logprobs_are_normalized_and_ranked() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let lp = token_logprobs(&logits, 2, 2);
        let total: f32 = logits.iter().map(|&x| (x - 3.0).exp()).sum();
        let want = |x: f32| x - 3.0 - total.ln();
        assert!((lp.logprob - want(2.0)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((lp.top[0].1 - want(3.0)).abs() < 1e-6);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
    }
}
