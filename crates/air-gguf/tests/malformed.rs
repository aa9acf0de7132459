//! Fuzz-style tests: every way of damaging a file gives a typed error, never a panic.

use air_gguf::{GgufError, GgufFile, GgufHeader, GgufWriter, TensorDesc, TensorType, Value, ValueType};

/// A small valid file with one value of every metadata type and two tensors; also returns the
/// offsets where each section ends (header counts, each key/value pair, each tensor info).
fn sample() -> Vec<u8> {
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("u8".into(), Value::U8(7)),
        ("i8".into(), Value::I8(-7)),
        ("u16".into(), Value::U16(700)),
        ("i16".into(), Value::I16(-700)),
        ("u32".into(), Value::U32(70000)),
        ("i32".into(), Value::I32(-70000)),
        ("f32".into(), Value::F32(0.5)),
        ("bool".into(), Value::Bool(true)),
        ("u64".into(), Value::U64(1 << 40)),
        ("i64".into(), Value::I64(-(1 << 40))),
        ("f64".into(), Value::F64(0.25)),
        (
            "strings".into(),
            Value::Array(ValueType::String, vec![Value::String("a".into()), Value::String("é🦊".into())]),
        ),
        (
            "nested".into(),
            Value::Array(ValueType::Array, vec![Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(2)])]),
        ),
    ];
    let tensors = vec![
        TensorDesc { name: "weight.a".into(), dims: vec![32, 2], ty: TensorType::Q8_0 },
        TensorDesc { name: "weight.b".into(), dims: vec![3], ty: TensorType::F32 },
    ];
    let mut w = GgufWriter::new(Vec::new(), &metadata, tensors).unwrap();
    w.write_tensor(&[1u8; 68]).unwrap();
    w.write_tensor(&[2u8; 12]).unwrap();
    w.finish().unwrap()
}

#[test]
fn sample_round_trips() {
    let bytes = sample();
    let h = GgufHeader::parse(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.metadata.len(), 14);
    assert_eq!(h.metadata.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(h.metadata.get("i64"), Some(&Value::I64(-(1 << 40))));
    assert_eq!(h.metadata.get_f64("f32").unwrap(), 0.5);
    assert_eq!(h.metadata.get_array("strings").unwrap()[1], Value::String("é🦊".into()));
    let a = h.tensor("weight.a").unwrap();
    assert_eq!((a.ty, a.size_bytes, a.elements()), (TensorType::Q8_0, 68, 64));
    assert_eq!(h.tensor("weight.b").unwrap().offset, 96);
    assert_eq!(h.data_offset % 32, 0);
    assert_eq!(bytes.len() as u64, h.data_offset + 96 + 32);
}

#[test]
fn version_2_is_read() {
    let mut bytes = sample();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufHeader::parse(&bytes).unwrap().version, 2);
}

#[test]
fn every_truncation_is_a_typed_error() {
    let bytes = sample();
    // The last tensor's data ends before the final padding, which a file may omit.
    let h = GgufHeader::parse(&bytes).unwrap();
    let data_end = h.tensors.iter().map(|t| h.data_offset + t.offset + t.size_bytes).max().unwrap();
    assert!(GgufHeader::parse(&bytes[..data_end as usize]).is_ok());
    for len in 0..data_end as usize {
        match GgufHeader::parse(&bytes[..len]) {
            Err(GgufError::Truncated { offset, available, .. }) => assert!(offset + available == len as u64),
            Err(GgufError::TensorOutOfBounds { file_size, .. }) => assert_eq!(file_size, len as u64),
            // A count checked against the bytes left.
            Err(GgufError::CountTooLarge { count, limit, .. }) => assert!(count > limit),
            // Cutting inside the magic leaves fewer than four bytes to compare.
            Err(GgufError::NotGguf { .. }) if len < 4 => {}
            other => panic!("truncated to {len} bytes: unexpected {other:?}"),
        }
    }
}

#[test]
fn wrong_magic_and_version() {
    let mut bytes = sample();
    bytes[0] = b'X';
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::NotGguf { .. })));
    let mut bytes = sample();
    bytes[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::UnsupportedVersion { version: 4 })));
}

#[test]
fn absurd_counts_are_rejected_before_allocation() {
    for (at, what) in [(8usize, "tensor count"), (16, "metadata count")] {
        let mut bytes = sample();
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        match GgufHeader::parse(&bytes) {
            Err(GgufError::CountTooLarge { what: w, offset, .. }) => {
                assert_eq!((w.as_str(), offset), (what, at as u64))
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // The first key's string length.
    let mut bytes = sample();
    bytes[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::Truncated { offset: 32, .. })));
    // The length of the "strings" array: find its element type tag (String = 8) and count.
    let needle = b"strings";
    let pos = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len();
    let mut bytes = sample();
    let count_at = pos + 4 + 4;
    bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::CountTooLarge { .. })));
}

/// Offset just after a length-prefixed string in the sample (a key or a tensor name).
fn after_string(bytes: &[u8], s: &[u8]) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s);
    bytes.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() + needle.len()
}

#[test]
fn bad_tensor_offsets_types_and_shapes() {
    let base = sample();
    let b = after_string(&base, b"weight.b") + 4; // after n_dims: dims[0] u64, type u32, offset u64
    let mut bytes = base.clone();
    bytes[b + 12..b + 20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::TensorOutOfBounds { .. })));
    let mut bytes = base.clone();
    bytes[b + 12..b + 20].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::TensorOutOfBounds { .. })));
    let mut bytes = base.clone();
    bytes[b + 12..b + 20].copy_from_slice(&100u64.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::Misaligned { offset: 100, alignment: 32, .. })));
    let mut bytes = base.clone();
    bytes[b + 8..b + 12].copy_from_slice(&4u32.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::UnknownTensorType { type_id: 4, .. })));
    let mut bytes = base.clone();
    bytes[b..b + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::BadShape { .. })));
    let a = after_string(&base, b"weight.a") + 4; // after n_dims: dims 32, 2
    let mut bytes = base.clone();
    bytes[a..a + 8].copy_from_slice(&33u64.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::BadShape { .. })));
    let mut bytes = base.clone();
    bytes[a + 8..a + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::BadShape { .. })));
    // n_dims of 9
    let mut bytes = base;
    bytes[a - 4..a].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(GgufHeader::parse(&bytes), Err(GgufError::CountTooLarge { .. })));
}

#[test]
fn wrong_alignment_is_rejected() {
    let md = vec![("general.alignment".to_string(), Value::U32(32))];
    let good = GgufWriter::new(Vec::new(), &md, vec![]).unwrap().finish().unwrap();
    let at = after_string(&good, b"general.alignment") + 4;
    for bad in [0u32, 3, 48] {
        let mut bytes = good.clone();
        bytes[at..at + 4].copy_from_slice(&bad.to_le_bytes());
        assert!(
            matches!(GgufHeader::parse(&bytes), Err(GgufError::BadAlignment { value }) if value == bad as u64),
            "{bad}"
        );
    }
}

#[test]
fn random_corruption_never_panics() {
    let base = sample();
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut bytes = base.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % bytes.len() as u64) as usize;
            bytes[i] = next() as u8;
        }
        let _ = GgufHeader::parse(&bytes);
    }
}

#[test]
fn open_reports_io_and_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    assert!(matches!(GgufFile::open(&missing), Err(GgufError::Io { .. })));
    let text = dir.path().join("text.gguf");
    std::fs::write(&text, "hello world").unwrap();
    let err = GgufFile::open(&text).err().unwrap();
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
    let good = dir.path().join("good.gguf");
    std::fs::write(&good, sample()).unwrap();
    let f = GgufFile::open(&good).unwrap();
    assert_eq!(f.tensor_data(f.tensor("weight.b").unwrap()), &[2u8; 12]);
}

#[test]
fn writer_rejects_shapes_that_are_not_whole_blocks() {
    let bad = vec![TensorDesc { name: "w".into(), dims: vec![33, 2], ty: TensorType::Q8_0 }];
    assert!(matches!(GgufWriter::new(Vec::new(), &[], bad), Err(GgufError::Write(_))));
}
