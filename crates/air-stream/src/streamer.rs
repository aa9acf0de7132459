//! The LayerStreamer: reads streamed layers ahead of their use and releases them after.

use crate::ResidencyPlan;
use memmap2::{Advice, Mmap, UncheckedAdvice};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// How streamed layers are handled beyond the plan.
#[derive(Debug, Default)]
pub struct StreamOptions {
    /// After use, drop a streamed layer from the page cache as well
    /// (`posix_fadvise(POSIX_FADV_DONTNEED)`), not just from this process. Right when the file
    /// is larger than memory (the cache cannot keep it anyway, and the kernel need not evict
    /// other data to make room); wrong when the cache can hold it (the next pass would read the
    /// disk again).
    pub drop_page_cache: Option<File>,
}

impl StreamOptions {
    /// The options for streaming the file at `path`: drop streamed layers from the page cache
    /// when the file is larger than the memory available now.
    pub fn for_file(path: &std::path::Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let larger_than_memory = crate::available_memory().is_some_and(|m| size > m.bytes());
        Ok(Self { drop_page_cache: larger_than_memory.then_some(file) })
    }
}

/// Where a layer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Resident for good (its pages are faulted in at first use and kept).
    Pinned,
    /// Streamed, not in memory on this process's account.
    Released,
    /// Streamed, waiting for or being read by the prefetch thread.
    Queued,
    /// Streamed, read in and mapped, not yet in use.
    Ready,
    /// Streamed and in use: never released until its guard is dropped.
    InUse,
}

/// Counters since the streamer was made.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamStats {
    /// Bytes of streamed layers handed to computation (each acquire counts the layer's bytes).
    pub bytes_streamed: u64,
    /// Bytes of streamed layers made resident by the prefetch thread.
    pub bytes_read: u64,
    /// Streamed layers made resident.
    pub layers_read: u64,
    /// Time the prefetch thread spent making them resident.
    pub read_seconds: f64,
    /// Time [`LayerStreamer::acquire`] spent waiting for a layer that was not ready yet.
    pub wait_seconds: f64,
}

impl std::ops::Sub for StreamStats {
    type Output = StreamStats;

    /// What happened between two snapshots (`later - earlier`).
    fn sub(self, earlier: StreamStats) -> StreamStats {
        StreamStats {
            bytes_streamed: self.bytes_streamed - earlier.bytes_streamed,
            bytes_read: self.bytes_read - earlier.bytes_read,
            layers_read: self.layers_read - earlier.layers_read,
            read_seconds: self.read_seconds - earlier.read_seconds,
            wait_seconds: self.wait_seconds - earlier.wait_seconds,
        }
    }
}

impl std::ops::AddAssign for StreamStats {
    fn add_assign(&mut self, other: StreamStats) {
        self.bytes_streamed += other.bytes_streamed;
        self.bytes_read += other.bytes_read;
        self.layers_read += other.layers_read;
        self.read_seconds += other.read_seconds;
        self.wait_seconds += other.wait_seconds;
    }
}

struct Shared {
    map: Arc<Mmap>,
    spans: Vec<Vec<Range<usize>>>,
    states: Mutex<Vec<Residency>>,
    changed: Condvar,
    bytes_streamed: AtomicU64,
    bytes_read: AtomicU64,
    layers_read: AtomicU64,
    read_nanos: AtomicU64,
    wait_nanos: AtomicU64,
    /// The first error of the prefetch thread, reported by the next `acquire`.
    failure: Mutex<Option<io::Error>>,
}

/// Streams the layers of a memory-mapped model through a prefetch window, following a
/// [`ResidencyPlan`]. [`acquire`](Self::acquire) a layer before computing with it; the guard
/// releases it when dropped.
pub struct LayerStreamer {
    shared: Arc<Shared>,
    plan: ResidencyPlan,
    /// The streamed layers in order, and each layer's index among them.
    order: Vec<usize>,
    position: Vec<Option<usize>>,
    drop_page_cache: Option<File>,
    requests: Option<Sender<usize>>,
    reader: Option<JoinHandle<()>>,
}

/// A layer acquired for computation; dropping it releases a streamed layer.
pub struct LayerGuard<'a> {
    streamer: &'a LayerStreamer,
    layer: usize,
}

impl LayerStreamer {
    /// A streamer over `map` whose layer `i` occupies the byte ranges `layers[i]` of the map.
    /// Starts the prefetch thread when the plan streams any layer.
    pub fn new(
        map: Arc<Mmap>,
        layers: Vec<Vec<Range<usize>>>,
        plan: ResidencyPlan,
        options: StreamOptions,
    ) -> io::Result<Self> {
        if layers.len() != plan.layers() {
            return Err(io::Error::other(format!("{} layers but a plan for {}", layers.len(), plan.layers())));
        }
        if let Some(r) = layers.iter().flatten().find(|r| r.start > r.end || r.end > map.len()) {
            return Err(io::Error::other(format!("layer bytes {r:?} outside the {}-byte mapping", map.len())));
        }
        let states = (0..plan.layers())
            .map(|i| if plan.is_pinned(i) { Residency::Pinned } else { Residency::Released })
            .collect();
        let shared = Arc::new(Shared {
            map,
            spans: layers.into_iter().map(merge).collect(),
            states: Mutex::new(states),
            changed: Condvar::new(),
            bytes_streamed: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            layers_read: AtomicU64::new(0),
            read_nanos: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
            failure: Mutex::new(None),
        });
        let order: Vec<usize> = plan.streamed().collect();
        let mut position = vec![None; plan.layers()];
        for (p, &layer) in order.iter().enumerate() {
            position[layer] = Some(p);
        }
        let (requests, reader) = if order.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = channel::<usize>();
            let shared = shared.clone();
            let reader = std::thread::Builder::new().name("air-layer-prefetch".into()).spawn(move || {
                for layer in rx {
                    shared.read_in(layer);
                }
            })?;
            (Some(tx), Some(reader))
        };
        Ok(Self { shared, plan, order, position, drop_page_cache: options.drop_page_cache, requests, reader })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.plan.layers()
    }

    /// The plan being followed.
    pub fn plan(&self) -> &ResidencyPlan {
        &self.plan
    }

    /// Where `layer` stands now.
    pub fn residency(&self, layer: usize) -> Residency {
        self.shared.states()[layer]
    }

    /// Bytes of the streamed layers: what one full pass reads.
    pub fn streamed_bytes_per_pass(&self) -> u64 {
        self.order.iter().map(|&l| self.shared.layer_bytes(l)).sum()
    }

    /// Counters so far.
    pub fn stats(&self) -> StreamStats {
        let s = &self.shared;
        StreamStats {
            bytes_streamed: s.bytes_streamed.load(Ordering::Relaxed),
            bytes_read: s.bytes_read.load(Ordering::Relaxed),
            layers_read: s.layers_read.load(Ordering::Relaxed),
            read_seconds: s.read_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            wait_seconds: s.wait_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// Makes `layer` resident for computation, waiting for its read if needed, and asks for the
    /// next streamed layers of the window (wrapping to the start of the model, where the next
    /// pass begins).
    pub fn acquire(&self, layer: usize) -> io::Result<LayerGuard<'_>> {
        // The guard exists only once the layer is held: a failed acquire releases nothing.
        let Some(p) = self.position[layer] else {
            return Ok(LayerGuard { streamer: self, layer });
        };
        let mut states = self.shared.states();
        self.request(&mut states, layer)?;
        for ahead in 1..=self.plan.depth() {
            self.request(&mut states, self.order[(p + ahead) % self.order.len()])?;
        }
        if states[layer] != Residency::Ready {
            let start = Instant::now();
            while states[layer] == Residency::Queued {
                states = self.shared.changed.wait(states).unwrap_or_else(|e| e.into_inner());
            }
            self.shared.wait_nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if let Some(e) = self.shared.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        if states[layer] != Residency::Ready {
            return Err(io::Error::other(format!("layer {layer} acquired twice")));
        }
        states[layer] = Residency::InUse;
        self.shared.bytes_streamed.fetch_add(self.shared.layer_bytes(layer), Ordering::Relaxed);
        Ok(LayerGuard { streamer: self, layer })
    }

    /// Queues a released layer for the prefetch thread.
    fn request(&self, states: &mut [Residency], layer: usize) -> io::Result<()> {
        if states[layer] == Residency::Released {
            let requests = self.requests.as_ref().ok_or_else(|| io::Error::other("no prefetch thread"))?;
            requests.send(layer).map_err(|_| io::Error::other("the prefetch thread has stopped"))?;
            states[layer] = Residency::Queued;
        }
        Ok(())
    }

    fn release(&self, layer: usize) {
        if self.position[layer].is_none() {
            return;
        }
        self.shared.states()[layer] = Residency::Released;
        let page = page_size();
        for r in &self.shared.spans[layer] {
            // Only whole pages of this layer: a page shared with a neighbour stays.
            let (start, end) = (r.start.next_multiple_of(page), r.end / page * page);
            if start < end {
                // SAFETY: the mapping is a read-only private file mapping: dropping its pages
                // only makes the next access read the same bytes from the file again.
                let _ =
                    unsafe { self.shared.map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
                if let Some(file) = &self.drop_page_cache {
                    // SAFETY: plain system call on an open descriptor; failure is harmless.
                    unsafe {
                        libc::posix_fadvise(
                            file.as_raw_fd(),
                            start as libc::off_t,
                            (end - start) as libc::off_t,
                            libc::POSIX_FADV_DONTNEED,
                        )
                    };
                }
            }
        }
    }
}

impl Drop for LayerStreamer {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl LayerGuard<'_> {
    /// The layer held.
    pub fn layer(&self) -> usize {
        self.layer
    }
}

impl Drop for LayerGuard<'_> {
    fn drop(&mut self) {
        self.streamer.release(self.layer);
    }
}

impl Shared {
    fn states(&self) -> MutexGuard<'_, Vec<Residency>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn layer_bytes(&self, layer: usize) -> u64 {
        self.spans[layer].iter().map(|r| r.len() as u64).sum()
    }

    /// The prefetch thread's work for one layer: start the reads of all its ranges at once, then
    /// wait until every page is read and mapped.
    fn read_in(&self, layer: usize) {
        let start = Instant::now();
        let result =
            self.spans[layer].iter().try_for_each(|r| self.map.advise_range(Advice::WillNeed, r.start, r.len()));
        let result = result.and_then(|()| self.spans[layer].iter().try_for_each(|r| self.populate(r.clone())));
        self.read_nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bytes_read.fetch_add(self.layer_bytes(layer), Ordering::Relaxed);
        self.layers_read.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
        }
        let mut states = self.states();
        if states[layer] == Residency::Queued {
            states[layer] = Residency::Ready;
        }
        self.changed.notify_all();
    }

    /// Maps every page of `range`, reading it from the file where needed.
    fn populate(&self, range: Range<usize>) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        match self.map.advise_range(Advice::PopulateRead, range.start, range.len()) {
            Ok(()) => Ok(()),
            // Kernels before 5.14 lack MADV_POPULATE_READ: touch one byte per page instead.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let bytes = &self.map[range];
                let touched = bytes.iter().step_by(page_size()).fold(0u8, |acc, b| acc ^ std::hint::black_box(*b));
                std::hint::black_box(touched);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Sorted ranges with touching or overlapping ones joined.
fn merge(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}
