//! S.L.I.P. over PCIe: the layers that do not fit the VRAM budget stream into a ring of VRAM
//! slots on every pass.
//!
//! - A loader thread copies a layer's matrices from the file mapping into pinned (page-locked)
//!   staging memory, then queues host-to-device copies into a free slot on a copy stream of its
//!   own and records the slot's *ready* event.
//! - The compute stream waits (on the GPU, not the host) for that event before the layer's
//!   kernels, and records the slot's *free* event after them; the copy stream waits for *free*
//!   before the slot's next upload. So compute waits only for the layer it needs, uploads overlap
//!   the other layers' compute, and a slot is reused as soon as its layer is done.
//! - When the streamed layers fit the host budget, each keeps its own pinned staging buffer
//!   after the first pass (a pinned host tier): later passes copy straight from it.

use crate::device::UploadStats;
use crate::device::matrices::{LayerMatrices, MATRIX_NAMES, ggml_dtype, matrix_shape};
use crate::{ModelConfig, ModelError};
use air_gguf::GgufFile;
use air_stream::ResidencyPlan;
use candle_core::CudaDevice;
use candle_core::quantized::cuda::QCudaStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, PinnedHostSlice, result, sys};
use memmap2::Mmap;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// GPU memory kept out of the weights' share of a VRAM budget: activations, KV caches and the
/// libraries' workspaces.
pub(crate) const WORKSPACE_RESERVE: u64 = 512 << 20;

/// Bytes one memcpy task moves into staging memory.
const FILL_CHUNK: usize = 4 << 20;

/// A matrix's type and (rows, columns): the slot tensor it can be uploaded into.
type MatrixKind = (GgmlDType, (usize, usize));

fn driver(e: DriverError) -> ModelError {
    ModelError::Device(format!("CUDA: {e}"))
}

/// One matrix of a streamed layer: where its bytes are in the file, and its kind.
#[derive(Clone)]
struct Source {
    range: Range<usize>,
    kind: MatrixKind,
}

/// A streamed layer's matrices, in [`MATRIX_NAMES`] order.
#[derive(Clone)]
struct LayerSource {
    matrices: Vec<Source>,
    bytes: usize,
}

fn layer_source(file: &GgufFile, layer: usize) -> Result<LayerSource, ModelError> {
    let mut matrices = Vec::with_capacity(MATRIX_NAMES.len());
    for name in MATRIX_NAMES {
        let name = format!("blk.{layer}.{name}.weight");
        let info = file.tensor(&name).ok_or(ModelError::MissingTensor(name))?;
        let dtype = ggml_dtype(info)?;
        if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Err(ModelError::Device(format!(
                "{} is not quantized ({}): only quantized layers can stream into VRAM",
                info.name, info.ty
            )));
        }
        matrices.push(Source { range: file.tensor_range(info), kind: (dtype, matrix_shape(info)?) });
    }
    let bytes = matrices.iter().map(|m| m.range.len()).sum();
    Ok(LayerSource { matrices, bytes })
}

/// Which layers' matrices stay in VRAM for a budget of `budget` bytes (for the layers), with
/// `depth` streamed layers uploaded ahead of the one computing.
pub(crate) fn plan(
    file: &GgufFile,
    config: &ModelConfig,
    budget: u64,
    depth: usize,
) -> Result<ResidencyPlan, ModelError> {
    let sizes = (0..config.n_layer)
        .map(|i| {
            MATRIX_NAMES.iter().try_fold(0u64, |sum, name| {
                let name = format!("blk.{i}.{name}.weight");
                let info = file.tensor(&name).ok_or(ModelError::MissingTensor(name))?;
                Ok::<_, ModelError>(sum + info.size_bytes)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ResidencyPlan::new(&sizes, budget, depth.max(1)))
}

/// A VRAM slot's tensor for one matrix kind: uploads write straight into its storage.
struct SlotMatrix {
    kind: MatrixKind,
    ptr: sys::CUdeviceptr,
    matmul: QMatMul,
}

/// A slot: for each of the seven matrices, a tensor of every kind the streamed layers use there
/// (files mix types, e.g. Q6_K `ffn_down` in some layers of a Q4_K_M file).
struct Slot {
    matrices: Vec<Vec<SlotMatrix>>,
    /// Recorded on the copy stream when the slot's layer is in VRAM.
    ready: CudaEvent,
    /// Recorded on the compute stream when the slot's layer is done with.
    free: CudaEvent,
}

impl Slot {
    fn new(cuda: &CudaDevice, kinds: &[Vec<MatrixKind>], ctx: &Arc<CudaContext>) -> Result<Self, ModelError> {
        let matrices = kinds
            .iter()
            .map(|kinds| {
                kinds
                    .iter()
                    .map(|&(dtype, (rows, cols))| {
                        let storage = QCudaStorage::zeros(cuda, rows * cols, dtype)?;
                        let tensor = QTensor::new(QStorage::Cuda(storage), (rows, cols))?;
                        let ptr = tensor.device_ptr()? as sys::CUdeviceptr;
                        let matmul = QMatMul::QTensor(Arc::new(tensor));
                        Ok(SlotMatrix { kind: (dtype, (rows, cols)), ptr, matmul })
                    })
                    .collect::<Result<Vec<_>, ModelError>>()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { matrices, ready: ctx.new_event(None).map_err(driver)?, free: ctx.new_event(None).map_err(driver)? })
    }

    fn matrix(&self, role: usize, kind: MatrixKind) -> &SlotMatrix {
        self.matrices[role].iter().find(|m| m.kind == kind).expect("slots hold every kind the streamed layers use")
    }

    fn layer(&self, source: &LayerSource) -> LayerMatrices {
        let matmuls: [QMatMul; 7] =
            std::array::from_fn(|role| self.matrix(role, source.matrices[role].kind).matmul.clone());
        LayerMatrices::new(matmuls)
    }
}

/// Page-locked host memory a layer is staged in before its upload.
struct Staging {
    memory: PinnedHostSlice<u8>,
    /// Recorded on the copy stream after the last upload from this memory.
    uploaded: CudaEvent,
    /// The position whose layer the memory holds, if any.
    holds: Option<usize>,
}

/// Progress shared by the compute side and the loader thread, in *positions*: the n-th streamed
/// layer acquired since load (passes wrap around the streamed layers).
#[derive(Default)]
struct Progress {
    /// Positions whose uploads are queued (their slot's `ready` recorded).
    issued: usize,
    /// Positions whose layer compute is done with.
    released: usize,
    stop: bool,
    error: Option<String>,
    /// Timing events of queued uploads not yet counted, with their bytes.
    uploads: Vec<(CudaEvent, CudaEvent, u64)>,
    /// Timing events around the compute stream's waits not yet counted.
    waits: Vec<(CudaEvent, CudaEvent)>,
    stats: UploadStats,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the loader thread owns and what it shares with compute.
struct Loader {
    map: Arc<Mmap>,
    order: Vec<usize>,
    sources: Vec<LayerSource>,
    slots: Arc<Vec<Slot>>,
    staging: Vec<Staging>,
    /// One staging buffer per streamed layer: filled on the first pass only.
    pinned_tier: bool,
    ctx: Arc<CudaContext>,
    copy: Arc<CudaStream>,
    shared: Arc<Shared>,
}

// SAFETY: the loader thread alone touches the staging memory (raw host pointers); slot device
// pointers are written only by its copy stream, ordered by events against compute.
unsafe impl Send for Loader {}

impl Loader {
    fn run(mut self) {
        let mut position = 0;
        loop {
            {
                let mut p = self.shared.lock();
                while !p.stop && position >= p.released + self.slots.len() {
                    p = self.shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.stop {
                    return;
                }
            }
            let result = self.upload(position);
            let mut p = self.shared.lock();
            match result {
                Ok(timing) => {
                    p.issued = position + 1;
                    p.uploads.push(timing);
                }
                Err(e) => {
                    p.error = Some(e.to_string());
                    self.shared.changed.notify_all();
                    return;
                }
            }
            self.shared.changed.notify_all();
            position += 1;
        }
    }

    /// Stages the layer of `position` and queues its upload into its slot.
    fn upload(&mut self, position: usize) -> Result<(CudaEvent, CudaEvent, u64), ModelError> {
        let n = self.order.len();
        let source = &self.sources[position % n];
        let slot = &self.slots[position % self.slots.len()];
        let buffer = if self.pinned_tier { position % n } else { position % self.staging.len() };
        let staging = &mut self.staging[buffer];
        let cached = self.pinned_tier && staging.holds.is_some();
        staging.uploaded.synchronize().map_err(driver)?;
        if !cached {
            let host = staging.memory.as_mut_slice().map_err(driver)?;
            let mut at = 0;
            for m in &source.matrices {
                let len = m.range.len();
                host[at..at + len]
                    .par_chunks_mut(FILL_CHUNK)
                    .zip(self.map[m.range.clone()].par_chunks(FILL_CHUNK))
                    .for_each(|(dst, src)| dst.copy_from_slice(src));
                at += len;
            }
            staging.holds = Some(position);
        }
        self.ctx.bind_to_thread().map_err(driver)?;
        self.copy.wait(&slot.free).map_err(driver)?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.copy.record_event(timing).map_err(driver)?;
        let host = staging.memory.as_slice().map_err(driver)?;
        let mut at = 0;
        for (role, m) in source.matrices.iter().enumerate() {
            let len = m.range.len();
            let dst = slot.matrix(role, m.kind).ptr;
            // SAFETY: the slot tensor holds at least `len` bytes (same kind); the copy stream
            // waited for the slot's previous layer to be done with it; the staging memory is not
            // rewritten before `uploaded` completes.
            unsafe { result::memcpy_htod_async(dst, &host[at..at + len], self.copy.cu_stream()) }.map_err(driver)?;
            at += len;
        }
        let end = self.copy.record_event(timing).map_err(driver)?;
        slot.ready.record(&self.copy).map_err(driver)?;
        staging.uploaded.record(&self.copy).map_err(driver)?;
        Ok((start, end, source.bytes as u64))
    }
}

/// Streams the layers a [`ResidencyPlan`] does not keep in VRAM.
pub(crate) struct VramStreamer {
    order: Vec<usize>,
    sources: Vec<LayerSource>,
    slots: Arc<Vec<Slot>>,
    shared: Arc<Shared>,
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    /// The next position compute will acquire.
    next: Mutex<usize>,
    loader: Option<JoinHandle<()>>,
}

impl VramStreamer {
    /// Slots for the streamed layers of `plan`, and the loader thread that fills them. Streamed
    /// layers keep pinned host copies when they fit half of `host_budget`.
    pub(crate) fn new(
        file: &GgufFile,
        cuda: &CudaDevice,
        plan: ResidencyPlan,
        host_budget: Option<u64>,
    ) -> Result<Self, ModelError> {
        let order: Vec<usize> = plan.streamed().collect();
        let sources = order.iter().map(|&i| layer_source(file, i)).collect::<Result<Vec<_>, _>>()?;
        let mut kinds: Vec<Vec<MatrixKind>> = vec![Vec::new(); MATRIX_NAMES.len()];
        for source in &sources {
            for (role, m) in source.matrices.iter().enumerate() {
                if !kinds[role].contains(&m.kind) {
                    kinds[role].push(m.kind);
                }
            }
        }
        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        let slot_count = (plan.depth() + 1).clamp(1, order.len());
        let slots = (0..slot_count).map(|_| Slot::new(cuda, &kinds, &ctx)).collect::<Result<Vec<_>, _>>()?;
        let largest = sources.iter().map(|s| s.bytes).max().unwrap_or(0);
        let total: u64 = sources.iter().map(|s| s.bytes as u64).sum();
        let pinned_tier = host_budget.is_some_and(|b| total <= b / 2);
        let staging_sizes: Vec<usize> =
            if pinned_tier { sources.iter().map(|s| s.bytes).collect() } else { vec![largest; slot_count + 1] };
        let staging = staging_sizes
            .iter()
            .map(|&len| {
                // SAFETY: the memory is written before any upload reads it.
                let memory = unsafe { ctx.alloc_pinned::<u8>(len.max(1)) }.map_err(driver)?;
                Ok(Staging { memory, uploaded: ctx.new_event(None).map_err(driver)?, holds: None })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        // The slot tensors were zeroed on the compute stream: finish that before any upload.
        stream.synchronize().map_err(driver)?;
        let shared = Arc::new(Shared { progress: Mutex::new(Progress::default()), changed: Condvar::new() });
        let slots = Arc::new(slots);
        let loader = Loader {
            map: file.mmap().clone(),
            order: order.clone(),
            sources: sources.clone(),
            slots: slots.clone(),
            staging,
            pinned_tier,
            ctx: ctx.clone(),
            copy: ctx.new_stream().map_err(driver)?,
            shared: shared.clone(),
        };
        let loader = std::thread::Builder::new()
            .name("air-vram-loader".into())
            .spawn(move || loader.run())
            .map_err(ModelError::Stream)?;
        Ok(Self { order, sources, slots, shared, ctx, compute: stream, next: Mutex::new(0), loader: Some(loader) })
    }

    /// Bytes uploaded per pass.
    pub(crate) fn bytes_per_pass(&self) -> u64 {
        self.sources.iter().map(|s| s.bytes as u64).sum()
    }

    /// Waits until `layer`'s upload is queued and makes the compute stream wait for it; the
    /// returned guard frees the slot when dropped (after the layer's kernels are queued).
    pub(crate) fn acquire(&self, layer: usize) -> Result<Held<'_>, ModelError> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.order.len();
        loop {
            let position = *next;
            {
                let mut p = self.shared.lock();
                while p.issued <= position && p.error.is_none() {
                    p = self.shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if let Some(e) = &p.error {
                    return Err(ModelError::Device(format!("uploading layer weights: {e}")));
                }
            }
            *next += 1;
            if self.order[position % n] == layer {
                let slot = &self.slots[position % self.slots.len()];
                self.ctx.bind_to_thread().map_err(driver)?;
                let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
                let before = self.compute.record_event(timing).map_err(driver)?;
                self.compute.wait(&slot.ready).map_err(driver)?;
                let after = self.compute.record_event(timing).map_err(driver)?;
                self.shared.lock().waits.push((before, after));
                let matrices = slot.layer(&self.sources[position % n]);
                return Ok(Held { streamer: self, position, matrices });
            }
            // A pass that stopped early (an error) left positions unused: skip them.
            self.release(position)?;
        }
    }

    fn release(&self, position: usize) -> Result<(), ModelError> {
        self.slots[position % self.slots.len()].free.record(&self.compute).map_err(driver)?;
        let mut p = self.shared.lock();
        p.released = p.released.max(position + 1);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Upload counters, counting the uploads and waits the GPU has finished.
    pub(crate) fn stats(&self) -> UploadStats {
        let mut p = self.shared.lock();
        let progress = &mut *p;
        let done = |a: &CudaEvent, b: &CudaEvent| a.is_complete() && b.is_complete();
        let seconds = |a: &CudaEvent, b: &CudaEvent| a.elapsed_ms(b).map_or(0.0, |ms| ms as f64 / 1e3);
        progress.uploads.retain(|(start, end, bytes)| {
            if !done(start, end) {
                return true;
            }
            progress.stats.layers += 1;
            progress.stats.bytes += bytes;
            progress.stats.copy_seconds += seconds(start, end);
            false
        });
        progress.waits.retain(|(before, after)| {
            if !done(before, after) {
                return true;
            }
            progress.stats.wait_seconds += seconds(before, after);
            false
        });
        progress.stats
    }
}

impl Drop for VramStreamer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(loader) = self.loader.take() {
            let _ = loader.join();
        }
    }
}

/// A streamed layer in its slot, ready for the compute stream.
pub(crate) struct Held<'a> {
    streamer: &'a VramStreamer,
    position: usize,
    matrices: LayerMatrices,
}

impl Held<'_> {
    pub(crate) fn matrices(&self) -> &LayerMatrices {
        &self.matrices
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.streamer.release(self.position) {
            self.streamer.shared.lock().error.get_or_insert(e.to_string());
        }
    }
}

/// Host-to-device bandwidth from pinned memory, in bytes per second: the best of a few 256 MiB
/// copies on a stream of their own.
pub(crate) fn measure_pinned_upload(cuda: &CudaDevice) -> Result<f64, ModelError> {
    const BYTES: usize = 256 << 20;
    let ctx = cuda.cuda_stream().context().clone();
    let stream = ctx.new_stream().map_err(driver)?;
    // SAFETY: the contents are irrelevant to a bandwidth measurement.
    let host = unsafe { ctx.alloc_pinned::<u8>(BYTES) }.map_err(driver)?;
    let mut device = stream.alloc_zeros::<u8>(BYTES).map_err(driver)?;
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut best = f64::MAX;
    for _ in 0..4 {
        let start = stream.record_event(timing).map_err(driver)?;
        stream.memcpy_htod(&host, &mut device).map_err(driver)?;
        let end = stream.record_event(timing).map_err(driver)?;
        end.synchronize().map_err(driver)?;
        best = best.min(start.elapsed_ms(&end).map_err(driver)? as f64 / 1e3);
    }
    Ok(BYTES as f64 / best)
}

/// Tracks the GPU memory the model takes: the device's memory in use less what was in use when
/// the meter was made (the CUDA context), at its highest.
pub(crate) struct VramMeter {
    ctx: Arc<CudaContext>,
    baseline: u64,
    total: u64,
    peak: std::sync::atomic::AtomicU64,
}

impl VramMeter {
    pub(crate) fn new(cuda: &CudaDevice) -> Result<Self, ModelError> {
        let ctx = cuda.cuda_stream().context().clone();
        let (free, total) = ctx.mem_get_info().map_err(driver)?;
        Ok(Self { ctx, baseline: (total - free) as u64, total: total as u64, peak: Default::default() })
    }

    /// The default VRAM budget: what is free now, less 5% of the device (at least 1 GiB) for
    /// the libraries and other processes.
    pub(crate) fn default_budget(&self) -> u64 {
        let free = self.total - self.baseline;
        free.saturating_sub((self.total / 20).max(1 << 30))
    }

    pub(crate) fn sample(&self) {
        if let Ok((free, total)) = self.ctx.mem_get_info() {
            let used = ((total - free) as u64).saturating_sub(self.baseline);
            self.peak.fetch_max(used, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(crate) fn peak(&self) -> u64 {
        self.sample();
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}
