//! GPT-2's byte-level alphabet: every byte maps to one printable character, so that BPE
//! vocabularies can be stored as strings.

use std::collections::HashMap;
use std::sync::OnceLock;

fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The character standing for each byte.
pub fn byte_to_char() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..=255u8 {
            table[b as usize] = if is_printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).expect("below the surrogate range");
                next += 1;
                c
            };
        }
        table
    })
}

/// The byte a character of the byte-level alphabet stands for.
pub fn char_to_byte() -> &'static HashMap<char, u8> {
    static MAP: OnceLock<HashMap<char, u8>> = OnceLock::new();
    MAP.get_or_init(|| byte_to_char().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect())
}

/// Decodes a byte-level token string into its bytes; None if a character is outside the alphabet.
pub fn decode_byte_level(token: &str) -> Option<Vec<u8>> {
    let map = char_to_byte();
    token.chars().map(|c| map.get(&c).copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection() {
        let chars = byte_to_char();
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(char_to_byte().len(), 256);
        assert_eq!(decode_byte_level("Ġhello").unwrap(), b" hello");
    }
}
