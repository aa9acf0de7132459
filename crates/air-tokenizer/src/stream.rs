use crate::Tokenizer;

/// Turns generated tokens into text incrementally, holding back bytes until they form complete
/// UTF-8 characters, so a multi-byte character split across tokens is never emitted broken.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tokenizer.token_bytes(id));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            // An invalid sequence (not merely an unfinished one) is replaced rather than held forever.
            Err(e) if e.error_len().is_some() => return self.flush(),
            Err(e) => e.valid_up_to(),
        };
        let rest = self.pending.split_off(valid);
        String::from_utf8(std::mem::replace(&mut self.pending, rest)).expect("checked valid")
    }

    /// Returns whatever is pending, invalid bytes replaced; call at the end of a generation.
    pub fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}
