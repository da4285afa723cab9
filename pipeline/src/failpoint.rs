//! Test-only pause points, so a crash test can SIGKILL a process at an exact
//! moment. `MIRGEN_TEST_PAUSE_AT=<point>[:<n>]` makes the n-th arrival
//! (default 1) at `<point>` print `mirgen: paused at <point>` to stderr and
//! sleep forever. Points: `part-written` (a wave's Parquet part is stored,
//! its commit record not yet), `commit-written` (right after a commit
//! record), `finalize-data` (the first data file written, the others and
//! card/stats/manifest not), `finalize-card` (data files, card and stats
//! written, manifest not). Unset (always, outside tests): no effect.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

static ARRIVALS: AtomicUsize = AtomicUsize::new(0);

pub fn pause(point: &str) {
    let Ok(spec) = std::env::var("MIRGEN_TEST_PAUSE_AT") else {
        return;
    };
    let (name, nth) = match spec.split_once(':') {
        Some((n, k)) => (n.to_string(), k.parse::<usize>().unwrap_or(1)),
        None => (spec, 1),
    };
    if name != point {
        return;
    }
    if ARRIVALS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("mirgen: paused at {point}");
        let _ = std::io::stderr().flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
