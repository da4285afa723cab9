//! The timely dataflow of a run.
//!
//! ```text
//! targets ──antijoin(committed)──> pending ──exchange(hash(target id))──> mir_rounds (per worker)
//! ```
//! `mir_rounds` keeps the targets routed to its worker and processes them in
//! waves of `batch.window` (every stage batched over the wave), hands each
//! finished wave to its commit thread (Parquet write and upload overlap the
//! next wave's model calls), then re-activates itself for the next wave. The
//! control plane (which targets are still to do) is a differential
//! antijoin; model payloads never enter differential operators.
//!
//! With a sharded index (each worker holds every n-th corpus vector) the
//! search leaves the worker:
//!
//! ```text
//! pending ─exchange(target)─> mir_rounds ─queries, one per shard─> exchange(shard) ─> shard_search
//!                                 ^                                                       │
//!                                 └──── feedback <── exchange(owner) <── local top-K ─────┘
//! ```
//! `mir_rounds` keeps up to `batch.waves_in_flight` waves; while one waits
//! for its round's shard answers it works on another, and between model
//! steps its worker answers other workers' queries. The owner merges the
//! shards' top-K (ties by corpus position) and sums their "rows above the
//! target" counts, which gives exactly the replicated index's answer.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use differential_dataflow::input::Input;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{ConnectLoop, Feedback, Probe};

use crate::commit::Output;
use crate::index::{merge_shard_hits, IndexShard, RowQuery, ShardHits};
use crate::progress::Progress;
use crate::rounds::{run_wave, Models, StageSeconds, Wave, WaveContext, WaveRows};
use crate::store::Location;

/// Extra attempts at committing a wave after a storage error.
const COMMIT_RETRIES: u32 = 3;

/// Takes the next wave from a worker's queue: up to `window` targets in id
/// order, except that a target of an earlier stalled wave runs alone.
fn next_wave(
    queue: &mut std::collections::BTreeSet<String>,
    window: usize,
    isolate: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    if let Some(id) = isolate.iter().find(|id| queue.contains(*id)).cloned() {
        queue.remove(&id);
        return vec![id];
    }
    let mut wave = Vec::with_capacity(window);
    while wave.len() < window {
        match queue.pop_first() {
            Some(id) => wave.push(id),
            None => break,
        }
    }
    wave
}

/// How workers reach the corpus index.
#[derive(Clone, Debug)]
pub enum IndexPlan {
    /// Every worker searches the whole index (`WaveContext::index`).
    Replicated,
    /// Every worker loads one shard of the cached index `key` from `cache`.
    Sharded { cache: Location, key: String },
}

/// A search for one query, sent to one shard.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ShardQuery {
    shard: u64,
    owner: u64,
    wave: u64,
    slot: u32,
    vector: Vec<f32>,
    /// The target's (score, corpus position), computed by its owner.
    target: Option<(f32, u64)>,
}

/// A shard's answer, sent back to the query's owner.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ShardReply {
    owner: u64,
    wave: u64,
    slot: u32,
    hits: ShardHits,
}

/// What one worker did (written to `.mirgen/stats/` and summed at the end).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WorkerStats {
    pub process: usize,
    pub worker: usize,
    pub device: String,
    pub targets: usize,
    pub rows: usize,
    pub failed_rows: usize,
    pub waves: usize,
    pub commit_seconds: f64,
    /// Vectors this worker held for search (whole index, or its shard plus owned targets).
    pub index_vectors: usize,
    pub index_bytes: usize,
    pub seconds: StageSeconds,
    pub wall_seconds: f64,
    /// Seconds after `JobShared::started` when this worker admitted its last
    /// wave, and when it finished its last wave.
    pub last_admission_s: f64,
    pub finished_s: f64,
    /// Seconds after `JobShared::started` when its models and index were ready.
    pub ready_s: f64,
}

/// Which worker owns a target: its position in the (identical on every
/// process) sorted target list, modulo the worker count — an even split, so
/// no worker keeps working alone at the end (timely's exchange takes the
/// returned key modulo the number of workers). Unknown ids fall back to a hash.
pub struct Router {
    position: std::collections::HashMap<String, u64>,
}

impl Router {
    pub fn new(targets: &[String]) -> Self {
        let mut sorted: Vec<&String> = targets.iter().collect();
        sorted.sort();
        Router {
            position: sorted
                .into_iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u64))
                .collect(),
        }
    }

    pub fn route(&self, id: &str) -> u64 {
        match self.position.get(id) {
            Some(&p) => p,
            None => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                id.hash(&mut h);
                h.finish()
            }
        }
    }
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
    pub index_plan: IndexPlan,
    /// Target -> owning worker.
    pub router: Arc<Router>,
    /// When this process's dataflow started (for admission/finish times).
    pub started: Instant,
    /// This process's index in the cluster (for stats).
    pub process: usize,
    /// Per-worker stats of this process, filled as workers finish.
    pub worker_stats: Mutex<Vec<WorkerStats>>,
}

impl JobShared {
    fn error(&self, message: String) {
        self.errors.lock().expect("lock").push(message);
    }

    /// Waits for a wave's encodes, then commits it.
    fn finish_and_commit(&self, worker: usize, rows: WaveRows, stats: &mut WorkerStats) {
        let (records, encode_seconds) = rows.finish(&self.ctx.runtime);
        stats.seconds.encode += encode_seconds;
        self.commit_wave(worker, &records, stats);
    }

    /// Commits a finished wave's rows (create-if-absent commit record) and
    /// counts it. Runs on the worker's commit thread, which reports no
    /// heartbeat: the watchdog watches model calls, and storage calls have
    /// object_store's timeouts and the retries below.
    fn commit_wave(
        &self,
        worker: usize,
        records: &[mirgen_schemas::Record],
        stats: &mut WorkerStats,
    ) {
        let t = Instant::now();
        let targets: std::collections::BTreeSet<&str> =
            records.iter().map(|r| r.target_id.as_str()).collect();
        // storage hiccups (a restarting S3 endpoint, throttling) get retried
        // with backoff on top of object_store's own retries
        let mut attempt = 0;
        let committed = loop {
            let r = self.ctx.runtime.block_on(self.output.commit_part(
                &self.config_hash,
                worker,
                records,
                self.ctx.config.output.row_group_rows,
            ));
            match r {
                Err(e) if attempt < COMMIT_RETRIES => {
                    attempt += 1;
                    let wait = std::time::Duration::from_secs(1 << attempt);
                    eprintln!("worker {worker}: commit failed ({e}); retry {attempt}/{COMMIT_RETRIES} in {wait:?}");
                    std::thread::sleep(wait);
                }
                r => break r,
            }
        };
        stats.commit_seconds += t.elapsed().as_secs_f64();
        stats.finished_s = self.started.elapsed().as_secs_f64();
        match committed {
            Ok(_) => {
                stats.waves += 1;
                stats.targets += targets.len();
                stats.rows += records.len();
                stats.failed_rows += records
                    .iter()
                    .filter(|r| r.status == mirgen_schemas::RecordStatus::Failed)
                    .count();
                self.progress.inc(targets.len(), "targets")
            }
            Err(e) => self.error(format!(
                "worker {worker}: could not commit {} targets ({e}); rerun the same command to retry them",
                targets.len()
            )),
        }
    }
}

impl WorkerStats {
    /// Adds what a commit thread counted.
    fn add_commits(&mut self, c: &WorkerStats) {
        self.waves += c.waves;
        self.targets += c.targets;
        self.rows += c.rows;
        self.failed_rows += c.failed_rows;
        self.commit_seconds += c.commit_seconds;
        self.seconds.encode += c.seconds.encode;
        self.finished_s = self.finished_s.max(c.finished_s);
    }
}

/// Commits a worker's finished waves on a thread of its own, so the worker's
/// models start the next wave while the last one's drawings are encoded and
/// its rows written (an upload to object storage can take longer than a round). At
/// most one finished wave waits while another is written, which bounds
/// memory; [`Committer::finish`] waits for both. If the thread cannot start
/// or dies, waves are committed on the worker's thread instead.
struct Committer {
    worker: usize,
    shared: Arc<JobShared>,
    queue: RefCell<Option<SyncSender<WaveRows>>>,
    thread: RefCell<Option<std::thread::JoinHandle<WorkerStats>>>,
}

impl Committer {
    fn start(shared: Arc<JobShared>, worker: usize) -> Self {
        let (tx, rx) = sync_channel::<WaveRows>(1);
        let job = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("commit-{worker}"))
            .spawn(move || {
                let mut counted = WorkerStats::default();
                for rows in rx {
                    job.finish_and_commit(worker, rows, &mut counted);
                }
                counted
            });
        let (queue, thread) = match thread {
            Ok(handle) => (Some(tx), Some(handle)),
            Err(e) => {
                eprintln!("worker {worker}: WARNING cannot start a commit thread ({e}); committing on the worker thread");
                (None, None)
            }
        };
        Committer {
            worker,
            shared,
            queue: RefCell::new(queue),
            thread: RefCell::new(thread),
        }
    }

    /// Hands a finished wave over; blocks while another wave already waits.
    fn commit(&self, rows: WaveRows, stats: &mut WorkerStats) {
        let unsent = match self.queue.borrow().as_ref() {
            Some(queue) => queue.send(rows).err().map(|e| e.0),
            None => Some(rows),
        };
        if let Some(rows) = unsent {
            self.shared.finish_and_commit(self.worker, rows, stats);
        }
    }

    /// Waits until every handed-over wave is committed and adds the counts to `stats`.
    fn finish(&self, stats: &mut WorkerStats) {
        drop(self.queue.borrow_mut().take());
        if let Some(handle) = self.thread.borrow_mut().take() {
            match handle.join() {
                Ok(counted) => stats.add_commits(&counted),
                Err(_) => self.shared.error(format!(
                    "worker {}: its commit thread panicked; rerun the same command to redo the targets it did not commit",
                    self.worker
                )),
            }
        }
    }
}

/// Runs the dataflow on this process's workers; returns when all are done.
pub fn run(shared: Arc<JobShared>, timely_args: Vec<String>) -> Result<(), String> {
    let guards = timely::execute_from_args(timely_args.into_iter(), move |worker| {
        let started = Instant::now();
        let shared = shared.clone();
        let index = worker.index();
        let peers = worker.peers();
        let (device, line) = mirgen_workers::device::select(&shared.device, index);
        eprintln!("{line}");
        let mut stats = WorkerStats {
            process: shared.process,
            worker: index,
            device: format!("{device:?}"),
            ..Default::default()
        };
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
                shared.error(format!("worker {index}: cannot build models: {e}"));
                None
            }
        };
        // this worker's part of the index (sharded plan)
        let shard = match &shared.index_plan {
            IndexPlan::Replicated => {
                if let Some(ix) = &shared.ctx.index {
                    stats.index_vectors = ix.len();
                    stats.index_bytes = ix.vectors.len() * 4;
                }
                None
            }
            IndexPlan::Sharded { cache, key } => {
                let router = shared.router.clone();
                let owns = move |id: &str| router.route(id) % peers as u64 == index as u64;
                match shared
                    .ctx
                    .runtime
                    .block_on(IndexShard::load(cache, key, index, peers, owns))
                {
                    Ok(s) => {
                        eprintln!(
                            "worker {index}: index shard {index}/{peers}: {} vectors + {} owned targets, {:.1} MiB",
                            s.len(),
                            s.owned_len(),
                            s.vector_bytes() as f64 / (1 << 20) as f64
                        );
                        stats.index_vectors = s.len() + s.owned_len();
                        stats.index_bytes = s.vector_bytes();
                        Some(Rc::new(s))
                    }
                    Err(e) => {
                        shared.error(format!("worker {index}: cannot load its index shard: {e}"));
                        // an empty shard keeps the cluster's protocol going
                        Some(Rc::new(IndexShard::empty(index, peers, 0)))
                    }
                }
            }
        };
        stats.ready_s = shared.started.elapsed().as_secs_f64();
        let committer = Rc::new(Committer::start(shared.clone(), index));
        let op_committer = committer.clone();
        let window = shared.ctx.config.batch.window;
        let max_waves = shared.ctx.config.batch.waves_in_flight.max(1);
        let top_k = shared.ctx.config.run.top_k;
        let stats = Rc::new(std::cell::RefCell::new(stats));
        let op_stats = stats.clone();
        let op_shared = shared.clone();
        let (mut targets_in, mut committed_in, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (targets_in, targets) = scope.new_collection::<(String, ()), isize>();
            let (committed_in, committed) = scope.new_collection::<String, isize>();
            let pending = targets.antijoin(committed);
            let mut models = models;
            let shared = op_shared;
            let activator_scope = scope;
            let router = shared.router.clone();
            let by_target =
                Exchange::new(move |x: &((String, ()), u64, isize)| router.route(&(x.0).0));
            let probe = match shard {
            None => {
            let done = pending
                .inner
                .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<usize>>, _, _, _>(
                    by_target,
                    "mir_rounds",
                    move |cap, info| {
                        let activator = activator_scope.activator_for(info.address.clone());
                        let mut cap = Some(cap);
                        let mut queue = std::collections::BTreeSet::<String>::new();
                        move |(input, frontier), output| {
                            input.for_each(|_time, data| {
                                for ((id, ()), _t, diff) in data.drain(..) {
                                    if diff > 0 {
                                        queue.insert(id);
                                    }
                                }
                            });
                            let input_done = frontier.is_empty();
                            if queue.len() >= window || (input_done && !queue.is_empty()) {
                                let wave = next_wave(&mut queue, window, &shared.ctx.stalls.isolate);
                                op_stats.borrow_mut().last_admission_s = shared.started.elapsed().as_secs_f64();
                                match (models.as_mut(), shared.ctx.index.as_ref()) {
                                    (Some(models), Some(ix)) => {
                                        let (rows, seconds) = run_wave(models, &shared.ctx, index, ix, &wave);
                                        let mut st = op_stats.borrow_mut();
                                        st.seconds.add(&seconds);
                                        op_committer.commit(rows, &mut st);
                                    }
                                    _ => shared.error(format!(
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
            probe
            }
            Some(shard) => {
            let (loop_handle, replies) = scope.feedback::<Vec<ShardReply>>(1);
            let owner_shard = shard.clone();
            let queries = pending
                .inner
                .binary_frontier::<_, timely::container::CapacityContainerBuilder<Vec<ShardQuery>>, _, _, _, _>(
                    replies,
                    by_target,
                    Exchange::new(|r: &ShardReply| r.owner),
                    "mir_rounds_sharded",
                    move |cap, info| {
                        let activator = activator_scope.activator_for(info.address.clone());
                        let mut cap = Some(cap);
                        let mut queue = std::collections::BTreeSet::<String>::new();
                        // wave id -> (wave, hits per query slot, replies received)
                        let mut waves: BTreeMap<u64, (Wave, Vec<Vec<ShardHits>>, usize)> = BTreeMap::new();
                        let mut wave_seq = 0u64;
                        let shard = owner_shard;
                        move |(input, frontier), (replies, _), output| {
                            input.for_each(|_time, data| {
                                for ((id, ()), _t, diff) in data.drain(..) {
                                    if diff > 0 {
                                        queue.insert(id);
                                    }
                                }
                            });
                            replies.for_each(|_time, data| {
                                for r in data.drain(..) {
                                    if let Some(w) = waves.get_mut(&r.wave) {
                                        w.1[r.slot as usize].push(r.hits);
                                        w.2 += 1;
                                    }
                                }
                            });
                            let input_done = frontier.is_empty();
                            let ready = |waves: &BTreeMap<u64, (Wave, Vec<Vec<ShardHits>>, usize)>| {
                                waves
                                    .iter()
                                    .find(|(_, w)| w.2 == w.1.len() * peers)
                                    .map(|(k, _)| *k)
                            };
                            let can_start = |waves: &BTreeMap<u64, _>, queue: &std::collections::BTreeSet<String>| {
                                waves.len() < max_waves
                                    && (queue.len() >= window || (input_done && !queue.is_empty()))
                            };
                            // one model step per activation, so this worker's
                            // shard_search answers other workers in between
                            let stepped: Option<(u64, Wave)> = if let Some(id) = ready(&waves) {
                                let (mut wave, hits, _) = waves.remove(&id).expect("ready wave");
                                let results = hits
                                    .iter()
                                    .zip(wave.queries())
                                    .map(|(h, (target, _))| merge_shard_hits(h, top_k, shard.owns(target)))
                                    .collect();
                                if let Some(models) = models.as_mut() {
                                    wave.resume(models, &shared.ctx, results);
                                }
                                Some((id, wave))
                            } else if can_start(&waves, &queue) {
                                let ids = next_wave(&mut queue, window, &shared.ctx.stalls.isolate);
                                op_stats.borrow_mut().last_admission_s = shared.started.elapsed().as_secs_f64();
                                match models.as_mut() {
                                    Some(models) => {
                                        wave_seq += 1;
                                        Some((wave_seq, Wave::start(models, &shared.ctx, index, &ids, &|id| shard.owns(id))))
                                    }
                                    None => {
                                        shared.error(format!(
                                            "worker {index}: skipped {} targets (no models)",
                                            ids.len()
                                        ));
                                        None
                                    }
                                }
                            } else {
                                None
                            };
                            if let Some((id, wave)) = stepped {
                                if wave.is_done() {
                                    let seconds = wave.seconds.clone();
                                    let rows = wave.into_records();
                                    let mut st = op_stats.borrow_mut();
                                    st.seconds.add(&seconds);
                                    op_committer.commit(rows, &mut st);
                                } else if let Some(c) = cap.as_ref() {
                                    let mut session = output.session(c);
                                    let mut slots = 0;
                                    for (slot, (target, vector)) in wave.queries().enumerate() {
                                        let key = shard.target_key(target, vector);
                                        for s in 0..peers as u64 {
                                            session.give(ShardQuery {
                                                shard: s,
                                                owner: index as u64,
                                                wave: id,
                                                slot: slot as u32,
                                                vector: vector.to_vec(),
                                                target: key,
                                            });
                                        }
                                        slots += 1;
                                    }
                                    waves.insert(id, (wave, vec![Vec::new(); slots], 0));
                                }
                            }
                            if ready(&waves).is_some() || can_start(&waves, &queue) {
                                activator.activate();
                            }
                            if input_done && queue.is_empty() && waves.is_empty() {
                                cap = None;
                            }
                        }
                    },
                );
            let answers = queries.clone().unary::<timely::container::CapacityContainerBuilder<Vec<ShardReply>>, _, _, _>(
                Exchange::new(|q: &ShardQuery| q.shard),
                "shard_search",
                move |_cap, _info| {
                    move |input, output| {
                        input.for_each(|cap, data| {
                            let mut session = output.session(&cap);
                            // the queries that arrived together in one pass over the shard
                            let batch: Vec<RowQuery<'_>> = data
                                .iter()
                                .map(|q| RowQuery { vector: &q.vector, target: q.target })
                                .collect();
                            let hits = shard.search_batch(&batch, top_k);
                            for (q, hits) in data.drain(..).zip(hits) {
                                session.give(ShardReply {
                                    owner: q.owner,
                                    wave: q.wave,
                                    slot: q.slot,
                                    hits,
                                });
                            }
                        });
                    }
                },
            );
            answers.connect_loop(loop_handle);
            let (probe, _) = queries.probe();
            probe
            }
            };
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
        let mut st = stats.borrow().clone();
        committer.finish(&mut st);
        st.wall_seconds = started.elapsed().as_secs_f64();
        shared.worker_stats.lock().expect("lock").push(st);
    })?;
    for r in guards.join() {
        r?;
    }
    Ok(())
}
