//! The forward pass with the CPU's numerics: the host pass of `model.rs`, step for step, on the
//! exact kernels.

use super::{ExactNumerics, LayerAttention, SequenceRows, attention, gated, matmul, rms_norm, row_flags};
use crate::F32_QUERY_ROWS;
use crate::device::{DeviceModel, LayerMatrices, logit_rows};
use crate::linear::BATCHED_MATMUL_ROWS;
use crate::model::{Logits, Sequence};
use crate::{Model, ModelError};
use candle_core::Tensor;

/// [`crate::Model::forward_batch`] on the GPU with the CPU's numerics. As there, a sequence
/// adding [`BATCHED_MATMUL_ROWS`] rows or more takes the batched matmul arithmetic for them, and
/// one adding [`F32_QUERY_ROWS`] or more attention's prompt path.
pub(in crate::device) fn forward(
    pass: &DeviceModel,
    exact: &ExactNumerics,
    model: &Model,
    batch: &mut [Sequence<'_>],
    logits: Logits,
) -> Result<Vec<f32>, ModelError> {
    let c = model.config();
    let device = pass.device();
    let mut tokens = Vec::new();
    let mut placed = Vec::with_capacity(batch.len());
    for seq in batch.iter() {
        let (start, n) = seq.span()?;
        placed.push((tokens.len(), start, n));
        tokens.extend_from_slice(seq.tokens);
    }
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let batched: Vec<bool> =
        placed.iter().flat_map(|&(_, _, n)| std::iter::repeat_n(n >= BATCHED_MATMUL_ROWS, n)).collect();
    let batched = row_flags(&batched, device)?;
    let mut x = model.weights.token_embd.rows(&tokens)?.to_device(device)?;
    if let Some(scale) = c.embedding_scale {
        x = (x * scale as f64)?;
    }
    {
        let seqs = batch
            .iter()
            .zip(&placed)
            .map(|(seq, &(row, start, n))| {
                Ok(SequenceRows {
                    row,
                    n,
                    start,
                    global: model.rope.tables(start, n, device)?,
                    local: model.local_rope.as_ref().map(|r| r.tables(start, n, device)).transpose()?,
                    cache: &*seq.cache,
                    tiled: n >= F32_QUERY_ROWS,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        for i in 0..c.n_layer {
            let layer = |m: &LayerMatrices| block(pass, exact, model, i, m, &x, &seqs, &batched);
            x = match (&pass.matrices[i], &pass.cuda) {
                (Some(m), _) => layer(m)?,
                (None, Some(cuda)) => cuda.with_streamed(i, layer)?,
                (None, None) => return Err(ModelError::Device(format!("layer {i} has no weights on the device"))),
            };
            if let Some(cuda) = &pass.cuda {
                cuda.sample_memory();
            }
        }
    }
    for (seq, &(_, _, n)) in batch.iter_mut().zip(&placed) {
        seq.cache.advance(n);
    }
    // The output head batched for a sequence that asks for the logits of several rows.
    let (mut rows, mut head_batched) = (Vec::new(), Vec::new());
    for &(row, _, n) in &placed {
        let part = logit_rows(std::iter::once((row, n)), logits);
        head_batched.extend(std::iter::repeat_n(part.len() >= BATCHED_MATMUL_ROWS, part.len()));
        rows.extend(part);
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let index = Tensor::new(rows.as_slice(), device)?;
    let x = rms_norm(&x.index_select(&index, 0)?, &pass.output_norm, c.rms_norm_eps)?;
    Ok(matmul(&pass.output, &x, &row_flags(&head_batched, device)?)?.flatten_all()?.to_vec1::<f32>()?)
}

/// One transformer block over every sequence's rows, as `Model::block` on the host; `batched`
/// flags the rows whose matmuls take the batched arithmetic.
#[allow(clippy::too_many_arguments)]
fn block(
    pass: &DeviceModel,
    exact: &ExactNumerics,
    model: &Model,
    index: usize,
    m: &LayerMatrices,
    x: &Tensor,
    seqs: &[SequenceRows<'_>],
    batched: &Tensor,
) -> Result<Tensor, ModelError> {
    let c = model.config();
    let matmul = |m: &candle_core::quantized::QMatMul, x: &Tensor| matmul(m, x, batched);
    let v = &pass.vectors[index];
    let eps = c.rms_norm_eps;
    let rows = x.dim(0)?;
    let post_norm = |y: Tensor, norm: &Option<Tensor>| match norm {
        Some(norm) => rms_norm(&y, norm, eps),
        None => Ok(y),
    };
    let h = rms_norm(x, &v.attn_norm, eps)?;
    let [q, k, val] = m.qkv_by(&h, &matmul)?;
    let finish = |mut y: Tensor, bias: &Option<Tensor>, norm: &Option<Tensor>, heads: usize| {
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(norm) = norm {
            y = rms_norm(&y.reshape((rows * heads, c.head_dim))?, norm, eps)?.reshape((rows, heads * c.head_dim))?;
        }
        Ok::<_, ModelError>(y)
    };
    let q = finish(q, &v.bq, &v.q_norm, c.n_head)?;
    let k = finish(k, &v.bk, &v.k_norm, c.n_head_kv)?;
    let val = finish(val, &v.bv, &None, c.n_head_kv)?;
    let (window, _) = c.layer_attention(index);
    let local = window.is_some() && model.local_rope.is_some();
    let rope = if local { model.local_rope.as_ref().unwrap_or(&model.rope) } else { &model.rope };
    let layer = LayerAttention { index, config: c, rope, local, window };
    let attn = attention(&q, &k, &val, seqs, layer)?;
    let x = (x + post_norm(matmul(m.wo(), &attn)?, &v.post_attn_norm)?)?;
    let h = rms_norm(&x, &v.ffn_norm, eps)?;
    let [gate, up] = m.gate_up_by(&h, &matmul)?;
    let ffn = matmul(m.w_down(), &gated(&gate, &up, exact.gelu_table.as_ref())?)?;
    Ok((x + post_norm(ffn, &v.post_ffn_norm)?)?)
}
