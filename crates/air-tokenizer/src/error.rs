/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] air_gguf::GgufError),
    #[error("unsupported tokenizer model {0:?} (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer {0:?} (tokenizer.ggml.pre)")]
    UnsupportedPreTokenizer(String),
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Library(String),
    #[error("chat template: {0}")]
    Template(String),
}

impl From<tokenizers::Error> for TokenizerError {
    fn from(e: tokenizers::Error) -> Self {
        TokenizerError::Library(e.to_string())
    }
}
