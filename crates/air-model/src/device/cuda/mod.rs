//! The CUDA side of the device pass: VRAM streaming ([`vram`]), Air's decode kernels
//! ([`kernels`]), quantized matmuls with the CPU's activation rounding ([`matmul`]), Air's
//! matrix-vector kernels for Q4_0/Q4_K ([`gemv`]), decode blocks with fused small kernels
//! ([`fused`]), CUDA graphs of decode steps ([`graph`]), the pass with the CPU's numerics
//! ([`exact`]). `no_cuda.rs` gives the same API when the `cuda`
//! feature is off, so the generic pass in `device/mod.rs` carries no `#[cfg]`.

mod exact;
mod fused;
mod gemv;
mod graph;
mod kernels;
mod matmul;
mod vram;

pub(super) use exact::{ExactNumerics, forward as exact_forward};
pub(super) use fused::block as fused_block;
pub(super) use matmul::forward as quantized_forward;

use super::{DeviceModel, DeviceOptions, LayerMatrices, PassState, Projections, UploadStats};
use crate::model::Sequence;
use crate::rope::Rope;
use crate::rope::RopeTables;
use crate::{Activation, ModelConfig, ModelError};
use air_gguf::GgufFile;
use air_stream::ResidencyPlan;
use candle_core::{Device, Tensor};

/// CUDA devices present (0 when the driver cannot be asked).
pub(super) fn device_count() -> usize {
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Opens CUDA device `ordinal` with a stream of its own.
pub(super) fn open(ordinal: usize) -> Result<Device, ModelError> {
    let device = Device::new_cuda_with_stream(ordinal)
        .map_err(|e| ModelError::Device(format!("cannot open CUDA device {ordinal}: {e}")))?;
    // candle computes on one stream, and the VRAM streamer orders its copy stream against it
    // with its own events: cudarc's per-buffer event tracking would only add a driver call per
    // kernel argument.
    // SAFETY: nothing has been allocated on the device yet.
    unsafe { device.as_cuda_device()?.disable_event_tracking() };
    Ok(device)
}

/// What a model on a CUDA device keeps beside its weights: the plan of resident layers, the
/// VRAM streamer of the others, the memory meter and the decode graphs.
pub(super) struct Backend {
    plan: ResidencyPlan,
    vram: Option<vram::VramStreamer>,
    meter: vram::VramMeter,
    graphs: graph::DecodeGraphs,
}

impl Backend {
    /// For a model on `device` (`None` when it is not a CUDA device): measures the memory in use
    /// before loading, plans residency within the VRAM budget (less `head_bytes` for the output
    /// head) and starts the streamer of the layers that do not fit.
    pub(super) fn load(
        file: &GgufFile,
        config: &ModelConfig,
        device: &Device,
        options: DeviceOptions,
        head_bytes: u64,
    ) -> Result<Option<Self>, ModelError> {
        let Device::Cuda(cuda) = device else { return Ok(None) };
        let meter = vram::VramMeter::new(cuda)?;
        let budget = options.vram_budget.unwrap_or_else(|| meter.default_budget());
        let layer_budget = budget.saturating_sub(head_bytes + vram::WORKSPACE_RESERVE);
        let plan = vram::plan(file, config, layer_budget, options.prefetch_depth)?;
        let vram = (plan.streamed_count() > 0)
            .then(|| vram::VramStreamer::new(file, cuda, plan.clone(), options.host_budget))
            .transpose()?;
        Ok(Some(Self { plan, vram, meter, graphs: Default::default() }))
    }

    /// Whether layer `i`'s matrices stay in VRAM.
    pub(super) fn is_resident(&self, i: usize) -> bool {
        self.plan.is_pinned(i)
    }

    /// Which layers stay in VRAM and which stream.
    pub(super) fn plan(&self) -> &ResidencyPlan {
        &self.plan
    }

    /// Runs `f` with streamed layer `i`'s matrices once they are in VRAM; frees the slot after.
    pub(super) fn with_streamed<T>(
        &self,
        i: usize,
        f: impl FnOnce(&LayerMatrices) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        let vram = self.vram.as_ref().ok_or_else(|| ModelError::Device(format!("layer {i} is not streamed")))?;
        let held = vram.acquire(i)?;
        f(held.matrices())
    }

    /// Upload counters (zero when every layer is resident).
    pub(super) fn upload_stats(&self) -> UploadStats {
        self.vram.as_ref().map_or_else(UploadStats::default, vram::VramStreamer::stats)
    }

    /// Bytes streamed per pass.
    pub(super) fn bytes_per_pass(&self) -> u64 {
        self.vram.as_ref().map_or(0, vram::VramStreamer::bytes_per_pass)
    }

    /// The most VRAM the model has taken.
    pub(super) fn peak_memory(&self) -> u64 {
        self.meter.peak()
    }

    /// Notes the VRAM in use.
    pub(super) fn sample_memory(&self) {
        self.meter.sample();
    }

    /// Host-to-device bandwidth from pinned memory, bytes per second.
    pub(super) fn measure_pinned_upload(&self, device: &Device) -> Result<f64, ModelError> {
        vram::measure_pinned_upload(device.as_cuda_device()?)
    }

    /// Runs a decode step as a CUDA graph when the model allows it (every layer resident):
    /// `Some(logits)`, or `None` to run it op by op.
    pub(super) fn graphed_decode(
        &self,
        pass: &DeviceModel,
        model: &crate::Model,
        step: DecodeStep,
        x: &Tensor,
    ) -> Result<Result<Vec<f32>, DecodeStep>, ModelError> {
        if self.vram.is_some() {
            return Ok(Err(step));
        }
        self.graphs.run(pass, model, step, x).map(Ok)
    }
}

/// The gated activation of stacked gate/up projections by Air's kernel, where the layer has
/// them stacked and the device is CUDA; `None` otherwise.
pub(super) fn stacked_gated(
    device: &Device,
    c: &ModelConfig,
    m: &LayerMatrices,
    h: &Tensor,
) -> Result<Option<Tensor>, ModelError> {
    if !device.is_cuda() {
        return Ok(None);
    }
    let Some(gate_up) = m.stacked_gate_up(h)? else { return Ok(None) };
    let op = kernels::Gated { ffn: c.n_ff, gelu: c.activation == Activation::GeluTanh };
    Ok(Some(gate_up.apply_op1_no_bwd(&op)?))
}

/// The decode kernels' inputs for a step: RoPE at each sequence's position, the positions, and
/// the addresses of every sequence's KV cache, for every layer.
pub(super) struct DecodeStep {
    tables: RopeTables,
    local_tables: Option<RopeTables>,
    positions: Tensor,
    /// (layers × 2 × sequences) addresses: each layer's key caches, then its value caches.
    caches: Tensor,
    sequences: usize,
    capacity: usize,
}

impl DecodeStep {
    /// Attention of layer `index` straight from its stacked projections of `h` (plus `b_qkv`),
    /// when the layer has them stacked and no QK-norm (`qk_norm`); `None` otherwise.
    pub(super) fn stacked_attention(
        &self,
        model: &crate::Model,
        index: usize,
        m: &LayerMatrices,
        h: &Tensor,
        b_qkv: &Option<Tensor>,
        qk_norm: bool,
    ) -> Result<Option<Tensor>, ModelError> {
        if qk_norm {
            return Ok(None);
        }
        let Some(mut qkv) = m.stacked_qkv(h)? else { return Ok(None) };
        if let Some(b) = b_qkv {
            qkv = qkv.broadcast_add(b)?;
        }
        Self::stacked_decode_attention(model, index, self, &qkv, None).map(Some)
    }

    /// The inputs for `batch` on `device`, or `None` where the kernels do not apply (not CUDA,
    /// a sequence adding other than one token, caches of different capacities, heads too wide).
    /// The caller has checked that every sequence fits its cache.
    pub(super) fn new(
        model: &crate::Model,
        batch: &[Sequence<'_>],
        device: &Device,
    ) -> Result<Option<Self>, ModelError> {
        let c = model.config();
        let Some(capacity) = batch.first().map(|s| s.cache.capacity()) else { return Ok(None) };
        if !device.is_cuda()
            || c.head_dim > kernels::MAX_HEAD_DIM
            || batch.iter().any(|s| s.tokens.len() != 1 || s.cache.capacity() != capacity)
        {
            return Ok(None);
        }
        let positions: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        let tables = model.rope.tables_at(&positions, device)?;
        let local_tables = model.local_rope.as_ref().map(|r| r.tables_at(&positions, device)).transpose()?;
        let mut addresses = Vec::with_capacity(c.n_layer * 2 * batch.len());
        for layer in 0..c.n_layer {
            for values in [false, true] {
                for seq in batch {
                    let (k, v) = seq.cache.device_layer(layer).ok_or_else(|| {
                        ModelError::Config("this KV cache was made for a model on another device".into())
                    })?;
                    addresses.push(kernels::address(if values { v } else { k })? as i64);
                }
            }
        }
        let sequences = batch.len();
        Ok(Some(Self {
            tables,
            local_tables,
            positions: Tensor::from_vec(positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), sequences, device)?,
            caches: Tensor::from_vec(addresses, c.n_layer * 2 * sequences, device)?,
            sequences,
            capacity,
        }))
    }

    /// A copy in memory of its own, for a captured graph to read.
    fn deep_copy(&self) -> Result<Self, ModelError> {
        Ok(Self {
            tables: self.tables.deep_copy()?,
            local_tables: self.local_tables.as_ref().map(RopeTables::deep_copy).transpose()?,
            positions: self.positions.copy()?,
            caches: self.caches.copy()?,
            sequences: self.sequences,
            capacity: self.capacity,
        })
    }

    /// Writes this step's inputs into `dst`'s memory (same shapes).
    fn write_into(&self, dst: &Self) -> Result<(), ModelError> {
        self.tables.write_into(&dst.tables)?;
        if let (Some(src), Some(dst)) = (&self.local_tables, &dst.local_tables) {
            src.write_into(dst)?;
        }
        dst.positions.slice_set(&self.positions, 0, 0)?;
        dst.caches.slice_set(&self.caches, 0, 0)?;
        Ok(())
    }

    /// The RoPE and tables of a layer with attention window `window`.
    fn rope<'a>(&'a self, model: &'a crate::Model, window: Option<usize>) -> (&'a Rope, &'a RopeTables) {
        match (&model.local_rope, &self.local_tables, window) {
            (Some(r), Some(t), Some(_)) => (r, t),
            _ => (&model.rope, &self.tables),
        }
    }

    /// The cache addresses of `layer`.
    fn table(&self, layer: usize) -> Result<kernels::CacheTable, ModelError> {
        let base = kernels::address(&self.caches)?;
        let row = (self.sequences * 8) as u64;
        Ok(kernels::CacheTable {
            keys: base + 2 * layer as u64 * row,
            values: base + (2 * layer as u64 + 1) * row,
            positions: kernels::address(&self.positions)?,
            sequences: self.sequences,
            capacity: self.capacity,
        })
    }

    /// [`DecodeStep::decode_attention`] from stacked projections (B, (heads + 2 kv_heads) × head_dim):
    /// RoPE and the cache append in one launch, attention in another (which also writes its
    /// output quantized into `quantized`, when given: see [`kernels::DecodeAttention`]).
    fn stacked_decode_attention(
        model: &crate::Model,
        index: usize,
        step: &DecodeStep,
        qkv: &Tensor,
        quantized: Option<(u64, u64)>,
    ) -> Result<Tensor, ModelError> {
        let c = model.config();
        let (window, _) = c.layer_attention(index);
        let (rope, tables) = step.rope(model, window);
        let (rope_dim, interleaved) = rope.layout();
        let (cos, sin) = tables.cos_sin();
        let (q_scale, _) = c.attention_scales();
        let table = step.table(index)?;
        let rope_kv = kernels::RopeKv {
            table,
            cos: kernels::address(cos)?,
            sin: kernels::address(sin)?,
            rope_dim,
            interleaved,
            q_scale,
            heads: c.n_head,
            kv_heads: c.n_head_kv,
            dim: c.head_dim,
        };
        let q = qkv.apply_op1_no_bwd(&rope_kv)?;
        Ok(q.apply_op1_no_bwd(&attention_op(c, table, window, quantized))?)
    }

    /// Attention of layer `index` for a step where every sequence adds one token, by Air's
    /// decode kernels: all sequences in two launches. Returns (sequences, heads * head_dim).
    pub(super) fn decode_attention(
        model: &crate::Model,
        index: usize,
        step: &DecodeStep,
        qkv: &Projections,
    ) -> Result<Tensor, ModelError> {
        let c = model.config();
        let (window, _) = c.layer_attention(index);
        let b = step.sequences;
        let (rope, tables) = step.rope(model, window);
        let (q_scale, _) = c.attention_scales();
        let mut q = rope.apply(&qkv.q.reshape((b, c.n_head, 1, c.head_dim))?.contiguous()?, tables)?;
        if q_scale != 1.0 {
            q = (q * q_scale as f64)?;
        }
        let k = rope.apply(&qkv.k.reshape((b, c.n_head_kv, 1, c.head_dim))?.contiguous()?, tables)?;
        let table = step.table(index)?;
        kernels::kv_append(&k, &qkv.v, table, c.n_head_kv, c.head_dim)?;
        let op = attention_op(c, table, window, None);
        Ok(q.reshape((b, c.n_head, c.head_dim))?.apply_op1_no_bwd(&op)?)
    }
}

/// The decode attention op of a layer with attention window `window` over the step's caches
/// `table` (writing its output quantized into `quantized` too, when given).
fn attention_op(
    c: &ModelConfig,
    table: kernels::CacheTable,
    window: Option<usize>,
    quantized: Option<(u64, u64)>,
) -> kernels::DecodeAttention {
    let (_, scale) = c.attention_scales();
    kernels::DecodeAttention {
        table,
        heads: c.n_head,
        kv_heads: c.n_head_kv,
        dim: c.head_dim,
        scale,
        window,
        quantized,
    }
}
