use crate::{ModelConfig, ModelError};
use half::f16;

/// Keys and values of one sequence for every layer, in f16 (as llama.cpp's default cache),
/// preallocated for `capacity` positions and written in place as the sequence grows.
/// Layout per layer: (kv_heads, capacity, head_dim).
pub struct KvCache {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for up to `capacity` positions.
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<Self, ModelError> {
        if capacity > config.context_length {
            return Err(ModelError::ContextOverflow { needed: capacity, capacity: config.context_length });
        }
        let size = config.n_head_kv * capacity * config.head_dim;
        Ok(Self {
            keys: (0..config.n_layer).map(|_| vec![f16::ZERO; size]).collect(),
            values: (0..config.n_layer).map(|_| vec![f16::ZERO; size]).collect(),
            kv_heads: config.n_head_kv,
            head_dim: config.head_dim,
            len: 0,
            capacity,
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything (the memory stays allocated).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes keys and values (kv_heads, n, head_dim) of `layer` for the `n` positions after the
    /// current end (rounded to f16).
    pub(crate) fn write(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let d = self.head_dim;
        for (cache, src) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            for h in 0..self.kv_heads {
                let dst = &mut cache[(h * self.capacity + self.len) * d..(h * self.capacity + self.len + n) * d];
                let src = &src[h * n * d..(h + 1) * n * d];
                dst.iter_mut().zip(src).for_each(|(o, &x)| *o = f16::from_f32(x));
            }
        }
    }

    /// Keys and values of `layer`, (kv_heads, capacity, head_dim).
    pub(crate) fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Marks `n` more positions as filled (after every layer wrote them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
