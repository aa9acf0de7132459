use crate::BlockId;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// The geometry of a KV store: how many layers, KV heads of what width, positions per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions per block.
    pub block_size: usize,
}

impl KvShape {
    /// f16 values of one block in one layer, keys or values: (kv_heads, block_size, head_dim).
    fn block_len(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn block_bytes(&self) -> u64 {
        (self.layers * 2 * self.block_len() * size_of::<f16>()) as u64
    }
}

/// Keys and values in f16 (as llama.cpp's default cache), `blocks` blocks per layer, allocated
/// up front as zeroed memory, so pages are only backed once written. Layout per layer and
/// block: (kv_heads, block_size, head_dim).
pub struct KvStore {
    shape: KvShape,
    blocks: usize,
    /// f16 bit patterns: a zeroed `Vec<u16>` comes from the allocator's zeroed pages, where a
    /// `Vec<f16>` would be written element by element.
    keys: Vec<Vec<u16>>,
    values: Vec<Vec<u16>>,
}

impl KvStore {
    /// A store of `blocks` blocks of `shape`.
    pub fn new(shape: KvShape, blocks: usize) -> Self {
        let len = blocks * shape.block_len();
        Self {
            shape,
            blocks,
            keys: (0..shape.layers).map(|_| vec![0u16; len]).collect(),
            values: (0..shape.layers).map(|_| vec![0u16; len]).collect(),
        }
    }

    /// The store's geometry.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Blocks in the store.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Writes keys and values of KV head `kv` of `layer`, each rows of head_dim values, at the
    /// consecutive positions from `at` of the sequence whose blocks are `table` (rounded to f16).
    ///
    /// Panics when a position lies beyond the table or a block id beyond the store: the caller
    /// grows the table first.
    pub fn write(&mut self, layer: usize, table: &[BlockId], kv: usize, at: usize, k: &[f32], v: &[f32]) {
        let s = self.shape;
        let d = s.head_dim;
        for (store, src) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            let store = store.reinterpret_cast_mut::<f16>();
            for (i, row) in src.chunks_exact(d).enumerate() {
                let at = offset(s, table, kv, at + i);
                store[at..at + d].convert_from_f32_slice(row);
            }
        }
    }

    /// What attention reads of `layer` for the sequence whose blocks are `table`.
    pub fn layer<'a>(&'a self, layer: usize, table: &'a [BlockId]) -> LayerView<'a> {
        let (keys, values) = (self.keys[layer].reinterpret_cast::<f16>(), self.values[layer].reinterpret_cast::<f16>());
        LayerView { keys, values, table, shape: self.shape }
    }
}

/// Index of the row of KV head `kv` at position `pos` in a layer's buffer.
#[inline]
fn offset(s: KvShape, table: &[BlockId], kv: usize, pos: usize) -> usize {
    let block = table[pos / s.block_size] as usize;
    ((block * s.kv_heads + kv) * s.block_size + pos % s.block_size) * s.head_dim
}

/// One layer's keys and values of one sequence, read through its block table.
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    keys: &'a [f16],
    values: &'a [f16],
    table: &'a [BlockId],
    shape: KvShape,
}

impl<'a> LayerView<'a> {
    /// The key of KV head `kv` at position `pos` (head_dim values).
    #[inline]
    pub fn key(&self, kv: usize, pos: usize) -> &'a [f16] {
        let at = offset(self.shape, self.table, kv, pos);
        &self.keys[at..at + self.shape.head_dim]
    }

    /// The value of KV head `kv` at position `pos` (head_dim values).
    #[inline]
    pub fn value(&self, kv: usize, pos: usize) -> &'a [f16] {
        let at = offset(self.shape, self.table, kv, pos);
        &self.values[at..at + self.shape.head_dim]
    }

    /// Positions the table covers.
    pub fn capacity(&self) -> usize {
        self.table.len() * self.shape.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_land_in_the_blocks_of_the_table() {
        let shape = KvShape { layers: 2, kv_heads: 2, head_dim: 3, block_size: 2 };
        let mut store = KvStore::new(shape, 4);
        // Positions 0..3 of a sequence whose blocks are 3 then 1.
        let table = [3, 1];
        let k: Vec<f32> = (0..2 * 3 * 3).map(|x| x as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        for kv in 0..2 {
            store.write(1, &table, kv, 0, &k[kv * 9..(kv + 1) * 9], &v[kv * 9..(kv + 1) * 9]);
        }
        let view = store.layer(1, &table);
        for kv in 0..2 {
            for pos in 0..3 {
                let want: Vec<f32> = k[(kv * 3 + pos) * 3..][..3].to_vec();
                assert_eq!(view.key(kv, pos).iter().map(|x| x.to_f32()).collect::<Vec<_>>(), want);
                assert_eq!(view.value(kv, pos)[0].to_f32(), -want[0]);
            }
        }
        // Block 3 holds positions 0 and 1; nothing was written to layer 0 or to blocks 0 and 2.
        assert_eq!(f16::from_bits(store.keys[1][(3 * 2) * 2 * 3 + 3]).to_f32(), k[3]);
        assert!(store.keys[0].iter().all(|&x| x == 0));
        assert!(store.keys[1][..2 * 2 * 3].iter().all(|&x| x == 0));
        assert_eq!(shape.block_bytes(), 2 * 2 * 2 * 2 * 3 * 2);
    }
}
