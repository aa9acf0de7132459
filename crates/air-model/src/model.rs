use crate::Linear;
use crate::attention::{AttentionShape, F32_QUERY_ROWS, QueryRows, ValueSums, causal_attention};
use crate::device::{ComputeDevice, DeviceModel, DeviceNumerics, DeviceOptions, UploadStats};
use crate::host::{SharedOutput, with_f32};
use crate::kv_cache::WHOLE;
use crate::linear::BATCHED_MATMUL_ROWS;
use crate::rope::{Rope, RopeTables, heads_first};
use crate::{CpuNumerics, Input, KvCache, LayerWeights, ModelConfig, ModelError, Weights};
use air_gguf::GgufFile;
use air_kv::{BlockId, KvStore};
use air_stream::{LayerStreamer, ResidencyPlan, StreamOptions};
use candle_core::{Device, Tensor};
use std::ops::Range;

/// Which positions of a forward pass to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// The positions of this call from index `i` on (`From(0)`: all of them; perplexity scoring
    /// asks only for the half it scores, sparing the output head the rest).
    From(usize),
}

/// One sequence of a batch: its new tokens and its KV cache.
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

impl Sequence<'_> {
    /// The positions this pass adds (start, count), or why they do not fit the cache.
    pub(crate) fn span(&self) -> Result<(usize, usize), ModelError> {
        let (start, n) = (self.cache.len(), self.tokens.len());
        if start + n > self.cache.capacity() {
            return Err(ModelError::ContextOverflow { needed: start + n, capacity: self.cache.capacity() });
        }
        Ok((start, n))
    }
}

/// One sequence of a batch whose keys and values live in a shared paged [`KvStore`].
pub struct PagedSequence<'a> {
    /// New tokens, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already in the cache.
    pub start: usize,
    /// The sequence's blocks in position order, covering at least `start + tokens.len()`.
    pub blocks: &'a [BlockId],
    /// The sequence's prompt length: positions before it are prompt tokens. A prompt's tokens
    /// are computed as llama.cpp computes a prompt in one batch (attention's prompt path from
    /// [`F32_QUERY_ROWS`] tokens on, batched matmul rounding from [`BATCHED_MATMUL_ROWS`] on),
    /// the others as it computes generated tokens, one by one; so a row gets the same bits
    /// however the sequence is chunked, batched with others or recomputed after preemption.
    pub prompt_len: usize,
}

/// A sequence's share of a host pass: its store and block table, its rows in the stacked
/// activations.
struct Part<'a> {
    /// Index of its store among the pass's stores.
    store: usize,
    table: &'a [BlockId],
    start: usize,
    row: usize,
    n: usize,
    /// Leading rows computed by attention's prompt path.
    prompt_rows: usize,
    /// Leading rows whose matmuls round as llama.cpp's batched kernel.
    batched_rows: usize,
}

/// What a host pass knows of its rows (the sequences' rows, stacked): their RoPE tables, for
/// the global layers and for the sliding-window layers when they have their own base, and which
/// rows' matmuls round as llama.cpp's batched kernel.
struct PassRows {
    global: RopeTables,
    local: Option<RopeTables>,
    batched: Vec<bool>,
}

/// How a model's weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Bytes the weights may keep resident; layers beyond it are streamed from the file on every
    /// pass (S.L.I.P.). `None`: everything stays resident.
    pub memory_budget: Option<u64>,
    /// Streamed layers read ahead of the one computing.
    pub prefetch_depth: usize,
    /// Where the model computes.
    pub device: ComputeDevice,
    /// Bytes of GPU memory the model may take; layers beyond it stream in over PCIe on every
    /// pass. `None`: the free GPU memory less a margin.
    pub vram_budget: Option<u64>,
    /// How a GPU rounds (ignored on the CPU).
    pub device_numerics: DeviceNumerics,
    /// How the CPU rounds the matmuls it computes.
    pub cpu_numerics: CpuNumerics,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            memory_budget: None,
            prefetch_depth: 2,
            device: ComputeDevice::Cpu,
            vram_budget: None,
            device_numerics: DeviceNumerics::default(),
            cpu_numerics: CpuNumerics::default(),
        }
    }
}

/// A loaded model: configuration, mapped weights and RoPE, and the device pass when it
/// computes on a device other than the host CPU.
pub struct Model {
    pub(crate) config: ModelConfig,
    /// Views of the weights in the file mapping: the host pass computes with them; the device
    /// pass looks up token embeddings in them.
    pub(crate) weights: Weights,
    /// RoPE of the global layers, and of the sliding-window layers when they have their own base.
    pub(crate) rope: Rope,
    pub(crate) local_rope: Option<Rope>,
    vocab_size: usize,
    device: Device,
    /// Makes each layer resident before the host pass computes it, per the memory budget.
    streamer: LayerStreamer,
    /// The weights on the device and the pass over them, when not computing on the host.
    pub(crate) on_device: Option<DeviceModel>,
    compute_device: ComputeDevice,
    /// How the host's generation attention sums values: in f32 with `--cpu-numerics fast`.
    attention_values: ValueSums,
}

impl Model {
    /// Loads the model in `file` for the CPU, everything resident.
    pub fn load(file: &GgufFile) -> Result<Self, ModelError> {
        Self::load_with(file, LoadOptions::default())
    }

    /// Loads the model in `file` for the CPU, keeping within `options`' memory budget.
    pub fn load_with(file: &GgufFile, options: LoadOptions) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(file.metadata())?;
        let embd =
            file.tensor("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size =
            *embd.dims.get(1).ok_or_else(|| ModelError::Config("token_embd.weight is not 2-D".into()))? as usize;
        let device = Device::Cpu;
        let weights = Weights::load(file, &config, vocab_size, options.cpu_numerics)?;
        let freq_factors = weights.rope_freqs.as_ref().map(|t| t.to_vec1::<f32>()).transpose()?;
        let rope = Rope::new(&config, config.rope_base, freq_factors.as_deref());
        let local_rope = config.sliding_window.map(|w| Rope::new(&config, w.rope_base, freq_factors.as_deref()));
        let on_device = match options.device {
            ComputeDevice::Cpu => None,
            other => {
                let device_options = DeviceOptions {
                    vram_budget: options.vram_budget,
                    prefetch_depth: options.prefetch_depth,
                    host_budget: options.memory_budget,
                    numerics: options.device_numerics,
                };
                Some(DeviceModel::load(file, &config, &weights, other.open()?, device_options)?)
            }
        };
        // On a device the host keeps only the mapping: nothing to make resident per layer.
        let host_options = if on_device.is_some() { LoadOptions::default() } else { options };
        let streamer = layer_streamer(file, config.n_layer, host_options)?;
        let compute_device = options.device;
        let attention_values = match options.cpu_numerics {
            CpuNumerics::Ggml => ValueSums::F16,
            CpuNumerics::Fast => ValueSums::F32,
        };
        Ok(Self {
            rope,
            local_rope,
            config,
            weights,
            vocab_size,
            device,
            streamer,
            on_device,
            compute_device,
            attention_values,
        })
    }

    /// Where the model computes.
    pub fn compute_device(&self) -> ComputeDevice {
        self.compute_device
    }

    /// On a GPU, which layers stay in VRAM and which stream into it on every pass (within the
    /// VRAM budget less the output head and a workspace).
    pub fn vram_plan(&self) -> Option<&ResidencyPlan> {
        self.on_device.as_ref().and_then(DeviceModel::vram_plan)
    }

    /// Layers streamed into device memory on every pass (0 on the host).
    pub fn device_streamed_layers(&self) -> usize {
        self.vram_plan().map_or(0, ResidencyPlan::streamed_count)
    }

    /// Bytes of weights streamed into device memory per pass (0 on the host).
    pub fn device_streamed_bytes_per_pass(&self) -> u64 {
        self.on_device.as_ref().map_or(0, DeviceModel::streamed_bytes_per_pass)
    }

    /// Weight uploads into device memory so far (zero on the host or with every layer resident).
    pub fn upload_stats(&self) -> UploadStats {
        self.on_device.as_ref().map_or_else(UploadStats::default, DeviceModel::upload_stats)
    }

    /// Host-to-device bandwidth from pinned host memory in bytes per second, measured now;
    /// `None` when the model is not on a GPU.
    pub fn measure_pinned_upload(&self) -> Result<Option<f64>, ModelError> {
        self.on_device.as_ref().map_or(Ok(None), DeviceModel::measure_pinned_upload)
    }

    /// The most GPU memory the model has taken so far (weights, activations, KV caches), in
    /// bytes; `None` when it is not on a GPU.
    pub fn peak_device_memory(&self) -> Option<u64> {
        self.on_device.as_ref().and_then(DeviceModel::peak_memory)
    }

    /// What keeps the layers resident: the plan, and counters of what was streamed.
    pub fn streamer(&self) -> &LayerStreamer {
        &self.streamer
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Rows of the output head (logits per position).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A KV cache for one sequence of up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        match &self.on_device {
            Some(d) => KvCache::on_device(&self.config, capacity, d.device()),
            None => KvCache::new(&self.config, capacity),
        }
    }

    /// Runs `tokens` (the continuation of the sequence held in `cache`) through the model,
    /// appends their keys/values to the cache, and returns logits, row-major, one row of
    /// `vocab_size` per position asked for.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>, ModelError> {
        self.forward_batch(&mut [Sequence { tokens, cache }], logits)
    }

    /// Runs several sequences through one pass over the weights: their tokens go through every
    /// matmul together (a streamed layer is read once for the whole batch); attention and the
    /// KV cache stay per sequence. Returns the logits asked for of each sequence, in order.
    pub fn forward_batch(&self, batch: &mut [Sequence<'_>], logits: Logits) -> Result<Vec<f32>, ModelError> {
        if let Some(on_device) = &self.on_device {
            return on_device.forward_batch(self, batch, logits);
        }
        let mut parts = Vec::with_capacity(batch.len());
        let mut tokens = Vec::new();
        for (i, seq) in batch.iter().enumerate() {
            let (start, n) = seq.span()?;
            // Like llama.cpp, by the call's rows.
            let prompt_rows = if n >= F32_QUERY_ROWS { n } else { 0 };
            let batched_rows = if n >= BATCHED_MATMUL_ROWS { n } else { 0 };
            parts.push(Part { store: i, table: &WHOLE, start, row: tokens.len(), n, prompt_rows, batched_rows });
            tokens.extend_from_slice(seq.tokens);
        }
        let mut stores = batch.iter_mut().map(|s| s.cache.host()).collect::<Result<Vec<_>, _>>()?;
        let out = self.forward_on_pool(&mut stores, &mut parts, &tokens, logits)?;
        for seq in batch.iter_mut() {
            seq.cache.advance(seq.tokens.len());
        }
        Ok(out)
    }

    /// Whether [`Self::forward_paged`] runs on this model (host models; a model on a GPU keeps a
    /// [`KvCache`] per sequence in VRAM).
    pub fn supports_paged_kv(&self) -> bool {
        self.on_device.is_none()
    }

    /// Runs several sequences whose keys and values live in the paged `store` through one pass
    /// (see [`Self::forward_batch`]), writing their new keys and values through their block
    /// tables. Host (CPU) models only.
    pub fn forward_paged(
        &self,
        store: &mut KvStore,
        batch: &[PagedSequence<'_>],
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        if self.on_device.is_some() {
            return Err(ModelError::Device("the paged KV cache is not on GPUs yet".into()));
        }
        if store.shape() != self.config.kv_shape(store.shape().block_size) {
            return Err(ModelError::Config("the KV store was made for another model".into()));
        }
        let mut parts = Vec::with_capacity(batch.len());
        let mut tokens = Vec::new();
        for seq in batch {
            let n = seq.tokens.len();
            let end = seq.start + n;
            let covered = seq.blocks.len() * store.shape().block_size;
            if end > covered.min(self.config.context_length) {
                return Err(ModelError::ContextOverflow { needed: end, capacity: covered });
            }
            if seq.blocks.iter().any(|&b| b as usize >= store.blocks()) {
                return Err(ModelError::Config("a block table names a block outside the KV store".into()));
            }
            let prompt_part = |threshold: usize| {
                if seq.prompt_len >= threshold { seq.prompt_len.saturating_sub(seq.start).min(n) } else { 0 }
            };
            let (prompt_rows, batched_rows) = (prompt_part(F32_QUERY_ROWS), prompt_part(BATCHED_MATMUL_ROWS));
            parts.push(Part {
                store: 0,
                table: seq.blocks,
                start: seq.start,
                row: tokens.len(),
                n,
                prompt_rows,
                batched_rows,
            });
            tokens.extend_from_slice(seq.tokens);
        }
        self.forward_on_pool(&mut [store], &mut parts, &tokens, logits)
    }

    /// The host pass over `tokens` (the sequences' rows, stacked), on the compute pool: one
    /// hand-off per pass, so its parallel regions (a dozen per layer) do not each wake the
    /// calling thread, and the other workers kept polling for those regions' work meanwhile
    /// ([`crate::host::with_warm_workers`]).
    fn forward_on_pool(
        &self,
        stores: &mut [&mut KvStore],
        parts: &mut [Part<'_>],
        tokens: &[u32],
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let positions = || parts.iter().flat_map(|p| p.start..p.start + p.n);
        let mut batched = vec![false; tokens.len()];
        for part in parts.iter() {
            batched[part.row..part.row + part.batched_rows].fill(true);
        }
        let pass = PassRows {
            global: self.rope.tables_for(positions(), &self.device)?,
            local: self.local_rope.as_ref().map(|r| r.tables_for(positions(), &self.device)).transpose()?,
            batched,
        };
        crate::host::with_warm_workers(|| {
            let mut x = self.weights.token_embd.rows(tokens)?;
            if let Some(scale) = self.config.embedding_scale {
                x = (x * scale as f64)?;
            }
            for (i, layer) in self.weights.layers.iter().enumerate() {
                let _resident = self.streamer.acquire(i)?;
                x = self.block(i, layer, &x, stores, parts, &pass)?;
            }
            // The output head as llama.cpp runs it per sequence: batched rounding where the
            // sequence asks for the logits of several rows.
            let (mut rows, mut head_batched) = (Vec::new(), Vec::new());
            for part in parts.iter() {
                let from = match logits {
                    Logits::Last => part.n.saturating_sub(1),
                    Logits::From(i) => i,
                };
                let part_rows = part.row + from.min(part.n)..part.row + part.n;
                head_batched.extend(std::iter::repeat_n(part_rows.len() >= BATCHED_MATMUL_ROWS, part_rows.len()));
                rows.extend(part_rows);
            }
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let index = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &self.device)?;
            let x = x.index_select(&index, 0)?;
            let x = crate::ops::rms_norm(&x, &self.weights.output_norm, self.config.rms_norm_eps)?;
            self.weights.output.forward_values(&x, &head_batched)
        })
    }

    /// One transformer block over the rows of every sequence: pre-norm attention and gated
    /// feed-forward, each with a residual (and, per family, QK-norm and post-norms).
    fn block(
        &self,
        index: usize,
        w: &LayerWeights,
        x: &Tensor,
        stores: &mut [&mut KvStore],
        parts: &[Part<'_>],
        pass: &PassRows,
    ) -> Result<Tensor, ModelError> {
        let batched = &pass.batched[..];
        let c = &self.config;
        let rows = x.dim(0)?;
        let (window, _) = c.layer_attention(index);
        let (width, eps) = (x.dim(1)?, c.rms_norm_eps);
        // Q, K and V from one quantization of h, then each one's bias and per-head norm.
        let finish = |y: Tensor, bias: &Option<Tensor>, norm: &Option<Tensor>, heads: usize| {
            let mut y = y;
            if let Some(b) = bias {
                y = crate::ops::add(&y, b)?;
            }
            if let Some(norm) = norm {
                let per_head = y.reshape((rows * heads, c.head_dim))?;
                y = crate::ops::rms_norm(&per_head, norm, c.rms_norm_eps)?.reshape((rows, heads * c.head_dim))?;
            }
            Ok::<_, ModelError>(y)
        };
        // The rows normed inside the matmuls' region (see [`Input`]).
        let [q_all, k_all, v_all] = norm_weights(&w.attn_norm, width, |attn_norm| {
            with_f32(x, |xs| {
                let normed = |first: usize, out: &mut [f32]| {
                    out.copy_from_slice(&xs[first * width..][..out.len()]);
                    crate::ops::rms_norm_in_place(out, attn_norm, eps);
                };
                Linear::forward_input([&w.wq, &w.wk, &w.wv], Input::Rows { rows, fill: &normed }, batched)
            })?
        })?;
        let q_all = finish(q_all, &w.bq, &w.q_norm, c.n_head)?;
        let k_all = finish(k_all, &w.bk, &w.k_norm, c.n_head_kv)?;
        let v_all = finish(v_all, &w.bv, &None, c.n_head_kv)?;
        // Every sequence's rows together: RoPE at each row's position, then keys and values
        // into each sequence's store, then attention of every (sequence, KV head) at once.
        let (rope, tables) = match (&self.local_rope, &pass.local, window) {
            (Some(r), Some(t), Some(_)) => (r, t),
            _ => (&self.rope, &pass.global),
        };
        let (q_scale, score_scale) = c.attention_scales();
        let d = c.head_dim;
        let q = with_f32(&q_all, |x| rope.heads_first_on_host(x, c.n_head, d, tables, q_scale))??;
        let k = with_f32(&k_all, |x| rope.heads_first_on_host(x, c.n_head_kv, d, tables, 1.0))??;
        let v = with_f32(&v_all, |x| heads_first(x, rows, c.n_head_kv, d))?;
        for part in parts {
            for kv in 0..c.n_head_kv {
                let span = (kv * rows + part.row) * d..(kv * rows + part.row + part.n) * d;
                stores[part.store].write(index, part.table, kv, part.start, &k[span.clone()], &v[span]);
            }
        }
        let shape = AttentionShape {
            heads: c.n_head,
            kv_heads: c.n_head_kv,
            head_dim: d,
            scale: score_scale,
            window,
            values: self.attention_values,
        };
        let seqs: Vec<QueryRows<'_>> = parts
            .iter()
            .map(|p| QueryRows {
                kv: stores[p.store].layer(index, p.table),
                row: p.row,
                n: p.n,
                start: p.start,
                tiled_rows: p.prompt_rows,
            })
            .collect();
        let attn = causal_attention(&q, rows, &seqs, shape);
        let attn = Tensor::from_vec(attn, (rows, c.n_head * c.head_dim), &self.device)?;
        let attn_out = self.post_norm(w.wo.forward(&attn, batched)?, &w.post_attn_norm)?;

        // The residual sum x + attention, then its norm, made inside the gate and up matmuls'
        // region, each row written to `residual` as it is made; then the gated activation
        // inside the down matmul's.
        let mut residual = Vec::with_capacity(rows * width);
        let residual_rows = SharedOutput::new(residual.as_mut_ptr());
        let [gate, up] = norm_weights(&w.ffn_norm, width, |ffn_norm| {
            with_f32(x, |xs| {
                with_f32(&attn_out, |ys| {
                    let normed_sum = |first: usize, out: &mut [f32]| {
                        let at = first * width;
                        for ((v, &a), &b) in out.iter_mut().zip(&xs[at..]).zip(&ys[at..]) {
                            *v = a + b;
                        }
                        // SAFETY: these rows of `residual` (rows × width) are this call's alone.
                        unsafe { residual_rows.write(at, out) };
                        crate::ops::rms_norm_in_place(out, ffn_norm, eps);
                    };
                    Linear::forward_input([&w.w_gate, &w.w_up], Input::Rows { rows, fill: &normed_sum }, batched)
                })
            })??
        })?;
        // SAFETY: the region above wrote every row of `residual`.
        unsafe { residual.set_len(rows * width) };
        let ff = gate.dim(1)?;
        let ffn = with_f32(&gate, |gs| {
            with_f32(&up, |us| {
                let gated = |first: usize, out: &mut [f32]| {
                    out.copy_from_slice(&gs[first * ff..][..out.len()]);
                    for (r, row) in out.chunks_exact_mut(ff).enumerate() {
                        crate::ops::gate_in_place(c.activation, row, &us[(first + r) * ff..][..ff]);
                    }
                };
                let [y] = Linear::forward_input([&w.w_down], Input::Rows { rows, fill: &gated }, batched)?;
                Ok::<_, ModelError>(y)
            })
        })???;
        let x = Tensor::from_vec(residual, (rows, width), &self.device)?;
        Ok(crate::ops::add(&x, &self.post_norm(ffn, &w.post_ffn_norm)?)?)
    }

    /// RMSNorm of a sub-layer's output before its residual add, where the family has one.
    fn post_norm(&self, y: Tensor, norm: &Option<Tensor>) -> Result<Tensor, ModelError> {
        Ok(match norm {
            Some(norm) => crate::ops::rms_norm(&y, norm, self.config.rms_norm_eps)?,
            None => y,
        })
    }
}

/// `f` on an RMSNorm's weights read in place, or an error where they do not fit rows of
/// `width` values.
fn norm_weights<R>(
    norm: &Tensor,
    width: usize,
    f: impl FnOnce(&[f32]) -> Result<R, ModelError>,
) -> Result<R, ModelError> {
    with_f32(norm, |w| {
        if w.len() != width {
            return Err(ModelError::Config(format!("RMSNorm weight of {} values for rows of {width}", w.len())));
        }
        f(w)
    })?
}

/// The streamer for `options`: each layer's bytes are its `blk.N.` tensors; the budget left for
/// layers is what the other tensors (embeddings, output head, final norm) leave of it.
fn layer_streamer(file: &GgufFile, layers: usize, options: LoadOptions) -> Result<LayerStreamer, ModelError> {
    let mut spans: Vec<Vec<Range<usize>>> = vec![Vec::new(); layers];
    let mut other_bytes = 0u64;
    for t in file.tensors() {
        let layer = t.name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()?.parse::<usize>().ok());
        match layer {
            Some(i) if i < layers => spans[i].push(file.tensor_range(t)),
            _ => other_bytes += file.tensor_range(t).len() as u64,
        }
    }
    let sizes: Vec<u64> = spans.iter().map(|s| s.iter().map(|r| r.len() as u64).sum()).collect();
    let plan = match options.memory_budget {
        Some(budget) => ResidencyPlan::new(&sizes, budget.saturating_sub(other_bytes), options.prefetch_depth),
        None => ResidencyPlan::all_resident(layers),
    };
    let stream_options =
        if plan.streamed_count() > 0 { StreamOptions::for_file(file.path())? } else { StreamOptions::default() };
    Ok(LayerStreamer::new(file.mmap().clone(), spans, plan, stream_options)?)
}
