//! A layer's weight matrices as candle quantized matmuls on a device.

use crate::ModelError;
use air_gguf::{GgufFile, TensorInfo, TensorType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::borrow::Cow;

/// The seven matrices of a transformer block, by GGUF name suffix, in the order
/// [`LayerMatrices`] holds them.
pub(crate) const MATRIX_NAMES: [&str; 7] =
    ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// The matrices of one block, ready to multiply on the device. Resident layers whose query, key
/// and value matrices share a type are stacked into one matrix at load (likewise gate and up):
/// one activation quantization and one launch where there were three (two).
#[derive(Clone)]
pub struct LayerMatrices {
    attention: Projection,
    wo: QMatMul,
    ffn: Projection,
    w_down: QMatMul,
}

/// A quantized matmul `x · Wᵀ` on the device.
pub(crate) type MatmulFn<'a> = &'a dyn Fn(&QMatMul, &Tensor) -> Result<Tensor, ModelError>;

/// Matrices applied to the same input: separately, or stacked row-wise into one.
#[derive(Clone)]
enum Projection {
    Separate(Vec<QMatMul>),
    /// The stacked matrix, and the output width of each part.
    Stacked(QMatMul, Vec<usize>),
}

impl Projection {
    /// Each part's output for `x` (rows, k) by `matmul`: (rows, width) each.
    fn forward(&self, x: &Tensor, matmul: MatmulFn<'_>) -> Result<Vec<Tensor>, ModelError> {
        match self {
            Projection::Separate(ms) => ms.iter().map(|m| matmul(m, x)).collect(),
            Projection::Stacked(m, widths) => {
                let y = matmul(m, x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, at, w)?.contiguous()?;
                        at += w;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }

    /// Uploads `names` of layer `layer`, stacked when they share a type.
    fn upload(file: &GgufFile, layer: usize, names: &[&str], device: &Device) -> Result<Self, ModelError> {
        let infos = names
            .iter()
            .map(|n| {
                let name = format!("blk.{layer}.{n}.weight");
                file.tensor(&name).ok_or(ModelError::MissingTensor(name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shapes = infos.iter().map(|i| matrix_shape(i)).collect::<Result<Vec<_>, _>>()?;
        let same_type = infos.iter().all(|i| i.ty == infos[0].ty);
        let same_k = shapes.iter().all(|s| s.1 == shapes[0].1);
        if !(same_type && same_k) {
            return Ok(Projection::Separate(
                infos.iter().map(|i| upload(file, &i.name, device)).collect::<Result<_, _>>()?,
            ));
        }
        let bytes: Vec<u8> = infos.iter().flat_map(|i| file.tensor_data(i).iter().copied()).collect();
        let widths: Vec<usize> = shapes.iter().map(|s| s.0).collect();
        let rows = widths.iter().sum::<usize>();
        let storage = QStorage::from_data(Cow::Owned(bytes), device, ggml_dtype(infos[0])?)?;
        let stacked = QMatMul::from_qtensor(QTensor::new(storage, (rows, shapes[0].1))?)?;
        Ok(Projection::Stacked(stacked, widths))
    }
}

impl LayerMatrices {
    /// From matmuls in [`MATRIX_NAMES`] order, unstacked.
    #[cfg(feature = "cuda")]
    pub(crate) fn new(m: [QMatMul; 7]) -> Self {
        let [wq, wk, wv, wo, w_gate, w_up, w_down] = m;
        Self {
            attention: Projection::Separate(vec![wq, wk, wv]),
            wo,
            ffn: Projection::Separate(vec![w_gate, w_up]),
            w_down,
        }
    }

    /// Uploads the matrices of layer `layer` of `file` to `device`.
    pub(crate) fn upload(file: &GgufFile, layer: usize, device: &Device) -> Result<Self, ModelError> {
        let one = |name: &str| upload(file, &format!("blk.{layer}.{name}.weight"), device);
        Ok(Self {
            attention: Projection::upload(file, layer, &MATRIX_NAMES[..3], device)?,
            wo: one(MATRIX_NAMES[3])?,
            ffn: Projection::upload(file, layer, &MATRIX_NAMES[4..6], device)?,
            w_down: one(MATRIX_NAMES[6])?,
        })
    }

    /// Queries, keys and values of `x`.
    pub(crate) fn qkv(&self, x: &Tensor) -> Result<[Tensor; 3], ModelError> {
        self.qkv_by(x, &matmul)
    }

    /// Queries, keys and values of `x`, multiplied by `matmul`.
    pub(crate) fn qkv_by(&self, x: &Tensor, matmul: MatmulFn<'_>) -> Result<[Tensor; 3], ModelError> {
        let parts = self.attention.forward(x, matmul)?;
        parts.try_into().map_err(|_| ModelError::Config("expected three attention projections".into()))
    }

    /// The stacked query/key/value output of `x`, (rows, q + k + v widths), when stacked.
    #[cfg(feature = "cuda")]
    pub(crate) fn stacked_qkv(&self, x: &Tensor) -> Result<Option<Tensor>, ModelError> {
        match &self.attention {
            Projection::Stacked(m, _) => Ok(Some(matmul(m, x)?)),
            Projection::Separate(_) => Ok(None),
        }
    }

    /// The stacked gate/up output of `x`, (rows, 2 × ffn), when stacked.
    #[cfg(feature = "cuda")]
    pub(crate) fn stacked_gate_up(&self, x: &Tensor) -> Result<Option<Tensor>, ModelError> {
        match &self.ffn {
            Projection::Stacked(m, _) => Ok(Some(matmul(m, x)?)),
            Projection::Separate(_) => Ok(None),
        }
    }

    /// The stacked query/key/value and gate/up matrices, when both are stacked.
    #[cfg(feature = "cuda")]
    pub(crate) fn stacked(&self) -> Option<(&QMatMul, &QMatMul)> {
        match (&self.attention, &self.ffn) {
            (Projection::Stacked(qkv, _), Projection::Stacked(gate_up, _)) => Some((qkv, gate_up)),
            _ => None,
        }
    }

    /// Gate and up projections of `x`.
    pub(crate) fn gate_up(&self, x: &Tensor) -> Result<[Tensor; 2], ModelError> {
        self.gate_up_by(x, &matmul)
    }

    /// Gate and up projections of `x`, multiplied by `matmul`.
    pub(crate) fn gate_up_by(&self, x: &Tensor, matmul: MatmulFn<'_>) -> Result<[Tensor; 2], ModelError> {
        let parts = self.ffn.forward(x, matmul)?;
        parts.try_into().map_err(|_| ModelError::Config("expected two feed-forward projections".into()))
    }

    pub(crate) fn wo(&self) -> &QMatMul {
        &self.wo
    }

    pub(crate) fn w_down(&self) -> &QMatMul {
        &self.w_down
    }
}

/// candle's name for a GGUF tensor type, for the types its device kernels multiply.
pub(crate) fn ggml_dtype(info: &TensorInfo) -> Result<GgmlDType, ModelError> {
    Ok(match info.ty {
        TensorType::F32 => GgmlDType::F32,
        TensorType::F16 => GgmlDType::F16,
        TensorType::BF16 => GgmlDType::BF16,
        TensorType::Q4_0 => GgmlDType::Q4_0,
        TensorType::Q4_1 => GgmlDType::Q4_1,
        TensorType::Q5_0 => GgmlDType::Q5_0,
        TensorType::Q5_1 => GgmlDType::Q5_1,
        TensorType::Q8_0 => GgmlDType::Q8_0,
        TensorType::Q2_K => GgmlDType::Q2K,
        TensorType::Q3_K => GgmlDType::Q3K,
        TensorType::Q4_K => GgmlDType::Q4K,
        TensorType::Q5_K => GgmlDType::Q5K,
        TensorType::Q6_K => GgmlDType::Q6K,
        _ => return Err(ModelError::UnsupportedTensorType { name: info.name.clone(), ty: info.ty }),
    })
}

/// The (rows, columns) of a 2-D GGUF tensor as candle orders them.
pub(crate) fn matrix_shape(info: &TensorInfo) -> Result<(usize, usize), ModelError> {
    match info.dims[..] {
        [k, n] => Ok((n as usize, k as usize)),
        _ => Err(ModelError::Config(format!("tensor {:?} is not a matrix: {:?}", info.name, info.dims))),
    }
}

/// Uploads the matrix `name` of `file` to `device` as a quantized matmul (dequantized when the
/// file stores it unquantized).
pub(crate) fn upload(file: &GgufFile, name: &str, device: &Device) -> Result<QMatMul, ModelError> {
    let info = file.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.into()))?;
    let storage = QStorage::from_data(Cow::Borrowed(file.tensor_data(info)), device, ggml_dtype(info)?)?;
    Ok(QMatMul::from_qtensor(QTensor::new(storage, matrix_shape(info)?)?)?)
}

/// `x · Wᵀ` for a weight matrix on the device (see `cuda::matmul` for how CUDA rounds).
pub(crate) fn matmul(m: &QMatMul, x: &Tensor) -> Result<Tensor, ModelError> {
    super::cuda::quantized_forward(m, x)
}
