//! Stop strings over streamed text: text is released as soon as it can no longer be the start
//! of a stop string, and a stop string is never released, even when split across tokens.

/// Text of one request between the detokenizer and its stream.
#[derive(Debug, Default)]
pub(crate) struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds `piece`; returns the text safe to release, and whether a stop string was reached
    /// (the text before it is released, the rest dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let text = self.held[..at].to_string();
            self.held.clear();
            return (text, true);
        }
        // Hold back the longest tail that begins some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k])))
            .filter(|&k| self.held.is_char_boundary(self.held.len() - k))
            .max()
            .unwrap_or(0);
        let release = self.held.len() - hold;
        let rest = self.held.split_off(release);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// What is held back, at the end of the generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_string_split_across_pieces_is_never_released() {
        let mut t = StopText::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(t.push("Hello E"), ("Hello ".into(), false));
        assert_eq!(t.push("N"), (String::new(), false));
        assert_eq!(t.push("Dless"), (String::new(), true));
        let mut t = StopText::new(vec!["END".into()]);
        assert_eq!(t.push("EN"), (String::new(), false));
        assert_eq!(t.push("ough"), ("ENough".into(), false));
        assert_eq!(t.push("é E"), ("é ".into(), false));
        assert_eq!(t.finish(), "E");
        let mut t = StopText::new(vec![]);
        assert_eq!(t.push("a\n\nb"), ("a\n\nb".into(), false));
    }
}
