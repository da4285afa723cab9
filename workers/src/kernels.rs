//! CPU kernel threads for the workers of one process.
//!
//! candle's CPU kernels parallelise through rayon's *global* pool and size
//! gemm's parallelism from `RAYON_NUM_THREADS` (else the core count). With
//! several workers in one process, every worker's kernels then queue on the
//! same pool: on 2 cores, 2 workers each ran the tiny generator 1.8x slower
//! than one worker alone, while two separate processes ran at full speed
//! (docs/perf.md). So each worker runs its model calls on its own pool
//! ([`KernelPool::run`]), and the process splits its cores between workers
//! ([`plan_threads`]). Results do not depend on the thread count: candle's
//! kernels split work over rows and channels, never inside a sum.

use std::sync::{Arc, OnceLock};

/// The environment variable candle (and rayon) read for the thread count.
pub const THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// Threads of candle's element-wise pool (default: `RAYON_NUM_THREADS`).
pub const ELEMENTWISE_VAR: &str = "CANDLE_NUM_THREADS";

/// Kernel threads for each of `workers` workers in this process: the
/// process's cores split evenly (at least 1), or `RAYON_NUM_THREADS` when the
/// user set it. Sets `RAYON_NUM_THREADS` so candle sizes its gemm calls to
/// match (the variable is process-wide and candle reads it at every call), so
/// call it only while no other thread touches the environment except
/// through `std::env`: at startup, or between phases when the process's
/// other threads are idle (`mirgen bench`). Returns the thread count and a
/// line for the log.
pub fn plan_threads(workers: usize) -> (usize, String) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let user = user_setting();
    let n = threads_per_worker(workers, cores, user);
    let line = if user.is_some() {
        format!("kernel threads: {n} per worker ({THREADS_VAR}={n}; {workers} workers on {cores} cores)")
    } else {
        std::env::set_var(THREADS_VAR, n.to_string());
        format!("kernel threads: {n} per worker ({workers} workers on {cores} cores; set {THREADS_VAR} to override)")
    };
    if workers > 1 {
        private_elementwise();
    }
    (n, line)
}

/// Makes candle run large element-wise ops on the calling thread. Its pool
/// for them is process-wide, sized once at first use, and takes one call at
/// a time, so several workers queue on it: 2 workers went from 8.2 s to
/// 11.9 s in `mirgen bench` when it had a thread. The tiny models' sequential
/// loop ran as fast without it (docs/perf.md). `CANDLE_NUM_THREADS` set by
/// the user wins. Same rules as [`plan_threads`] for when to call it.
pub fn private_elementwise() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if std::env::var_os(ELEMENTWISE_VAR).is_none() {
            std::env::set_var(ELEMENTWISE_VAR, "1");
        }
    });
}

/// The user's `RAYON_NUM_THREADS` as it was when mirgen first looked (later
/// values are mirgen's own).
fn user_setting() -> Option<usize> {
    static USER: OnceLock<Option<usize>> = OnceLock::new();
    *USER.get_or_init(|| parse_threads(std::env::var(THREADS_VAR).ok().as_deref()))
}

fn parse_threads(set: Option<&str>) -> Option<usize> {
    set.and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// The user's thread count if given, else the cores split evenly between
/// the workers (at least one each).
pub fn threads_per_worker(workers: usize, cores: usize, user: Option<usize>) -> usize {
    user.unwrap_or_else(|| (cores / workers.max(1)).max(1))
}

/// The kernel threads a worker's model calls run on.
#[derive(Clone)]
pub struct KernelPool {
    pool: Option<Arc<rayon::ThreadPool>>,
    threads: usize,
}

impl KernelPool {
    /// A pool with candle's configured thread count (see [`plan_threads`]).
    pub fn for_worker(name: &str) -> Self {
        Self::with_threads(name, candle_core::utils::get_num_threads())
    }

    /// A pool of `threads` threads named `name-kernel-i`. If the threads
    /// cannot be started, calls run on rayon's global pool instead (slower
    /// with several workers, never wrong) and a warning says so.
    pub fn with_threads(name: &str, threads: usize) -> Self {
        let threads = threads.max(1);
        let prefix = name.to_string();
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{prefix}-kernel-{i}"))
            .build()
        {
            Ok(pool) => KernelPool {
                pool: Some(Arc::new(pool)),
                threads,
            },
            Err(e) => {
                eprintln!("{name}: WARNING cannot start {threads} kernel threads ({e}); using the shared pool");
                KernelPool {
                    pool: None,
                    threads,
                }
            }
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `work` (model calls) on this pool; it blocks the caller until done.
    pub fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_workers_own_threads() {
        let pool = KernelPool::with_threads("w7", 2);
        let name = pool.run(|| std::thread::current().name().map(str::to_string));
        assert!(name.unwrap().starts_with("w7-kernel-"));
        // nested rayon work stays on the pool
        let inner = pool.run(rayon::current_num_threads);
        assert_eq!(inner, 2);
        assert_eq!(pool.threads(), 2);
    }

    #[test]
    fn cores_are_split_between_workers_unless_the_user_says_otherwise() {
        assert_eq!(threads_per_worker(2, 2, None), 1);
        assert_eq!(threads_per_worker(1, 2, None), 2);
        assert_eq!(threads_per_worker(4, 16, None), 4);
        assert_eq!(threads_per_worker(3, 2, None), 1, "at least one thread");
        assert_eq!(threads_per_worker(0, 8, None), 8);
        assert_eq!(threads_per_worker(2, 16, Some(3)), 3);
        assert_eq!(parse_threads(Some(" 3")), Some(3));
        assert_eq!(parse_threads(Some("0")), None, "0 is not a count");
        assert_eq!(parse_threads(Some("many")), None);
        assert_eq!(parse_threads(None), None);
    }
}
