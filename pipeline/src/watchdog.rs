//! Stuck-worker detection.
//!
//! A model call cannot be interrupted safely (a GPU kernel or a CPU matmul
//! runs to completion), so a per-call timeout is enforced one level up:
//! every worker records what it is doing (stage, targets, since when) in a
//! [`Heartbeats`] slot, and a watchdog thread
//! - warns (once per stall) when a stage runs longer than `warn_after`,
//! - and, past `abort_after`, records the stalled wave under
//!   `.mirgen/stalls/` and exits the process with [`STALL_EXIT_CODE`] rather
//!   than hang: committed work is safe, and rerunning the same command
//!   resumes. On the rerun, targets of a stalled wave run alone (so the next
//!   stall names the one culprit), and a target that stalled alone twice gets
//!   `failed` rows ("model call stalled") instead of a third try.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::Location;
use crate::PipelineError;

/// Exit status of a process stopped by the watchdog.
pub const STALL_EXIT_CODE: i32 = 4;

#[derive(Clone, Debug)]
struct Beat {
    stage: &'static str,
    targets: Vec<String>,
    since: Instant,
    warned: bool,
}

/// What each worker of a process is doing now.
#[derive(Default)]
pub struct Heartbeats {
    slots: Mutex<HashMap<usize, Beat>>,
}

impl Heartbeats {
    /// Worker `worker` starts `stage` on `targets`.
    pub fn enter(&self, worker: usize, stage: &'static str, targets: &[String]) {
        self.slots.lock().expect("heartbeats").insert(
            worker,
            Beat {
                stage,
                targets: targets.to_vec(),
                since: Instant::now(),
                warned: false,
            },
        );
    }

    /// Worker `worker` is between model calls.
    pub fn idle(&self, worker: usize) {
        self.slots.lock().expect("heartbeats").remove(&worker);
    }
}

/// A stall recorded by a previous attempt.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StallRecord {
    pub stage: String,
    pub targets: Vec<String>,
    pub seconds: f64,
    pub worker: usize,
}

/// Stall history of an output: which targets to isolate, which to give up on.
#[derive(Clone, Debug, Default)]
pub struct StallHistory {
    /// Targets of a stalled wave: run them one per wave.
    pub isolate: BTreeSet<String>,
    /// Targets that stalled alone twice: target -> the reason for their failed rows.
    pub give_up: BTreeMap<String, String>,
}

impl StallHistory {
    pub async fn load(staging: &Location) -> Result<Self, PipelineError> {
        let mut h = StallHistory::default();
        let mut alone: BTreeMap<String, Vec<StallRecord>> = BTreeMap::new();
        for (key, _) in staging.list("stalls").await? {
            let Ok(rec) = serde_json::from_slice::<StallRecord>(&staging.get(&key).await?) else {
                eprintln!("warning: ignoring unreadable stall record {key}");
                continue;
            };
            if rec.targets.len() == 1 {
                alone
                    .entry(rec.targets[0].clone())
                    .or_default()
                    .push(rec.clone());
            }
            h.isolate.extend(rec.targets);
        }
        for (target, recs) in alone {
            if recs.len() >= 2 {
                let last = recs.last().expect("two records");
                h.give_up.insert(
                    target,
                    format!(
                        "model call stalled {} times ({} stage ran over {:.0} s); not retried",
                        recs.len(),
                        last.stage,
                        last.seconds
                    ),
                );
            }
        }
        Ok(h)
    }
}

/// Limits of the watchdog (CLI flags).
#[derive(Clone, Copy, Debug)]
pub struct StallLimits {
    pub warn_after: Duration,
    /// `None`: never stop the process.
    pub abort_after: Option<Duration>,
}

/// Runs the watchdog thread until the returned guard is dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(
        beats: Arc<Heartbeats>,
        limits: StallLimits,
        staging: Location,
        runtime: Arc<tokio::runtime::Runtime>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mirgen-watchdog".into())
            .spawn(move || {
                let tick = Duration::from_millis(200).min(limits.warn_after / 4).max(Duration::from_millis(10));
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    let mut slots = beats.slots.lock().expect("heartbeats");
                    for (worker, beat) in slots.iter_mut() {
                        let elapsed = beat.since.elapsed();
                        if elapsed >= limits.warn_after && !beat.warned {
                            beat.warned = true;
                            eprintln!(
                                "warning: worker {worker} has been in stage `{}` for {:.0} s on {} target(s) ({}); still waiting",
                                beat.stage,
                                elapsed.as_secs_f64(),
                                beat.targets.len(),
                                preview(&beat.targets)
                            );
                        }
                        if limits.abort_after.is_some_and(|limit| elapsed >= limit) {
                            let rec = StallRecord {
                                stage: beat.stage.to_string(),
                                targets: beat.targets.clone(),
                                seconds: elapsed.as_secs_f64(),
                                worker: *worker,
                            };
                            let key = format!(
                                "stalls/{}-w{worker:04}.json",
                                std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map(|d| d.as_millis())
                                    .unwrap_or(0)
                            );
                            let saved = serde_json::to_vec_pretty(&rec)
                                .map_err(|e| e.to_string())
                                .and_then(|b| {
                                    runtime.block_on(staging.put(&key, b)).map_err(|e| e.to_string())
                                });
                            eprintln!(
                                "error: worker {worker} stalled in stage `{}` for {:.0} s (limit --stall-timeout) on {}; \
                                 stopping this process so the job does not hang. Committed work is kept: rerun the same \
                                 command to resume (the stalled targets then run one at a time; one that stalls alone twice \
                                 is recorded as failed).{}",
                                beat.stage,
                                elapsed.as_secs_f64(),
                                preview(&beat.targets),
                                match saved {
                                    Ok(()) => String::new(),
                                    Err(e) => format!(" (could not record the stall: {e})"),
                                }
                            );
                            std::process::exit(STALL_EXIT_CODE);
                        }
                    }
                }
            })
            .expect("spawn the watchdog thread");
        Watchdog {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn preview(targets: &[String]) -> String {
    let mut s = targets
        .iter()
        .take(3)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if targets.len() > 3 {
        s.push_str(&format!(", … {} more", targets.len() - 3));
    }
    s
}
