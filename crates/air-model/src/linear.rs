//! Quantized linear layers on the CPU: weights in their GGUF block format (mapped in place),
//! activations quantized as ggml does ([`crate::activation_quant`]), dot products by candle's
//! block kernels or Air's where candle's are slow ([`crate::block_dot`]), spread over the
//! rayon pool by output columns.

use crate::ModelError;
use crate::block_dot::BlockDot;
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
use crate::block_dot::FastDot;
use crate::host::{ChunkClaims, Scratch, SharedOutput, with_f32, with_scratch};
use crate::mapped::MappedBlocks;
use air_gguf::{GgufFile, TensorInfo, TensorType};
use candle_core::quantized::k_quants;
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::any::Any;
use std::mem::MaybeUninit;

/// Fewest weight rows (output columns) per parallel work item.
const MIN_COLUMNS_PER_TASK: usize = 32;
/// Activation rows per parallel work item: with the task's weight rows, a tile of blocks that
/// stays in the core's cache while the kernel works through it.
const ROWS_PER_TASK: usize = 48;
/// Output columns per kernel call: a task's outputs go through a compact tile of this many
/// columns per row. A tile as wide as a task (thousands of columns for an output head) put the
/// kernel's 16 rows of stores a multiple of 4 KiB apart, likely into one L1 cache set: the
/// 16-row head ran a third slower (docs/benchmarks.md).
pub(crate) const TILE_COLUMNS: usize = 96;
/// Work items per thread to aim for: enough to balance the load, few enough that scheduling
/// stays a small cost (a generation step runs hundreds of matmuls). A thread that finishes
/// first waits on average half an item, and a batch's items are long: with 16 rather than 8,
/// 16-row steps ran 2% faster, alternated with 8 (docs/benchmarks.md, eighteenth session); one
/// row's items are short, and one row keeps 8.
fn tasks_per_thread(rows: usize) -> usize {
    if rows == 1 { 8 } else { 16 }
}

/// llama.cpp multiplies matrices of K-quant weights by a batched kernel, which rounds
/// differently from its one-row dot products, when they have this many activation rows or more.
pub const BATCHED_MATMUL_ROWS: usize = 8;

/// One matrix of a [`Blocks::matmul`] call and where its product goes.
struct Product<'a> {
    blocks: &'a dyn Blocks,
    /// Rows of the matrix (output columns).
    n: usize,
    /// (m, n), every element written.
    out: &'a mut [MaybeUninit<f32>],
}

/// The math a weight matrix of one block type supports.
trait Blocks: Any + Send + Sync {
    /// out_i (m, n_i) = x (m, k) · W_iᵀ for every product's matrix W_i (n_i, k) in blocks, x
    /// made and quantized once and every product's tiles in one parallel region; rows flagged
    /// in `batched` (empty: none) by the batched arithmetic ([`BlockDot::dots`]). Returns false,
    /// computing nothing, when a matrix is not of this one's type and arithmetic.
    fn matmul(&self, products: &mut [Product<'_>], x: Input<'_>, k: usize, batched: &[bool]) -> bool;
    /// Dequantizes row `row` (k values) into `out`.
    fn row(&self, row: usize, k: usize, out: &mut [f32]);
    /// The matrix as `Any`, for [`targets`] to find its type.
    fn as_any(&self) -> &dyn Any;
}

/// The products as [`parallel_matmul`]'s targets when every matrix is an `S`, whose blocks
/// `blocks` gives.
fn targets<'a, S: Blocks, W>(
    products: &'a mut [Product<'_>],
    blocks: impl Fn(&S) -> &[W],
) -> Option<Vec<Target<'a, W>>> {
    products
        .iter_mut()
        .map(|p| {
            let matrix = p.blocks.as_any().downcast_ref::<S>()?;
            Some(Target { w: blocks(matrix), n: p.n, out: &mut *p.out })
        })
        .collect()
}

/// One weight matrix of a [`parallel_matmul`] and where its product goes.
struct Target<'a, W> {
    /// n rows of k values in blocks.
    w: &'a [W],
    n: usize,
    /// (m, n), every element written.
    out: &'a mut [MaybeUninit<f32>],
}

/// A matmul's input rows: given, or made a chunk of rows at a time inside the matmul's
/// parallel region, just before they are quantized. The work between two matmuls (a norm, a
/// gated activation) then runs on every thread that region wakes, instead of on the calling
/// thread while the others wait.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// Rows of `k` values, row-major.
    Values(&'a [f32]),
    /// `rows` rows, where `fill(first, out)` writes rows `first..` into `out` (whole rows),
    /// from any thread: once for each row per matmul region, so again where the matrices of a
    /// [`Linear::forward_input`] differ in block type; the same values each time.
    Rows { rows: usize, fill: &'a (dyn Fn(usize, &mut [f32]) + Sync) },
}

impl Input<'_> {
    /// Rows of `k` values.
    fn rows(&self, k: usize) -> usize {
        match self {
            Self::Values(x) => x.len() / k.max(1),
            Self::Rows { rows, .. } => *rows,
        }
    }
}

/// How a matmul quantizes its input: activations for its rows, filled in chunks of rows.
struct Quantizer<A, F> {
    /// Space for every row, filled by `quantize_rows`.
    activations: A,
    /// The rows of a chunk `quantize_rows` takes are a multiple of this, from a multiple of it.
    chunk_rows: usize,
    /// `quantize_rows(activations, first row, values)`; see [`BlockDot::quantize_rows`].
    quantize_rows: F,
}

/// out_i (m, n_i) = x (m, k) · W_iᵀ for each target, n_i rows of k values in blocks of `block`
/// values, in one parallel region over the compute pool: the tasks first share the input's
/// chunks of rows ([`ChunkClaims`]: made where `x` is [`Input::Rows`], then quantized), then
/// compute `dots(w rows, activations, activation rows, out, stride)` over (activation rows,
/// weight rows) tiles of all the targets.
/// SAFETY (caller): `q.activations` are a type's unfilled activations for m rows of k values,
/// `q.quantize_rows` and `q.chunk_rows` the same type's (see [`BlockDot::quantize_rows`]).
unsafe fn parallel_matmul<W: Sync, A: Sync>(
    targets: &mut [Target<'_, W>],
    block: usize,
    (x, k): (Input<'_>, usize),
    q: Quantizer<A, impl Fn(&A, usize, &[f32]) + Sync>,
    dots: impl Fn(&[W], &A, std::ops::Range<usize>, &mut [f32], usize) + Sync,
) {
    let (kb, m) = (k / block, x.rows(k));
    let row_tasks = m.div_ceil(ROWS_PER_TASK);
    let wanted = (rayon::current_num_threads() * tasks_per_thread(m)).div_ceil(row_tasks.max(1));
    let total_n: usize = targets.iter().map(|t| t.n).sum();
    let per_task = total_n.div_ceil(wanted).next_multiple_of(16).max(MIN_COLUMNS_PER_TASK);
    // (target, its output, its first column) per column task.
    let mut column_tasks = Vec::new();
    for (i, t) in targets.iter_mut().enumerate() {
        assert!(t.out.len() >= m * t.n && t.w.len() >= t.n * kb);
        let dst = SharedOutput::new(t.out.as_mut_ptr().cast());
        column_tasks.extend((0..t.n).step_by(per_task).map(|first| (i, dst, first)));
    }
    let targets = &*targets;
    // Two chunks per thread, so that a thread that comes late still takes a share; at most
    // 16 rows, so that the rows made for one stay in cache; whole chunks of the quantizer's.
    let chunk_rows = m.div_ceil(2 * rayon::current_num_threads()).clamp(1, 16).next_multiple_of(q.chunk_rows);
    let chunks = ChunkClaims::new(m.div_ceil(chunk_rows));
    let xq = &q.activations;
    (0..column_tasks.len() * row_tasks).into_par_iter().for_each(|task| {
        let made = chunks.run(|chunk| {
            let rows = chunk * chunk_rows..((chunk + 1) * chunk_rows).min(m);
            match x {
                Input::Values(x) => (q.quantize_rows)(xq, rows.start, &x[rows.start * k..rows.end * k]),
                Input::Rows { fill, .. } => with_scratch(Scratch::MatmulInput, rows.len() * k, |values| {
                    fill(rows.start, values);
                    (q.quantize_rows)(xq, rows.start, values);
                }),
            }
        });
        if !made {
            // A chunk panicked: its panic ends the region; its rows are not to be read.
            return;
        }
        let (target, dst, first) = column_tasks[task % column_tasks.len()];
        let (w, n) = (targets[target].w, targets[target].n);
        let cols = first..(first + per_task).min(n);
        let rows =
            (task / column_tasks.len()) * ROWS_PER_TASK..((task / column_tasks.len() + 1) * ROWS_PER_TASK).min(m);
        with_scratch(Scratch::MatmulTile, TILE_COLUMNS.min(cols.len()) * rows.len(), |tile| {
            for start in cols.clone().step_by(TILE_COLUMNS) {
                let width = TILE_COLUMNS.min(cols.end - start);
                let tile = &mut tile[..width * rows.len()];
                // The kernel writes every output of the tile.
                dots(&w[start * kb..(start + width) * kb], xq, rows.clone(), tile, width);
                for (r, values) in rows.clone().zip(tile.chunks_exact(width)) {
                    // SAFETY: r < m and the columns within n, so the range is inside the
                    // target's out (m × n); tasks cover disjoint (rows, cols) tiles.
                    unsafe { dst.write(r * n + start, values) };
                }
            }
        });
    });
}

impl<T> Blocks for MappedBlocks<T>
where
    T: BlockDot + 'static,
{
    fn matmul(&self, products: &mut [Product<'_>], x: Input<'_>, k: usize, batched: &[bool]) -> bool {
        let Some(mut targets) = targets::<Self, T>(products, MappedBlocks::blocks) else { return false };
        let kb = k / T::BLCK_SIZE;
        // SAFETY: T's activations, quantized by T's chunks.
        unsafe {
            let q = Quantizer {
                activations: T::activations(x.rows(k), k),
                chunk_rows: T::QUANTIZE_ROWS,
                quantize_rows: |a: &T::Activations, first: usize, values: &[f32]| T::quantize_rows(a, first, values),
            };
            parallel_matmul(&mut targets, T::BLCK_SIZE, (x, k), q, |w, xq, rows, tile, stride| {
                T::dots(kb, w, xq, rows, batched, tile, stride)
            });
        }
        true
    }

    fn row(&self, row: usize, k: usize, out: &mut [f32]) {
        let kb = k / T::BLCK_SIZE;
        T::to_float(&self.blocks()[row * kb..(row + 1) * kb], out);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// How the CPU rounds the matmuls of the 32-value block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuNumerics {
    /// ggml's CPU order, so llama.cpp's logits bit for bit.
    #[default]
    Ggml,
    /// Each block's dot product summed in integers, then one rounding per block: 16 outputs
    /// per AVX-512 register (8 per AVX2 one), matmuls on 16 rows 2.4-2.6x faster (needs an x86-64
    /// CPU with AVX2; docs/benchmarks.md).
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
    fn matmul(&self, products: &mut [Product<'_>], x: Input<'_>, k: usize, _batched: &[bool]) -> bool {
        let Some(mut targets) = targets::<Self, T>(products, |b| b.0.blocks()) else { return false };
        let kb = k / T::BLCK_SIZE;
        // SAFETY: T's activations, quantized a row at a time as its fast kernels take them.
        unsafe {
            let q = Quantizer {
                activations: T::fast_activations(x.rows(k), k),
                chunk_rows: 1,
                quantize_rows: |a: &T::FastActivations, first: usize, values: &[f32]| {
                    T::fast_quantize_rows(a, first, values)
                },
            };
            parallel_matmul(&mut targets, T::BLCK_SIZE, (x, k), q, |w, xq, rows, tile, stride| {
                T::fast_dots(kb, w, xq, rows, tile, stride)
            });
        }
        true
    }

    fn row(&self, row: usize, k: usize, out: &mut [f32]) {
        self.0.row(row, k, out)
    }

    fn as_any(&self) -> &dyn Any {
        self
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
            return Err(ModelError::Config("CPU numerics \"fast\" need an x86-64 CPU with AVX2".into()));
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
        let [y] = Self::forward_many([self], x, batched)?;
        Ok(y)
    }

    /// [`Self::forward`] of one input by several matrices (Q, K and V; gate and up): where they
    /// share a block type and arithmetic, the input is quantized once and all their output
    /// columns are one parallel region's work, else one matmul each. Same results either way.
    pub fn forward_many<const N: usize>(
        layers: [&Linear; N],
        x: &Tensor,
        batched: &[bool],
    ) -> Result<[Tensor; N], ModelError> {
        let (_, k) = x.dims2()?;
        Self::check_width(&layers, k)?;
        with_f32(x, |xs| Self::forward_input(layers, Input::Values(xs), batched))?
    }

    /// [`Self::forward_many`] of an [`Input`] whose rows have the matrices' width (they all
    /// share it).
    pub fn forward_input<const N: usize>(
        layers: [&Linear; N],
        x: Input<'_>,
        batched: &[bool],
    ) -> Result<[Tensor; N], ModelError> {
        let ys = Self::products(layers, x, batched)?;
        let mut tensors = Vec::with_capacity(N);
        for (y, l) in ys.into_iter().zip(layers) {
            let m = y.len() / l.n.max(1);
            tensors.push(Tensor::from_vec(y, (m, l.n), &Device::Cpu)?);
        }
        Ok(tensors.try_into().unwrap_or_else(|_| unreachable!("one product per matrix")))
    }

    /// [`Self::forward`]'s values, row-major, without a tensor around them: for logits, whose
    /// copy out of a tensor costs as much as a small matmul.
    pub fn forward_values(&self, x: &Tensor, batched: &[bool]) -> Result<Vec<f32>, ModelError> {
        let (_, k) = x.dims2()?;
        Self::check_width(&[self], k)?;
        let [y] = with_f32(x, |xs| Self::products([self], Input::Values(xs), batched))??;
        Ok(y)
    }

    /// An error unless every layer takes rows of `k` values.
    fn check_width(layers: &[&Linear], k: usize) -> Result<(), ModelError> {
        match layers.iter().find(|l| l.k != k) {
            Some(other) => Err(ModelError::Config(format!("linear layer expects {} inputs, got {k}", other.k))),
            None => Ok(()),
        }
    }

    /// The products of [`Self::forward_input`], row-major.
    fn products<const N: usize>(
        layers: [&Linear; N],
        x: Input<'_>,
        batched: &[bool],
    ) -> Result<[Vec<f32>; N], ModelError> {
        let Some(k) = layers.first().map(|l| l.k) else { return Ok(layers.map(|_| Vec::new())) };
        Self::check_width(&layers, k)?;
        let m = x.rows(k);
        if let Input::Values(values) = x
            && values.len() != m * k
        {
            return Err(ModelError::Config(format!("{} input values are not rows of {k}", values.len())));
        }
        let mut outs: [Vec<f32>; N] = layers.map(|l| Vec::with_capacity(m * l.n));
        let mut products: Vec<Product<'_>> = layers
            .iter()
            .zip(&mut outs)
            .map(|(l, out)| Product { blocks: &*l.blocks, n: l.n, out: &mut out.spare_capacity_mut()[..m * l.n] })
            .collect();
        if !products[0].blocks.matmul(&mut products, x, k, batched) {
            for product in &mut products {
                let blocks = product.blocks;
                let done = blocks.matmul(std::slice::from_mut(product), x, k, batched);
                debug_assert!(done, "a matrix multiplies by its own kernels");
            }
        }
        drop(products);
        for (out, l) in outs.iter_mut().zip(layers) {
            // SAFETY: `matmul` wrote all m × n outputs.
            unsafe { out.set_len(m * l.n) };
        }
        Ok(outs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn smollm2() -> GgufFile {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::var_os("AIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
        GgufFile::open(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
            .unwrap_or_else(|e| panic!("{e} (fetch the models with scripts/fetch-models.sh all)"))
    }

    /// Products of one input by several matrices: the same bits whether the input is quantized
    /// once for all (Q, K and V share Q4_1) or once per matrix (Q4_1 beside the Q8_0 head).
    #[test]
    fn several_matrices_give_the_bits_of_one_at_a_time() {
        let file = smollm2();
        let numerics = [CpuNumerics::Ggml, CpuNumerics::Fast].into_iter().filter(|n| n.supported());
        for numerics in numerics {
            let linear = |name: &str| Linear::new(&file, file.tensor(name).unwrap(), numerics).unwrap();
            let (q, k, v, head) = (
                linear("blk.0.attn_q.weight"),
                linear("blk.0.attn_k.weight"),
                linear("blk.0.attn_v.weight"),
                linear("token_embd.weight"),
            );
            for rows in [1, 16, 37] {
                let x = Tensor::randn(0f32, 1.0, (rows, 576), &Device::Cpu).unwrap();
                let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let batched = vec![rows >= BATCHED_MATMUL_ROWS; rows];
                let together = Linear::forward_many([&q, &k, &v], &x, &batched).unwrap();
                for (y, m) in together.iter().zip([&q, &k, &v]) {
                    assert_eq!(bits(y), bits(&m.forward(&x, &batched).unwrap()), "{numerics:?}, {rows} rows");
                }
                let [yq, yh] = Linear::forward_many([&q, &head], &x, &batched).unwrap();
                assert_eq!(bits(&yq), bits(&together[0]), "{numerics:?}, {rows} rows");
                assert_eq!(bits(&yh), bits(&head.forward(&x, &batched).unwrap()), "{numerics:?}, {rows} rows");
                // Rows made inside the region, for matrices of one type and of two: the same.
                let values = bits(&x);
                let fill = |first: usize, out: &mut [f32]| out.copy_from_slice(&values[first * 576..][..out.len()]);
                let made = Input::Rows { rows, fill: &fill };
                let [mq, mk, mv] = Linear::forward_input([&q, &k, &v], made, &batched).unwrap();
                for (y, want) in [mq, mk, mv].iter().zip(&together) {
                    assert_eq!(bits(y), bits(want), "{numerics:?}, {rows} rows made");
                }
                let [mq, mh] = Linear::forward_input([&q, &head], made, &batched).unwrap();
                assert_eq!((bits(&mq), bits(&mh)), (bits(&yq), bits(&yh)), "{numerics:?}, {rows} rows made");
            }
            let wrong = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
            assert!(Linear::forward_many([&q, &k], &wrong, &[]).is_err());
        }
    }
}
