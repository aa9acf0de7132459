use std::path::PathBuf;

/// Everything that can be wrong with a GGUF file; offsets are byte positions in the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file: the first bytes are {found:?}, expected \"GGUF\"")]
    NotGguf { found: Vec<u8> },
    #[error("unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { version: u32 },
    #[error("file truncated at offset {offset}: {what} needs {needed} bytes, {available} left")]
    Truncated { what: String, offset: u64, needed: u64, available: u64 },
    #[error("invalid metadata value type {type_id} at offset {offset}")]
    InvalidValueType { type_id: u32, offset: u64 },
    #[error("string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },
    #[error("{what} at offset {offset} claims {count} entries, more than the {limit} the file can hold")]
    CountTooLarge { what: String, count: u64, limit: u64, offset: u64 },
    #[error("metadata arrays nested deeper than {limit} levels at offset {offset}")]
    NestingTooDeep { limit: usize, offset: u64 },
    #[error("duplicate {what} {name:?} at offset {offset}")]
    Duplicate { what: &'static str, name: String, offset: u64 },
    #[error("invalid alignment {value} (must be a non-zero power of two)")]
    BadAlignment { value: u64 },
    #[error("tensor {name:?} has unknown type id {type_id} (at offset {offset})")]
    UnknownTensorType { name: String, type_id: u32, offset: u64 },
    #[error("tensor {name:?} has an invalid shape {dims:?}: {reason}")]
    BadShape { name: String, dims: Vec<u64>, reason: String },
    #[error("tensor {name:?} data offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { name: String, offset: u64, alignment: u64 },
    #[error("tensor {name:?} data [{start}, {end}) lies outside the file ({file_size} bytes)")]
    TensorOutOfBounds { name: String, start: u64, end: u64, file_size: u64 },
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType { key: String, found: String, expected: &'static str },
    #[error("cannot write GGUF: {0}")]
    Write(#[from] std::io::Error),
}
