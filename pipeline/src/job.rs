//! `mirgen run`: plan, index, dataflow, finalize.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use mirgen_schemas::Manifest;
use sha2::{Digest, Sha256};

use crate::commit::{finalize, FinalizeInput, Output, STAGING};
use crate::config::LoadedConfig;
use crate::corpus::Corpus;
use crate::dataflow::{self, IndexPlan, JobShared, WorkerStats};
use crate::index::CorpusIndex;
use crate::indexing::{ensure_index, Cluster};
use crate::progress::{Progress, ProgressMode};
use crate::rounds::{build_embedder, WaveContext};
use crate::store::Location;
use crate::watchdog::{Heartbeats, StallHistory, StallLimits, Watchdog};
use crate::PipelineError;

/// How the process runs (CLI flags, not config).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub output: String,
    /// timely's own arguments (`-w`, `-n`, `-p`, `-h`).
    pub timely_args: Vec<String>,
    /// This process's index in the cluster (finalizes when 0).
    pub process: usize,
    /// Processes in the cluster and worker threads per process (as in `timely_args`).
    pub processes: usize,
    pub workers: usize,
    pub device: String,
    pub progress: ProgressMode,
    pub index: IndexMode,
    /// `IndexMode::Auto` shards indexes larger than this.
    pub index_memory_mb: u64,
    /// Watchdog limits for a stage that does not finish.
    pub stalls: StallLimits,
}

/// Where the corpus index lives during a run (see `mirgen run --help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IndexMode {
    Auto,
    Replicated,
    Sharded,
}

/// What a run did.
#[derive(Debug)]
pub enum RunOutcome {
    /// The output already held the finished dataset of this config.
    AlreadyComplete(Manifest),
    /// The dataset was (completed and) written.
    Finished {
        manifest: Manifest,
        new_targets: usize,
    },
    /// A non-zero process finished its share; process 0 writes the dataset.
    ShareDone { new_targets: usize },
}

/// The hash of everything that changes the records: config sections that
/// matter (not batching or card text), the corpus listing and the targets.
pub fn config_hash(cfg: &LoadedConfig, corpus: &Corpus, targets: &[String]) -> String {
    let c = &cfg.config;
    let relevant = serde_json::json!({
        "run": c.run,
        "models": c.models,
        "prompts": c.prompts,
        "image_format": c.output.image_format,
        "jpeg_quality": c.output.jpeg_quality,
        "format": 1,
    });
    let mut h = Sha256::new();
    h.update(relevant.to_string().as_bytes());
    for id in &corpus.ids {
        h.update(id.as_bytes());
        h.update([0]);
    }
    h.update([1]);
    for t in targets {
        h.update(t.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

pub fn run(cfg: LoadedConfig, opts: RunOptions) -> Result<RunOutcome, PipelineError> {
    let start = Instant::now();
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| PipelineError::Input(format!("cannot start the IO runtime: {e}")))?,
    );
    let corpus = runtime.block_on(Corpus::load(&cfg))?;
    let targets = runtime.block_on(corpus.targets(&cfg))?;
    let hash = config_hash(&cfg, &corpus, &targets);
    let output = Output::new(Location::open(&opts.output, true)?);
    if let Some(m) = runtime.block_on(output.manifest())? {
        if m.config_hash == hash {
            return Ok(RunOutcome::AlreadyComplete(m));
        }
        return Err(PipelineError::ConfigChanged {
            output: opts.output.clone(),
            existing: m.config_hash,
            current: hash,
        });
    }
    runtime.block_on(output.claim(&hash))?;
    let committed = runtime.block_on(output.committed(&hash))?;
    let target_set: std::collections::BTreeSet<&String> = targets.iter().collect();
    let committed_ids: Vec<String> = committed
        .keys()
        .filter(|t| target_set.contains(t))
        .cloned()
        .collect();
    drop(committed); // finalize reads the records again; keep no per-target map meanwhile
    let todo = targets.len() - committed_ids.len();
    let rounds_per_target = cfg.config.run.rounds as usize + 1;
    eprintln!(
        "mirgen run: {} targets x {} rounds over a corpus of {} images; {} already committed, {} to do{}",
        targets.len(),
        rounds_per_target,
        corpus.ids.len(),
        committed_ids.len(),
        todo,
        if cfg.smoke_test() { "\nNOTE: smoke-test models (tiny presets with random weights, or simulation stand-ins that are no model at all): the text is noise and the images draw nothing" } else { "" }
    );

    // the corpus index (cached in the output store per embedder + corpus listing)
    let staging = Location {
        prefix: output.loc.path(STAGING),
        ..output.loc.clone()
    };
    let cluster = Cluster {
        processes: opts.processes,
        process: opts.process,
        workers: opts.workers,
        device: opts.device.clone(),
    };
    let ensured = ensure_index(
        &cfg.config,
        &corpus,
        &staging,
        &runtime,
        &cluster,
        opts.progress,
        &|c, d| Ok(build_embedder(c, d)?),
    )?;
    let (key, reused) = (ensured.key.clone(), ensured.reused);
    let estimated_mb = (ensured.meta.indexed * ensured.meta.row_len() * 4) as u64 >> 20;
    let sharded = match opts.index {
        IndexMode::Sharded => true,
        IndexMode::Replicated => false,
        IndexMode::Auto => estimated_mb > opts.index_memory_mb,
    };
    let corpus_failures = runtime.block_on(ensured.meta.failures(&staging))?;
    // a sharded run never loads the whole index into one process
    let index = if sharded {
        None
    } else {
        Some(
            runtime
                .block_on(CorpusIndex::load(&staging, &key))?
                .ok_or_else(|| PipelineError::Input(format!("corpus index {key} is missing")))?,
        )
    };
    let indexed = corpus.ids.len() - corpus_failures.len();
    eprintln!(
        "corpus index: {indexed} images indexed{}{}; {} (process peak RSS so far {:.0} MiB)",
        if reused { " (reused from cache)" } else { "" },
        if corpus_failures.is_empty() {
            String::new()
        } else {
            format!(", {} could not be read", corpus_failures.len())
        },
        if sharded {
            "sharded over the workers"
        } else {
            "replicated on every worker"
        },
        crate::bench::peak_rss_mib()
    );
    for (id, reason) in &corpus_failures {
        eprintln!("  skipped corpus image {id}: {reason}");
    }

    let stalls = runtime.block_on(StallHistory::load(&staging))?;
    if !stalls.isolate.is_empty() {
        eprintln!(
            "{} target(s) of earlier stalled waves run one at a time{}",
            stalls.isolate.len(),
            if stalls.give_up.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} stalled alone twice and get failed rows",
                    stalls.give_up.len()
                )
            }
        );
    }
    let heartbeats = Arc::new(Heartbeats::default());
    let _watchdog = Watchdog::start(
        heartbeats.clone(),
        opts.stalls,
        staging.clone(),
        runtime.clone(),
    );
    let shared = Arc::new(JobShared {
        ctx: WaveContext {
            config: cfg.config.clone(),
            corpus_root: corpus.root.clone(),
            index: index.map(Arc::new),
            runtime: runtime.clone(),
            overlap_encode: true,
            heartbeats,
            stalls,
        },
        output,
        config_hash: hash.clone(),
        targets: targets.clone(),
        committed: committed_ids,
        device: opts.device.clone(),
        progress: Progress::new(opts.progress, "targets", todo, rounds_per_target),
        errors: Mutex::new(vec![]),
        models: Mutex::new(None),
        index_plan: if sharded {
            IndexPlan::Sharded {
                cache: staging.clone(),
                key,
            }
        } else {
            IndexPlan::Replicated
        },
        process: opts.process,
        worker_stats: Mutex::new(vec![]),
        router: Arc::new(dataflow::Router::new(&targets)),
        started: Instant::now(),
    });
    if todo > 0 {
        dataflow::run(shared.clone(), opts.timely_args.clone()).map_err(PipelineError::Dataflow)?;
    }
    shared.progress.finish();
    let peak_after_dataflow = crate::bench::peak_rss_mib();
    report_worker_stats(
        &runtime,
        &staging,
        &shared.worker_stats.lock().expect("lock"),
    );
    let errors = shared.errors.lock().expect("lock").clone();
    if !errors.is_empty() {
        return Err(PipelineError::Incomplete(errors.join("\n")));
    }
    if opts.process != 0 {
        return Ok(RunOutcome::ShareDone { new_targets: todo });
    }
    let c = &cfg.config;
    // the models' descriptions (built here only when no worker ran this time)
    let described = shared.models.lock().expect("lock").clone();
    let models_description = match described {
        Some(d) => d,
        None => {
            let (device, _) = mirgen_workers::device::select(&opts.device, 0);
            crate::rounds::Models::build(c, &device)?.describe()
        }
    };
    let manifest = runtime.block_on(finalize(
        &shared.output,
        &targets,
        rounds_per_target,
        FinalizeInput {
            config_hash: &hash,
            config: serde_json::to_value(c)?,
            models: models_description,
            seed: c.run.seed,
            rounds: c.run.rounds,
            shard_rows: c.output.shard_rows,
            row_group_rows: c.output.row_group_rows,
            corpus_size: corpus.ids.len(),
            corpus_failures,
            pretty_name: &c.output.pretty_name,
            license: &c.output.license,
            corpus_note: &c.output.corpus_note,
            smoke_test: cfg.smoke_test(),
            prompts: c.prompts.named(),
            wall_seconds: start.elapsed().as_secs_f64(),
        },
    ))?;
    eprintln!(
        "memory: process peak RSS {:.0} MiB after the dataflow, {:.0} MiB after finalize",
        peak_after_dataflow,
        crate::bench::peak_rss_mib()
    );
    Ok(RunOutcome::Finished {
        manifest,
        new_targets: todo,
    })
}

/// Writes each worker's stats to `.mirgen/stats/` (one file per worker and
/// attempt, so resumed runs keep their history) and prints a summary.
fn report_worker_stats(
    runtime: &tokio::runtime::Runtime,
    staging: &Location,
    stats: &[WorkerStats],
) {
    if stats.is_empty() {
        return;
    }
    let attempt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut sorted: Vec<&WorkerStats> = stats.iter().collect();
    sorted.sort_by_key(|s| s.worker);
    eprintln!("worker  targets  rows  failed  waves  load_s  vlm_s  gen_s  embed_s  search_s  encode_s  commit_s  wall_s  index_MiB");
    for s in &sorted {
        let t = &s.seconds;
        eprintln!(
            "{:>6}  {:>7}  {:>4}  {:>6}  {:>5}  {:>6.1}  {:>5.1}  {:>5.1}  {:>7.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>6.1}  {:>9.1}",
            s.worker, s.targets, s.rows, s.failed_rows, s.waves, t.load, t.vlm, t.generate, t.embed,
            t.search, t.encode, s.commit_seconds, s.wall_seconds, s.index_bytes as f64 / (1 << 20) as f64
        );
        let key = format!("stats/{attempt}-p{:03}-w{:04}.json", s.process, s.worker);
        let written = serde_json::to_vec_pretty(s)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                runtime
                    .block_on(staging.put(&key, b))
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            eprintln!("warning: could not write worker stats {key}: {e}");
        }
    }
}

/// `mirgen index`: builds (or finds) the corpus index of `cfg` in `output`'s
/// index cache, sharded over this cluster's workers. Unreadable images are
/// reported and left out.
pub fn index_only(
    cfg: &LoadedConfig,
    output: &str,
    cluster: Cluster,
    progress: ProgressMode,
) -> Result<crate::indexing::EnsuredIndex, PipelineError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Input(format!("cannot start the IO runtime: {e}")))?;
    let corpus = runtime.block_on(Corpus::load(cfg))?;
    let out = Location::open(output, true)?;
    let staging = Location {
        prefix: out.path(STAGING),
        ..out.clone()
    };
    let ensured = ensure_index(
        &cfg.config,
        &corpus,
        &staging,
        &runtime,
        &cluster,
        progress,
        &|c, d| Ok(build_embedder(c, d)?),
    )?;
    for (id, reason) in runtime.block_on(ensured.meta.failures(&staging))? {
        eprintln!("  skipped corpus image {id}: {reason}");
    }
    Ok(ensured)
}
