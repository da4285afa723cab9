//! The job configuration (TOML). What the job does lives here; how the
//! process runs (workers, processes, device, output location, progress)
//! lives in CLI flags. Unknown keys are errors.

use std::path::{Path, PathBuf};

use mirgen_workers::{
    generator::DiffusionSettings, image_io::ImageEncoding, roles::TokenBudgets, Prompts,
    SamplingConfig,
};
use serde::{Deserialize, Serialize};

/// Errors in the configuration, each naming the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

/// A whole job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub corpus: CorpusConfig,
    #[serde(default)]
    pub targets: TargetsConfig,
    pub models: ModelsConfig,
    /// Prompt templates (defaults: GenIR's prompts).
    #[serde(default)]
    pub prompts: Prompts,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub batch: BatchConfig,
}

/// The round loop.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Last round R: rounds 0..=R are made (GenIR: 10, i.e. 11 rounds).
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// Base seed; every model call's seed derives from it, the target id and the round.
    #[serde(default)]
    pub seed: u64,
    /// How many retrieved ids/scores each row keeps.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Feedback mode: `genir` (the VLM sees a drawing of the query; retrieval
    /// by the drawing), or the paper's baselines `verbal` (the VLM critiques
    /// its own caption, no image; retrieval by the query text) and
    /// `prediction` (the VLM sees the top-1 retrieved real image; retrieval by
    /// the query text).
    #[serde(default)]
    pub mode: Mode,
}

/// Feedback modes (GenIR and its baselines).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Genir,
    Verbal,
    Prediction,
}

fn default_rounds() -> u32 {
    10
}
fn default_top_k() -> usize {
    10
}

/// The search space.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// A folder or object-store URL (`s3://bucket/prefix`, `gs://…`, `az://…`)
    /// holding the images. Relative paths are relative to the config file.
    pub root: String,
    /// Optional JSON list of image paths relative to `root` (ChatIR's
    /// `Search_Space_val_50k.json` format). Without it every image file
    /// under `root` (recursively) is in the corpus.
    #[serde(default)]
    pub list: Option<String>,
}

/// Which corpus images become targets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, tag = "source", rename_all = "lowercase")]
pub enum TargetsConfig {
    /// Every corpus image is a target.
    #[default]
    Corpus,
    /// A seeded sample of `count` corpus images.
    Sample { count: usize },
    /// A JSON list of targets: ChatIR queries (`[{"img": path, "dialog": [...]}]`)
    /// or plain paths; paths are corpus ids.
    List {
        path: String,
        /// Use only the first `limit` entries.
        #[serde(default)]
        limit: Option<usize>,
    },
}

/// The three models.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub vlm: VlmConfig,
    pub generator: GeneratorConfig,
    pub embedder: EmbedderConfig,
}

/// The query writer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VlmConfig {
    /// `tiny`: smoke-test PaliGemma-style model with random weights (its text
    /// is noise); `simulation`: no model, hashed stand-in text (pipeline
    /// tests). Give either `preset` or `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`)
    /// in the Hugging Face layout: a folder (relative to this config file) or
    /// Hub id `owner/name[@revision]`, e.g. `google/gemma-3-4b-it` (GenIR's
    /// default). Try one with `mirgen vlm --model ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `model` with a relative folder resolved against the config's folder.
    #[serde(skip)]
    pub resolved_model: Option<String>,
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// Max new tokens per call (GenIR: caption 500, compare 400).
    #[serde(default)]
    pub max_new_tokens: TokenBudgets,
}

/// The image generator.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// `tiny`: smoke-test latent diffusion model (64x64) with random weights;
    /// `simulation`: no model, 16x16 hash-coloured images (pipeline tests).
    /// Give either `preset` or `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A diffusers pipeline folder (relative to this config file) or Hub id
    /// `owner/name[@revision]`: SD-Turbo and Stable Diffusion 1.x/2.x-style
    /// `StableDiffusionPipeline` checkpoints with an Euler discrete
    /// scheduler (e.g. `stabilityai/sd-turbo` with steps = 1, guidance = 0).
    /// Try one with `mirgen generate --model ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `model` with a relative folder resolved against the config's folder.
    #[serde(skip)]
    pub resolved_model: Option<String>,
    /// Denoising steps (GenIR's SD 3.5 default: 28).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Classifier-free guidance scale (GenIR: 3.5); <= 1 disables guidance.
    #[serde(default = "default_guidance")]
    pub guidance: f64,
}

fn default_steps() -> usize {
    28
}
fn default_guidance() -> f64 {
    3.5
}

impl VlmConfig {
    /// The preset name, or `model` for a checkpoint.
    pub fn kind(&self) -> &str {
        self.preset.as_deref().unwrap_or("model")
    }
}

impl GeneratorConfig {
    /// The preset name, or `model` for a checkpoint.
    pub fn kind(&self) -> &str {
        self.preset.as_deref().unwrap_or("model")
    }

    pub fn diffusion(&self) -> DiffusionSettings {
        DiffusionSettings {
            steps: self.steps,
            guidance: self.guidance,
        }
    }
}

/// The retrieval encoder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbedderConfig {
    /// `tiny`: smoke-test CLIP with random weights; `simulation`: no model,
    /// hashed unit vectors (pipeline tests). Give either `preset` or `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A retrieval checkpoint in the Hugging Face layout: a folder (relative
    /// to this config file) or a Hub id `owner/name[@revision]` (downloaded
    /// into the Hugging Face cache; pin a revision so reruns embed alike).
    /// Architectures: CLIP, SigLIP, BLIP (ITC) and BLIP-2 (ITC), picked by
    /// `config.json`'s `model_type`. Try one with `mirgen embed --model ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `model` with a relative folder resolved against the config's folder
    /// (filled in when the config is loaded; not part of the config hash).
    #[serde(skip)]
    pub resolved_model: Option<String>,
}

impl EmbedderConfig {
    /// The preset name, or `model` for a checkpoint.
    pub fn kind(&self) -> &str {
        match (&self.preset, &self.model) {
            (Some(p), _) => p,
            _ => "model",
        }
    }
}

/// How records are stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Encoding of synthetic images.
    #[serde(default = "default_format")]
    pub image_format: ImageEncoding,
    /// JPEG quality (1..=100).
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    /// Rows per Parquet row group (the Hub viewer reads one at a time).
    #[serde(default = "default_row_group")]
    pub row_group_rows: usize,
    /// Rows per final data file.
    #[serde(default = "default_shard_rows")]
    pub shard_rows: usize,
    /// Dataset name on the card.
    #[serde(default = "default_name")]
    pub pretty_name: String,
    /// Licence id for the card (the corpus images decide it).
    #[serde(default = "default_license")]
    pub license: String,
    /// Text for the card about the corpus' origin and licences.
    #[serde(default)]
    pub corpus_note: String,
}

fn default_format() -> ImageEncoding {
    ImageEncoding::Png
}
fn default_quality() -> u8 {
    90
}
fn default_row_group() -> usize {
    100
}
fn default_shard_rows() -> usize {
    5000
}
fn default_name() -> String {
    "mirgen MIR dataset".into()
}
fn default_license() -> String {
    "other".into()
}

impl Default for OutputConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// Batching and memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Targets in flight per worker (one wave); all of a wave's items go
    /// through each stage as one batch. Also the unit of commit.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Waves a worker keeps in flight when the index is sharded: while one
    /// waits for the shards' search answers the worker computes another.
    #[serde(default = "default_waves_in_flight")]
    pub waves_in_flight: usize,
    /// Images per embedder call when indexing the corpus.
    #[serde(default = "default_index_batch")]
    pub index_batch: usize,
}

fn default_window() -> usize {
    8
}
fn default_waves_in_flight() -> usize {
    2
}
fn default_index_batch() -> usize {
    16
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            window: default_window(),
            waves_in_flight: default_waves_in_flight(),
            index_batch: default_index_batch(),
        }
    }
}

/// Checks that a role names exactly one of `preset` and `model`, and
/// resolves a relative `model` folder against the config's folder (a Hub id
/// stays as written).
fn checkpoint(
    role: &str,
    preset: &Option<String>,
    model: &Option<String>,
    example: &str,
    base: &Path,
) -> Result<Option<String>, String> {
    match (preset, model) {
        (Some(_), Some(_)) => Err(format!(
            "{role}: give either `preset` (tiny, simulation) or `model` (a Hugging Face folder or hub id), not both"
        )),
        (None, None) => Err(format!(
            "{role}: missing `preset` (tiny, simulation) or `model` (a Hugging Face folder or hub id such as \"{example}\")"
        )),
        (None, Some(m)) => {
            let local = base.join(m);
            Ok(Some(
                if !Path::new(m).is_absolute() && !m.starts_with("hf:") && local.exists() {
                    local.display().to_string()
                } else {
                    m.clone()
                },
            ))
        }
        (Some(_), None) => Ok(None),
    }
}

/// A parsed config and the folder its relative paths are relative to.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: Config,
    pub path: PathBuf,
    pub base_dir: PathBuf,
}

impl LoadedConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        };
        config
            .prompts
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        if config.batch.window == 0 {
            return Err(invalid("batch.window must be at least 1".into()));
        }
        if config.output.shard_rows == 0 || config.output.row_group_rows == 0 {
            return Err(invalid(
                "output.shard_rows and output.row_group_rows must be at least 1".into(),
            ));
        }
        if config.run.top_k == 0 {
            return Err(invalid("run.top_k must be at least 1".into()));
        }
        let mut config = config;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let m = &mut config.models;
        m.embedder.resolved_model = checkpoint(
            "models.embedder",
            &m.embedder.preset,
            &m.embedder.model,
            "Salesforce/blip-itm-base-coco",
            &base,
        )
        .map_err(invalid)?;
        m.vlm.resolved_model = checkpoint(
            "models.vlm",
            &m.vlm.preset,
            &m.vlm.model,
            "google/gemma-3-4b-it",
            &base,
        )
        .map_err(invalid)?;
        m.generator.resolved_model = checkpoint(
            "models.generator",
            &m.generator.preset,
            &m.generator.model,
            "stabilityai/sd-turbo",
            &base,
        )
        .map_err(invalid)?;
        for (role, preset) in [
            (
                "models.vlm",
                config.models.vlm.preset.as_deref().unwrap_or("tiny"),
            ),
            (
                "models.generator",
                config.models.generator.preset.as_deref().unwrap_or("tiny"),
            ),
            (
                "models.embedder",
                config.models.embedder.preset.as_deref().unwrap_or("tiny"),
            ),
        ] {
            if preset != "tiny" && preset != "simulation" {
                return Err(invalid(format!(
                    "{role}.preset = {preset:?}: this version implements only the `tiny` smoke-test preset \
                     and the `simulation` stand-ins (real checkpoints: see the open model issues)"
                )));
            }
        }
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(LoadedConfig {
            config,
            path: path.to_path_buf(),
            base_dir,
        })
    }

    /// Resolves a config path or URL: URLs as they are, relative paths
    /// against the config file's folder.
    pub fn resolve(&self, p: &str) -> String {
        if p.contains("://") || Path::new(p).is_absolute() {
            p.to_string()
        } else {
            self.base_dir.join(p).display().to_string()
        }
    }

    /// True when any model is a smoke-test preset.
    pub fn smoke_test(&self) -> bool {
        let m = &self.config.models;
        [m.vlm.kind(), m.generator.kind(), m.embedder.kind()]
            .iter()
            .any(|p| *p == "tiny" || *p == "simulation")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[run]
rounds = 2
[corpus]
root = "imgs"
[models.vlm]
preset = "tiny"
[models.generator]
preset = "tiny"
steps = 2
guidance = 1.0
[models.embedder]
preset = "tiny"
"#;

    #[test]
    fn minimal_config_gets_genir_defaults() {
        let c = LoadedConfig::parse(MINIMAL, Path::new("/x/job.toml")).unwrap();
        assert_eq!(c.config.run.top_k, 10);
        assert_eq!(c.config.models.vlm.sampling.temperature, 0.7);
        assert_eq!(c.config.models.vlm.max_new_tokens.caption, 500);
        assert_eq!(c.config.targets, TargetsConfig::Corpus);
        assert_eq!(c.resolve("imgs"), "/x/imgs");
        assert_eq!(c.resolve("s3://b/p"), "s3://b/p");
        assert!(c.smoke_test());
    }

    #[test]
    fn embedder_is_a_preset_or_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blip")).unwrap();
        let path = dir.path().join("job.toml");
        let with = |embedder: &str| {
            MINIMAL.replacen(
                "[models.embedder]\npreset = \"tiny\"",
                &format!("[models.embedder]\n{embedder}"),
                1,
            )
        };
        // a folder next to the config resolves against the config's folder
        let c = LoadedConfig::parse(&with("model = \"blip\""), &path).unwrap();
        let e = &c.config.models.embedder;
        assert_eq!(
            e.resolved_model.as_deref(),
            Some(dir.path().join("blip").to_str().unwrap())
        );
        assert_eq!(e.kind(), "model");
        // a hub id stays as written
        let c = LoadedConfig::parse(
            &with("model = \"Salesforce/blip-itm-base-coco@main\""),
            &path,
        )
        .unwrap();
        assert_eq!(
            c.config.models.embedder.resolved_model.as_deref(),
            Some("Salesforce/blip-itm-base-coco@main")
        );
        // the hash input of a preset config is unchanged by the new fields
        let c = LoadedConfig::parse(MINIMAL, &path).unwrap();
        assert_eq!(
            serde_json::to_value(&c.config.models.embedder).unwrap(),
            serde_json::json!({"preset": "tiny"})
        );
        for bad in ["model = \"blip\"\npreset = \"tiny\"", ""] {
            let e = LoadedConfig::parse(&with(bad), &path)
                .unwrap_err()
                .to_string();
            assert!(e.contains("models.embedder") && e.contains("model"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = LoadedConfig::parse(
            &format!("{MINIMAL}\n[batch]\nwindoww = 3\n"),
            Path::new("job.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("job.toml") && e.contains("windoww"), "{e}");
        let e = LoadedConfig::parse(
            &MINIMAL.replace("rounds = 2", "rounds = 2\nfoo = 1"),
            Path::new("job.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("foo"), "{e}");
        let e = LoadedConfig::parse(
            &format!("{MINIMAL}\n[prompts]\ncompare = \"{{nope}}\"\n"),
            Path::new("job.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("{nope}"), "{e}");
        let e = LoadedConfig::parse(
            &MINIMAL.replacen("preset = \"tiny\"", "preset = \"gemma-3-4b\"", 1),
            Path::new("job.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("models.vlm.preset") && e.contains("gemma-3-4b"),
            "{e}"
        );
    }
}
