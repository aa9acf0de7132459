//! Quantized linear layers on the CPU: weights in their GGUF block format (mapped in place),
//! activations quantized as ggml does ([`crate::activation_quant`]), dot products by candle's
//! block kernels or Air's where candle's are slow ([`crate::block_dot`]), spread over the
//! rayon pool by output columns.

use crate::ModelError;
use crate::block_dot::BlockDot;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
use crate::block_dot::FastDot;
use crate::host::with_f32;
use crate::mapped::MappedBlocks;
use air_gguf::{GgufFile, TensorInfo, TensorType};
use candle_core::quantized::k_quants;
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Fewest weight rows (output columns) per parallel work item.
const MIN_COLUMNS_PER_TASK: usize = 32;
/// Activation rows per parallel work item: with the task's weight rows, a tile of blocks that
/// stays in the core's cache while the kernel works through it.
const ROWS_PER_TASK: usize = 48;
/// Work items per thread to aim for: enough to balance the load, few enough that scheduling
/// stays a small cost (a generation step runs hundreds of matmuls).
const TASKS_PER_THREAD: usize = 8;

/// llama.cpp multiplies matrices of K-quant weights by a batched kernel, which rounds
/// differently from its one-row dot products, when they have this many activation rows or more.
pub const BATCHED_MATMUL_ROWS: usize = 8;

/// The math a weight matrix of one block type supports.
trait Blocks: Send + Sync {
    /// out (m, n) = x (m, k) · Wᵀ, W being (n, k) in blocks; rows flagged in `batched` (empty:
    /// none) by the batched arithmetic ([`BlockDot::dots`]).
    /// Writes every element of `out`.
    fn matmul(&self, x: &[f32], m: usize, n: usize, k: usize, batched: &[bool], out: &mut [MaybeUninit<f32>]);
    /// Dequantizes row `row` (k values) into `out`.
    fn row(&self, row: usize, k: usize, out: &mut [f32]);
}

/// Pointer to the output, shared by workers that write disjoint elements.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: workers write disjoint elements (distinct tiles), see `matmul`.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// Writes `values` at element `at`.
    /// SAFETY (caller): the range is in bounds and no other thread writes or reads it.
    unsafe fn write(self, at: usize, values: &[f32]) {
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len()) }
    }
}

/// out (m, n) = x (m, k) · Wᵀ for `w`, n rows of k values in blocks of `block` values: `x`
/// quantized once by `quantize`, then `dots(w rows, activations, activation rows, out, stride)`
/// over (activation rows, weight rows) tiles spread across the compute pool.
fn parallel_matmul<W: Sync, A: Sync>(
    w: &[W],
    block: usize,
    (x, m, n, k): (&[f32], usize, usize, usize),
    quantize: impl FnOnce(&[f32], usize) -> A,
    dots: impl Fn(&[W], &A, std::ops::Range<usize>, &mut [f32], usize) + Sync,
    out: &mut [MaybeUninit<f32>],
) {
    let kb = k / block;
    let xq = quantize(&x[..m * k], k);
    assert!(out.len() >= m * n && w.len() >= n * kb);
    let dst = Output(out.as_mut_ptr().cast());
    let row_tasks = m.div_ceil(ROWS_PER_TASK);
    let wanted = (rayon::current_num_threads() * TASKS_PER_THREAD).div_ceil(row_tasks);
    let per_task = n.div_ceil(wanted).next_multiple_of(16).max(MIN_COLUMNS_PER_TASK);
    let column_tasks = n.div_ceil(per_task);
    (0..column_tasks * row_tasks).into_par_iter().for_each(|task| {
        let cols = (task % column_tasks) * per_task..((task % column_tasks + 1) * per_task).min(n);
        let rows = (task / column_tasks) * ROWS_PER_TASK..((task / column_tasks + 1) * ROWS_PER_TASK).min(m);
        let width = cols.len();
        let mut tile = vec![0f32; width * rows.len()];
        dots(&w[cols.start * kb..cols.end * kb], &xq, rows.clone(), &mut tile, width);
        for (r, values) in rows.zip(tile.chunks_exact(width)) {
            // SAFETY: r < m and cols within n, so the range is inside out (m * n); tasks
            // cover disjoint (rows, cols) tiles.
            unsafe { dst.write(r * n + cols.start, values) };
        }
    });
}

impl<T> Blocks for MappedBlocks<T>
where
    T: BlockDot + 'static,
{
    fn matmul(&self, x: &[f32], m: usize, n: usize, k: usize, batched: &[bool], out: &mut [MaybeUninit<f32>]) {
        let kb = k / T::BLCK_SIZE;
        parallel_matmul(
            self.blocks(),
            T::BLCK_SIZE,
            (x, m, n, k),
            T::quantize,
            |w, xq, rows, tile, stride| T::dots(kb, w, xq, rows, batched, tile, stride),
            out,
        );
    }

    fn row(&self, row: usize, k: usize, out: &mut [f32]) {
        let kb = k / T::BLCK_SIZE;
        T::to_float(&self.blocks()[row * kb..(row + 1) * kb], out);
    }
}

/// How the CPU rounds the matmuls of the 32-value block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuNumerics {
    /// ggml's CPU order, so llama.cpp's logits bit for bit.
    #[default]
    Ggml,
    /// Each block's dot product summed in integers, then one rounding per block: 16 outputs
    /// per AVX-512 register, matmuls 1.9-2.6x faster (needs AVX-512 VNNI; docs/benchmarks.md).
    /// Logits differ from llama.cpp's, on small models by tenths (docs/numerics.md). The
    /// K-quants keep ggml's order.
    Fast,
}

impl CpuNumerics {
    /// Whether this CPU computes with these numerics.
    pub fn supported(self) -> bool {
        self == Self::Ggml || crate::block_dot::fast_supported()
    }
}

impl std::str::FromStr for CpuNumerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ggml" => Ok(Self::Ggml),
            "fast" => Ok(Self::Fast),
            other => Err(format!("unknown CPU numerics {other:?} (expected ggml or fast)")),
        }
    }
}

/// A weight matrix multiplied by the per-block integer kernels ([`CpuNumerics::Fast`]).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
struct FastBlocks<T>(MappedBlocks<T>);

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
impl<T> Blocks for FastBlocks<T>
where
    T: BlockDot + FastDot + 'static,
{
    fn matmul(&self, x: &[f32], m: usize, n: usize, k: usize, _batched: &[bool], out: &mut [MaybeUninit<f32>]) {
        let kb = k / T::BLCK_SIZE;
        parallel_matmul(
            self.0.blocks(),
            T::BLCK_SIZE,
            (x, m, n, k),
            T::fast_quantize,
            |w, xq, rows, tile, stride| T::fast_dots(kb, w, xq, rows, tile, stride),
            out,
        );
    }

    fn row(&self, row: usize, k: usize, out: &mut [f32]) {
        self.0.row(row, k, out)
    }
}

/// A weight matrix of shape (n outputs, k inputs) applied as y = x·Wᵀ.
pub struct Linear {
    blocks: Box<dyn Blocks>,
    n: usize,
    k: usize,
}

fn boxed<T>(file: &GgufFile, info: &TensorInfo) -> Option<Box<dyn Blocks>>
where
    T: BlockDot + 'static,
{
    let blocks = MappedBlocks::<T>::new(file, info)?;
    Some(Box::new(blocks))
}

/// [`boxed`], by the per-block integer kernels where `numerics` asks for them.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
fn boxed_fast<T>(file: &GgufFile, info: &TensorInfo, numerics: CpuNumerics) -> Option<Box<dyn Blocks>>
where
    T: BlockDot + FastDot + 'static,
{
    match numerics {
        CpuNumerics::Ggml => boxed::<T>(file, info),
        CpuNumerics::Fast => Some(Box::new(FastBlocks(MappedBlocks::<T>::new(file, info)?))),
    }
}

/// Builds without the kernels: [`Linear::new`] refuses [`CpuNumerics::Fast`] before this.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
fn boxed_fast<T>(file: &GgufFile, info: &TensorInfo, _numerics: CpuNumerics) -> Option<Box<dyn Blocks>>
where
    T: BlockDot + 'static,
{
    boxed::<T>(file, info)
}

impl Linear {
    /// Maps a 2-D GGUF tensor (GGUF dims [k, n]) as a linear layer whose matmuls round as
    /// `numerics` says.
    pub fn new(file: &GgufFile, info: &TensorInfo, numerics: CpuNumerics) -> Result<Self, ModelError> {
        use k_quants::*;
        if !numerics.supported() {
            return Err(ModelError::Config("CPU numerics \"fast\" need a CPU with AVX-512 VNNI".into()));
        }
        let (k, n) = match info.dims[..] {
            [k, n] => (k as usize, n as usize),
            [k] => (k as usize, 1),
            _ => return Err(ModelError::Config(format!("tensor {:?} is not a matrix: {:?}", info.name, info.dims))),
        };
        let blocks = match info.ty {
            TensorType::F32 => boxed::<f32>(file, info),
            TensorType::F16 => boxed::<f16>(file, info),
            TensorType::BF16 => boxed::<bf16>(file, info),
            TensorType::Q4_0 => boxed_fast::<BlockQ4_0>(file, info, numerics),
            TensorType::Q4_1 => boxed_fast::<BlockQ4_1>(file, info, numerics),
            TensorType::Q5_0 => boxed_fast::<BlockQ5_0>(file, info, numerics),
            TensorType::Q5_1 => boxed_fast::<BlockQ5_1>(file, info, numerics),
            TensorType::Q8_0 => boxed_fast::<BlockQ8_0>(file, info, numerics),
            TensorType::Q2_K => boxed::<BlockQ2K>(file, info),
            TensorType::Q3_K => boxed::<BlockQ3K>(file, info),
            TensorType::Q4_K => boxed::<BlockQ4K>(file, info),
            TensorType::Q5_K => boxed::<BlockQ5K>(file, info),
            TensorType::Q6_K => boxed::<BlockQ6K>(file, info),
            _ => return Err(ModelError::UnsupportedTensorType { name: info.name.clone(), ty: info.ty }),
        }
        .ok_or_else(|| ModelError::Config(format!("tensor {:?} data is misaligned in the file", info.name)))?;
        Ok(Self { blocks, n, k })
    }

    /// y (m, n) = x (m, k) · Wᵀ. The rows flagged in `batched` (one flag per row, or empty for
    /// none) round as llama.cpp's batched matmul does (see [`BATCHED_MATMUL_ROWS`]); flags
    /// chosen per row, not per call, keep a row's result independent of the rows beside it.
    pub fn forward(&self, x: &Tensor, batched: &[bool]) -> Result<Tensor, ModelError> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            return Err(ModelError::Config(format!("linear layer expects {} inputs, got {k}", self.k)));
        }
        let mut out = Vec::with_capacity(m * self.n);
        with_f32(x, |xs| {
            self.blocks.matmul(xs, m, self.n, self.k, batched, &mut out.spare_capacity_mut()[..m * self.n])
        })?;
        // SAFETY: `matmul` wrote all m × n outputs.
        unsafe { out.set_len(m * self.n) };
        Ok(Tensor::from_vec(out, (m, self.n), &Device::Cpu)?)
    }

    /// Rows of W dequantized, as an embedding lookup: (ids.len(), k).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor, ModelError> {
        let mut out = vec![0f32; ids.len() * self.k];
        for (dst, &id) in out.chunks_exact_mut(self.k).zip(ids) {
            if id as usize >= self.n {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.n });
            }
            self.blocks.row(id as usize, self.k, dst);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.k), &Device::Cpu)?)
    }
}
