use air_gguf::TensorType;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] air_gguf::GgufError),
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("tensor {name:?} has type {ty}, which Air cannot compute with yet")]
    UnsupportedTensorType { name: String, ty: TensorType },
    #[error("tensor {0:?} is missing from the file")]
    MissingTensor(String),
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    BadShape { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("{needed} tokens do not fit in the context of {capacity} tokens")]
    ContextOverflow { needed: usize, capacity: usize },
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("streaming layer weights from the file: {0}")]
    Stream(#[from] std::io::Error),
    #[error("{0}")]
    Device(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
