use std::fmt;

/// A ggml tensor element type, as stored in GGUF tensor infos.
///
/// Every type id of current ggml is known here so that any file can be described; which types a
/// backend can compute with is the model crate's business.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

use TensorType::*;

/// (type, ggml id, elements per block, bytes per block)
const TABLE: &[(TensorType, u32, u64, u64)] = &[
    (F32, 0, 1, 4),
    (F16, 1, 1, 2),
    (Q4_0, 2, 32, 18),
    (Q4_1, 3, 32, 20),
    (Q5_0, 6, 32, 22),
    (Q5_1, 7, 32, 24),
    (Q8_0, 8, 32, 34),
    (Q8_1, 9, 32, 36),
    (Q2_K, 10, 256, 84),
    (Q3_K, 11, 256, 110),
    (Q4_K, 12, 256, 144),
    (Q5_K, 13, 256, 176),
    (Q6_K, 14, 256, 210),
    (Q8_K, 15, 256, 292),
    (IQ2_XXS, 16, 256, 66),
    (IQ2_XS, 17, 256, 74),
    (IQ3_XXS, 18, 256, 98),
    (IQ1_S, 19, 256, 50),
    (IQ4_NL, 20, 32, 18),
    (IQ3_S, 21, 256, 110),
    (IQ2_S, 22, 256, 82),
    (IQ4_XS, 23, 256, 136),
    (I8, 24, 1, 1),
    (I16, 25, 1, 2),
    (I32, 26, 1, 4),
    (I64, 27, 1, 8),
    (F64, 28, 1, 8),
    (IQ1_M, 29, 256, 56),
    (BF16, 30, 1, 2),
    (TQ1_0, 34, 256, 54),
    (TQ2_0, 35, 256, 66),
    (MXFP4, 39, 32, 17),
];

impl TensorType {
    fn row(self) -> &'static (TensorType, u32, u64, u64) {
        TABLE.iter().find(|r| r.0 == self).expect("every variant is in TABLE")
    }

    /// The type for a ggml type id, if it is one.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The type for its ggml name (`q4_0`, `Q4_K`, `f16`...), case-insensitive.
    pub fn from_name(name: &str) -> Option<Self> {
        TABLE.iter().map(|r| r.0).find(|t| t.to_string().eq_ignore_ascii_case(name))
    }

    /// The ggml type id written in GGUF files.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Number of elements in one block.
    pub fn block_size(self) -> u64 {
        self.row().2
    }

    /// Number of bytes of one block.
    pub fn block_bytes(self) -> u64 {
        self.row().3
    }

    /// Bytes taken by `elements` elements (a multiple of the block size), or None on overflow.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        (elements / self.block_size()).checked_mul(self.block_bytes())
    }

    /// All known types.
    pub fn all() -> impl Iterator<Item = TensorType> {
        TABLE.iter().map(|r| r.0)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let debug = format!("{self:?}");
        f.write_str(&debug)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for t in TensorType::all() {
            assert_eq!(TensorType::from_id(t.id()), Some(t));
            assert_eq!(TensorType::from_name(&t.to_string().to_lowercase()), Some(t));
        }
        assert_eq!(TensorType::from_id(4), None);
        assert_eq!(TensorType::Q4_K.bytes_for(512), Some(288));
    }
}
