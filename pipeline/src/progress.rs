//! Progress: a bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    Bar,
    Log,
    None,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    log: bool,
    total: usize,
    done: AtomicUsize,
    rounds_per_target: usize,
    start: Instant,
    last_log: Mutex<Instant>,
}

impl Progress {
    pub fn new(mode: ProgressMode, what: &str, total: usize, rounds_per_target: usize) -> Self {
        let bar_mode = match mode {
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Bar => true,
            _ => false,
        };
        let bar = bar_mode.then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template"),
            );
            b.set_prefix(what.to_string());
            b
        });
        Progress {
            bar,
            log: mode == ProgressMode::Log || (mode == ProgressMode::Auto && !bar_mode),
            total,
            done: AtomicUsize::new(0),
            rounds_per_target,
            start: Instant::now(),
            last_log: Mutex::new(Instant::now()),
        }
    }

    /// `n` more items finished.
    pub fn inc(&self, n: usize, what: &str) {
        let done = self.done.fetch_add(n, Ordering::SeqCst) + n;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = (done * self.rounds_per_target) as f64 / secs;
        if let Some(b) = &self.bar {
            b.set_message(format!("{rate:.2} rounds/s"));
            b.inc(n as u64);
        } else if self.log {
            let mut last = self.last_log.lock().expect("progress lock");
            if done == self.total || last.elapsed().as_secs_f64() >= 2.0 {
                *last = Instant::now();
                let eta = if done > 0 {
                    secs / done as f64 * (self.total - done.min(self.total)) as f64
                } else {
                    0.0
                };
                eprintln!(
                    "{what}: {done}/{} done, {rate:.2} rounds/s, elapsed {secs:.0}s, ETA {eta:.0}s",
                    self.total
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
