//! The prefetch window over a real file mapping: no layer is handed out before its pages are in
//! memory, no layer is released while in use, and every pass reads each streamed layer once.

use air_stream::{LayerStreamer, Residency, ResidencyPlan, StreamOptions};
use memmap2::Mmap;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

const LAYERS: usize = 6;
const LAYER_BYTES: usize = 256 * 1024;
const HEADER: usize = 4096;

/// A file of a header and `LAYERS` layers; byte i of layer l is (l * 31 + i) % 251.
fn model_file() -> (tempfile::NamedTempFile, Arc<Mmap>, Vec<Vec<Range<usize>>>) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&[0u8; HEADER]).unwrap();
    let mut layers = Vec::new();
    for l in 0..LAYERS {
        let bytes: Vec<u8> = (0..LAYER_BYTES).map(|i| ((l * 31 + i) % 251) as u8).collect();
        file.write_all(&bytes).unwrap();
        // Two tensors per layer, as a GGUF file has several.
        let start = HEADER + l * LAYER_BYTES;
        layers.push(vec![start + LAYER_BYTES / 2..start + LAYER_BYTES, start..start + LAYER_BYTES / 2]);
    }
    file.flush().unwrap();
    let map = Arc::new(unsafe { Mmap::map(file.as_file()) }.unwrap());
    (file, map, layers)
}

/// Whether every page of `range` is in memory (mincore).
fn in_core(map: &Mmap, range: Range<usize>) -> bool {
    let page = 4096;
    let start = range.start / page * page;
    let len = range.end - start;
    let mut vec = vec![0u8; len.div_ceil(page)];
    let rc = unsafe { libc::mincore(map.as_ptr().add(start) as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    vec.iter().all(|v| v & 1 == 1)
}

fn layer_range(l: usize) -> Range<usize> {
    HEADER + l * LAYER_BYTES..HEADER + (l + 1) * LAYER_BYTES
}

#[test]
fn layers_are_resident_when_acquired_and_released_after_use() {
    let (_file, map, layers) = model_file();
    let plan = ResidencyPlan::new(&[LAYER_BYTES as u64; LAYERS], 3 * LAYER_BYTES as u64, 2);
    assert_eq!(plan.streamed_count(), LAYERS);
    let streamer = LayerStreamer::new(map.clone(), layers, plan, StreamOptions::default()).unwrap();
    for pass in 0..3 {
        for l in 0..LAYERS {
            let guard = streamer.acquire(l).unwrap();
            assert_eq!(streamer.residency(l), Residency::InUse);
            assert!(in_core(&map, layer_range(l)), "pass {pass}: layer {l} handed out before it was read");
            // The window: the next two layers (wrapping into the next pass) are asked for.
            for ahead in 1..=2 {
                let next = streamer.residency((l + ahead) % LAYERS);
                assert!(matches!(next, Residency::Queued | Residency::Ready), "layer {l}+{ahead}: {next:?}");
            }
            let expected = (l * 31 + 12345) % 251;
            assert_eq!(map[layer_range(l).start + 12345] as usize, expected);
            drop(guard);
            assert_eq!(streamer.residency(l), Residency::Released);
        }
    }
    let stats = streamer.stats();
    assert!(stats.layers_read >= 3 * LAYERS as u64 && stats.layers_read <= 3 * LAYERS as u64 + 2, "{stats:?}");
    assert_eq!(stats.bytes_streamed, (3 * LAYERS * LAYER_BYTES) as u64);
    assert_eq!(streamer.streamed_bytes_per_pass(), (LAYERS * LAYER_BYTES) as u64);
}

#[test]
fn a_layer_in_use_is_never_released_by_the_window() {
    let (_file, map, layers) = model_file();
    let plan = ResidencyPlan::new(&[LAYER_BYTES as u64; LAYERS], 0, 3);
    let streamer = LayerStreamer::new(map.clone(), layers, plan, StreamOptions::default()).unwrap();
    let held = streamer.acquire(0).unwrap();
    // Walk the rest of the model twice: the window wraps past layer 0 without touching it.
    for _ in 0..2 {
        for l in 1..LAYERS {
            let guard = streamer.acquire(l).unwrap();
            assert_eq!(streamer.residency(0), Residency::InUse);
            drop(guard);
        }
    }
    assert!(in_core(&map, layer_range(0)));
    assert_eq!(held.layer(), 0);
    drop(held);
    assert_eq!(streamer.residency(0), Residency::Released);
    assert!(streamer.acquire(0).is_ok());
}

#[test]
fn pinned_layers_are_never_streamed() {
    let (_file, map, layers) = model_file();
    // Room for the window (3 layers) and three pinned layers: every other layer streams.
    let plan = ResidencyPlan::new(&[LAYER_BYTES as u64; LAYERS], 6 * LAYER_BYTES as u64 - 1, 2);
    assert_eq!(plan.pinned_count(), 2);
    let pinned: Vec<usize> = (0..LAYERS).filter(|&l| plan.is_pinned(l)).collect();
    let streamer = LayerStreamer::new(map, layers, plan, StreamOptions::default()).unwrap();
    for _ in 0..2 {
        for l in 0..LAYERS {
            let _guard = streamer.acquire(l).unwrap();
        }
    }
    for l in pinned {
        assert_eq!(streamer.residency(l), Residency::Pinned);
    }
    assert_eq!(streamer.streamed_bytes_per_pass(), (4 * LAYER_BYTES) as u64);
}

#[test]
fn a_fully_resident_plan_starts_no_reader() {
    let (_file, map, layers) = model_file();
    let plan = ResidencyPlan::new(&[LAYER_BYTES as u64; LAYERS], u64::MAX, 2);
    let streamer = LayerStreamer::new(map, layers, plan, StreamOptions::default()).unwrap();
    for l in 0..LAYERS {
        let _guard = streamer.acquire(l).unwrap();
        assert_eq!(streamer.residency(l), Residency::Pinned);
    }
    assert_eq!(streamer.stats().layers_read, 0);
    assert_eq!(streamer.streamed_bytes_per_pass(), 0);
}

#[test]
fn ranges_outside_the_file_are_an_error() {
    let (_file, map, _) = model_file();
    let bad = vec![vec![0..map.len() + 1]];
    let plan = ResidencyPlan::all_resident(1);
    assert!(LayerStreamer::new(map, bad, plan, StreamOptions::default()).is_err());
}

#[test]
fn acquiring_a_layer_in_use_fails_without_releasing_it() {
    let (_file, map, layers) = model_file();
    let plan = ResidencyPlan::new(&[LAYER_BYTES as u64; LAYERS], 0, 2);
    let streamer = LayerStreamer::new(map.clone(), layers, plan, StreamOptions::default()).unwrap();
    let held = streamer.acquire(2).unwrap();
    assert!(streamer.acquire(2).is_err());
    assert_eq!(streamer.residency(2), Residency::InUse);
    assert!(in_core(&map, layer_range(2)));
    drop(held);
    assert_eq!(streamer.residency(2), Residency::Released);
}
