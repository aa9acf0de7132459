//! GGUF files: a reader over a read-only memory map and a streaming writer.
//!
//! [`GgufFile::open`] maps a file and parses its header, metadata and tensor index; tensor data is
//! never copied: [`GgufFile::tensor_data`] returns a slice of the mapping. Every count and offset
//! read from the file is checked against the bytes that are actually there before anything is
//! allocated, so a malformed file yields a [`GgufError`] naming what is wrong and where, never a
//! panic.
//!
//! ```no_run
//! let file = air_gguf::GgufFile::open("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! println!("{}", file.metadata().get_str("general.architecture")?);
//! for t in file.tensors() {
//!     println!("{} {:?} {}", t.name, t.dims, t.ty);
//! }
//! # Ok::<(), air_gguf::GgufError>(())
//! ```

mod error;
mod header;
mod metadata;
mod tensor_type;
mod writer;

pub use error::GgufError;
pub use header::{DEFAULT_ALIGNMENT, GgufHeader, MAGIC, TensorInfo};
pub use metadata::{Metadata, Value, ValueType};
pub use tensor_type::TensorType;
pub use writer::{GgufWriter, TensorDesc};

use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A GGUF file: its parsed header over a shared read-only memory map of the whole file.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    header: GgufHeader,
}

impl GgufFile {
    /// Maps `path` read-only and parses its header; tensor data stays in the mapping.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only; a file truncated underneath a running process is the
        // one hazard of every mmap-based reader (llama.cpp's included) and is documented.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = GgufHeader::parse(&map)?;
        Ok(Self { path, map: Arc::new(map), header })
    }

    /// Where the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: version, metadata, tensor index, data offset.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The metadata key/value pairs.
    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    /// The tensor index, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor(name)
    }

    /// The shared memory map of the whole file (for zero-copy views that outlive a borrow).
    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Absolute byte range of a tensor's data within the file.
    pub fn tensor_range(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.header.data_offset + info.offset) as usize;
        start..start + info.size_bytes as usize
    }

    /// A tensor's data: a view into the mapping (bounds were checked when the header was parsed).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[self.tensor_range(info)]
    }
}
