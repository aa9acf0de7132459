//! A layer's weight matrices as candle quantized matmuls on a device.

use crate::ModelError;
use air_gguf::{GgufFile, TensorInfo, TensorType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::Device;
use std::borrow::Cow;

/// The seven matrices of a transformer block, by GGUF name suffix, in the order
/// [`LayerMatrices`] holds them.
pub(crate) const MATRIX_NAMES: [&str; 7] =
    ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// The matrices of one block, ready to multiply on the device.
#[derive(Clone)]
pub struct LayerMatrices([QMatMul; 7]);

impl LayerMatrices {
    /// From matmuls in [`MATRIX_NAMES`] order.
    #[cfg(feature = "cuda")]
    pub(crate) fn new(matrices: [QMatMul; 7]) -> Self {
        Self(matrices)
    }

    /// Uploads the matrices of layer `layer` of `file` to `device`.
    pub(crate) fn upload(file: &GgufFile, layer: usize, device: &Device) -> Result<Self, ModelError> {
        let mut out = Vec::with_capacity(MATRIX_NAMES.len());
        for name in MATRIX_NAMES {
            out.push(upload(file, &format!("blk.{layer}.{name}.weight"), device)?);
        }
        Ok(Self(out.try_into().unwrap_or_else(|_| unreachable!("one matmul per name"))))
    }

    pub(crate) fn wq(&self) -> &QMatMul {
        &self.0[0]
    }
    pub(crate) fn wk(&self) -> &QMatMul {
        &self.0[1]
    }
    pub(crate) fn wv(&self) -> &QMatMul {
        &self.0[2]
    }
    pub(crate) fn wo(&self) -> &QMatMul {
        &self.0[3]
    }
    pub(crate) fn w_gate(&self) -> &QMatMul {
        &self.0[4]
    }
    pub(crate) fn w_up(&self) -> &QMatMul {
        &self.0[5]
    }
    pub(crate) fn w_down(&self) -> &QMatMul {
        &self.0[6]
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
