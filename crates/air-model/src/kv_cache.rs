use crate::{ModelConfig, ModelError};
use air_kv::{BlockId, KvStore};
use candle_core::{DType, Device, Tensor};

/// The block table of a [`KvCache`] in host memory: its one block.
pub(crate) const WHOLE: [BlockId; 1] = [0];

/// Keys and values of one sequence for every layer, in f16 (as llama.cpp's default cache),
/// preallocated for `capacity` positions and written in place as the sequence grows. It lives
/// where the model computes: in host memory (a [`KvStore`] of one block of `capacity`
/// positions), or on the model's device (VRAM). Layout per layer: (kv_heads, capacity, head_dim).
pub struct KvCache {
    store: Store,
    len: usize,
    capacity: usize,
}

enum Store {
    Host(KvStore),
    /// Per layer, keys and values as f16 tensors (kv_heads, capacity, head_dim) on the device.
    Device(Vec<(Tensor, Tensor)>),
}

fn check_capacity(config: &ModelConfig, capacity: usize) -> Result<(), ModelError> {
    if capacity > config.context_length {
        return Err(ModelError::ContextOverflow { needed: capacity, capacity: config.context_length });
    }
    Ok(())
}

impl KvCache {
    /// An empty cache in host memory for up to `capacity` positions.
    pub fn new(config: &ModelConfig, capacity: usize) -> Result<Self, ModelError> {
        check_capacity(config, capacity)?;
        let shape = config.kv_shape(capacity.max(1));
        Ok(Self { store: Store::Host(KvStore::new(shape, 1)), len: 0, capacity })
    }

    /// An empty cache on `device` for up to `capacity` positions.
    pub(crate) fn on_device(config: &ModelConfig, capacity: usize, device: &Device) -> Result<Self, ModelError> {
        check_capacity(config, capacity)?;
        let shape = (config.n_head_kv, capacity, config.head_dim);
        let layers = (0..config.n_layer)
            .map(|_| Ok((Tensor::zeros(shape, DType::F16, device)?, Tensor::zeros(shape, DType::F16, device)?)))
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { store: Store::Device(layers), len: 0, capacity })
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

    /// The host store (block table [`WHOLE`]), for the CPU pass.
    pub(crate) fn host(&mut self) -> Result<&mut KvStore, ModelError> {
        match &mut self.store {
            Store::Host(h) => Ok(h),
            Store::Device(_) => Err(misplaced()),
        }
    }

    /// Writes keys and values (kv_heads, n, head_dim) of `layer` for the positions after the
    /// current end, on the device, and returns every cached key and value of the layer so far,
    /// widened to f32: (kv_heads, len + n, head_dim) each.
    pub(crate) fn append_on_device(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let Store::Device(layers) = &mut self.store else { return Err(misplaced()) };
        let (keys, values) = &layers[layer];
        let n = k.dim(1)?;
        keys.slice_set(&k.to_dtype(DType::F16)?.contiguous()?, 1, self.len)?;
        values.slice_set(&v.to_dtype(DType::F16)?.contiguous()?, 1, self.len)?;
        let total = self.len + n;
        Ok((keys.narrow(1, 0, total)?.to_dtype(DType::F32)?, values.narrow(1, 0, total)?.to_dtype(DType::F32)?))
    }

    /// The device tensors of `layer` (keys, values), when the cache is on a device.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        match &self.store {
            Store::Device(layers) => layers.get(layer),
            Store::Host(_) => None,
        }
    }

    /// Marks `n` more positions as filled (after every layer wrote them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

fn misplaced() -> ModelError {
    ModelError::Config("this KV cache was made for a model on another device".into())
}
