use crate::{ModelConfig, ModelError};
use candle_core::{DType, Device, Tensor};
use half::f16;

/// Keys and values of one sequence for every layer, in f16 (as llama.cpp's default cache),
/// preallocated for `capacity` positions and written in place as the sequence grows. It lives
/// where the model computes: in host memory, or on the model's device (VRAM).
/// Layout per layer: (kv_heads, capacity, head_dim).
pub struct KvCache {
    store: Store,
    len: usize,
    capacity: usize,
}

enum Store {
    Host(HostKv),
    /// Per layer, keys and values as f16 tensors (kv_heads, capacity, head_dim) on the device.
    Device(Vec<(Tensor, Tensor)>),
}

/// A cache in host memory, read by the CPU attention kernels.
pub(crate) struct HostKv {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
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
        let size = config.n_head_kv * capacity * config.head_dim;
        let host = HostKv {
            keys: (0..config.n_layer).map(|_| vec![f16::ZERO; size]).collect(),
            values: (0..config.n_layer).map(|_| vec![f16::ZERO; size]).collect(),
            kv_heads: config.n_head_kv,
            head_dim: config.head_dim,
            capacity,
        };
        Ok(Self { store: Store::Host(host), len: 0, capacity })
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

    /// The host store, for the CPU pass.
    pub(crate) fn host(&mut self) -> Result<&mut HostKv, ModelError> {
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

impl HostKv {
    /// Writes keys and values (kv_heads, n, head_dim) of `layer` for the `n` positions after
    /// position `at` (rounded to f16).
    pub(crate) fn write(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32], n: usize) {
        let d = self.head_dim;
        for (cache, src) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            for h in 0..self.kv_heads {
                let dst = &mut cache[(h * self.capacity + at) * d..(h * self.capacity + at + n) * d];
                let src = &src[h * n * d..(h + 1) * n * d];
                dst.iter_mut().zip(src).for_each(|(o, &x)| *o = f16::from_f32(x));
            }
        }
    }

    /// Keys and values of `layer`, (kv_heads, capacity, head_dim).
    pub(crate) fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (&self.keys[layer], &self.values[layer])
    }
}
