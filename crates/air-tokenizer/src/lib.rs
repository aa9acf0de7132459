//! The model's own tokenizer, built from GGUF metadata (`tokenizer.ggml.*`), and its chat template.
//!
//! Encoding is done by a Hugging Face `tokenizers` pipeline assembled from the vocabulary:
//! byte-level BPE for `gpt2` files (with the pre-tokenizer regexes `tokenizer.ggml.pre` names, as
//! llama.cpp applies them) and score-ranked BPE with byte fallback for SentencePiece (`llama`)
//! files. Decoding goes through each token's exact bytes, so [`StreamDecoder`] can emit text as
//! soon as it forms complete UTF-8 and never splits a character.

mod bytes;
mod chat;
mod error;
mod pretokenize;
mod stream;
mod vocab;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::TokenizerError;
pub use stream::StreamDecoder;
pub use vocab::{TokenKind, Tokenizer, TokenizerModel};
