//! Re-ranking a finished dataset with another retrieval view, for
//! `mirgen eval --retrieval text|fused`: the query text against the corpus,
//! or a fusion of image and text scores (DAR: score = w_img * s_img +
//! w_txt * s_txt, (0.2, 0.8) at round 0 and (0.5, 0.5) after).

use mirgen_schemas::{Record, RecordStatus};
use mirgen_workers::image_io::decode_rgb;

use crate::commit::STAGING;
use crate::config::LoadedConfig;
use crate::corpus::Corpus;
use crate::eval::RankRow;
use crate::index::CorpusIndex;
use crate::rounds::Models;
use crate::store::Location;
use crate::PipelineError;

/// Which view ranks the corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Retrieval {
    /// The ranks recorded in the dataset (the drawing in genir mode).
    Image,
    /// The query text.
    Text,
    /// Weighted sum of image and text scores.
    Fused,
}

/// Fusion weights (w_img, w_txt) at round 0 and at later rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FuseWeights {
    pub first: (f32, f32),
    pub later: (f32, f32),
}

impl Default for FuseWeights {
    /// DAR's weights.
    fn default() -> Self {
        FuseWeights {
            first: (0.2, 0.8),
            later: (0.5, 0.5),
        }
    }
}

impl FuseWeights {
    /// Parses `w_img0,w_txt0,w_img,w_txt`.
    pub fn parse(s: &str) -> Result<Self, PipelineError> {
        let v: Vec<f32> = s
            .split(',')
            .map(|x| x.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                PipelineError::Input(format!(
                    "--fuse-weights {s:?}: expected four numbers w_img0,w_txt0,w_img,w_txt"
                ))
            })?;
        if v.len() != 4 {
            return Err(PipelineError::Input(format!(
                "--fuse-weights {s:?}: expected four numbers w_img0,w_txt0,w_img,w_txt"
            )));
        }
        Ok(FuseWeights {
            first: (v[0], v[1]),
            later: (v[2], v[3]),
        })
    }
}

/// Parses ChatIR dialogs: `[{"img": path, "dialog": [strings]}]`.
pub fn parse_dialogs(
    spec: &str,
    value: &serde_json::Value,
) -> Result<Vec<(String, Vec<String>)>, PipelineError> {
    let bad = |i: usize, what: &str| {
        PipelineError::Input(format!(
            "{spec}: entry {i} {what} (ChatIR format: {{\"img\": path, \"dialog\": [strings]}})"
        ))
    };
    value
        .as_array()
        .ok_or_else(|| {
            PipelineError::Input(format!("{spec}: expected a JSON list of ChatIR dialogs"))
        })?
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let img = d
                .get("img")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad(i, "has no string \"img\""))?;
            let dialog = d
                .get("dialog")
                .and_then(|x| x.as_array())
                .ok_or_else(|| bad(i, "has no \"dialog\" list"))?
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(i, "has a non-string dialog turn"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((img.to_string(), dialog))
        })
        .collect()
}

/// ChatIR's protocol: at round t the query is the dialog's first t+1 turns
/// joined with ", ", ranked by text against the corpus of `cfg`.
pub fn rank_dialogs(
    cfg: &LoadedConfig,
    cache: &Location,
    dialogs: &[(String, Vec<String>)],
) -> Result<Vec<RankRow>, PipelineError> {
    let (index, mut models) = index_for(cfg, cache)?;
    let mut out = Vec::new();
    for (img, dialog) in dialogs {
        for t in 0..dialog.len() {
            let text = dialog[..=t].join(", ");
            let v = models.embedder.embed_texts(&[text])?.remove(0);
            out.push(RankRow {
                target_id: img.clone(),
                round: t as i32,
                rank: index.rank_of(&index.scores(&v), img),
            });
        }
    }
    Ok(out)
}

/// The corpus index of `cfg`'s corpus and embedder, cached under `cache`.
fn index_for(cfg: &LoadedConfig, cache: &Location) -> Result<(CorpusIndex, Models), PipelineError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Input(format!("cannot start the IO runtime: {e}")))?;
    let corpus = runtime.block_on(Corpus::load(cfg))?;
    let mut models = Models::build(&cfg.config, &mirgen_workers::Device::Cpu)?;
    let (index, _) = runtime.block_on(CorpusIndex::load_or_build(
        cache,
        &corpus,
        models.embedder.as_mut(),
        cfg.config.batch.index_batch,
        |_, _| {},
    ))?;
    Ok((index, models))
}

/// Ranks every ok row of `rows` with the embedder of `cfg` over its corpus
/// (index cached under the dataset's staging folder).
pub fn rescore(
    cfg: &LoadedConfig,
    dataset: &Location,
    rows: &[Record],
    retrieval: Retrieval,
    weights: FuseWeights,
) -> Result<Vec<RankRow>, PipelineError> {
    if retrieval == Retrieval::Image {
        return Ok(crate::commit::rank_rows(rows));
    }
    let staging = Location {
        prefix: dataset.path(STAGING),
        ..dataset.clone()
    };
    let (index, mut models) = index_for(cfg, &staging)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let rank = match (&r.query, r.status) {
            (Some(q), RecordStatus::Ok) => {
                let text = models
                    .embedder
                    .embed_texts(std::slice::from_ref(q))?
                    .remove(0);
                let text_scores = index.scores(&text);
                let scores = match (&r.synthetic_image, retrieval) {
                    (Some(cell), Retrieval::Fused) => {
                        let img = decode_rgb(&cell.path, &cell.bytes)?;
                        let image = models.embedder.embed_images(&[&img])?.remove(0);
                        let (wi, wt) = if r.round == 0 {
                            weights.first
                        } else {
                            weights.later
                        };
                        index
                            .scores(&image)
                            .iter()
                            .zip(&text_scores)
                            .map(|(si, st)| wi * si + wt * st)
                            .collect()
                    }
                    _ => text_scores,
                };
                index.rank_of(&scores, &r.target_id)
            }
            _ => None,
        };
        out.push(RankRow {
            target_id: r.target_id.clone(),
            round: r.round,
            rank,
        });
    }
    Ok(out)
}
