//! Host buffers of the CPU forward pass: a tensor's values read in place (no copy), work over
//! rows spread across the compute pool when there are enough rows to pay for it, and the
//! buffers and chunk claims with which a matmul's parallel region makes its own input.
//!
//! A pass spends its time in matmuls that use every thread; what ran between them (activation
//! quantization, norms, gated activations) ran on one thread while the others waited: about a
//! fifth of a Gemma 3 prompt pass with two threads, and most of the helper thread's waiting in
//! a 16-row generation step (docs/benchmarks.md). The matmuls' regions now make and quantize
//! their input rows themselves ([`ChunkClaims`], `linear::Input`).

use candle_core::{Storage, Tensor};
use rayon::prelude::*;
use std::cell::{RefCell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Values per parallel work item: below this a hand-off to another thread costs more than it
/// saves, so the norms and activations of a generation step of up to 16 rows (SmolLM2's 576
/// or 1536 values a row) stay on the calling thread: its 16-row passes took 1.1-1.5% less time
/// than with 8192 (docs/benchmarks.md).
pub(crate) const VALUES_PER_TASK: usize = 32768;

/// Runs `f` on the values of `t` in row-major order, borrowing a contiguous f32 CPU tensor's
/// storage; other tensors are copied first.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
            && let Ok(values) = cpu.as_slice::<f32>()
        {
            return Ok(f(&values[start..end]));
        }
    }
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&values))
}

/// Calls `f(first_row, rows)` over `data`, rows of `row_len` items, in chunks of whole rows:
/// across the compute pool when `data` holds enough values (`values_per_row` each), on the
/// calling thread otherwise. Chunks never split a row, so results do not depend on the split.
pub(crate) fn for_row_chunks<T: Send>(
    data: &mut [T],
    row_len: usize,
    values_per_row: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let rows = data.len() / row_len.max(1);
    let tasks = rows.div_ceil(VALUES_PER_TASK.div_ceil(values_per_row.max(1)).max(1));
    if tasks <= 1 {
        f(0, data);
        return;
    }
    // Even chunks: 16 rows of 576 values go as 8 and 8, not 15 and 1.
    let rows_per_task = rows.div_ceil(tasks);
    data.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(i, chunk)| f(i * rows_per_task, chunk));
}

/// Runs `f` on the compute pool with the pool's other workers kept polling for its parallel
/// work until it returns. A pass has a dozen parallel regions per layer, tens of microseconds
/// apart; between them rayon's idle workers go to sleep, and waking one costs a region about
/// as much as its work at generation sizes (docs/benchmarks.md). The polling lasts one call,
/// so an idle server burns no CPU.
pub(crate) fn with_warm_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::cell::Cell;
    thread_local! {
        /// Whether this worker already polls for some call (a poller stolen by another).
        static POLLING: Cell<bool> = const { Cell::new(false) };
    }
    let done = &AtomicBool::new(false);
    rayon::scope(|scope| {
        let caller = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(move |_| {
                // The caller may run a poller itself while it waits inside `f`: it would then
                // wait for its own end.
                if rayon::current_thread_index() == caller || POLLING.get() {
                    return;
                }
                POLLING.set(true);
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
                POLLING.set(false);
            });
        }
        let result = f();
        done.store(true, Ordering::Release);
        result
    })
}

/// An output buffer shared by workers of a parallel region that each write their own
/// disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOutput(*mut f32);
// SAFETY: the users write disjoint elements (see `write`).
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// The buffer of f32 values from `start`.
    pub(crate) fn new(start: *mut f32) -> Self {
        Self(start)
    }

    /// Writes `values` at element `at`.
    /// SAFETY (caller): the range is inside the buffer, which outlives the writes, and no other
    /// thread writes or reads it meanwhile.
    pub(crate) unsafe fn write(self, at: usize, values: &[f32]) {
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len()) }
    }
}

/// The uses of [`with_scratch`]'s buffers: one buffer each per thread.
#[derive(Clone, Copy)]
pub(crate) enum Scratch {
    /// Input rows a matmul's region makes before quantizing them.
    MatmulInput,
    /// The tile of outputs a matmul task's kernel writes.
    MatmulTile,
}

/// Runs `f` on `len` f32 values of this thread's buffer for `use_`, kept from call to call so
/// that a region's tasks neither allocate nor zero one each time: it holds what the last call
/// left, so `f` writes every value before reading it. (A call inside another call for the
/// same use gets a new buffer.)
pub(crate) fn with_scratch<R>(use_: Scratch, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static BUFFERS: [RefCell<Vec<f32>>; 2] = const { [RefCell::new(Vec::new()), RefCell::new(Vec::new())] };
    }
    BUFFERS.with(|buffers| match buffers[use_ as usize].try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// A buffer that the threads of a parallel region fill in disjoint parts, then read: written
/// element by element through [`Self::slot`] while nothing reads it, read as a slice once full.
pub(crate) struct RegionBuffer<T>(Box<[UnsafeCell<MaybeUninit<T>>]>);
// SAFETY: writers write disjoint elements (see `slot`); reads come after the writes.
unsafe impl<T: Send + Sync> Sync for RegionBuffer<T> {}

impl<T> RegionBuffer<T> {
    /// `len` elements, not written yet.
    /// SAFETY (caller): every element is written through [`Self::slot`] before the buffer is
    /// read as a slice.
    pub(crate) unsafe fn uninit(len: usize) -> Self {
        let cells = Box::into_raw(Box::<[T]>::new_uninit_slice(len)) as *mut [UnsafeCell<MaybeUninit<T>>];
        // SAFETY: UnsafeCell<MaybeUninit<T>> has the layout of MaybeUninit<T> (repr transparent).
        Self(unsafe { Box::from_raw(cells) })
    }

    /// Element `i`, to write.
    /// SAFETY (caller): no other thread writes or reads element `i` meanwhile, and `i` is in
    /// bounds.
    pub(crate) unsafe fn slot(&self, i: usize) -> *mut T {
        unsafe { self.0.get_unchecked(i).get().cast() }
    }
}

impl<T> From<Vec<T>> for RegionBuffer<T> {
    /// A buffer that starts with `values` (elements a fill may leave alone, such as padding).
    fn from(values: Vec<T>) -> Self {
        let cells = Box::into_raw(values.into_boxed_slice()) as *mut [UnsafeCell<MaybeUninit<T>>];
        // SAFETY: T and UnsafeCell<MaybeUninit<T>> share a layout; every element is written.
        Self(unsafe { Box::from_raw(cells) })
    }
}

impl<T> std::ops::Deref for RegionBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: every element was written (the contract of `uninit`), and the writes are done.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len()) }
    }
}

/// Chunks of work that the tasks of a parallel region share before their own work: each task
/// first claims and runs chunks until none are left, then waits until every claimed one is
/// done. A task waits only for chunks that running tasks have claimed, so the region finishes
/// however many threads run it; the work between two matmuls (quantizing, norms) thus runs on
/// all the threads the matmul's region wakes, without a region of its own.
pub(crate) struct ChunkClaims {
    chunks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Whether a chunk panicked (its writes unfinished).
    failed: AtomicBool,
}

impl ChunkClaims {
    /// Chunks `0..chunks`, none claimed yet.
    pub(crate) fn new(chunks: usize) -> Self {
        Self { chunks, next: AtomicUsize::new(0), done: AtomicUsize::new(0), failed: AtomicBool::new(false) }
    }

    /// Runs `chunk(i)` for unclaimed chunks, then waits until every chunk is done. Returns
    /// whether all finished: a chunk that panics counts as done but not finished, so that the
    /// other tasks skip their work (reading what it left unwritten) while its panic ends the
    /// region.
    #[must_use]
    pub(crate) fn run(&self, chunk: impl Fn(usize)) -> bool {
        /// Counts its chunk done when dropped, after the chunk's writes, and failed if dropped
        /// by a panic.
        struct Done<'a>(&'a ChunkClaims);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.failed.store(true, Ordering::Relaxed);
                }
                self.0.done.fetch_add(1, Ordering::Release);
            }
        }
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.chunks {
                break;
            }
            let _done = Done(self);
            chunk(i);
        }
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < self.chunks {
            // A claimed chunk takes microseconds, unless its thread was preempted.
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        !self.failed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reads_contiguous_tensors_in_place_and_others_by_copy() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let sum = |t: &Tensor| with_f32(t, |v| v.to_vec()).unwrap();
        assert_eq!(sum(&t.narrow(0, 1, 2).unwrap()), (4..12).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(sum(&t.t().unwrap()), vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
    }

    #[test]
    fn claimed_chunks_run_once_each_before_any_task_goes_on() {
        use std::sync::atomic::AtomicU32;
        let runs: Vec<AtomicU32> = (0..37).map(|_| AtomicU32::new(0)).collect();
        let claims = ChunkClaims::new(runs.len());
        (0..64).into_par_iter().for_each(|_| {
            let finished = claims.run(|i| {
                runs[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(finished && runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
        });
    }

    #[test]
    fn a_panicking_chunk_ends_the_region_and_no_task_goes_on() {
        let claims = ChunkClaims::new(8);
        let went_on = AtomicUsize::new(0);
        let region = std::panic::catch_unwind(|| {
            (0..16).into_par_iter().for_each(|_| {
                if claims.run(|i| assert!(i != 5, "chunk 5 fails")) {
                    went_on.fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        assert!(region.is_err());
        assert_eq!(went_on.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn scratch_is_kept_per_use_and_nested_calls_get_their_own() {
        with_scratch(Scratch::MatmulTile, 4, |outer| {
            outer.fill(1.0);
            with_scratch(Scratch::MatmulTile, 3, |inner| inner.fill(2.0));
            with_scratch(Scratch::MatmulInput, 2, |other| other.fill(3.0));
            assert_eq!(outer, [1.0; 4]);
        });
        // The same thread's buffer again, as the last call left it.
        with_scratch(Scratch::MatmulTile, 2, |again| assert_eq!(again, [1.0; 2]));
    }

    #[test]
    fn row_chunks_cover_every_row_once() {
        for rows in [1, 2, 7, 300] {
            let mut data = vec![0usize; rows * 5];
            for_row_chunks(&mut data, 5, 1000, |first, chunk| {
                for (r, row) in chunk.chunks_exact_mut(5).enumerate() {
                    row.iter_mut().for_each(|v| *v += first + r + 1);
                }
            });
            let want: Vec<usize> = (0..rows).flat_map(|r| [r + 1; 5]).collect();
            assert_eq!(data, want);
        }
    }
}
