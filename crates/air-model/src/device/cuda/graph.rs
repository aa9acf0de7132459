//! CUDA graphs of the decode step. A step of a resident model launches some 800 small kernels
//! (candle runs one op per launch); replaying them as one captured graph removes the host's
//! launch cost, which dominated decode time (docs/benchmarks.md). A graph is captured per
//! (batch size, cache capacity) the first time such a step runs, and replayed after that with
//! the step's inputs copied into the buffers it was captured with: token embeddings, RoPE
//! tables, positions and cache addresses. Attention reads the positions from device memory, so
//! one graph serves every position.

use super::{DecodeStep, DeviceModel, PassState};
use crate::ModelError;
use candle_core::{DType, Device, Tensor};
use cudarc::driver::{CudaGraph, sys};
use std::collections::HashMap;
use std::sync::Mutex;

/// A captured decode step and the buffers it reads and writes.
struct Graphed {
    state: PassState,
    x: Tensor,
    logits: Tensor,
    graph: CudaGraph,
}

// SAFETY: a graph is launched only under the mutex that owns it, on the stream it was captured on.
unsafe impl Send for Graphed {}

/// The decode graphs of a model, by (sequences, cache capacity).
#[derive(Default)]
pub(crate) struct DecodeGraphs(Mutex<HashMap<(usize, usize), Graphed>>);

fn driver(e: cudarc::driver::DriverError) -> ModelError {
    ModelError::Device(format!("CUDA graph: {e}"))
}

impl DecodeGraphs {
    /// Runs the decode step of `x` (one embedded token per sequence) through every layer and
    /// the output head by replaying a graph, capturing it first if this shape is new. Returns
    /// the logits, one row per sequence.
    pub(crate) fn run(
        &self,
        pass: &DeviceModel,
        model: &crate::Model,
        step: DecodeStep,
        x: &Tensor,
    ) -> Result<Vec<f32>, ModelError> {
        let Device::Cuda(cuda) = x.device() else {
            return Err(ModelError::Device("decode graphs need a CUDA device".into()));
        };
        let mut graphs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (step.sequences, step.capacity);
        match graphs.get(&key) {
            Some(g) => {
                let Some(inputs) = &g.state.decode else {
                    return Err(ModelError::Device("a decode graph lost its step inputs".into()));
                };
                step.write_into(inputs)?;
                g.x.slice_set(x, 0, 0)?;
            }
            None => {
                let state = PassState { decode: Some(step.deep_copy()?) };
                let x = x.copy()?;
                let logits = Tensor::zeros((key.0, model.vocab_size()), DType::F32, x.device())?;
                // candle uploads small constants (shapes, strides) inside some ops: its cache
                // serves them from device memory during capture, once a plain run filled it.
                let _uploads = cuda.enable_cuda_graph_htod_cache();
                decode_body(pass, model, &state, &x, &logits)?;
                let stream = cuda.cuda_stream();
                stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(driver)?;
                let captured = decode_body(pass, model, &state, &x, &logits);
                let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(driver)?;
                captured?;
                let graph = graph.ok_or_else(|| ModelError::Device("CUDA graph capture recorded nothing".into()))?;
                graphs.insert(key, Graphed { state, x, logits, graph });
            }
        }
        let g = &graphs[&key];
        g.graph.launch().map_err(driver)?;
        Ok(g.logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// A decode step of resident layers as the graph captures it: the (scaled) embeddings `x`, one
/// row per sequence, through every layer and the output head, the logits written to `logits`.
fn decode_body(
    pass: &DeviceModel,
    model: &crate::Model,
    state: &PassState,
    x: &Tensor,
    logits: &Tensor,
) -> Result<(), ModelError> {
    let c = model.config();
    let mut x = x.clone();
    for (i, m) in pass.matrices.iter().enumerate() {
        let m = m.as_ref().ok_or_else(|| ModelError::Device(format!("layer {i} is not resident")))?;
        x = pass.block(model, i, m, &x, &mut [], state)?;
    }
    let x = candle_nn::ops::rms_norm(&x, &pass.output_norm, c.rms_norm_eps)?;
    logits.slice_set(&super::super::matrices::matmul(&pass.output, &x)?, 0, 0)?;
    Ok(())
}
