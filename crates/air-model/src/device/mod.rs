//! The forward pass on a candle device: weights uploaded as candle quantized tensors, every op a
//! candle tensor op, so it runs wherever candle has kernels. With the `cuda` feature this is the
//! GPU backend (quantized matmuls, attention, norms, RoPE and the KV cache all in VRAM; layers
//! that do not fit the VRAM budget stream in; see `cuda/`). The same code runs on candle's CPU
//! backend, where the tests check it against the host pass.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "no_cuda.rs"]
mod cuda;
mod matrices;

use crate::model::{Logits, Sequence};
use crate::rope::RopeTables;
use crate::{Activation, KvCache, LayerWeights, ModelConfig, ModelError, Weights};
use air_gguf::GgufFile;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};
pub use matrices::LayerMatrices;
use std::fmt;
use std::str::FromStr;

/// Where a model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDevice {
    /// The host CPU, with Air's own quantized kernels.
    Cpu,
    /// An NVIDIA GPU, by ordinal (needs a build with the `cuda` feature).
    Cuda(usize),
}

impl ComputeDevice {
    /// CUDA device 0 when this build has CUDA and a GPU is present, else the CPU.
    pub fn preferred() -> Self {
        if cuda::device_count() > 0 { ComputeDevice::Cuda(0) } else { ComputeDevice::Cpu }
    }

    /// The candle device to compute on, or why it cannot be opened.
    pub(crate) fn open(self) -> Result<Device, ModelError> {
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda(ordinal) => cuda::open(ordinal),
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => write!(f, "cpu"),
            ComputeDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for ComputeDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" | "gpu" => Ok(ComputeDevice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(ComputeDevice::Cuda(n)),
                _ => Err(format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
            },
        }
    }
}

/// Counters of weight uploads into VRAM, accumulated over passes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UploadStats {
    /// Layers copied into VRAM slots.
    pub layers: u64,
    /// Bytes copied host-to-device.
    pub bytes: u64,
    /// Time the copy engine spent on those copies, in seconds.
    pub copy_seconds: f64,
    /// Time the compute stream stood waiting for a layer's upload, in seconds.
    pub wait_seconds: f64,
}

impl std::ops::AddAssign for UploadStats {
    fn add_assign(&mut self, other: Self) {
        self.layers += other.layers;
        self.bytes += other.bytes;
        self.copy_seconds += other.copy_seconds;
        self.wait_seconds += other.wait_seconds;
    }
}

impl std::ops::Sub for UploadStats {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            layers: self.layers - earlier.layers,
            bytes: self.bytes - earlier.bytes,
            copy_seconds: self.copy_seconds - earlier.copy_seconds,
            wait_seconds: self.wait_seconds - earlier.wait_seconds,
        }
    }
}

/// The small per-layer tensors (norm weights, biases), resident on the device for every layer.
struct LayerVectors {
    attn_norm: Tensor,
    /// The query, key and value biases end to end, for stacked projections.
    b_qkv: Option<Tensor>,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    post_ffn_norm: Option<Tensor>,
}

impl LayerVectors {
    fn upload(w: &LayerWeights, device: &Device) -> Result<Self, ModelError> {
        let up = |t: &Tensor| t.to_device(device);
        let up_opt = |t: &Option<Tensor>| t.as_ref().map(up).transpose();
        let b_qkv = match (&w.bq, &w.bk, &w.bv) {
            (Some(q), Some(k), Some(v)) => Some(up(&Tensor::cat(&[q, k, v], 0)?)?),
            _ => None,
        };
        Ok(Self {
            attn_norm: up(&w.attn_norm)?,
            b_qkv,
            bq: up_opt(&w.bq)?,
            bk: up_opt(&w.bk)?,
            bv: up_opt(&w.bv)?,
            q_norm: up_opt(&w.q_norm)?,
            k_norm: up_opt(&w.k_norm)?,
            post_attn_norm: up_opt(&w.post_attn_norm)?,
            ffn_norm: up(&w.ffn_norm)?,
            post_ffn_norm: up_opt(&w.post_ffn_norm)?,
        })
    }
}

/// A sequence's share of a device pass: its cache, its rows in the stacked activations, and
/// what op-by-op attention needs of its positions (none when Air's decode kernels serve the step).
struct Part<'a> {
    cache: &'a mut KvCache,
    row: usize,
    n: usize,
    positions: Option<Positions>,
}

/// RoPE tables and attention masks of a sequence's new positions.
struct Positions {
    tables: RopeTables,
    local_tables: Option<RopeTables>,
    /// Additive attention masks (n, start + n): causal, and causal within the window.
    mask: Option<Tensor>,
    local_mask: Option<Tensor>,
}

impl Positions {
    /// For the `n` positions from `start`.
    fn new(model: &crate::Model, start: usize, n: usize, device: &Device) -> Result<Self, ModelError> {
        let window = model.config().sliding_window.map(|w| w.size);
        Ok(Self {
            tables: model.rope.tables(start, n, device)?,
            local_tables: model.local_rope.as_ref().map(|r| r.tables(start, n, device)).transpose()?,
            mask: attention_mask(start, n, None, device)?,
            local_mask: window.map(|w| attention_mask(start, n, Some(w), device)).transpose()?.flatten(),
        })
    }
}

/// What every layer of one pass shares beyond the sequences' parts.
#[derive(Default)]
struct PassState {
    /// Inputs of Air's decode kernels, when every sequence adds one token on CUDA.
    decode: Option<cuda::DecodeStep>,
}

/// How a GPU rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceNumerics {
    /// As llama.cpp's CUDA backend: candle's kernels, with Air's attention and the CPU's
    /// activation quantization. Logits differ from the CPU's in the last bits, and where a small
    /// model's top two tokens are that close, the greedy text with them.
    #[default]
    Fast,
    /// The CPU pass's arithmetic, bit for bit, for the 32-value block types (Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q8_0): the same logits and the same text as `--device cpu`, slower.
    Cpu,
}

impl FromStr for DeviceNumerics {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fast" => Ok(DeviceNumerics::Fast),
            "cpu" => Ok(DeviceNumerics::Cpu),
            _ => Err(format!("unknown GPU numerics {s:?} (expected fast or cpu)")),
        }
    }
}

/// How the device pass keeps its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceOptions {
    /// Bytes of GPU memory the model may take: weights (resident layers and streaming slots),
    /// activations and KV cache. `None`: the free GPU memory less a margin.
    pub vram_budget: Option<u64>,
    /// Streamed layers uploaded ahead of the one computing.
    pub prefetch_depth: usize,
    /// Host memory the streamed layers may keep pinned (page-locked) between passes.
    pub host_budget: Option<u64>,
    /// How the device rounds.
    pub numerics: DeviceNumerics,
}

/// A model's weights on a candle device, and the pass over them.
pub(crate) struct DeviceModel {
    device: Device,
    vectors: Vec<LayerVectors>,
    /// Each layer's matrices when resident; `None` when streamed.
    matrices: Vec<Option<LayerMatrices>>,
    output_norm: Tensor,
    output: QMatMul,
    /// What a CUDA device adds: VRAM streaming, the memory meter, decode graphs.
    cuda: Option<cuda::Backend>,
    /// The pass with the CPU's numerics, when asked for.
    exact: Option<cuda::ExactNumerics>,
}

impl DeviceModel {
    /// Uploads the model's weights to `device` within `options`' budget.
    pub(crate) fn load(
        file: &GgufFile,
        config: &ModelConfig,
        weights: &Weights,
        device: Device,
        options: DeviceOptions,
    ) -> Result<Self, ModelError> {
        let output_name = if file.tensor("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
        let head_bytes = file.tensor(output_name).map_or(0, |t| t.size_bytes);
        // First, so that the memory in use before loading is measured.
        let cuda = cuda::Backend::load(file, config, &device, options, head_bytes)?;
        let vectors = weights.layers.iter().map(|w| LayerVectors::upload(w, &device)).collect::<Result<_, _>>()?;
        let output = matrices::upload(file, output_name, &device)?;
        let output_norm = weights.output_norm.to_device(&device)?;
        let matrices = (0..config.n_layer)
            .map(|i| match &cuda {
                Some(cuda) if !cuda.is_resident(i) => Ok(None),
                _ => LayerMatrices::upload(file, i, &device).map(Some),
            })
            .collect::<Result<_, ModelError>>()?;
        let exact = match options.numerics {
            DeviceNumerics::Fast => None,
            DeviceNumerics::Cpu => Some(cuda::ExactNumerics::new(file, config, &device)?),
        };
        Ok(Self { device, vectors, matrices, output_norm, output, cuda, exact })
    }

    /// The device computing.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Which layers stay in VRAM and which stream, on a GPU.
    pub(crate) fn vram_plan(&self) -> Option<&air_stream::ResidencyPlan> {
        self.cuda.as_ref().map(cuda::Backend::plan)
    }

    /// Upload counters so far (zero when every layer is resident).
    pub(crate) fn upload_stats(&self) -> UploadStats {
        self.cuda.as_ref().map_or_else(UploadStats::default, cuda::Backend::upload_stats)
    }

    /// Bytes of weights streamed per pass.
    pub(crate) fn streamed_bytes_per_pass(&self) -> u64 {
        self.cuda.as_ref().map_or(0, cuda::Backend::bytes_per_pass)
    }

    /// Host-to-device bandwidth from pinned memory, measured once (bytes per second); `None`
    /// off CUDA.
    pub(crate) fn measure_pinned_upload(&self) -> Result<Option<f64>, ModelError> {
        self.cuda.as_ref().map(|c| c.measure_pinned_upload(&self.device)).transpose()
    }

    /// The most GPU memory the model has taken so far (sampled after every layer: the device's
    /// memory in use less what was in use before loading), in bytes; `None` off CUDA.
    pub(crate) fn peak_memory(&self) -> Option<u64> {
        self.cuda.as_ref().map(cuda::Backend::peak_memory)
    }

    /// The pass of [`crate::Model::forward_batch`] on the device.
    pub(crate) fn forward_batch(
        &self,
        model: &crate::Model,
        batch: &mut [Sequence<'_>],
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        if let Some(exact) = &self.exact {
            return cuda::exact_forward(self, exact, model, batch, logits);
        }
        let c = model.config();
        let spans = batch.iter().map(Sequence::span).collect::<Result<Vec<_>, _>>()?;
        if spans.iter().all(|&(_, n)| n == 0) {
            return Ok(Vec::new());
        }
        let mut state = PassState { decode: cuda::DecodeStep::new(model, batch, &self.device)? };
        let mut tokens = Vec::new();
        let mut parts = Vec::with_capacity(batch.len());
        for (seq, &(start, n)) in batch.iter_mut().zip(&spans) {
            let positions = match state.decode {
                Some(_) => None,
                None => Some(Positions::new(model, start, n, &self.device)?),
            };
            parts.push(Part { cache: &mut *seq.cache, row: tokens.len(), n, positions });
            tokens.extend_from_slice(seq.tokens);
        }
        let rows = logit_rows(parts.iter().map(|p| (p.row, p.n)), logits);
        let mut x = model.weights.token_embd.rows(&tokens)?.to_device(&self.device)?;
        if let Some(scale) = c.embedding_scale {
            x = (x * scale as f64)?;
        }
        // A logit row per sequence of a decode step: replay it as a CUDA graph where the model
        // allows (every layer resident).
        if let (Some(cuda), Some(step)) = (&self.cuda, state.decode.take()) {
            if rows.len() == parts.len() {
                match cuda.graphed_decode(self, model, step, &x)? {
                    Ok(logits) => {
                        for part in &mut parts {
                            part.cache.advance(part.n);
                        }
                        return Ok(logits);
                    }
                    Err(step) => state.decode = Some(step),
                }
            } else {
                state.decode = Some(step);
            }
        }
        for i in 0..c.n_layer {
            x = match &self.matrices[i] {
                Some(m) => self.block(model, i, m, &x, &mut parts, &state)?,
                None => self.streamed_block(model, i, &x, &mut parts, &state)?,
            };
            if let Some(cuda) = &self.cuda {
                cuda.sample_memory();
            }
        }
        for part in &mut parts {
            part.cache.advance(part.n);
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let index = Tensor::new(rows.as_slice(), &self.device)?;
        let x = candle_nn::ops::rms_norm(&x.index_select(&index, 0)?, &self.output_norm, c.rms_norm_eps)?;
        Ok(matrices::matmul(&self.output, &x)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A block whose matrices stream into VRAM: waits for its upload, computes, frees the slot.
    fn streamed_block(
        &self,
        model: &crate::Model,
        i: usize,
        x: &Tensor,
        parts: &mut [Part<'_>],
        state: &PassState,
    ) -> Result<Tensor, ModelError> {
        match &self.cuda {
            Some(cuda) => cuda.with_streamed(i, |m| self.block(model, i, m, x, parts, state)),
            None => Err(ModelError::Device(format!("layer {i} has no weights on the device"))),
        }
    }

    /// One transformer block over the rows of every sequence (see the host pass in `model.rs`).
    fn block(
        &self,
        model: &crate::Model,
        index: usize,
        m: &LayerMatrices,
        x: &Tensor,
        parts: &mut [Part<'_>],
        state: &PassState,
    ) -> Result<Tensor, ModelError> {
        if let Some(step) = &state.decode
            && let Some(y) = cuda::fused_block(self, model, index, m, x, step)?
        {
            return Ok(y);
        }
        let c = model.config();
        let v = &self.vectors[index];
        let eps = c.rms_norm_eps;
        let h = candle_nn::ops::rms_norm(x, &v.attn_norm, eps)?;
        let attn = self.layer_attention(model, index, m, v, &h, parts, state)?;
        let x = (x + post_norm(matrices::matmul(m.wo(), &attn)?, &v.post_attn_norm, eps)?)?;
        let h = candle_nn::ops::rms_norm(&x, &v.ffn_norm, eps)?;
        let ffn = matrices::matmul(m.w_down(), &self.gated(c, m, &h)?)?;
        Ok((x + post_norm(ffn, &v.post_ffn_norm, eps)?)?)
    }

    /// The gated feed-forward activation of `h`: act(gate) * up.
    fn gated(&self, c: &ModelConfig, m: &LayerMatrices, h: &Tensor) -> Result<Tensor, ModelError> {
        if let Some(gated) = cuda::stacked_gated(&self.device, c, m, h)? {
            return Ok(gated);
        }
        let [gate, up] = m.gate_up(h)?;
        Ok(match c.activation {
            Activation::Silu => (gate.silu()? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        })
    }

    /// The attention sub-layer of layer `index` for the normed input `h`: (rows, heads × head_dim).
    #[allow(clippy::too_many_arguments)]
    fn layer_attention(
        &self,
        model: &crate::Model,
        index: usize,
        m: &LayerMatrices,
        v: &LayerVectors,
        h: &Tensor,
        parts: &mut [Part<'_>],
        state: &PassState,
    ) -> Result<Tensor, ModelError> {
        let c = model.config();
        let qk_norm = v.q_norm.is_some() || v.k_norm.is_some();
        if let Some(step) = &state.decode
            && let Some(attn) = step.stacked_attention(model, index, m, h, &v.b_qkv, qk_norm)?
        {
            return Ok(attn);
        }
        let rows = h.dim(0)?;
        let eps = c.rms_norm_eps;
        let finish = |mut y: Tensor, bias: &Option<Tensor>, norm: &Option<Tensor>, heads: usize| {
            if let Some(b) = bias {
                y = y.broadcast_add(b)?;
            }
            if let Some(norm) = norm {
                let per_head = y.reshape((rows * heads, c.head_dim))?;
                y = candle_nn::ops::rms_norm(&per_head, norm, eps)?.reshape((rows, heads * c.head_dim))?;
            }
            Ok::<_, ModelError>(y)
        };
        let [q, k, val] = m.qkv(h)?;
        let qkv = Projections {
            q: finish(q, &v.bq, &v.q_norm, c.n_head)?,
            k: finish(k, &v.bk, &v.k_norm, c.n_head_kv)?,
            v: finish(val, &v.bv, &None, c.n_head_kv)?,
        };
        if let Some(step) = &state.decode {
            return cuda::DecodeStep::decode_attention(model, index, step, &qkv);
        }
        self.attention(model, index, parts, &qkv)
    }

    /// Attention of layer `index` sequence by sequence, from candle ops: any number of new
    /// tokens per sequence. Returns (rows, heads * head_dim).
    fn attention(
        &self,
        model: &crate::Model,
        index: usize,
        parts: &mut [Part<'_>],
        qkv: &Projections,
    ) -> Result<Tensor, ModelError> {
        let c = model.config();
        let (window, _) = c.layer_attention(index);
        let group = c.n_head / c.n_head_kv;
        let mut outputs = Vec::with_capacity(parts.len());
        let (q_scale, score_scale) = c.attention_scales();
        for part in parts.iter_mut() {
            let p = part.positions.as_ref().ok_or_else(|| {
                ModelError::Device("attention of a sequence whose positions were not prepared".into())
            })?;
            let (rope, tables, mask) = match (&model.local_rope, &p.local_tables, window) {
                (Some(r), Some(t), Some(_)) => (r, t, &p.local_mask),
                (_, _, Some(_)) => (&model.rope, &p.tables, &p.local_mask),
                _ => (&model.rope, &p.tables, &p.mask),
            };
            // (n, heads * head_dim) -> (1, heads, n, head_dim)
            let heads_first = |y: &Tensor, heads: usize| -> Result<Tensor, ModelError> {
                let y = y.narrow(0, part.row, part.n)?;
                Ok(y.reshape((1, part.n, heads, c.head_dim))?.transpose(1, 2)?.contiguous()?)
            };
            let mut q = rope.apply(&heads_first(&qkv.q, c.n_head)?, tables)?;
            if q_scale != 1.0 {
                q = (q * q_scale as f64)?;
            }
            let k = rope.apply(&heads_first(&qkv.k, c.n_head_kv)?, tables)?.squeeze(0)?;
            let val = heads_first(&qkv.v, c.n_head_kv)?.squeeze(0)?;
            let (keys, values) = part.cache.append_on_device(index, &k, &val)?;
            let total = keys.dim(1)?;
            // Queries grouped by the KV head they share: (kv_heads, group * n, head_dim).
            let q = q.reshape((c.n_head_kv, group * part.n, c.head_dim))?;
            let mut scores = (q.matmul(&keys.t()?)? * score_scale as f64)?;
            if let Some(mask) = mask {
                scores = scores.reshape((c.n_head_kv, group, part.n, total))?.broadcast_add(mask)?.reshape((
                    c.n_head_kv,
                    group * part.n,
                    total,
                ))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&values)?.reshape((c.n_head, part.n, c.head_dim))?;
            outputs.push(out.transpose(0, 1)?.reshape((part.n, c.n_head * c.head_dim))?);
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }
}

/// The rows (among a pass's stacked rows) whose logits `logits` asks for, of sequences placed at
/// (first row, rows).
fn logit_rows(sequences: impl Iterator<Item = (usize, usize)>, logits: Logits) -> Vec<u32> {
    let mut rows = Vec::new();
    for (row, n) in sequences {
        let from = match logits {
            Logits::Last => n.saturating_sub(1),
            Logits::From(i) => i,
        };
        rows.extend((row + from.min(n)..row + n).map(|r| r as u32));
    }
    rows
}

/// A block's query, key and value projections, (rows, heads * head_dim) each.
struct Projections {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

/// RMSNorm of a sub-layer's output before its residual add, where the family has one.
fn post_norm(y: Tensor, norm: &Option<Tensor>, eps: f32) -> Result<Tensor, ModelError> {
    Ok(match norm {
        Some(norm) => candle_nn::ops::rms_norm(&y, norm, eps)?,
        None => y,
    })
}

/// The additive mask (n, start + n) of `n` queries at positions `start..start + n`: 0 where a
/// query sees a key (causal, and within `window` when given), -inf elsewhere. `None` when every
/// query sees every key (a single new position with nothing beyond the window).
fn attention_mask(
    start: usize,
    n: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>, ModelError> {
    let total = start + n;
    let visible = |pos: usize, key: usize| key <= pos && window.is_none_or(|w| key + w > pos);
    if (start..total).all(|pos| (0..total).all(|key| visible(pos, key))) {
        return Ok(None);
    }
    let mask: Vec<f32> = (start..total)
        .flat_map(|pos| (0..total).map(move |key| if visible(pos, key) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (n, total), device)?))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<ComputeDevice>(), Ok(ComputeDevice::Cpu));
        assert_eq!("CUDA".parse::<ComputeDevice>(), Ok(ComputeDevice::Cuda(0)));
        assert_eq!("cuda:3".parse::<ComputeDevice>(), Ok(ComputeDevice::Cuda(3)));
        assert!("cuda:x".parse::<ComputeDevice>().is_err());
        assert!("tpu".parse::<ComputeDevice>().is_err());
        assert_eq!(ComputeDevice::Cuda(1).to_string(), "cuda:1");
    }

    fn mask(start: usize, n: usize, window: Option<usize>) -> Option<Vec<Vec<bool>>> {
        let m = attention_mask(start, n, window, &Device::Cpu).unwrap()?;
        let rows = m.to_vec2::<f32>().unwrap();
        Some(rows.iter().map(|r| r.iter().map(|&v| v == 0.0).collect()).collect())
    }

    #[test]
    fn masks_are_causal_and_windowed() {
        // One new position seeing everything needs no mask.
        assert_eq!(mask(5, 1, None), None);
        assert_eq!(mask(5, 1, Some(8)), None);
        // Two queries at positions 1 and 2 over keys 0..3.
        assert_eq!(mask(1, 2, None), Some(vec![vec![true, true, false], vec![true, true, true]]));
        // A window of 2: position 2 sees keys 1 and 2 only.
        assert_eq!(mask(1, 2, Some(2)), Some(vec![vec![true, true, false], vec![false, true, true]]));
        // A single query beyond the window still needs its mask.
        assert_eq!(mask(3, 1, Some(2)), Some(vec![vec![false, false, true, true]]));
    }
}
