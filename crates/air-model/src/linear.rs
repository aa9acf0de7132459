//! Quantized linear layers on the CPU: weights in their GGUF block format (mapped in place),
//! activations quantized as ggml does ([`crate::activation_quant`]), dot products by candle's
//! block kernels or Air's where candle's are slow ([`crate::block_dot`]), spread over the
//! rayon pool by output columns.

use crate::ModelError;
use crate::block_dot::BlockDot;
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

impl<T> Blocks for MappedBlocks<T>
where
    T: BlockDot + 'static,
{
    fn matmul(&self, x: &[f32], m: usize, n: usize, k: usize, batched: &[bool], out: &mut [MaybeUninit<f32>]) {
        let w = self.blocks();
        let kb = k / T::BLCK_SIZE;
        let xq = T::quantize(&x[..m * k], k);
        assert!(out.len() >= m * n && w.len() >= n * kb);
        let dst = Output(out.as_mut_ptr().cast());
        let row_tasks = m.div_ceil(ROWS_PER_TASK);
        let wanted = (rayon::current_num_threads() * TASKS_PER_THREAD).div_ceil(row_tasks);
        let per_task = n.div_ceil(wanted).next_multiple_of(4).max(MIN_COLUMNS_PER_TASK);
        let column_tasks = n.div_ceil(per_task);
        (0..column_tasks * row_tasks).into_par_iter().for_each(|task| {
            let cols = (task % column_tasks) * per_task..((task % column_tasks + 1) * per_task).min(n);
            let rows = (task / column_tasks) * ROWS_PER_TASK..((task / column_tasks + 1) * ROWS_PER_TASK).min(m);
            let width = cols.len();
            let mut tile = vec![0f32; width * rows.len()];
            T::dots(kb, &w[cols.start * kb..cols.end * kb], &xq, rows.clone(), batched, &mut tile, width);
            for (r, values) in rows.zip(tile.chunks_exact(width)) {
                // SAFETY: r < m and cols within n, so the range is inside out (m * n); tasks
                // cover disjoint (rows, cols) tiles.
                unsafe { dst.write(r * n + cols.start, values) };
            }
        });
    }

    fn row(&self, row: usize, k: usize, out: &mut [f32]) {
        let kb = k / T::BLCK_SIZE;
        T::to_float(&self.blocks()[row * kb..(row + 1) * kb], out);
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

impl Linear {
    /// Maps a 2-D GGUF tensor (GGUF dims [k, n]) as a linear layer.
    pub fn new(file: &GgufFile, info: &TensorInfo) -> Result<Self, ModelError> {
        use k_quants::*;
        let (k, n) = match info.dims[..] {
            [k, n] => (k as usize, n as usize),
            [k] => (k as usize, 1),
            _ => return Err(ModelError::Config(format!("tensor {:?} is not a matrix: {:?}", info.name, info.dims))),
        };
        let blocks = match info.ty {
            TensorType::F32 => boxed::<f32>(file, info),
            TensorType::F16 => boxed::<f16>(file, info),
            TensorType::BF16 => boxed::<bf16>(file, info),
            TensorType::Q4_0 => boxed::<BlockQ4_0>(file, info),
            TensorType::Q4_1 => boxed::<BlockQ4_1>(file, info),
            TensorType::Q5_0 => boxed::<BlockQ5_0>(file, info),
            TensorType::Q5_1 => boxed::<BlockQ5_1>(file, info),
            TensorType::Q8_0 => boxed::<BlockQ8_0>(file, info),
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
