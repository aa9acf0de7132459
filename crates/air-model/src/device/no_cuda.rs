//! The CUDA side of the device pass in a build without the `cuda` feature: the same API as
//! `cuda/mod.rs`, with no CUDA device to open, no backend and no decode step.

use super::{DeviceModel, DeviceOptions, LayerMatrices, Projections, UploadStats};
use crate::model::Sequence;
use crate::{ModelConfig, ModelError};
use air_gguf::GgufFile;
use candle_core::{Device, Tensor};

/// A quantized matmul on the device: candle's, the only kind in this build.
pub(super) fn quantized_forward(m: &candle_core::quantized::QMatMul, x: &Tensor) -> Result<Tensor, ModelError> {
    Ok(candle_core::Module::forward(m, x)?)
}

/// CUDA devices present: none in this build.
pub(super) fn device_count() -> usize {
    0
}

/// Opening a CUDA device fails in this build.
pub(super) fn open(_ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device("this build of Air has no CUDA support (build it with `--features cuda`)".into()))
}

/// No CUDA backend exists in this build.
pub(super) enum Backend {}

impl Backend {
    pub(super) fn load(
        _: &GgufFile,
        _: &ModelConfig,
        _: &Device,
        _: DeviceOptions,
        _: u64,
    ) -> Result<Option<Self>, ModelError> {
        Ok(None)
    }

    pub(super) fn is_resident(&self, _: usize) -> bool {
        match *self {}
    }

    pub(super) fn plan(&self) -> &air_stream::ResidencyPlan {
        match *self {}
    }

    pub(super) fn with_streamed<T>(
        &self,
        _: usize,
        _: impl FnOnce(&LayerMatrices) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        match *self {}
    }

    pub(super) fn upload_stats(&self) -> UploadStats {
        match *self {}
    }

    pub(super) fn bytes_per_pass(&self) -> u64 {
        match *self {}
    }

    pub(super) fn peak_memory(&self) -> u64 {
        match *self {}
    }

    pub(super) fn sample_memory(&self) {
        match *self {}
    }

    pub(super) fn measure_pinned_upload(&self, _: &Device) -> Result<f64, ModelError> {
        match *self {}
    }

    pub(super) fn graphed_decode(
        &self,
        _: &DeviceModel,
        _: &crate::Model,
        _: DecodeStep,
        _: &Tensor,
    ) -> Result<Result<Vec<f32>, DecodeStep>, ModelError> {
        match *self {}
    }
}

/// The pass with the CPU's numerics runs on CUDA only: never made in this build.
pub(super) enum ExactNumerics {}

impl ExactNumerics {
    pub(super) fn new(_: &GgufFile, _: &ModelConfig, _: &Device) -> Result<Self, ModelError> {
        Err(ModelError::Device("the CPU's numerics on a GPU need a build with the `cuda` feature".into()))
    }
}

pub(super) fn exact_forward(
    _: &DeviceModel,
    exact: &ExactNumerics,
    _: &crate::Model,
    _: &mut [Sequence<'_>],
    _: crate::model::Logits,
) -> Result<Vec<f32>, ModelError> {
    match *exact {}
}

/// Air's gated-activation kernel is CUDA's: never here.
pub(super) fn stacked_gated(
    _: &Device,
    _: &ModelConfig,
    _: &LayerMatrices,
    _: &Tensor,
) -> Result<Option<Tensor>, ModelError> {
    Ok(None)
}

/// The fused decode block is CUDA's: never here (no decode step exists).
pub(super) fn fused_block(
    _: &DeviceModel,
    _: &crate::Model,
    _: usize,
    _: &LayerMatrices,
    _: &Tensor,
    step: &DecodeStep,
) -> Result<Option<Tensor>, ModelError> {
    match *step {}
}

/// No decode step uses Air's CUDA kernels in this build.
pub(super) enum DecodeStep {}

impl DecodeStep {
    pub(super) fn new(_: &crate::Model, _: &[Sequence<'_>], _: &Device) -> Result<Option<Self>, ModelError> {
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn stacked_attention(
        &self,
        _: &crate::Model,
        _: usize,
        _: &LayerMatrices,
        _: &Tensor,
        _: &Option<Tensor>,
        _: bool,
    ) -> Result<Option<Tensor>, ModelError> {
        match *self {}
    }

    pub(super) fn decode_attention(
        _: &crate::Model,
        _: usize,
        step: &DecodeStep,
        _: &Projections,
    ) -> Result<Tensor, ModelError> {
        match *step {}
    }
}
