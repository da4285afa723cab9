//! The corpus (search space) and the targets drawn from it.
//!
//! Corpus ids are image paths relative to the corpus root, exactly as ChatIR's
//! `Search_Space_val_50k.json` writes them (`unlabeled2017/000000000008.jpg`).

use std::collections::HashSet;

use mirgen_workers::seed::derive_seed;

use crate::config::{LoadedConfig, TargetsConfig};
use crate::store::Location;
use crate::PipelineError;

/// File endings taken as images when a corpus folder is listed.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

pub struct Corpus {
    pub root: Location,
    /// Corpus ids in a stable order (the list's order, or sorted listing).
    pub ids: Vec<String>,
    /// Object sizes when known from a listing (part of the index cache key).
    pub sizes: Vec<Option<u64>>,
}

fn is_image_key(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    !name.starts_with('.')
        && name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// Reads a JSON file given as a local path or object-store URL.
pub async fn read_json_file(spec: &str) -> Result<serde_json::Value, PipelineError> {
    let bytes = if spec.contains("://") && !spec.starts_with("file://") {
        let (dir, name) = spec
            .rsplit_once('/')
            .ok_or_else(|| PipelineError::Input(format!("{spec}: not a file URL")))?;
        Location::open(dir, false)?.get(name).await?.to_vec()
    } else {
        std::fs::read(spec.strip_prefix("file://").unwrap_or(spec))
            .map_err(|e| PipelineError::Input(format!("cannot read {spec}: {e}")))?
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| PipelineError::Input(format!("{spec} is not valid JSON: {e}")))
}

/// Parses ChatIR's search-space format: a flat JSON list of relative paths.
pub fn parse_path_list(
    spec: &str,
    value: &serde_json::Value,
) -> Result<Vec<String>, PipelineError> {
    let arr = value.as_array().ok_or_else(|| {
        PipelineError::Input(format!("{spec}: expected a JSON list of image paths"))
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                PipelineError::Input(format!("{spec}: entry {i} is not a string path: {v}"))
            })
        })
        .collect()
}

/// Parses a target list: ChatIR queries (`{"img": path, "dialog": [...]}`) or plain paths.
pub fn parse_target_list(
    spec: &str,
    value: &serde_json::Value,
) -> Result<Vec<String>, PipelineError> {
    let arr = value
        .as_array()
        .ok_or_else(|| PipelineError::Input(format!("{spec}: expected a JSON list of targets")))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Object(o) => o
                .get("img")
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    PipelineError::Input(format!(
                        "{spec}: entry {i} has no string field \"img\" (ChatIR query format)"
                    ))
                }),
            _ => Err(PipelineError::Input(format!(
                "{spec}: entry {i} is neither a path nor a ChatIR query: {v}"
            ))),
        })
        .collect()
}

impl Corpus {
    pub async fn load(cfg: &LoadedConfig) -> Result<Self, PipelineError> {
        let c = &cfg.config.corpus;
        let root_spec = cfg.resolve(&c.root);
        let root = Location::open(&root_spec, false)
            .map_err(|e| PipelineError::Input(format!("corpus.root: {e}")))?;
        let (ids, sizes) = match &c.list {
            Some(list) => {
                let spec = cfg.resolve(list);
                let ids = parse_path_list(&spec, &read_json_file(&spec).await?)?;
                let n = ids.len();
                (ids, vec![None; n])
            }
            None => {
                let listing = root.list("").await?;
                listing
                    .into_iter()
                    .filter(|(k, _)| is_image_key(k))
                    .map(|(k, s)| (k, Some(s)))
                    .unzip()
            }
        };
        let mut seen = HashSet::new();
        if let Some(dup) = ids.iter().find(|id| !seen.insert(*id)) {
            return Err(PipelineError::Input(format!(
                "corpus lists {dup} twice; corpus ids must be unique"
            )));
        }
        if ids.is_empty() {
            return Err(PipelineError::Input(format!(
                "corpus {root_spec} has no images (looked for files ending in {})",
                IMAGE_EXTENSIONS.join(", ")
            )));
        }
        Ok(Corpus { root, ids, sizes })
    }

    /// The targets of the job, in a stable order, without duplicates.
    pub async fn targets(&self, cfg: &LoadedConfig) -> Result<Vec<String>, PipelineError> {
        let mut targets = match &cfg.config.targets {
            TargetsConfig::Corpus => self.ids.clone(),
            TargetsConfig::Sample { count } => {
                let mut keyed: Vec<(u64, &String)> = self
                    .ids
                    .iter()
                    .map(|id| (derive_seed(cfg.config.run.seed, &["target-sample", id]), id))
                    .collect();
                keyed.sort();
                let mut picked: Vec<String> = keyed
                    .into_iter()
                    .take(*count)
                    .map(|(_, id)| id.clone())
                    .collect();
                picked.sort();
                picked
            }
            TargetsConfig::List { path, limit } => {
                let spec = cfg.resolve(path);
                let mut t = parse_target_list(&spec, &read_json_file(&spec).await?)?;
                if let Some(l) = limit {
                    t.truncate(*l);
                }
                t
            }
        };
        let mut seen = HashSet::new();
        targets.retain(|t| seen.insert(t.clone()));
        if targets.is_empty() {
            return Err(PipelineError::Input("the job has no targets".into()));
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatir(name: &str) -> Option<serde_json::Value> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/chatir")
            .join(name);
        let text = std::fs::read_to_string(p).ok()?;
        Some(serde_json::from_str(&text).unwrap())
    }

    #[test]
    fn reads_the_real_chatir_files() {
        let (Some(space), Some(queries)) = (
            chatir("Search_Space_val_50k.json"),
            chatir("VisDial_v1.0_queries_val.json"),
        ) else {
            panic!("../shared/data/chatir is missing: the ChatIR protocol files must sit beside the checkout");
        };
        let ids = parse_path_list("space", &space).unwrap();
        assert_eq!(ids.len(), 50_000);
        assert!(ids[0].starts_with("unlabeled2017/") && ids[0].ends_with(".jpg"));
        let targets = parse_target_list("queries", &queries).unwrap();
        assert_eq!(targets.len(), 2_064);
        let space: HashSet<&String> = ids.iter().collect();
        assert!(
            targets.iter().all(|t| space.contains(t)),
            "every VisDial target is in the 50k search space"
        );
    }

    #[test]
    fn malformed_lists_name_the_entry() {
        let e = parse_target_list(
            "q.json",
            &serde_json::json!([{"img": "a.jpg"}, {"image": "b.jpg"}]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("q.json") && e.contains("entry 1"), "{e}");
        let e = parse_path_list("s.json", &serde_json::json!({"a": 1}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("s.json"), "{e}");
        assert!(
            is_image_key("a/B.JPG")
                && !is_image_key("LICENSES.md")
                && !is_image_key("a/.hidden.jpg")
        );
    }
}
