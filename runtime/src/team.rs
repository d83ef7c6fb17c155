//! The kernel threads: a team started at load that runs whole programs (the encoder, one
//! decoder step), not single launches.
//!
//! Every thread walks the same launch list. A launch marked `split` runs on every thread,
//! each on its own sub-range of the kernel's parallel loop (the ranges are computed at load);
//! any other launch runs on the calling thread (thread 0) alone. A barrier separates two
//! launches wherever a thread could otherwise read what another has not finished writing:
//! before a split launch (it may read what thread 0 wrote) and after one (the next launch
//! may read any part of its result). Between two launches that thread 0 runs alone there is
//! none. One more ends every program, so no thread touches it after the run returns. So the other threads are woken once per program, not once per launch, and wait
//! for each other by spinning on one counter; between programs they spin a little, then
//! park until the next one. Nothing is allocated per run.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// The kernel ABI: `(buffer pointers, runtime function table, start, end)`.
pub(crate) type KernelFn = unsafe extern "C" fn(*const *mut u8, *const u8, i64, i64);

/// One kernel launch, ready to call.
pub(crate) struct Launch {
    pub kernel: usize,
    pub f: KernelFn,
    pub ptrs: Vec<*mut u8>,
    pub extent: u64,
    /// Run by every thread of a team, thread `t` on `ranges[t]`.
    pub split: bool,
    pub ranges: Vec<(u64, u64)>,
}

// SAFETY: the pointers point into the arena and the mapped weights, both owned by the
// `CompiledModel` for as long as the launches exist. When a launch is split across
// threads, each thread runs a disjoint sub-range of the kernel's parallel loop, and every
// kernel writes only the output elements of its own parallel indices (checked for every
// kernel by the kernel verifier), so the threads never write the same memory; the barriers
// order every write before any read of it by another thread.
unsafe impl Sync for Launch {}
unsafe impl Send for Launch {}

/// Functions the runtime offers kernels (reserved for micro-kernels; empty so far).
#[repr(C)]
struct RuntimeTable {
    version: u64,
}

static RUNTIME_TABLE: RuntimeTable = RuntimeTable { version: 1 };

impl Launch {
    fn call(&self, start: u64, end: u64) {
        if start < end {
            let rt = &RUNTIME_TABLE as *const RuntimeTable as *const u8;
            // SAFETY: see `Launch`: buffers bounds-checked at load, code compiled for this
            // CPU, `start..end` inside the parallel extent and disjoint across threads.
            unsafe { (self.f)(self.ptrs.as_ptr(), rt, start as i64, end as i64) };
        }
    }
}

/// Splits `0..extent` into `threads` contiguous ranges (the first ones one longer).
pub(crate) fn split_ranges(extent: u64, threads: usize) -> Vec<(u64, u64)> {
    let n = threads as u64;
    let (q, r) = (extent / n, extent % n);
    let mut at = 0;
    (0..n)
        .map(|t| {
            let len = q + (t < r) as u64;
            at += len;
            (at - len, at)
        })
        .collect()
}

/// How many times a waiting thread polls before it yields (in a barrier) or parks (between
/// programs): about 50 µs of polling.
const SPINS: u32 = 20_000;

/// A reusable barrier for `n` threads: the last to arrive starts the next generation.
struct Barrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicU64,
}

impl Barrier {
    fn wait(&self) {
        let g = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            // Nobody can arrive again before the generation changes, so the reset is safe.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == g {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                // More threads than free cores: let the ones still working run.
                std::thread::yield_now();
            }
        }
    }
}

struct Shared {
    barrier: Barrier,
    /// Bumped to start a program (or to stop, with `stop` set).
    epoch: AtomicU64,
    stop: AtomicBool,
    /// The program being run: a `[Launch]` slice, valid while its run is in progress.
    launches: AtomicPtr<Launch>,
    len: AtomicUsize,
}

/// The threads besides the caller's, started at load, stopped when dropped.
pub(crate) struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` threads in all (the caller is thread 0).
    pub(crate) fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            barrier: Barrier { n: threads, arrived: AtomicUsize::new(0), generation: AtomicU64::new(0) },
            epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            launches: AtomicPtr::new(std::ptr::null_mut()),
            len: AtomicUsize::new(0),
        });
        let mut workers = Vec::new();
        for id in 1..threads {
            let s = shared.clone();
            let spawned = std::thread::Builder::new().name(format!("wcc-kernel-{id}")).spawn(move || worker(&s, id));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    // Stop the ones already started before reporting.
                    drop(Team { shared, workers });
                    return Err(e);
                }
            }
        }
        Ok(Team { shared, workers })
    }

    /// Runs `launches` on the whole team; returns when every launch has finished on every
    /// thread. With `profile`, adds each launch's time (from its start to the start of the
    /// next, barriers included) and one call to `profile[launch.kernel]`.
    pub(crate) fn run(&self, launches: &[Launch], profile: Option<&mut [(f64, u64)]>) {
        let s = &*self.shared;
        s.launches.store(launches.as_ptr() as *mut Launch, Ordering::Relaxed);
        s.len.store(launches.len(), Ordering::Relaxed);
        // Release: the workers that see the new epoch see the program too.
        s.epoch.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            w.thread().unpark();
        }
        walk(s, launches, 0, profile);
        // Every worker has passed the final barrier of `walk` and touches nothing after it,
        // so `launches` may go (or be run again) once this returns.
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, id: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                // Woken by `run`'s unpark (or spuriously: the loop checks again).
                std::thread::park();
            }
        };
        seen = epoch;
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let (ptr, len) = (s.launches.load(Ordering::Relaxed), s.len.load(Ordering::Relaxed));
        // SAFETY: `run` published this slice before the epoch (release/acquire) and does
        // not return, so the slice stays alive, until this thread has passed the last
        // barrier of the walk; after that barrier `walk` does not touch it.
        let launches = unsafe { std::slice::from_raw_parts(ptr, len) };
        walk(s, launches, id, None);
    }
}

/// Thread `id`'s part of a program (see the module comment for where the barriers are).
fn walk(s: &Shared, launches: &[Launch], id: usize, mut profile: Option<&mut [(f64, u64)]>) {
    let mut pending: Option<(usize, Instant)> = None;
    let mut prev_split = false;
    for l in launches {
        if l.split || prev_split {
            s.barrier.wait();
        }
        if let Some(p) = profile.as_deref_mut() {
            let now = Instant::now();
            if let Some((k, t0)) = pending.replace((l.kernel, now)) {
                p[k].0 += (now - t0).as_secs_f64();
                p[k].1 += 1;
            }
        }
        if l.split {
            let (a, b) = l.ranges[id];
            l.call(a, b);
        } else if id == 0 {
            l.call(0, l.extent);
        }
        prev_split = l.split;
    }
    // Always a final barrier: without it a worker could still be walking the tail of the
    // list (launches thread 0 runs alone) when `run` returns and the list is dropped.
    s.barrier.wait();
    if let (Some(p), Some((k, t0))) = (profile, pending) {
        p[k].0 += t0.elapsed().as_secs_f64();
        p[k].1 += 1;
    }
}

/// Runs `launches` on the calling thread alone (a one-thread model).
pub(crate) fn run_alone(launches: &[Launch], mut profile: Option<&mut [(f64, u64)]>) {
    for l in launches {
        let t0 = profile.as_ref().map(|_| Instant::now());
        l.call(0, l.extent);
        if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
            p[l.kernel].0 += t0.elapsed().as_secs_f64();
            p[l.kernel].1 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_extent_once() {
        for (extent, threads) in [(10, 3), (2, 4), (0, 2), (7, 1), (1500, 2)] {
            let r = split_ranges(extent, threads);
            assert_eq!(r.len(), threads);
            assert_eq!(r[0].0, 0);
            assert_eq!(r[threads - 1].1, extent);
            assert!(r.windows(2).all(|w| w[0].1 == w[1].0));
            let lens: Vec<u64> = r.iter().map(|(a, b)| b - a).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
    }

    /// Kernels as plain functions: each adds 1 to its slice of a counter array, after
    /// checking that the previous launch finished everywhere (the barrier's job).
    unsafe extern "C" fn bump(ptrs: *const *mut u8, _rt: *const u8, start: i64, end: i64) {
        // SAFETY (test): ptrs[0] is a [u64; N] with N >= end, ranges disjoint per thread.
        unsafe {
            let a = *ptrs as *mut u64;
            let generation = *(*ptrs.add(1) as *const u64);
            for i in start..end {
                let p = a.add(i as usize);
                assert_eq!(*p, generation, "element {i} saw an unfinished launch");
                *p += 1;
            }
        }
    }

    unsafe extern "C" fn next_generation(ptrs: *const *mut u8, _rt: *const u8, _start: i64, _end: i64) {
        // SAFETY (test): ptrs[1] is a u64, written only by this single-thread launch.
        unsafe { *(*ptrs.add(1) as *mut u64) += 1 };
    }

    #[test]
    fn a_team_runs_every_range_once_and_in_order() {
        const N: usize = 1001;
        for threads in [2, 3, 4] {
            let mut data = vec![0u64; N];
            let mut generation = 0u64;
            let ptrs = vec![data.as_mut_ptr() as *mut u8, &mut generation as *mut u64 as *mut u8];
            let mut launches = Vec::new();
            for _ in 0..50 {
                // A split launch, then a single-thread one that moves the generation on:
                // each split launch checks that every element saw every earlier launch.
                launches.push(Launch {
                    kernel: 0,
                    f: bump,
                    ptrs: ptrs.clone(),
                    extent: N as u64,
                    split: true,
                    ranges: split_ranges(N as u64, threads),
                });
                launches.push(Launch {
                    kernel: 1,
                    f: next_generation,
                    ptrs: ptrs.clone(),
                    extent: 1,
                    split: false,
                    ranges: vec![],
                });
            }
            let team = Team::new(threads).unwrap();
            let mut profile = vec![(0.0, 0); 2];
            for _ in 0..20 {
                team.run(&launches, Some(&mut profile));
            }
            drop(team);
            assert!(data.iter().all(|&v| v == 1000), "{threads} threads");
            assert_eq!(generation, 1000);
            assert_eq!((profile[0].1, profile[1].1), (1000, 1000));
        }
    }
}
