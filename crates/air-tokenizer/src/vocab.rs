use crate::{TokenizerError, bytes, pretokenize};
use air_gguf::{Metadata, Value};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Which algorithm the file's vocabulary is for (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerModel {
    /// Byte-level BPE with merges (`gpt2`).
    BytePairGpt2,
    /// SentencePiece BPE ranked by token scores, with byte fallback (`llama`).
    SentencePiece,
}

/// A token's role (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_id(id: i64) -> Self {
        match id {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

/// Control-token texts that end a generation wherever they appear (as llama.cpp treats them).
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|return|>",
    "<|call|>",
];

/// The model's tokenizer: encodes text to ids and maps ids back to bytes.
pub struct Tokenizer {
    model: TokenizerModel,
    inner: tokenizers::Tokenizer,
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    token_bytes: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn optional_id(md: &Metadata, key: &str, n_vocab: usize) -> Result<Option<u32>, TokenizerError> {
    match md.opt(md.get_u64(key))? {
        None => Ok(None),
        Some(id) if (id as usize) < n_vocab => Ok(Some(id as u32)),
        // llama.cpp writes -1 (as u32::MAX) for "none"; anything else out of range is an error.
        Some(id) if id == u32::MAX as u64 => Ok(None),
        Some(id) => Err(TokenizerError::Invalid(format!("{key} = {id} is outside the vocabulary ({n_vocab} tokens)"))),
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(md: &Metadata) -> Result<Self, TokenizerError> {
        let model = match md.get_str("tokenizer.ggml.model")? {
            "gpt2" => TokenizerModel::BytePairGpt2,
            "llama" => TokenizerModel::SentencePiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let texts: Vec<String> =
            md.get_array_of("tokenizer.ggml.tokens", "string", |v| v.as_str().map(String::from))?;
        let n = texts.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("tokenizer.ggml.tokens is empty".into()));
        }
        let kinds: Vec<TokenKind> =
            match md.opt(md.get_array_of("tokenizer.ggml.token_type", "integer", Value::as_i64))? {
                Some(ids) if ids.len() == n => ids.into_iter().map(TokenKind::from_id).collect(),
                Some(ids) => {
                    return Err(TokenizerError::Invalid(format!("{} token types for {n} tokens", ids.len())));
                }
                None => vec![TokenKind::Normal; n],
            };
        let bos = optional_id(md, "tokenizer.ggml.bos_token_id", n)?;
        let eos = optional_id(md, "tokenizer.ggml.eos_token_id", n)?;
        let unk = optional_id(md, "tokenizer.ggml.unknown_token_id", n)?;
        let add_bos =
            md.opt(md.get_bool("tokenizer.ggml.add_bos_token"))?.unwrap_or(model == TokenizerModel::SentencePiece);
        let add_eos = md.opt(md.get_bool("tokenizer.ggml.add_eos_token"))?.unwrap_or(false);

        let vocab: Vocab = texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut inner = match model {
            TokenizerModel::BytePairGpt2 => {
                let merges = md.get_array_of("tokenizer.ggml.merges", "string", |v| v.as_str())?;
                let merges = merges
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| TokenizerError::Invalid(format!("merge {m:?} has no space")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let bpe = BPE::builder().vocab_and_merges(vocab, merges).build()?;
                let pre = md.opt(md.get_str("tokenizer.ggml.pre"))?.unwrap_or("default");
                let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
                for regex in pretokenize::regexes(pre)? {
                    let split =
                        Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)?;
                    steps.push(split.into());
                }
                steps.push(ByteLevel::new(false, false, false).into());
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
                t
            }
            TokenizerModel::SentencePiece => {
                let scores: Vec<f64> =
                    match md.opt(md.get_array_of("tokenizer.ggml.scores", "number", Value::as_f64))? {
                        Some(s) if s.len() == n => s,
                        _ => {
                            return Err(TokenizerError::Invalid(
                                "tokenizer.ggml.scores must give one score per token".into(),
                            ));
                        }
                    };
                let merges = merges_from_scores(&texts, &kinds, &scores, &vocab);
                let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
                if let Some(unk) = unk {
                    builder = builder.unk_token(texts[unk as usize].clone());
                }
                let mut t = tokenizers::Tokenizer::new(builder.build()?);
                let add_space_prefix = md.opt(md.get_bool("tokenizer.ggml.add_space_prefix"))?.unwrap_or(true);
                let mut norms: Vec<NormalizerWrapper> = Vec::new();
                if add_space_prefix {
                    norms.push(Prepend::new("▁".into()).into());
                }
                norms.push(Replace::new(" ", "▁")?.into());
                t.with_normalizer(Some(NormalizerSequence::new(norms)))?;
                t
            }
        };
        let added: Vec<AddedToken> = texts
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| matches!(k, TokenKind::Control | TokenKind::UserDefined))
            .map(|(t, k)| AddedToken::from(t.clone(), *k == TokenKind::Control).normalized(false))
            .collect();
        inner.add_special_tokens(added)?;

        let token_bytes = texts
            .iter()
            .zip(&kinds)
            .map(|(text, kind)| match (kind, model) {
                (TokenKind::Control | TokenKind::Unused, _) => Vec::new(),
                (TokenKind::UserDefined, _) => text.as_bytes().to_vec(),
                (TokenKind::Byte, _) => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
                (_, TokenizerModel::BytePairGpt2) => {
                    bytes::decode_byte_level(text).unwrap_or_else(|| text.as_bytes().to_vec())
                }
                (TokenKind::Unknown, TokenizerModel::SentencePiece) => " \u{2047} ".as_bytes().to_vec(),
                (_, TokenizerModel::SentencePiece) => text.replace('▁', " ").into_bytes(),
            })
            .collect();

        let mut end_of_generation: Vec<u32> = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            end_of_generation.extend(optional_id(md, key, n)?);
        }
        for (i, (text, kind)) in texts.iter().zip(&kinds).enumerate() {
            if matches!(kind, TokenKind::Control | TokenKind::UserDefined)
                && END_OF_GENERATION_TEXTS.contains(&text.as_str())
            {
                end_of_generation.push(i as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        Ok(Self { model, inner, texts, kinds, token_bytes, bos, eos, add_bos, add_eos, end_of_generation })
    }

    /// The vocabulary's algorithm.
    pub fn model(&self) -> TokenizerModel {
        self.model
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// Encodes text; control tokens written in the text (`<|im_start|>`) become their ids.
    /// With `add_special`, BOS/EOS are added as the file says (`add_bos_token`, `add_eos_token`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode_fast(text, false)?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// The bytes a token contributes to generated text (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Decodes ids to text, replacing invalid UTF-8 (control tokens are left out).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The token's text as stored in the vocabulary (`<|im_end|>`, `Ġthe`, `▁the`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The token's role.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether encoding with `add_special` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// True for tokens that end a generation (EOS, EOT and the well-known end-of-turn tokens).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }
}

/// `<0x0A>` -> 0x0A
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// SentencePiece BPE as llama.cpp runs it merges the adjacent pair whose concatenation is the
/// highest-scoring token. As BPE merges: every split of a token into two tokens, ranked by the
/// whole token's score (stable by id on equal scores).
fn merges_from_scores(texts: &[String], kinds: &[TokenKind], scores: &[f64], vocab: &Vocab) -> Vec<(String, String)> {
    let mut order: Vec<usize> =
        (0..texts.len()).filter(|&i| matches!(kinds[i], TokenKind::Normal | TokenKind::UserDefined)).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for i in order {
        let text = &texts[i];
        for (cut, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(cut);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left.to_string(), right.to_string()));
            }
        }
    }
    merges
}
