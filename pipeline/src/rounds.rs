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
    vlm::PaliGemmaStyleVlm,
    Embedder, GenerateRequest, ImageGenerator, QueryWriter, RgbImage, WorkerError,
};

use crate::config::{Config, Mode};
use crate::index::CorpusIndex;
use crate::store::Location;

/// The three roles, owned by one worker.
pub struct Models {
    pub writer: QueryWriter,
    pub generator: Box<dyn ImageGenerator>,
    pub embedder: Box<dyn Embedder>,
}

impl Models {
    /// Builds the configured models on `device`. Presets are seeded by the run seed.
    pub fn build(cfg: &Config, device: &mirgen_workers::Device) -> Result<Self, WorkerError> {
        let seed = cfg.run.seed;
        let m = &cfg.models;
        Ok(Models {
            writer: QueryWriter {
                vlm: Box::new(PaliGemmaStyleVlm::tiny(
                    seed,
                    m.vlm.sampling.clone(),
                    device,
                )?),
                prompts: cfg.prompts.clone(),
                budgets: m.vlm.max_new_tokens.clone(),
            },
            generator: Box::new(SdGenerator::tiny(seed, m.generator.diffusion(), device)?),
            embedder: Box::new(ClipEmbedder::tiny(seed, device)?),
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

/// What every wave needs besides the models (shared by a process's workers).
pub struct WaveContext {
    pub config: Config,
    pub corpus_root: Location,
    pub index: Arc<CorpusIndex>,
    pub runtime: Arc<tokio::runtime::Runtime>,
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
    pending_vlm_ms: f32,
}

/// Runs `call` on the whole batch; if it errs or panics, runs it item by item
/// so one bad item cannot fail its neighbours.
/// An item, its drawing (genir mode), and its retrieval vector.
type Embedded = (usize, Option<Arc<RgbImage>>, Result<Vec<f32>, String>);

/// A batched model call.
type BatchCall<'a, Q, O> = dyn FnMut(&[Q]) -> Result<Vec<O>, WorkerError> + 'a;

fn call_isolated<Q: Clone, O>(
    requests: &[Q],
    call: &mut BatchCall<'_, Q, O>,
) -> Vec<Result<O, String>> {
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

/// Makes every row of a wave: `(rounds + 1) * ids.len()` records, in (target, round) order.
pub fn run_wave(models: &mut Models, ctx: &WaveContext, ids: &[String]) -> Vec<Record> {
    let cfg = &ctx.config;
    let last_round = cfg.run.rounds as i32;
    let seed = cfg.run.seed;
    let mut items: Vec<Item> = ids
        .iter()
        .map(|id| {
            let mut item = Item { id: id.clone(), target_cell: None, target: None, query: None, feedback: None, failed: None, rows: vec![], pending_vlm_ms: 0.0 };
            let loaded = ctx
                .runtime
                .block_on(ctx.corpus_root.get(id))
                .map_err(|e| format!("cannot read target {id}: {e}"))
                .and_then(|bytes| {
                    let img = decode_rgb(id, &bytes).map_err(|e| format!("target image: {e}"))?;
                    Ok((bytes, img))
                });
            match loaded {
                Ok((bytes, img)) => {
                    item.target_cell = Some(ImageCell { bytes: bytes.to_vec(), path: file_name(id).to_string() });
                    item.target = Some(Arc::new(img));
                    if !ctx.index.contains(id) {
                        item.failed = Some((0, format!("target {id} is not in the corpus index, so it cannot be ranked (is it listed in the corpus?)")));
                    }
                }
                Err(e) => item.failed = Some((0, e)),
            }
            item
        })
        .collect();

    let live = |items: &[Item]| -> Vec<usize> {
        (0..items.len())
            .filter(|&i| items[i].failed.is_none())
            .collect()
    };

    // round 0 query: caption the target
    let idx = live(&items);
    let reqs = models.writer.caption_requests(
        &idx.iter()
            .map(|&i| {
                (
                    items[i].target.clone().expect("live items have targets"),
                    call_seed(seed, &items[i].id, "caption", 0),
                )
            })
            .collect::<Vec<_>>(),
    );
    let t = Instant::now();
    let out = call_isolated(&reqs, &mut |b| models.writer.run(b));
    let per = t.elapsed().as_secs_f32() * 1000.0 / idx.len().max(1) as f32;
    for (&i, o) in idx.iter().zip(out) {
        items[i].pending_vlm_ms = per;
        match o {
            Ok(o) => items[i].query = Some(o.text),
            Err(e) => items[i].failed = Some((0, format!("round 0 caption: {e}"))),
        }
    }

    for round in 0..=last_round {
        let idx = live(&items);
        // The retrieval vector of each live item and, in genir mode, its drawing.
        let mut gen_ms = 0.0;
        let embedded: Vec<Embedded>;
        let t = Instant::now();
        match cfg.run.mode {
            Mode::Genir => {
                let reqs: Vec<GenerateRequest> = idx
                    .iter()
                    .map(|&i| GenerateRequest {
                        prompt: items[i].query.clone().unwrap_or_default(),
                        seed: call_seed(seed, &items[i].id, "generate", round),
                        init_latents: None,
                    })
                    .collect();
                let out = call_isolated(&reqs, &mut |b| models.generator.generate(b));
                gen_ms = t.elapsed().as_secs_f32() * 1000.0 / idx.len().max(1) as f32;
                let mut drawn: Vec<(usize, Arc<RgbImage>)> = Vec::new();
                for (&i, o) in idx.iter().zip(out) {
                    match o {
                        Ok(img) => drawn.push((i, Arc::new(img))),
                        Err(e) => {
                            items[i].failed = Some((round, format!("round {round} generate: {e}")))
                        }
                    }
                }
                let images: Vec<&RgbImage> = drawn.iter().map(|(_, img)| img.as_ref()).collect();
                let out = call_isolated(&images, &mut |b| models.embedder.embed_images(b));
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
                    .map(|&i| items[i].query.clone().unwrap_or_default())
                    .collect();
                let out = call_isolated(&texts, &mut |b| models.embedder.embed_texts(b));
                embedded = idx
                    .iter()
                    .copied()
                    .zip(out)
                    .map(|(i, v)| (i, None, v))
                    .collect();
            }
        }
        let embed_ms = (t.elapsed().as_secs_f32() * 1000.0 - gen_ms * idx.len() as f32).max(0.0)
            / idx.len().max(1) as f32;
        // (item, image shown to the VLM next to the target)
        let mut synthetic: Vec<(usize, Option<Arc<RgbImage>>)> = Vec::new();
        for (i, img, vector) in embedded {
            let item = &mut items[i];
            let vector = match vector {
                Ok(v) => v,
                Err(e) => {
                    item.failed = Some((round, format!("round {round} embed: {e}")));
                    continue;
                }
            };
            let t = Instant::now();
            let found = ctx.index.search(&vector, cfg.run.top_k, Some(&item.id));
            let search_ms = t.elapsed().as_secs_f32() * 1000.0;
            let cell = match &img {
                Some(img) => match encode(img, cfg.output.image_format, cfg.output.jpeg_quality) {
                    Ok(bytes) => {
                        let ext = cfg.output.image_format.extension();
                        let name = file_name(&item.id);
                        let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name);
                        Some(ImageCell {
                            bytes,
                            path: format!("{stem}_{round}.{ext}"),
                        })
                    }
                    Err(e) => {
                        item.failed = Some((round, format!("round {round} encode: {e}")));
                        continue;
                    }
                },
                None => None,
            };
            // prediction feedback shows the top-1 retrieved real image
            let shown = match cfg.run.mode {
                Mode::Genir => img,
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
                    generate_ms: gen_ms,
                    embed_ms,
                    search_ms,
                },
            });
            synthetic.push((i, shown));
        }
        if round == last_round {
            break;
        }
        // compare target and feedback image (or critique the caption), then refine
        let t = Instant::now();
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
        let out = call_isolated(&reqs, &mut |b| models.writer.run(b));
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
        let out = call_isolated(&reqs, &mut |b| models.writer.run(b));
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

    let mut records = Vec::with_capacity(items.len() * (last_round as usize + 1));
    for mut item in items {
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
                    call_seed(seed, &item.id, "generate", round),
                    error,
                );
                row.target_image = item.target_cell.clone();
                item.rows.push(row);
            }
        }
        records.extend(item.rows);
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_keeps_good_items_when_one_fails() {
        let reqs = vec![1, 2, 3];
        let out = call_isolated(&reqs, &mut |b: &[i32]| {
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
