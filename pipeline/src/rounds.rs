//! The GenIR round loop for one wave of targets, every stage batched over
//! the wave's live targets:
//!
//! ```text
//! q0 = caption(T)
//! for r in 0..=R:  S_r = generate(q_r); rank corpus by embed(S_r); emit row r
//!                  if r < R: d_r = compare(T, S_r, q_r); q_{r+1} = refine(T, d_r, q_r)
//! ```
//!
//! A failing item never stops the wave: a batch that fails is retried item
//! by item, and an item that still fails gets `failed` rows (with the stage
//! and the reason) for every round it could not complete.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use mirgen_schemas::{ImageCell, Record, RecordStatus, StageTimings};
use mirgen_workers::{
    embedder::ClipEmbedder,
    generator::SdGenerator,
    image_io::{decode_rgb, encode},
    roles::{CompareItem, RefineItem},
    seed::derive_seed,
    simulation::{SimEmbedder, SimGenerator, SimVlm},
    vlm::PaliGemmaStyleVlm,
    Embedder, GenerateRequest, ImageGenerator, QueryWriter, RgbImage, WorkerError,
};

use mirgen_workers::kernels::KernelPool;

use crate::config::{Config, Mode};
use crate::index::{CorpusIndex, SearchResult};
use crate::store::Location;
use crate::watchdog::{Heartbeats, StallHistory};

/// The three roles, owned by one worker.
pub struct Models {
    pub writer: QueryWriter,
    pub generator: Box<dyn ImageGenerator>,
    pub embedder: Box<dyn Embedder>,
    /// The kernel threads this worker's model calls run on.
    pub kernels: KernelPool,
}

impl Models {
    /// Builds the configured models on `device`. Presets are seeded by the run seed.
    pub fn build(cfg: &Config, device: &mirgen_workers::Device) -> Result<Self, WorkerError> {
        let seed = cfg.run.seed;
        let m = &cfg.models;
        let vlm: Box<dyn mirgen_workers::Vlm> =
            if let Some(spec) = m.vlm.resolved_model.as_ref().or(m.vlm.model.as_ref()) {
                mirgen_workers::vlms::load_vlm(spec, m.vlm.sampling.clone(), device)?
            } else {
                match m.vlm.kind() {
                    "simulation" => Box::new(SimVlm),
                    _ => Box::new(PaliGemmaStyleVlm::tiny(
                        seed,
                        m.vlm.sampling.clone(),
                        device,
                    )?),
                }
            };
        let generator: Box<dyn ImageGenerator> = if let Some(spec) = m
            .generator
            .resolved_model
            .as_ref()
            .or(m.generator.model.as_ref())
        {
            mirgen_workers::generators::load_generator(
                spec,
                m.generator.steps,
                m.generator.guidance,
                device,
            )?
        } else {
            match m.generator.kind() {
                "simulation" => Box::new(SimGenerator { size: 16 }),
                _ => Box::new(SdGenerator::tiny(seed, m.generator.diffusion(), device)?),
            }
        };
        Ok(Models {
            writer: QueryWriter {
                vlm,
                prompts: cfg.prompts.clone(),
                budgets: m.vlm.max_new_tokens.clone(),
            },
            generator,
            embedder: build_embedder(cfg, device)?,
            kernels: KernelPool::for_worker("mirgen"),
        })
    }

    /// Role -> description, for the manifest and the card.
    pub fn describe(&self) -> BTreeMap<String, serde_json::Value> {
        [
            ("vlm", serde_json::to_value(self.writer.vlm.info())),
            ("generator", serde_json::to_value(self.generator.info())),
            ("embedder", serde_json::to_value(self.embedder.info())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.expect("model info serializes")))
        .collect()
    }
}

/// Builds only the configured retrieval encoder (corpus indexing needs no other model).
pub fn build_embedder(
    cfg: &Config,
    device: &mirgen_workers::Device,
) -> Result<Box<dyn Embedder>, WorkerError> {
    let e = &cfg.models.embedder;
    if let Some(spec) = e.resolved_model.as_ref().or(e.model.as_ref()) {
        return mirgen_workers::encoders::load_embedder(spec, device);
    }
    Ok(match e.kind() {
        "simulation" => Box::new(SimEmbedder { dim: 32 }),
        _ => Box::new(ClipEmbedder::tiny(cfg.run.seed, device)?),
    })
}

/// What every wave needs besides the models (shared by a process's workers).
pub struct WaveContext {
    pub config: Config,
    pub corpus_root: Location,
    /// The whole corpus index (replicated mode); `None` when workers hold shards.
    pub index: Option<Arc<CorpusIndex>>,
    pub runtime: Arc<tokio::runtime::Runtime>,
    /// Encode drawings on the runtime's blocking threads while the models go
    /// on (the dataflow; [`WaveRows::finish`] collects them on the commit
    /// thread); false encodes each in place (GenIR's sequential loop).
    pub overlap_encode: bool,
    /// What each worker is doing (read by the watchdog).
    pub heartbeats: Arc<Heartbeats>,
    /// Stalls of earlier attempts on this output.
    pub stalls: StallHistory,
}

struct Item {
    id: String,
    target_cell: Option<ImageCell>,
    target: Option<Arc<RgbImage>>,
    query: Option<String>,
    /// d_{r-1}: the comparison that produced the current query.
    feedback: Option<String>,
    failed: Option<(i32, String)>,
    rows: Vec<Record>,
    /// Encoded drawings of its rows: (index in `rows`, encode).
    encoding: Vec<(usize, Encode)>,
    pending_vlm_ms: f32,
}

/// A drawing's encoded bytes (or why not), filled into its row by
/// [`WaveRows::finish`], so an encode failure means the same in both modes of
/// [`WaveContext::overlap_encode`].
enum Encode {
    /// Encoded in place (its time is in the wave's `encode` stage).
    Done(Result<Vec<u8>, String>),
    /// Running on the runtime's blocking threads: bytes and seconds taken.
    Running(tokio::task::JoinHandle<(Result<Vec<u8>, String>, f64)>),
}

/// A finished wave's rows, `(rounds + 1)` per target in (target, round)
/// order. The drawings' bytes go into their rows in [`WaveRows::finish`].
pub struct WaveRows {
    records: Vec<Record>,
    encoding: Vec<(usize, Encode)>,
}

impl WaveRows {
    /// Waits for the wave's encodes (on the commit thread, so the models go
    /// on meanwhile) and returns the rows and the seconds spent encoding. A
    /// drawing that cannot be encoded makes its row `failed`; the target's
    /// later rounds, which used the drawing in memory, stay.
    pub fn finish(self, runtime: &tokio::runtime::Runtime) -> (Vec<Record>, f64) {
        let mut records = self.records;
        let mut seconds = 0.0;
        for (at, encode) in self.encoding {
            let bytes = match encode {
                Encode::Done(bytes) => bytes,
                Encode::Running(job) => {
                    let (bytes, s) = runtime
                        .block_on(job)
                        .unwrap_or_else(|e| (Err(format!("the encoder stopped: {e}")), 0.0));
                    seconds += s;
                    bytes
                }
            };
            let row = &mut records[at];
            match (bytes, row.synthetic_image.as_mut()) {
                (Ok(bytes), Some(cell)) => cell.bytes = bytes,
                (Ok(_), None) => {}
                (Err(e), _) => {
                    let mut failed = Record::failed(
                        &row.target_id,
                        row.round,
                        row.seed,
                        format!("round {} encode: {e}", row.round),
                    );
                    failed.target_image = row.target_image.take();
                    *row = failed;
                }
            }
        }
        (records, seconds)
    }
}

/// An item, its drawing (genir mode), and its retrieval vector.
type Embedded = (usize, Option<Arc<RgbImage>>, Result<Vec<f32>, String>);

/// A batched model call.
type BatchCall<'a, Q, O> = dyn FnMut(&[Q]) -> Result<Vec<O>, WorkerError> + Send + 'a;

/// Runs `call` on the worker's own kernel threads ([`KernelPool`]).
fn call_isolated<Q: Clone + Sync, O: Send>(
    kernels: &KernelPool,
    requests: &[Q],
    call: &mut BatchCall<'_, Q, O>,
) -> Vec<Result<O, String>> {
    kernels.run(|| isolated(requests, call))
}

/// Runs `call` on the whole batch; if it errs or panics, runs it item by item
/// so one bad item cannot fail its neighbours.
fn isolated<Q: Clone, O>(requests: &[Q], call: &mut BatchCall<'_, Q, O>) -> Vec<Result<O, String>> {
    let mut guarded = |reqs: &[Q]| -> Result<Vec<O>, String> {
        match catch_unwind(AssertUnwindSafe(|| call(reqs))) {
            Ok(Ok(out)) if out.len() == reqs.len() => Ok(out),
            Ok(Ok(out)) => Err(format!(
                "model returned {} results for {} inputs",
                out.len(),
                reqs.len()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(format!(
                "model panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    };
    if requests.is_empty() {
        return vec![];
    }
    match guarded(requests) {
        Ok(out) => out.into_iter().map(Ok).collect(),
        Err(_) if requests.len() > 1 => requests
            .iter()
            .map(|r| guarded(std::slice::from_ref(r)).map(|mut v| v.remove(0)))
            .collect(),
        Err(e) => vec![Err(e)],
    }
}

fn file_name(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// The seed of a model call: run seed, target, stage and round.
pub fn call_seed(run_seed: u64, id: &str, stage: &str, round: i32) -> u64 {
    derive_seed(run_seed, &[id, stage, &round.to_string()])
}

/// Test hook: `MIRGEN_TEST_STALL=<target id>` makes the caption call of any
/// wave holding that target hang forever (exercises the watchdog).
fn stall_hook(ids: &[String]) {
    if let Ok(t) = std::env::var("MIRGEN_TEST_STALL") {
        if ids.contains(&t) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}

/// Seconds spent per stage (summed over items' shares), for per-worker stats.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageSeconds {
    pub load: f64,
    pub vlm: f64,
    pub generate: f64,
    pub embed: f64,
    pub search: f64,
    pub encode: f64,
}

impl StageSeconds {
    pub fn add(&mut self, other: &StageSeconds) {
        self.load += other.load;
        self.vlm += other.vlm;
        self.generate += other.generate;
        self.embed += other.embed;
        self.search += other.search;
        self.encode += other.encode;
    }
}

/// A live item's retrieval query for the current round.
struct Pending {
    item: usize,
    /// The drawing (genir mode).
    image: Option<Arc<RgbImage>>,
    vector: Vec<f32>,
    gen_ms: f32,
    embed_ms: f32,
}

/// A wave of targets moving through the round loop. After drawing and
/// embedding a round it waits for that round's search results
/// ([`Wave::queries`] / [`Wave::resume`]), so the search can run elsewhere
/// (the shards of a distributed index) while the worker does other work.
pub struct Wave {
    items: Vec<Item>,
    round: i32,
    last_round: i32,
    pending: Vec<Pending>,
    issued: Instant,
    done: bool,
    seed: u64,
    worker: usize,
    ids: Vec<String>,
    pub seconds: StageSeconds,
}

impl Wave {
    /// Loads the targets, captions them (round 0 query) and draws and embeds
    /// round 0. `indexed` says whether a target is in the corpus index.
    pub fn start(
        models: &mut Models,
        ctx: &WaveContext,
        worker: usize,
        ids: &[String],
        indexed: &dyn Fn(&str) -> bool,
    ) -> Wave {
        let t = Instant::now();
        ctx.heartbeats.enter(worker, "load", ids);
        // the wave's targets are read and decoded concurrently (one storage
        // round trip for the wave, not one per target)
        let loads: Vec<_> = ids
            .iter()
            .map(|id| {
                let (root, id) = (ctx.corpus_root.clone(), id.clone());
                ctx.runtime.spawn(async move {
                    let bytes = root
                        .get(&id)
                        .await
                        .map_err(|e| format!("cannot read target {id}: {e}"))?;
                    tokio::task::spawn_blocking(move || {
                        let img =
                            decode_rgb(&id, &bytes).map_err(|e| format!("target image: {e}"))?;
                        Ok((bytes, img))
                    })
                    .await
                    .map_err(|e| format!("target decoder stopped: {e}"))?
                })
            })
            .collect();
        let items: Vec<Item> = ids
            .iter()
            .zip(loads)
            .map(|(id, load)| {
                let mut item = Item { id: id.clone(), target_cell: None, target: None, query: None, feedback: None, failed: None, rows: vec![], encoding: vec![], pending_vlm_ms: 0.0 };
                let loaded: Result<(bytes::Bytes, RgbImage), String> = ctx
                    .runtime
                    .block_on(load)
                    .unwrap_or_else(|e| Err(format!("target loader stopped: {e}")));
                match loaded {
                    Ok((bytes, img)) => {
                        item.target_cell = Some(ImageCell { bytes: bytes.to_vec(), path: file_name(id).to_string() });
                        item.target = Some(Arc::new(img));
                        if let Some(reason) = ctx.stalls.give_up.get(id) {
                            item.failed = Some((0, reason.clone()));
                        } else if !indexed(id) {
                            item.failed = Some((0, format!("target {id} is not in the corpus index, so it cannot be ranked (is it listed in the corpus?)")));
                        }
                    }
                    Err(e) => item.failed = Some((0, e)),
                }
                item
            })
            .collect();
        let mut wave = Wave {
            items,
            round: 0,
            last_round: ctx.config.run.rounds as i32,
            pending: vec![],
            issued: Instant::now(),
            done: false,
            seed: ctx.config.run.seed,
            worker,
            ids: ids.to_vec(),
            seconds: StageSeconds::default(),
        };
        wave.seconds.load = t.elapsed().as_secs_f64();

        // round 0 query: caption the target
        let seed = ctx.config.run.seed;
        let idx = wave.live();
        let reqs = models.writer.caption_requests(
            &idx.iter()
                .map(|&i| {
                    let item = &wave.items[i];
                    (
                        item.target.clone().expect("live items have targets"),
                        call_seed(seed, &item.id, "caption", 0),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let t = Instant::now();
        ctx.heartbeats.enter(worker, "caption", ids);
        stall_hook(
            &idx.iter()
                .map(|&i| wave.items[i].id.clone())
                .collect::<Vec<_>>(),
        );
        let out = call_isolated(&models.kernels, &reqs, &mut |b| models.writer.run(b));
        wave.seconds.vlm += t.elapsed().as_secs_f64();
        let per = t.elapsed().as_secs_f32() * 1000.0 / idx.len().max(1) as f32;
        for (&i, o) in idx.iter().zip(out) {
            let item = &mut wave.items[i];
            item.pending_vlm_ms = per;
            match o {
                Ok(o) => item.query = Some(o.text),
                Err(e) => item.failed = Some((0, format!("round 0 caption: {e}"))),
            }
        }
        wave.draw_and_embed(models, ctx);
        ctx.heartbeats.idle(worker);
        wave
    }

    fn live(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| self.items[i].failed.is_none())
            .collect()
    }

    /// True when every round of every target is made (or failed).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The searches this wave waits for: (target id, query vector), in the
    /// order [`Wave::resume`] expects their results.
    pub fn queries(&self) -> impl Iterator<Item = (&str, &[f32])> {
        self.pending
            .iter()
            .map(|p| (self.items[p.item].id.as_str(), p.vector.as_slice()))
    }

    /// Makes the current round's query vectors: draws each live item's query
    /// and embeds the drawing (genir), or embeds the query text (baselines).
    fn draw_and_embed(&mut self, models: &mut Models, ctx: &WaveContext) {
        let cfg = &ctx.config;
        let (round, seed) = (self.round, cfg.run.seed);
        let idx = self.live();
        let mut gen_ms = 0.0;
        let embedded: Vec<Embedded>;
        let t = Instant::now();
        match cfg.run.mode {
            Mode::Genir => {
                let reqs: Vec<GenerateRequest> = idx
                    .iter()
                    .map(|&i| GenerateRequest {
                        prompt: self.items[i].query.clone().unwrap_or_default(),
                        seed: call_seed(seed, &self.items[i].id, "generate", round),
                        init_latents: None,
                    })
                    .collect();
                ctx.heartbeats.enter(self.worker, "generate", &self.ids);
                let out = call_isolated(&models.kernels, &reqs, &mut |b| {
                    models.generator.generate(b)
                });
                self.seconds.generate += t.elapsed().as_secs_f64();
                gen_ms = t.elapsed().as_secs_f32() * 1000.0 / idx.len().max(1) as f32;
                let mut drawn: Vec<(usize, Arc<RgbImage>)> = Vec::new();
                for (&i, o) in idx.iter().zip(out) {
                    match o {
                        Ok(img) => drawn.push((i, Arc::new(img))),
                        Err(e) => {
                            self.items[i].failed =
                                Some((round, format!("round {round} generate: {e}")))
                        }
                    }
                }
                let images: Vec<&RgbImage> = drawn.iter().map(|(_, img)| img.as_ref()).collect();
                ctx.heartbeats.enter(self.worker, "embed", &self.ids);
                let out = call_isolated(&models.kernels, &images, &mut |b| {
                    models.embedder.embed_images(b)
                });
                embedded = drawn
                    .into_iter()
                    .zip(out)
                    .map(|((i, img), v)| (i, Some(img), v))
                    .collect();
            }
            Mode::Verbal | Mode::Prediction => {
                // no drawing: the query text itself is the retrieval query
                let texts: Vec<String> = idx
                    .iter()
                    .map(|&i| self.items[i].query.clone().unwrap_or_default())
                    .collect();
                ctx.heartbeats.enter(self.worker, "embed", &self.ids);
                let out = call_isolated(&models.kernels, &texts, &mut |b| {
                    models.embedder.embed_texts(b)
                });
                embedded = idx
                    .iter()
                    .copied()
                    .zip(out)
                    .map(|(i, v)| (i, None, v))
                    .collect();
            }
        }
        let total_ms = t.elapsed().as_secs_f32() * 1000.0;
        let embed_ms = (total_ms - gen_ms * idx.len() as f32).max(0.0) / idx.len().max(1) as f32;
        self.seconds.embed += (embed_ms * idx.len() as f32 / 1000.0) as f64;
        self.pending.clear();
        for (i, image, vector) in embedded {
            match vector {
                Ok(vector) => self.pending.push(Pending {
                    item: i,
                    image,
                    vector,
                    gen_ms,
                    embed_ms,
                }),
                Err(e) => self.items[i].failed = Some((round, format!("round {round} embed: {e}"))),
            }
        }
        self.issued = Instant::now();
        if self.pending.is_empty() {
            self.done = true;
        }
    }

    /// Takes the current round's search results (one per query, in order),
    /// writes the round's rows, and unless it was the last round compares,
    /// refines, and draws and embeds the next round.
    pub fn resume(&mut self, models: &mut Models, ctx: &WaveContext, results: Vec<SearchResult>) {
        assert_eq!(
            results.len(),
            self.pending.len(),
            "one search result per query"
        );
        let cfg = &ctx.config;
        let (round, seed) = (self.round, cfg.run.seed);
        let search_s = self.issued.elapsed().as_secs_f64();
        self.seconds.search += search_s;
        let search_ms = (search_s * 1000.0 / self.pending.len().max(1) as f64) as f32;
        // (item, image shown to the VLM next to the target)
        let mut synthetic: Vec<(usize, Option<Arc<RgbImage>>)> = Vec::new();
        let t = Instant::now();
        ctx.heartbeats.enter(self.worker, "encode", &self.ids);
        let (format, quality) = (cfg.output.image_format, cfg.output.jpeg_quality);
        for (p, found) in std::mem::take(&mut self.pending).into_iter().zip(results) {
            let item = &mut self.items[p.item];
            let cell = p.image.as_ref().map(|img| {
                let name = file_name(&item.id);
                let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name);
                let encoded = if ctx.overlap_encode {
                    let img = img.clone();
                    Encode::Running(ctx.runtime.spawn_blocking(move || {
                        let t = Instant::now();
                        let bytes = encode(&img, format, quality).map_err(|e| e.to_string());
                        (bytes, t.elapsed().as_secs_f64())
                    }))
                } else {
                    Encode::Done(encode(img, format, quality).map_err(|e| e.to_string()))
                };
                item.encoding.push((item.rows.len(), encoded));
                ImageCell {
                    bytes: vec![],
                    path: format!("{stem}_{round}.{}", format.extension()),
                }
            });
            // prediction feedback shows the top-1 retrieved real image
            let shown = match cfg.run.mode {
                Mode::Genir => p.image,
                Mode::Verbal => None,
                Mode::Prediction => match found.ids.first() {
                    Some(top) => {
                        let loaded = ctx
                            .runtime
                            .block_on(ctx.corpus_root.get(top))
                            .map_err(|e| e.to_string())
                            .and_then(|b| decode_rgb(top, &b).map_err(|e| e.to_string()));
                        match loaded {
                            Ok(im) => Some(Arc::new(im)),
                            Err(e) => {
                                item.failed = Some((
                                    round,
                                    format!("round {round} prediction feedback: {e}"),
                                ));
                                continue;
                            }
                        }
                    }
                    None => None,
                },
            };
            item.rows.push(Record {
                target_id: item.id.clone(),
                round,
                target_image: item.target_cell.clone(),
                query: item.query.clone(),
                feedback: item.feedback.clone(),
                synthetic_image: cell,
                retrieved_ids: found.ids,
                retrieved_scores: found.scores,
                target_rank: found.target_rank,
                hit_at_10: found.target_rank.map(|r| r < 10),
                status: RecordStatus::Ok,
                error: None,
                seed: call_seed(seed, &item.id, "generate", round),
                timings: StageTimings {
                    vlm_ms: item.pending_vlm_ms,
                    generate_ms: p.gen_ms,
                    embed_ms: p.embed_ms,
                    search_ms,
                },
            });
            synthetic.push((p.item, shown));
        }
        self.seconds.encode += t.elapsed().as_secs_f64();
        if round == self.last_round || synthetic.is_empty() {
            self.done = true;
            ctx.heartbeats.idle(self.worker);
            return;
        }
        self.compare_and_refine(models, ctx, synthetic);
        self.round += 1;
        self.draw_and_embed(models, ctx);
        ctx.heartbeats.idle(self.worker);
    }

    /// Compares target and feedback image (or critiques the caption), then refines.
    fn compare_and_refine(
        &mut self,
        models: &mut Models,
        ctx: &WaveContext,
        synthetic: Vec<(usize, Option<Arc<RgbImage>>)>,
    ) {
        let cfg = &ctx.config;
        let (round, seed) = (self.round, cfg.run.seed);
        let items = &mut self.items;
        let t = Instant::now();
        ctx.heartbeats.enter(self.worker, "compare", &self.ids);
        let reqs = match cfg.run.mode {
            Mode::Verbal => models.writer.critique_requests(
                &synthetic
                    .iter()
                    .map(|(i, _)| RefineItem {
                        target: items[*i].target.clone().expect("live items have targets"),
                        feedback: String::new(),
                        previous_caption: items[*i].query.clone().unwrap_or_default(),
                        seed: call_seed(seed, &items[*i].id, "compare", round),
                    })
                    .collect::<Vec<_>>(),
            ),
            _ => models.writer.compare_requests(
                &synthetic
                    .iter()
                    .map(|(i, img)| CompareItem {
                        target: items[*i].target.clone().expect("live items have targets"),
                        synthetic: img.clone().unwrap_or_else(|| {
                            items[*i].target.clone().expect("live items have targets")
                        }),
                        previous_caption: items[*i].query.clone().unwrap_or_default(),
                        seed: call_seed(seed, &items[*i].id, "compare", round),
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        let out = call_isolated(&models.kernels, &reqs, &mut |b| models.writer.run(b));
        let mut to_refine = Vec::new();
        for ((i, _), o) in synthetic.iter().zip(out) {
            match o {
                Ok(o) => to_refine.push((*i, o.text)),
                Err(e) => {
                    items[*i].failed = Some((round + 1, format!("round {round} compare: {e}")))
                }
            }
        }
        let refine: Vec<RefineItem> = to_refine
            .iter()
            .map(|(i, fb)| RefineItem {
                target: items[*i].target.clone().expect("live items have targets"),
                feedback: fb.clone(),
                previous_caption: items[*i].query.clone().unwrap_or_default(),
                seed: call_seed(seed, &items[*i].id, "refine", round),
            })
            .collect();
        let reqs = models.writer.refine_requests(&refine);
        ctx.heartbeats.enter(self.worker, "refine", &self.ids);
        let out = call_isolated(&models.kernels, &reqs, &mut |b| models.writer.run(b));
        self.seconds.vlm += t.elapsed().as_secs_f64();
        let per = t.elapsed().as_secs_f32() * 1000.0 / synthetic.len().max(1) as f32;
        for ((i, fb), o) in to_refine.into_iter().zip(out) {
            let item = &mut items[i];
            item.pending_vlm_ms = per;
            match o {
                Ok(o) => {
                    item.query = Some(o.text);
                    item.feedback = Some(fb);
                }
                Err(e) => item.failed = Some((round + 1, format!("round {round} refine: {e}"))),
            }
        }
    }

    /// Every row of the wave: `(rounds + 1)` per target in (target, round)
    /// order, with `failed` rows for rounds a failed target could not make.
    pub fn into_records(self) -> WaveRows {
        let last_round = self.last_round;
        let mut records = Vec::with_capacity(self.items.len() * (last_round as usize + 1));
        let mut encoding = Vec::new();
        for mut item in self.items {
            let base = records.len();
            encoding.extend(item.encoding.drain(..).map(|(at, e)| (base + at, e)));
            if let Some((at, reason)) = &item.failed {
                for round in item.rows.len() as i32..=last_round {
                    let error = if round == *at {
                        reason.clone()
                    } else {
                        format!("not run: the target failed at round {at} ({reason})")
                    };
                    let mut row = Record::failed(
                        &item.id,
                        round,
                        call_seed(self.seed, &item.id, "generate", round),
                        error,
                    );
                    row.target_image = item.target_cell.clone();
                    item.rows.push(row);
                }
            }
            records.extend(item.rows);
        }
        WaveRows { records, encoding }
    }
}

/// Makes every row of a wave against a whole (replicated) index:
/// `(rounds + 1) * ids.len()` records, in (target, round) order (encodes
/// may still run: see [`WaveRows::finish`]).
pub fn run_wave(
    models: &mut Models,
    ctx: &WaveContext,
    worker: usize,
    index: &CorpusIndex,
    ids: &[String],
) -> (WaveRows, StageSeconds) {
    let mut wave = Wave::start(models, ctx, worker, ids, &|id| index.contains(id));
    while !wave.is_done() {
        // the wave's queries in one pass over the index
        let queries: Vec<(Option<&str>, &[f32])> = wave
            .queries()
            .map(|(target, v)| (Some(target), v))
            .collect();
        let results = index.search_batch(&queries, ctx.config.run.top_k);
        wave.resume(models, ctx, results);
    }
    let seconds = wave.seconds.clone();
    (wave.into_records(), seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes land in their rows; one that failed makes only its own row
    /// `failed` (keeping the target image), whether it ran in place or not.
    #[test]
    fn overlapped_encodes_fill_their_rows_and_a_failed_one_fails_only_its_row() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let cell = |path: &str| ImageCell {
            bytes: vec![],
            path: path.into(),
        };
        let row = |round| {
            let mut r = Record::failed("t.jpg", round, 7, String::new());
            r.status = RecordStatus::Ok;
            r.error = None;
            r.target_image = Some(ImageCell {
                bytes: vec![1, 2],
                path: "t.jpg".into(),
            });
            r.synthetic_image = Some(cell(&format!("t_{round}.png")));
            r.query = Some(format!("query {round}"));
            r
        };
        let job = |out: Result<Vec<u8>, String>| {
            Encode::Running(runtime.spawn_blocking(move || (out, 0.5)))
        };
        let rows = WaveRows {
            records: vec![row(0), row(1), row(2), row(3)],
            encoding: vec![
                (0, job(Ok(vec![9, 9]))),
                (1, job(Err("disk full".into()))),
                (2, job(Ok(vec![8]))),
                // encoded in place: same rules, its time is not counted again
                (3, Encode::Done(Err("disk full".into()))),
            ],
        };
        let (records, seconds) = rows.finish(&runtime);
        assert_eq!(seconds, 1.5);
        assert_eq!(
            records[0].synthetic_image.as_ref().unwrap().bytes,
            vec![9, 9]
        );
        assert_eq!(records[0].status, RecordStatus::Ok);
        assert_eq!(records[2].synthetic_image.as_ref().unwrap().bytes, vec![8]);
        let failed = &records[1];
        assert_eq!(failed.status, RecordStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("round 1 encode: disk full"));
        assert!(failed.synthetic_image.is_none() && failed.query.is_none());
        assert_eq!(failed.target_image.as_ref().unwrap().bytes, vec![1, 2]);
        assert_eq!((failed.round, failed.seed), (1, 7));
        assert_eq!(records[3].status, RecordStatus::Failed);
        assert_eq!(
            records[3].error.as_deref(),
            Some("round 3 encode: disk full")
        );
    }

    #[test]
    fn isolation_keeps_good_items_when_one_fails() {
        let reqs = vec![1, 2, 3];
        let kernels = KernelPool::with_threads("test", 1);
        let out = call_isolated(&kernels, &reqs, &mut |b: &[i32]| {
            if b.contains(&2) && b.len() > 1 {
                return Err(WorkerError::Invalid("batch with 2".into()));
            }
            if b == [2] {
                panic!("item 2 is poison");
            }
            Ok(b.iter().map(|x| x * 10).collect())
        });
        assert_eq!(out[0], Ok(10));
        assert!(out[1].as_ref().unwrap_err().contains("poison"));
        assert_eq!(out[2], Ok(30));
    }
}
