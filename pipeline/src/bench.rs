//! `mirgen bench`: the dataflow against the sequential reference loop.
//!
//! One process, one run, the same targets, models and seeds, two ways:
//! 1. **sequential** — GenIR's structure: one target at a time, every round
//!    in turn, batch 1, nothing overlapped, one model replica;
//! 2. **dataflow** — `mirgen run`'s timely job with `-w N` workers, targets
//!    split evenly, each worker batching a wave of targets per stage.
//!
//! Both write their records; the report says whether they are identical
//! (timings aside), the target-rounds per second of each and their ratio,
//! the share of the dataflow workers' time spent in model calls, the
//! end-of-run tail, and the peak resident memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mirgen_schemas::Record;

use crate::commit::{Output, STAGING};
use crate::config::LoadedConfig;
use crate::corpus::Corpus;
use crate::dataflow::{self, IndexPlan, JobShared, Router, WorkerStats};
use crate::index::CorpusIndex;
use crate::job::config_hash;
use crate::progress::{Progress, ProgressMode};
use crate::rounds::{run_wave, Models, StageSeconds, WaveContext};
use crate::store::Location;
use crate::watchdog::{Heartbeats, StallHistory};
use crate::PipelineError;

/// How the benchmark runs.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Dataflow workers (threads) in this process.
    pub workers: usize,
    /// Use only the first N targets (sorted by id).
    pub targets: Option<usize>,
    /// Scratch folder for both outputs (a temporary folder by default).
    pub work_dir: Option<std::path::PathBuf>,
    pub device: String,
    /// Give the sequential loop all cores and each dataflow worker its
    /// share, switching `RAYON_NUM_THREADS` between the phases (the CLI
    /// does; leave it false where other threads may read the environment
    /// through libc, as in a test harness).
    pub plan_kernel_threads: bool,
}

/// What `mirgen bench --json` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub targets: usize,
    pub rounds_per_target: usize,
    pub target_rounds: usize,
    pub workers: usize,
    /// CPU kernel threads of the sequential loop (all cores, or
    /// `RAYON_NUM_THREADS`).
    pub sequential_kernel_threads: usize,
    /// CPU kernel threads of each dataflow worker (the cores split between
    /// the workers, or `RAYON_NUM_THREADS`).
    pub kernel_threads: usize,
    /// Sequential loop: wall seconds (models built beforehand).
    pub sequential_s: f64,
    pub sequential_rounds_per_s: f64,
    /// Share of the sequential loop's wall time in model calls.
    pub sequential_model_share: f64,
    /// Dataflow: from the first worker ready (models built) to the last commit.
    pub dataflow_s: f64,
    pub dataflow_rounds_per_s: f64,
    /// dataflow_rounds_per_s / sequential_rounds_per_s.
    pub ratio: f64,
    /// Share of the dataflow workers' time (workers x dataflow_s) in model calls.
    pub model_share: f64,
    /// Records of both runs are identical (timings aside).
    pub identical_records: bool,
    /// Straggler tail: from the first worker running out of work to the end.
    pub tail_s: f64,
    /// From the last admission of a wave (any worker) to the end. Every
    /// target needs rounds_per_target sequential rounds, so this is at least
    /// one wave's full duration by construction.
    pub last_admission_to_end_s: f64,
    /// Mean time of one batched round step of a wave on a worker.
    pub round_s: f64,
    /// Peak resident memory of the process (both runs), MiB.
    pub peak_rss_mib: f64,
    /// Dataflow seconds per stage, summed over workers.
    pub dataflow_stage_seconds: StageSeconds,
    /// Sequential seconds per stage.
    pub sequential_stage_seconds: StageSeconds,
    pub smoke_test: bool,
}

fn model_seconds(s: &StageSeconds) -> f64 {
    s.vlm + s.generate + s.embed
}

/// Peak resident set size (VmHWM) in MiB, where /proc is available.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn sorted_without_timings(rows: &[Record]) -> Vec<Record> {
    let mut v: Vec<Record> = rows.iter().map(Record::without_timings).collect();
    v.sort_by(|a, b| (&a.target_id, a.round).cmp(&(&b.target_id, b.round)));
    v
}

pub fn run(cfg: LoadedConfig, opts: BenchOptions) -> Result<BenchReport, PipelineError> {
    let plan_threads = |workers: usize| {
        if opts.plan_kernel_threads {
            let (_, line) = mirgen_workers::kernels::plan_threads(workers);
            eprintln!("{line}");
        }
    };
    // before any thread starts: the sequential loop is one model replica on
    // all cores; candle's element-wise pool is sized once per process, so it
    // stays off for both phases (the dataflow's workers would queue on it)
    if opts.plan_kernel_threads {
        mirgen_workers::kernels::private_elementwise();
    }
    plan_threads(1);
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| PipelineError::Input(format!("cannot start the IO runtime: {e}")))?,
    );
    let corpus = runtime.block_on(Corpus::load(&cfg))?;
    let mut targets = runtime.block_on(corpus.targets(&cfg))?;
    targets.sort();
    if let Some(n) = opts.targets {
        targets.truncate(n);
    }
    if targets.is_empty() {
        return Err(PipelineError::Input("the benchmark has no targets".into()));
    }
    let scratch = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| PipelineError::Input(format!("cannot create {}: {e}", d.display())))?;
            None
        }
        None => {
            Some(tempfile::tempdir().map_err(|e| {
                PipelineError::Input(format!("cannot create a temporary folder: {e}"))
            })?)
        }
    };
    let root = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| scratch.as_ref().expect("temp dir").path().to_path_buf());
    let out_dir = root.join(format!(
        "dataflow-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    let output = Output::new(Location::open(&out_dir.display().to_string(), true)?);
    let staging = Location {
        prefix: output.loc.path(STAGING),
        ..output.loc.clone()
    };
    let hash = config_hash(&cfg, &corpus, &targets);
    runtime.block_on(output.claim(&hash))?;

    // models and the corpus index, shared by both runs
    let (device, _) = mirgen_workers::device::select(&opts.device, 0);
    let mut models = Models::build(&cfg.config, &device)?;
    let sequential_kernel_threads = models.kernels.threads();
    let smoke_test = cfg.smoke_test();
    eprintln!(
        "mirgen bench: {} targets x {} rounds; sequential loop, then the dataflow with {} workers{}",
        targets.len(),
        cfg.config.run.rounds + 1,
        opts.workers,
        if smoke_test {
            " (smoke-test models)"
        } else {
            ""
        }
    );
    let (index, _) = runtime.block_on(CorpusIndex::load_or_build(
        &staging,
        &corpus,
        models.embedder.as_mut(),
        cfg.config.batch.index_batch,
        |_, _| {},
    ))?;
    let index = Arc::new(index);
    let ctx = |overlap_encode| WaveContext {
        config: cfg.config.clone(),
        corpus_root: corpus.root.clone(),
        index: Some(index.clone()),
        runtime: runtime.clone(),
        overlap_encode,
        heartbeats: Arc::new(Heartbeats::default()),
        stalls: StallHistory::default(),
    };
    let rounds_per_target = cfg.config.run.rounds as usize + 1;
    let target_rounds = targets.len() * rounds_per_target;

    // 1. sequential: one target at a time, batch 1, no overlap
    let seq_ctx = ctx(false);
    let progress = Progress::new(
        ProgressMode::Auto,
        "sequential loop",
        targets.len(),
        rounds_per_target,
    );
    let mut seq_rows = Vec::with_capacity(target_rounds);
    let mut seq_seconds = StageSeconds::default();
    let t = Instant::now();
    for target in &targets {
        let (rows, seconds) = run_wave(
            &mut models,
            &seq_ctx,
            0,
            &index,
            std::slice::from_ref(target),
        );
        // encoded in place (overlap_encode is off); finish fills in the bytes
        let (rows, _) = rows.finish(&runtime);
        seq_rows.extend(rows);
        seq_seconds.add(&seconds);
        progress.inc(1, "targets");
    }
    let sequential_s = t.elapsed().as_secs_f64();
    progress.finish();
    drop(models);

    // 2. the dataflow: the cores split between the workers (the runtime's
    // threads are idle now, and the environment is only read through std)
    plan_threads(opts.workers);
    let kernel_threads = candle_core::utils::get_num_threads();
    let shared = Arc::new(JobShared {
        ctx: ctx(true),
        output,
        config_hash: hash.clone(),
        targets: targets.clone(),
        committed: vec![],
        device: opts.device.clone(),
        progress: Progress::new(
            ProgressMode::Auto,
            "dataflow",
            targets.len(),
            rounds_per_target,
        ),
        errors: Mutex::new(vec![]),
        models: Mutex::new(None),
        index_plan: IndexPlan::Replicated,
        process: 0,
        worker_stats: Mutex::new(vec![]),
        router: Arc::new(Router::new(&targets)),
        started: Instant::now(),
    });
    dataflow::run(
        shared.clone(),
        vec!["mirgen".into(), "-w".into(), opts.workers.to_string()],
    )
    .map_err(PipelineError::Dataflow)?;
    shared.progress.finish();
    let errors = shared.errors.lock().expect("lock").clone();
    if !errors.is_empty() {
        return Err(PipelineError::Incomplete(errors.join("\n")));
    }
    let stats: Vec<WorkerStats> = shared.worker_stats.lock().expect("lock").clone();
    let flow_rows = runtime.block_on(shared.output.committed_records(&hash, &targets))?;

    let first_ready = stats
        .iter()
        .map(|s| s.ready_s)
        .fold(f64::INFINITY, f64::min);
    let last_finish = stats.iter().map(|s| s.finished_s).fold(0.0, f64::max);
    let first_finish = stats
        .iter()
        .filter(|s| s.waves > 0)
        .map(|s| s.finished_s)
        .fold(f64::INFINITY, f64::min);
    let last_admission = stats.iter().map(|s| s.last_admission_s).fold(0.0, f64::max);
    let dataflow_s = (last_finish - first_ready).max(1e-9);
    let mut flow_seconds = StageSeconds::default();
    for s in &stats {
        flow_seconds.add(&s.seconds);
    }
    let busy_steps: Vec<f64> = stats
        .iter()
        .filter(|s| s.waves > 0)
        .map(|s| (s.finished_s - s.ready_s) / (s.waves * rounds_per_target) as f64)
        .collect();
    let by_worker: BTreeMap<usize, &WorkerStats> = stats.iter().map(|s| (s.worker, s)).collect();
    for (w, s) in &by_worker {
        eprintln!(
            "worker {w}: {} targets in {} waves, ready at {:.1} s, last admission {:.1} s, finished {:.1} s",
            s.targets, s.waves, s.ready_s, s.last_admission_s, s.finished_s
        );
    }
    let sequential_rounds_per_s = target_rounds as f64 / sequential_s;
    let dataflow_rounds_per_s = target_rounds as f64 / dataflow_s;
    Ok(BenchReport {
        targets: targets.len(),
        rounds_per_target,
        target_rounds,
        workers: opts.workers,
        sequential_kernel_threads,
        kernel_threads,
        sequential_s,
        sequential_rounds_per_s,
        sequential_model_share: model_seconds(&seq_seconds) / sequential_s,
        dataflow_s,
        dataflow_rounds_per_s,
        ratio: dataflow_rounds_per_s / sequential_rounds_per_s,
        model_share: model_seconds(&flow_seconds) / (dataflow_s * stats.len().max(1) as f64),
        identical_records: sorted_without_timings(&seq_rows) == sorted_without_timings(&flow_rows),
        tail_s: (last_finish - first_finish).max(0.0),
        last_admission_to_end_s: (last_finish - last_admission).max(0.0),
        round_s: busy_steps.iter().sum::<f64>() / busy_steps.len().max(1) as f64,
        peak_rss_mib: peak_rss_mib(),
        dataflow_stage_seconds: flow_seconds,
        sequential_stage_seconds: seq_seconds,
        smoke_test,
    })
}
