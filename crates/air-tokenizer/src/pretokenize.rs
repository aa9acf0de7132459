//! Pre-tokenizer regexes per `tokenizer.ggml.pre`, the ones llama.cpp applies for each name.
//! Each list is applied in order, every regex splitting the pieces the previous one produced.

use crate::TokenizerError;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes for a pre-tokenizer name, or an error for names not supported yet.
pub fn regexes(pre: &str) -> Result<&'static [&'static str], TokenizerError> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" | "phi-2" | "trillion" => &[GPT2],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" | "pixtral" => &[LLAMA3],
        "qwen2" | "deepseek-r1-qwen" | "megrez" => &[QWEN2],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => &[r"\p{N}", GPT2],
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    })
}
