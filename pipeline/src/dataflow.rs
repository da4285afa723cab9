//! The timely dataflow of a run.
//!
//! ```text
//! targets ──antijoin(committed)──> pending ──exchange(hash(target id))──> mir_rounds (per worker)
//! ```
//! `mir_rounds` keeps the targets routed to its worker and processes them in
//! waves of `batch.window` (every stage batched over the wave), commits each
//! wave to the object store, then re-activates itself for the next wave. The
//! control plane (which targets are still to do) is a differential
//! antijoin; model payloads never enter differential operators.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Probe;

use crate::commit::Output;
use crate::progress::Progress;
use crate::rounds::{run_wave, Models, WaveContext};

/// A stable hash of a target id (timely's exchange uses the key as is).
pub fn route(id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Everything the workers of one process share.
pub struct JobShared {
    pub ctx: WaveContext,
    pub output: Output,
    pub config_hash: String,
    pub targets: Vec<String>,
    pub committed: Vec<String>,
    pub device: String,
    pub progress: Progress,
    /// Errors that stopped a worker or a commit (reported at the end).
    pub errors: Mutex<Vec<String>>,
    /// Model descriptions, from the first worker that built models.
    pub models: Mutex<Option<std::collections::BTreeMap<String, serde_json::Value>>>,
}

/// Runs the dataflow on this process's workers; returns when all are done.
pub fn run(shared: Arc<JobShared>, timely_args: Vec<String>) -> Result<(), String> {
    let guards = timely::execute_from_args(timely_args.into_iter(), move |worker| {
        let shared = shared.clone();
        let index = worker.index();
        let peers = worker.peers();
        let (device, line) = mirgen_workers::device::select(&shared.device, index);
        eprintln!("{line}");
        let models = match Models::build(&shared.ctx.config, &device) {
            Ok(m) => {
                shared
                    .models
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(|| m.describe());
                Some(m)
            }
            Err(e) => {
                shared
                    .errors
                    .lock()
                    .expect("lock")
                    .push(format!("worker {index}: cannot build models: {e}"));
                None
            }
        };
        let window = shared.ctx.config.batch.window;
        let op_shared = shared.clone();
        let (mut targets_in, mut committed_in, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (targets_in, targets) = scope.new_collection::<(String, ()), isize>();
            let (committed_in, committed) = scope.new_collection::<String, isize>();
            let pending = targets.antijoin(committed);
            let mut models = models;
            let shared = op_shared;
            let activator_scope = scope;
            let done = pending
                .inner
                .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<usize>>, _, _, _>(
                    Exchange::new(|x: &((String, ()), u64, isize)| route(&(x.0).0)),
                    "mir_rounds",
                    move |cap, info| {
                        let activator = activator_scope.activator_for(info.address.clone());
                        let mut cap = Some(cap);
                        let mut queue: Vec<String> = Vec::new();
                        move |(input, frontier), output| {
                            input.for_each(|_time, data| {
                                for ((id, ()), _t, diff) in data.drain(..) {
                                    if diff > 0 {
                                        queue.push(id);
                                    }
                                }
                            });
                            let input_done = frontier.is_empty();
                            if queue.len() >= window || (input_done && !queue.is_empty()) {
                                queue.sort();
                                let take = queue.len().min(window);
                                let wave: Vec<String> = queue.drain(..take).collect();
                                match models.as_mut() {
                                    Some(models) => {
                                        let records = run_wave(models, &shared.ctx, &wave);
                                        let committed = shared.ctx.runtime.block_on(shared.output.commit_part(
                                            &shared.config_hash,
                                            index,
                                            &records,
                                            shared.ctx.config.output.row_group_rows,
                                        ));
                                        match committed {
                                            Ok(_) => shared.progress.inc(wave.len(), "targets"),
                                            Err(e) => shared.errors.lock().expect("lock").push(format!(
                                                "worker {index}: could not commit {} targets ({e}); rerun the same command to retry them",
                                                wave.len()
                                            )),
                                        }
                                    }
                                    None => shared.errors.lock().expect("lock").push(format!(
                                        "worker {index}: skipped {} targets (no models)",
                                        wave.len()
                                    )),
                                }
                                if let Some(c) = cap.as_ref() {
                                    output.session(c).give(wave.len());
                                }
                                if !queue.is_empty() {
                                    activator.activate();
                                }
                            }
                            if input_done && queue.is_empty() {
                                cap = None;
                            }
                        }
                    },
                );
            let (probe, _) = done.probe();
            (targets_in, committed_in, probe)
        });
        // every worker introduces its share of the (identical) target list
        for (i, t) in shared.targets.iter().enumerate() {
            if i % peers == index {
                targets_in.insert((t.clone(), ()));
            }
        }
        for (i, t) in shared.committed.iter().enumerate() {
            if i % peers == index {
                committed_in.insert(t.clone());
            }
        }
        targets_in.advance_to(1);
        committed_in.advance_to(1);
        drop(targets_in);
        drop(committed_in);
        while !probe.done() {
            worker.step_or_park(None);
        }
    })?;
    for r in guards.join() {
        r?;
    }
    Ok(())
}
