use crate::metadata::{Metadata, Value, ValueType};
use crate::{GgufError, TensorType};
use std::collections::HashMap;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor can have.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1).
const MAX_ARRAY_NESTING: usize = 4;

/// One entry of the tensor index.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: TensorType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Total number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Everything before the tensor data: version, metadata, tensor index and where data starts.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Key/value metadata.
    pub metadata: Metadata,
    /// Tensor index in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of tensor data (`general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    by_name: HashMap<String, usize>,
}

impl GgufHeader {
    /// Parses a header from the bytes of a whole file and checks every tensor lies within them.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::NotGguf { found: magic.to_vec() });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let tensor_count_at = r.pos;
        let tensor_count = r.u64("tensor count")?;
        let kv_count_at = r.pos;
        let kv_count = r.u64("metadata count")?;
        // A tensor info takes at least 8+4+8+4+8 bytes, a key/value pair at least 8+4+1.
        r.check_count("tensor count", tensor_count, 32, tensor_count_at)?;
        r.check_count("metadata count", kv_count, 13, kv_count_at)?;

        let mut metadata = Metadata::default();
        for _ in 0..kv_count {
            let key_at = r.pos;
            let key = r.string("metadata key")?;
            let value = r.value(0)?;
            if !metadata.insert(key.clone(), value) {
                return Err(GgufError::Duplicate { what: "metadata key", name: key, offset: key_at as u64 });
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(GgufError::BadAlignment { value: v.as_u64().unwrap_or(0) }),
            },
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut by_name = HashMap::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let at = r.pos as u64;
            let info = r.tensor_info(alignment)?;
            if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Duplicate { what: "tensor", name: info.name, offset: at });
            }
            tensors.push(info);
        }
        let data_offset = (r.pos as u64).next_multiple_of(alignment);
        let file_size = bytes.len() as u64;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.size_bytes));
            match end {
                Some(end) if end <= file_size => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: data_offset.saturating_add(t.offset),
                        end: data_offset.saturating_add(t.offset).saturating_add(t.size_bytes),
                        file_size,
                    });
                }
            }
        }
        Ok(Self { version, metadata, tensors, alignment, data_offset, by_name })
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
}

/// A bounds-checked little-endian cursor over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count that could not fit in the rest of the file at `min_size` bytes an entry.
    fn check_count(&self, what: &str, count: u64, min_size: u64, offset: usize) -> Result<(), GgufError> {
        let limit = self.remaining() / min_size;
        if count > limit {
            return Err(GgufError::CountTooLarge { what: what.to_string(), count, limit, offset: offset as u64 });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let at = self.pos as u64;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::InvalidUtf8 { offset: at })
    }

    fn value_type(&mut self) -> Result<ValueType, GgufError> {
        let at = self.pos as u64;
        let id = self.u32("value type")?;
        ValueType::from_id(id).ok_or(GgufError::InvalidValueType { type_id: id, offset: at })
    }

    fn value(&mut self, depth: usize) -> Result<Value, GgufError> {
        let ty = self.value_type()?;
        self.value_of(ty, depth)
    }

    fn value_of(&mut self, ty: ValueType, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("u8 value")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("i8 value")?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16 value")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16 value")?)),
            ValueType::U32 => Value::U32(self.u32("u32 value")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32 value")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32 value")?)),
            ValueType::U64 => Value::U64(self.u64("u64 value")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64 value")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64 value")?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.array::<1>("bool value")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(GgufError::InvalidValueType { type_id: b.into(), offset: at }),
                }
            }
            ValueType::String => Value::String(self.string("string value")?),
            ValueType::Array => {
                let at = self.pos as u64;
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep { limit: MAX_ARRAY_NESTING, offset: at });
                }
                let elem = self.value_type()?;
                let count_at = self.pos;
                let count = self.u64("array length")?;
                self.check_count("array", count, elem.min_encoded_size(), count_at)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value_of(elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("tensor name")?;
        let n_dims_at = self.pos;
        let n_dims = self.u32("tensor dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::CountTooLarge {
                what: format!("dimensions of tensor {name:?}"),
                count: n_dims.into(),
                limit: MAX_DIMS.into(),
                offset: n_dims_at as u64,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("tensor dimension")?);
        }
        let type_at = self.pos as u64;
        let type_id = self.u32("tensor type")?;
        let ty = TensorType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            type_id,
            offset: type_at,
        })?;
        let offset = self.u64("tensor data offset")?;
        let bad_shape = |reason: String| GgufError::BadShape { name: name.clone(), dims: dims.clone(), reason };
        if dims.contains(&0) {
            return Err(bad_shape("a dimension is zero".into()));
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad_shape("element count overflows".into()))?;
        if dims[0] % ty.block_size() != 0 {
            return Err(bad_shape(format!("row length is not a multiple of {ty}'s block size {}", ty.block_size())));
        }
        let size_bytes = ty.bytes_for(elements).ok_or_else(|| bad_shape("byte size overflows".into()))?;
        if offset % alignment != 0 {
            return Err(GgufError::Misaligned { name, offset, alignment });
        }
        Ok(TensorInfo { name, dims, ty, offset, size_bytes })
    }
}
