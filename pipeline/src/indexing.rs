//! Building the corpus index with every worker of the cluster.
//!
//! The corpus is cut into chunks of [`INDEX_CHUNK`] positions; global worker
//! `g` of `G` (process `p` x local worker `i`) embeds the chunks `c` with
//! `c mod G == g`, each on its own device with its own embedder, and writes
//! each chunk (failures list, then Parquet) as soon as it is done. A rerun
//! skips the chunks already written. When every chunk exists, process 0
//! writes `index.json`; the other processes wait for it. `mirgen index` runs
//! only this; `mirgen run` runs it first when the index is missing.

use std::time::{Duration, Instant};

use mirgen_workers::Embedder;

use crate::config::Config;
use crate::corpus::Corpus;
use crate::index::{build_chunks, finish_index, CorpusIndex, IndexMeta, INDEX_CHUNK};
use crate::progress::{Progress, ProgressMode};
use crate::store::Location;
use crate::PipelineError;

/// Where this process sits in the cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub processes: usize,
    pub process: usize,
    pub workers: usize,
    pub device: String,
}

/// The index's cache key and metadata, and whether it already existed.
pub struct EnsuredIndex {
    pub key: String,
    pub meta: IndexMeta,
    pub reused: bool,
}

/// Builds an embedder of `cfg` on `device` (one per indexing worker).
pub type EmbedderFactory<'a> = dyn Fn(&Config, &mirgen_workers::Device) -> Result<Box<dyn Embedder>, PipelineError>
    + Sync
    + 'a;

/// Makes sure the index of `corpus` under `cfg`'s embedder exists in `cache`.
pub fn ensure_index(
    cfg: &Config,
    corpus: &Corpus,
    cache: &Location,
    runtime: &tokio::runtime::Runtime,
    cluster: &Cluster,
    progress: ProgressMode,
    build_embedder: &EmbedderFactory<'_>,
) -> Result<EnsuredIndex, PipelineError> {
    let (device, _) = mirgen_workers::device::select(&cluster.device, 0);
    let first = build_embedder(cfg, &device)?;
    let info = first.info();
    let shape = crate::index::IndexShape::of(first.as_ref());
    let key = CorpusIndex::cache_key(&info.fingerprint, corpus);
    if let Some(meta) = runtime.block_on(IndexMeta::load(cache, &key))? {
        return Ok(EnsuredIndex {
            key,
            meta,
            reused: true,
        });
    }
    let workers = cluster.workers.max(1);
    let global = cluster.processes.max(1) * workers;
    let n_chunks = corpus.ids.len().div_ceil(INDEX_CHUNK);
    let mine = |c: usize| c % global / workers == cluster.process;
    let share: usize = (0..n_chunks)
        .filter(|&c| mine(c))
        .map(|c| INDEX_CHUNK.min(corpus.ids.len() - c * INDEX_CHUNK))
        .sum();
    let bar = Progress::new(progress, "indexing corpus", share, 1);
    let batch = cfg.batch.index_batch;
    let mut first = Some(first);
    let errors: Vec<PipelineError> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let embedder = if i == 0 { first.take() } else { None };
                let bar = &bar;
                let key = &key;
                let g = cluster.process * workers + i;
                s.spawn(move || -> Result<(), PipelineError> {
                    // each indexing thread embeds on its own kernel threads
                    let kernels =
                        mirgen_workers::kernels::KernelPool::for_worker(&format!("index{i}"));
                    kernels.run(|| {
                        let mut embedder = match embedder {
                            Some(e) => e,
                            None => {
                                let (device, line) =
                                    mirgen_workers::device::select(&cluster.device, i);
                                eprintln!("indexing {line}");
                                build_embedder(cfg, &device)?
                            }
                        };
                        let mut last = 0;
                        runtime.block_on(build_chunks(
                            cache,
                            key,
                            corpus,
                            embedder.as_mut(),
                            batch,
                            &|c| c % global == g,
                            |done, _| {
                                bar.inc(done - last, "indexing corpus");
                                last = done;
                            },
                        ))
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(PipelineError::Input(
                    "an indexing worker panicked; rerun to resume the index".into(),
                )),
            })
            .collect()
    });
    bar.finish();
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    // process 0 seals the index once every chunk is there; the others wait
    let started = Instant::now();
    let mut last_note = Instant::now();
    loop {
        let meta = if cluster.process == 0 {
            runtime.block_on(finish_index(cache, &key, corpus, &info, shape.clone()))?
        } else {
            runtime.block_on(IndexMeta::load(cache, &key))?
        };
        if let Some(meta) = meta {
            return Ok(EnsuredIndex {
                key,
                meta,
                reused: false,
            });
        }
        if last_note.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "waiting for the other processes' index chunks ({:.0} s so far)",
                started.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
