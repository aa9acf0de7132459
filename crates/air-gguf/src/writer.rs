use crate::header::MAGIC;
use crate::metadata::Value;
use crate::{GgufError, TensorType};
use std::io::Write;

/// A tensor to be written: name, GGUF-order dimensions and type.
#[derive(Debug, Clone)]
pub struct TensorDesc {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: TensorType,
}

impl TensorDesc {
    /// Bytes of data this tensor takes; None if its shape is not whole blocks or overflows.
    pub fn size_bytes(&self) -> Option<u64> {
        let first = *self.dims.first()?;
        if first % self.ty.block_size() != 0 {
            return None;
        }
        let elements = self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.ty.bytes_for(elements)
    }
}

/// Writes a GGUF (version 3) file in one pass: the header first, then each tensor's data in
/// order, padded to the alignment. Nothing is buffered beyond what the caller hands over, so
/// files of any size can be streamed out.
pub struct GgufWriter<W: Write> {
    out: W,
    tensors: Vec<(TensorDesc, u64)>,
    next: usize,
    written: u64,
    alignment: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header for `metadata` and `tensors`; data must follow with [`Self::write_tensor`].
    pub fn new(mut out: W, metadata: &[(String, Value)], tensors: Vec<TensorDesc>) -> Result<Self, GgufError> {
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(crate::DEFAULT_ALIGNMENT);
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut head, key);
            head.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut head, value);
        }
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let size = t.size_bytes().ok_or_else(|| {
                std::io::Error::other(format!("tensor {:?}: shape {:?} is not whole {} blocks", t.name, t.dims, t.ty))
            })?;
            sizes.push(size);
        }
        let mut offset = 0u64;
        for (t, size) in tensors.iter().zip(&sizes) {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + size).next_multiple_of(alignment);
        }
        head.resize((head.len() as u64).next_multiple_of(alignment) as usize, 0);
        out.write_all(&head)?;
        Ok(Self { out, tensors: tensors.into_iter().zip(sizes).collect(), next: 0, written: 0, alignment })
    }

    /// The next tensor whose data is expected, if any.
    pub fn next_tensor(&self) -> Option<&TensorDesc> {
        self.tensors.get(self.next).map(|(t, _)| t)
    }

    /// Appends data of the next tensor; may be called several times per tensor, in order.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<(), GgufError> {
        let Some((t, size)) = self.tensors.get(self.next) else {
            return Err(GgufError::Write(std::io::Error::other("more tensor data than tensors")));
        };
        let size = *size;
        if self.written + data.len() as u64 > size {
            return Err(GgufError::Write(std::io::Error::other(format!("too much data for tensor {:?}", t.name))));
        }
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        if self.written == size {
            let pad = size.next_multiple_of(self.alignment) - size;
            self.out.write_all(&vec![0u8; pad as usize])?;
            self.next += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Checks all data was written and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, GgufError> {
        if self.next != self.tensors.len() {
            return Err(GgufError::Write(std::io::Error::other("not all tensor data was written")));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_string(buf, s),
        Value::Array(ty, items) => {
            buf.extend_from_slice(&(*ty as u32).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(buf, item);
            }
        }
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
    }
}
