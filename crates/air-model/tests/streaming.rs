//! Streaming (S.L.I.P.) changes where weights are read from, never the numbers: logits of a
//! streamed model equal those of the resident one bit for bit.

use air_gguf::{GgufFile, TensorType};
use air_model::{LoadOptions, Logits, Model, Sequence, SynthSpec};

fn synthetic(ty: TensorType) -> tempfile::NamedTempFile {
    let spec =
        SynthSpec { layers: 4, hidden: 256, ffn: 512, heads: 4, kv_heads: 2, vocab: 512, context: 64, ty, seed: 7 };
    let file = tempfile::NamedTempFile::new().unwrap();
    spec.write(std::io::BufWriter::new(file.as_file()), |_| {}).unwrap();
    file
}

fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(32).unwrap();
    let mut all = model.forward(tokens, &mut cache, Logits::From(0)).unwrap();
    // Then two generation steps, where each layer is acquired again.
    for &t in &[5u32, 300] {
        all.extend(model.forward(&[t], &mut cache, Logits::Last).unwrap());
    }
    all
}

#[test]
fn streamed_logits_equal_resident_logits() {
    for ty in [TensorType::Q4_0, TensorType::Q4_K, TensorType::Q8_0] {
        let file = synthetic(ty);
        let gguf = GgufFile::open(file.path()).unwrap();
        let resident = Model::load(&gguf).unwrap();
        assert_eq!(resident.streamer().plan().streamed_count(), 0);
        // A budget of nothing: every layer streams through a window of one layer ahead.
        let streamed = Model::load_with(
            &gguf,
            LoadOptions { memory_budget: Some(0), prefetch_depth: 1, ..LoadOptions::default() },
        )
        .unwrap();
        assert_eq!(streamed.streamer().plan().streamed_count(), 4);

        let tokens = [1u32, 17, 260, 511, 42, 42, 9];
        let (a, b) = (logits(&resident, &tokens), logits(&streamed, &tokens));
        assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != a[0]), "{ty}: degenerate logits");
        assert_eq!(a.len(), b.len());
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{ty}: streamed logits differ from resident ones");
        // Three passes, each reading every layer once (plus the window's read-ahead).
        let stats = streamed.streamer().stats();
        assert!(stats.layers_read >= 12, "{stats:?}");
    }
}

#[test]
fn a_batch_of_sequences_gives_each_sequence_its_own_logits() {
    let file = synthetic(TensorType::Q4_0);
    let gguf = GgufFile::open(file.path()).unwrap();
    let model =
        Model::load_with(&gguf, LoadOptions { memory_budget: Some(0), prefetch_depth: 2, ..LoadOptions::default() })
            .unwrap();
    let prompts: [&[u32]; 3] = [&[1, 17, 260, 511, 42], &[1, 300], &[1, 9, 9, 9, 100, 200, 301]];

    // Each sequence alone: prompt, then three greedy-free steps with fixed tokens.
    let steps = [[3u32, 4, 5], [6, 7, 8], [9, 10, 11]];
    let mut alone = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        let mut cache = model.new_cache(16).unwrap();
        let mut out = model.forward(prompt, &mut cache, Logits::Last).unwrap();
        for step in steps {
            out.extend(model.forward(&[step[p]], &mut cache, Logits::Last).unwrap());
        }
        alone.push(out);
    }

    // All three together: one pass for the prompts, one per step.
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(16).unwrap()).collect();
    let vocab = model.vocab_size();
    let mut together = vec![Vec::new(); 3];
    let mut record = |logits: Vec<f32>| {
        assert_eq!(logits.len(), 3 * vocab);
        for (p, row) in logits.chunks(vocab).enumerate() {
            together[p].extend_from_slice(row);
        }
    };
    let mut batch: Vec<_> = prompts.iter().zip(&mut caches).map(|(t, cache)| Sequence { tokens: t, cache }).collect();
    record(model.forward_batch(&mut batch, Logits::Last).unwrap());
    for step in steps {
        let tokens: Vec<[u32; 1]> = step.iter().map(|&t| [t]).collect();
        let mut batch: Vec<_> =
            tokens.iter().zip(&mut caches).map(|(t, cache)| Sequence { tokens: t, cache }).collect();
        record(model.forward_batch(&mut batch, Logits::Last).unwrap());
    }
    for p in 0..3 {
        let same = alone[p].iter().zip(&together[p]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "sequence {p}: batched logits differ from its logits alone");
    }
}
