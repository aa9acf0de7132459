//! Zero-copy views of GGUF tensor data as slices of ggml blocks.

use air_gguf::{GgufFile, TensorInfo};
use candle_core::quantized::k_quants::GgmlType;
use memmap2::Mmap;
use std::marker::PhantomData;
use std::sync::Arc;

/// A tensor's blocks of type `T`, viewed in place in the file mapping.
pub struct MappedBlocks<T> {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
    _blocks: PhantomData<T>,
}

impl<T: GgmlType> MappedBlocks<T> {
    /// A view of the tensor's data, if its bytes are whole blocks of `T`, in the map and aligned.
    pub fn new(file: &GgufFile, info: &TensorInfo) -> Option<Self> {
        let range = file.tensor_range(info);
        let map = file.mmap().clone();
        let block = size_of::<T>();
        let aligned = (map.as_ptr() as usize + range.start).is_multiple_of(align_of::<T>());
        let whole = range.len().is_multiple_of(block) && range.end <= map.len();
        (aligned && whole).then(|| Self { map, start: range.start, len: range.len() / block, _blocks: PhantomData })
    }

    /// The blocks.
    pub fn blocks(&self) -> &[T] {
        // SAFETY: `new` checked bounds and alignment; ggml blocks are repr(C) plain data, valid
        // for any bit pattern; the map is read-only and kept alive by `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.start) as *const T, self.len) }
    }
}
