use crate::{Tokenizer, TokenizerError};
use air_gguf::Metadata;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message with a role (`system`, `user`, `assistant`) and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A Jinja chat template (`tokenizer.chat_template`) rendered with minijinja, with the Python
/// string methods Hugging Face templates use and `raise_exception`.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env
}

impl ChatTemplate {
    /// Compiles a template; `bos_token`/`eos_token` are the texts templates may refer to.
    pub fn new(source: impl Into<String>, bos_token: &str, eos_token: &str) -> Result<Self, TokenizerError> {
        let source = source.into();
        environment().template_from_str(&source).map_err(|e| TokenizerError::Template(e.to_string()))?;
        Ok(Self { source, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with the texts of its BOS and
    /// EOS tokens; `None` when the file has no template.
    pub fn from_gguf(md: &Metadata, tokenizer: &Tokenizer) -> Result<Option<Self>, TokenizerError> {
        let Some(source) = md.opt(md.get_str("tokenizer.chat_template"))? else { return Ok(None) };
        Self::for_tokenizer(source, tokenizer).map(Some)
    }

    /// Compiles `source` with the texts of `tokenizer`'s BOS and EOS tokens.
    pub fn for_tokenizer(source: impl Into<String>, tokenizer: &Tokenizer) -> Result<Self, TokenizerError> {
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_string();
        Self::new(source, &text(tokenizer.bos()), &text(tokenizer.eos()))
    }

    /// Renders `messages` with the generation prompt and tokenizes the result, adding the BOS
    /// token only when the template did not write it.
    pub fn encode(&self, tokenizer: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        let text = self.render(messages, true)?;
        let writes_bos = !self.bos_token.is_empty() && text.starts_with(&self.bos_token);
        tokenizer.encode(&text, !writes_bos)
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let env = environment();
        let template = env.template_from_str(&self.source).map_err(|e| TokenizerError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
