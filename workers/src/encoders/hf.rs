//! Loading retrieval encoders from Hugging Face checkpoints: a local folder
//! in the Hub layout, or a Hub id (`owner/name`, optionally `@revision`)
//! downloaded into the Hugging Face cache.
//!
//! A folder holds `config.json` (its `model_type` picks the architecture),
//! `model.safetensors` or a sharded `model.safetensors.index.json`,
//! `tokenizer.json` (+ optional `tokenizer_config.json`) and
//! `preprocessor_config.json`. Every error names the file and the fix.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::clip::{ClipConfig, ClipModel};
use super::layers::{Act, TowerConfig};
use super::siglip::{SiglipConfig, SiglipModel};
use crate::preprocess::ImageProcessor;
use crate::{Embedder, ModelInfo, Result, RgbImage, WorkerError};

pub(crate) fn load_err(msg: String) -> WorkerError {
    WorkerError::Load(msg)
}

/// A candle error's message without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set, and without a repeated file path.
pub(crate) fn plain(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(*inner),
        candle_core::Error::WithPath { inner, .. } => plain(*inner),
        e => e.to_string(),
    }
}

// ------------------------------------------------------------------ config

/// A JSON object of a model folder (or a sub-object of it) whose errors
/// name the file and the key.
#[derive(Clone, Debug)]
pub struct ConfigReader {
    value: Value,
    file: PathBuf,
    prefix: String,
}

impl ConfigReader {
    /// Reads `dir/name`.
    pub fn read(dir: &Path, name: &str) -> Result<Self> {
        Ok(ConfigReader {
            value: read_json(dir, name)?,
            file: dir.join(name),
            prefix: String::new(),
        })
    }

    pub fn from_value(value: Value, file: &Path) -> Self {
        ConfigReader {
            value,
            file: file.to_path_buf(),
            prefix: String::new(),
        }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// An error about this object: "FILE: key.path: msg".
    pub fn error(&self, msg: String) -> WorkerError {
        load_err(format!("{}: {}{msg}", self.file.display(), self.prefix))
    }

    /// A nested object (`text_config`, ...); absent means all defaults.
    pub fn sub(&self, key: &str) -> Result<ConfigReader> {
        let v = &self.value[key];
        if !(v.is_null() || v.is_object()) {
            return Err(self.error(format!("{key} must be an object")));
        }
        Ok(ConfigReader {
            value: if v.is_null() {
                Value::Object(Default::default())
            } else {
                v.clone()
            },
            file: self.file.clone(),
            prefix: format!("{}{key}.", self.prefix),
        })
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.value[key].as_str()
    }

    /// An unsigned integer; `null` or absent gives `None`.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match &self.value[key] {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.error(format!("{key} = {v} is not a non-negative integer"))),
        }
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match &self.value[key] {
            Value::Null => Ok(default),
            v => v
                .as_f64()
                .ok_or_else(|| self.error(format!("{key} = {v} is not a number"))),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match &self.value[key] {
            Value::Null => Ok(default),
            v => v
                .as_bool()
                .ok_or_else(|| self.error(format!("{key} = {v} is not true/false"))),
        }
    }

    /// A transformer tower's sizes (`hidden_size`, `intermediate_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `hidden_act`,
    /// `layer_norm_eps`) with the given defaults.
    pub fn tower(
        &self,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        act: &str,
        eps: f64,
    ) -> Result<TowerConfig> {
        let act_name = self.str("hidden_act").unwrap_or(act);
        let act = Act::parse(act_name).ok_or_else(|| {
            self.error(format!(
                "hidden_act = {act_name:?} is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu, silu are)"
            ))
        })?;
        let c = TowerConfig {
            hidden_size: self.usize("hidden_size", hidden)?,
            intermediate_size: self.usize("intermediate_size", intermediate)?,
            num_hidden_layers: self.usize("num_hidden_layers", layers)?,
            num_attention_heads: self.usize("num_attention_heads", heads)?,
            layer_norm_eps: self.f64("layer_norm_eps", eps)?,
            act,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(self.error(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(c)
    }
}

/// A file that marks a checkpoint folder as random weights made for tests
/// (the parity fixtures): models loaded from it report `smoke_test`, so
/// manifests, cards and run notes never present them as working models.
pub const RANDOM_WEIGHTS_MARKER: &str = "RANDOM_WEIGHTS.md";

/// Whether `dir` holds the [`RANDOM_WEIGHTS_MARKER`].
pub fn has_random_weights(dir: &Path) -> bool {
    dir.join(RANDOM_WEIGHTS_MARKER).is_file()
}

/// Reads a JSON file of the folder, naming it in errors.
pub fn read_json(dir: &Path, name: &str) -> Result<Value> {
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).map_err(|e| {
        load_err(format!(
            "{}: {e} (a Hugging Face model folder needs {name}; copy or download the whole repository)",
            p.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| load_err(format!("{}: not valid JSON ({e})", p.display())))
}

// ------------------------------------------------------------------ where

/// Where a model spec points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder.
    Folder(PathBuf),
    /// A Hub repository id and optional revision (branch, tag or commit).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

/// Parses a model spec: an existing path is a folder; `hf:owner/name[@rev]`
/// or a bare `owner/name[@rev]` that is not a local path is a Hub id.
pub fn parse_spec(spec: &str) -> ModelSource {
    let hub = |s: &str| {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r.to_string(), Some(rev.to_string())),
            None => (s.to_string(), None),
        };
        ModelSource::Hub { repo, revision }
    };
    if let Some(rest) = spec
        .strip_prefix("hf://")
        .or_else(|| spec.strip_prefix("hf:"))
    {
        return hub(rest);
    }
    let path = Path::new(spec);
    if path.exists() {
        return ModelSource::Folder(path.to_path_buf());
    }
    let repo = spec.split('@').next().unwrap_or("");
    let looks_like_id = !spec.starts_with(['.', '/', '~'])
        && repo.matches('/').count() == 1
        && repo.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if looks_like_id {
        hub(spec)
    } else {
        ModelSource::Folder(path.to_path_buf())
    }
}

/// Files fetched from the Hub for an encoder.
const HUB_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
];

/// The local folder of a spec (downloading Hub ids into the Hugging Face
/// cache, `HF_HOME` / `HF_HUB_CACHE`; `HF_TOKEN` for gated repositories)
/// and a label for `ModelInfo::source` (`hub:owner/name@<commit>`).
pub fn resolve(spec: &str) -> Result<(PathBuf, String)> {
    match parse_spec(spec) {
        ModelSource::Folder(dir) => {
            if !dir.is_dir() {
                return Err(load_err(format!(
                    "{}: no such folder (a model is a local folder in the Hugging Face layout or a Hub id such as \
                     openai/clip-vit-base-patch16[@revision])",
                    dir.display()
                )));
            }
            Ok((dir.clone(), dir.display().to_string()))
        }
        ModelSource::Hub { repo, revision } => {
            let (owner, name) = repo.split_once('/').unwrap_or(("", repo.as_str()));
            let fail = |e: String| {
                load_err(format!(
                    "{spec}: downloading from the Hugging Face Hub failed ({e}); check the id and revision, the network, \
                     and HF_TOKEN for gated repositories, or pass a local folder"
                ))
            };
            let client = hf_hub::HFClientSync::new().map_err(|e| fail(e.to_string()))?;
            let dir = client
                .model(owner, name)
                .snapshot_download()
                .maybe_revision(revision.clone())
                .allow_patterns(HUB_FILES.iter().map(|s| s.to_string()).collect())
                .send()
                .map_err(|e| fail(e.to_string()))?;
            let commit = dir
                .file_name()
                .map(|c| c.to_string_lossy().to_string())
                .filter(|c| c.len() == 40 && c.chars().all(|x| x.is_ascii_hexdigit()))
                .or(revision)
                .unwrap_or_else(|| "main".into());
            Ok((dir, format!("hub:{repo}@{commit}")))
        }
    }
}

// ------------------------------------------------------------------ weights

/// The safetensors files of the folder (one file or the shards of an index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(dir, "model.safetensors.index.json")?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| load_err(format!("{}: no weight_map object", index.display())))?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(load_err(format!(
                "{}: listed in {} but missing; download all the shards",
                missing.display(),
                index.display()
            )));
        }
        return Ok(files);
    }
    let bin = dir.join("pytorch_model.bin");
    Err(load_err(format!(
        "{}: no model.safetensors or model.safetensors.index.json{} (convert the weights: \
         transformers `AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)",
        dir.display(),
        if bin.exists() {
            " (only pytorch_model.bin, which mirgen does not read)"
        } else {
            ""
        }
    )))
}

/// A VarBuilder (f32) over the folder's weights, and a label naming the
/// weight file(s) for errors. Each file's header is checked first, so a
/// truncated or corrupt file is named.
pub fn var_builder(dir: &Path, device: &Device) -> Result<(VarBuilder<'static>, String)> {
    let files = weight_files(dir)?;
    for f in &files {
        // SAFETY: memory-mapped read-only; model files are not modified while loaded.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            load_err(format!(
                "{}: not a readable safetensors file ({}); it is truncated or corrupt (or a git-lfs pointer): \
                 download it again",
                f.display(),
                plain(e)
            ))
        })?;
    }
    let label = if files.len() == 1 {
        files[0].display().to_string()
    } else {
        dir.join("model.safetensors.index.json")
            .display()
            .to_string()
    };
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }
        .map_err(|e| load_err(format!("{label}: {}", plain(e))))?;
    Ok((vb, label))
}

/// Wraps an error raised while building a model from the weights.
pub(crate) fn weights_err(label: &str, e: candle_core::Error) -> WorkerError {
    load_err(format!(
        "{label}: {}; the weights do not fit config.json (are config.json and the weights from the same checkpoint?)",
        plain(e)
    ))
}

// ------------------------------------------------------------------ tokenizer

/// `tokenizer.json`, checked against the model's vocabulary size.
pub fn load_tokenizer(dir: &Path, vocab_size: usize) -> Result<Tokenizer> {
    let p = dir.join("tokenizer.json");
    if !p.exists() {
        return Err(load_err(format!(
            "{}: missing; mirgen reads the fast-tokenizer file. Write it with transformers: \
             `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`",
            p.display()
        )));
    }
    let tok = Tokenizer::from_file(&p).map_err(|e| {
        load_err(format!(
            "{}: not a tokenizer.json this version of `tokenizers` reads ({e})",
            p.display()
        ))
    })?;
    let max_id = tok.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
    if max_id >= vocab_size {
        return Err(load_err(format!(
            "{}: the tokenizer has ids up to {max_id} but config.json's vocab_size is {vocab_size}; \
             tokenizer and model come from different checkpoints",
            p.display()
        )));
    }
    Ok(tok)
}

/// The optional `tokenizer_config.json` (empty when absent).
pub(crate) fn tokenizer_config(dir: &Path) -> Result<ConfigReader> {
    if dir.join("tokenizer_config.json").exists() {
        ConfigReader::read(dir, "tokenizer_config.json")
    } else {
        Ok(ConfigReader::from_value(
            Value::Object(Default::default()),
            &dir.join("tokenizer_config.json"),
        ))
    }
}

/// A special token of `tokenizer_config.json` (a string or `{"content": ..}`).
pub(crate) fn special_token(tc: &ConfigReader, key: &str) -> Option<String> {
    let v = &tc.value()[key];
    v.as_str()
        .or_else(|| v["content"].as_str())
        .map(String::from)
}

// ------------------------------------------------------------------ the embedder

/// The architectures [`HfEmbedder`] runs.
pub enum DualEncoder {
    Clip(ClipModel),
    Siglip(SiglipModel),
}

/// How texts are tokenized for the text tower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextSpec {
    /// Truncation length (special tokens included).
    pub max_len: usize,
    /// Pad every text to `max_len` with this id (SigLIP); `None`: no padding.
    pub pad_to_max_with: Option<u32>,
}

/// A CLIP or SigLIP checkpoint as an [`Embedder`]: preprocessing from
/// `preprocessor_config.json`, tokenization from `tokenizer.json`, and one
/// forward pass per item (an embedding never depends on the batch).
pub struct HfEmbedder {
    model: DualEncoder,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    text: TextSpec,
    device: Device,
    dim: usize,
    info: ModelInfo,
}

impl HfEmbedder {
    /// Loads a folder or Hub id (see [`resolve`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local folder; `source` is recorded in [`ModelInfo`].
    pub fn load_dir(dir: &Path, source: &str, device: &Device) -> Result<Self> {
        let cfg = ConfigReader::read(dir, "config.json")?;
        let kind = model_type(&cfg)?;
        let pre = ConfigReader::read(dir, "preprocessor_config.json")?;
        let processor = ImageProcessor::from_preprocessor_config(
            pre.value(),
            &pre.file().display().to_string(),
        )?;
        let tc = tokenizer_config(dir)?;
        let model_max = model_max_length(&tc);
        enum Arch {
            Clip(ClipConfig),
            Siglip(SiglipConfig),
        }
        let arch = match kind.as_str() {
            "clip" => Arch::Clip(ClipConfig::from_hf(&cfg)?),
            "siglip" => {
                let c = SiglipConfig::from_hf(&cfg)?;
                if c.projection_size != c.vision.hidden_size {
                    return Err(cfg.error(format!(
                        "text_config.projection_size {} differs from vision_config.hidden_size {}: \
                         text and image embeddings would not share a space",
                        c.projection_size, c.vision.hidden_size
                    )));
                }
                Arch::Siglip(c)
            }
            other => return Err(unsupported(&cfg, other)),
        };
        let (vocab, max_pos, image_size, pad_id, dim) = match &arch {
            Arch::Clip(c) => (
                c.vocab_size,
                c.max_position_embeddings,
                c.image_size,
                None,
                c.projection_dim,
            ),
            Arch::Siglip(c) => (
                c.vocab_size,
                c.max_position_embeddings,
                c.image_size,
                Some(c.pad_token_id),
                c.projection_size,
            ),
        };
        // the tokenizer first: a tokenizer from another checkpoint is named as such
        let mut tokenizer = load_tokenizer(dir, vocab)?;
        let (vb, label) = var_builder(dir, device)?;
        let model = match &arch {
            Arch::Clip(c) => {
                DualEncoder::Clip(ClipModel::new(c, vb).map_err(|e| weights_err(&label, e))?)
            }
            Arch::Siglip(c) => {
                DualEncoder::Siglip(SiglipModel::new(c, vb).map_err(|e| weights_err(&label, e))?)
            }
        };
        // the processor must produce what the vision tower was built for
        check_processor_size(&processor, &pre, image_size)?;
        let max_len = text_max_len(model_max, max_pos);
        truncate_unpadded(&mut tokenizer, dir, max_len)?;
        let pad_to_max_with = match pad_id {
            None => None,
            Some(config_pad) => {
                let from_tokenizer =
                    special_token(&tc, "pad_token").and_then(|t| tokenizer.token_to_id(&t));
                Some(from_tokenizer.or(config_pad).ok_or_else(|| {
                    load_err(format!(
                        "{}: SigLIP pads texts to max_length but neither tokenizer_config.json's pad_token nor \
                         config.json's text_config.pad_token_id names the padding token",
                        dir.display()
                    ))
                })?)
            }
        };
        let text = TextSpec {
            max_len,
            pad_to_max_with,
        };
        let fingerprint = fingerprint(dir, &kind, &processor, &text)?;
        Ok(HfEmbedder {
            model,
            tokenizer,
            processor,
            text,
            device: device.clone(),
            dim,
            info: ModelInfo {
                architecture: kind,
                source: source.to_string(),
                smoke_test: crate::encoders::hf::has_random_weights(dir),
                fingerprint,
            },
        })
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn text_spec(&self) -> &TextSpec {
        &self.text
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids the text tower gets for one text (special tokens, truncation,
    /// SigLIP's padding to max_length).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = encode_ids(&self.tokenizer, text)?;
        if let Some(pad) = self.text.pad_to_max_with {
            ids.resize(self.text.max_len.max(ids.len()), pad);
        }
        Ok(ids)
    }

    /// Unit-norm embeddings of preprocessed images (B, 3, H, W).
    pub fn embed_pixel_values(&self, pixel_values: &Tensor) -> Result<Vec<Vec<f32>>> {
        let f = match &self.model {
            DualEncoder::Clip(m) => m.image_features(pixel_values)?,
            DualEncoder::Siglip(m) => m.image_features(pixel_values)?,
        };
        rows_normalized(&f)
    }

    /// Unit-norm embeddings of token ids (B, L); `attention_mask` (B, L) is
    /// used by CLIP (SigLIP is run without one, as transformers runs it).
    pub fn embed_token_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let f = match &self.model {
            DualEncoder::Clip(m) => m.text_features(input_ids, attention_mask)?,
            DualEncoder::Siglip(m) => m.text_features(input_ids)?,
        };
        rows_normalized(&f)
    }
}

impl Embedder for HfEmbedder {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn preprocessing(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.processor).ok()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    /// One forward pass per image (see [`embed_images_one_by_one`]).
    fn embed_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Vec<f32>>> {
        embed_images_one_by_one(&self.processor, &self.device, images, |p| {
            self.embed_pixel_values(p)
        })
    }

    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        embed_texts_one_by_one(
            &self.device,
            texts,
            |t| self.tokenize(t),
            |ids| self.embed_token_ids(ids, None),
        )
    }
}

/// `tokenizer_config.json`'s `model_max_length` when it is a real limit
/// (transformers writes a huge sentinel when there is none).
pub(crate) fn model_max_length(tc: &ConfigReader) -> Option<usize> {
    tc.opt_usize("model_max_length")
        .ok()
        .flatten()
        .filter(|&n| n > 0 && n < 1_000_000)
}

/// The truncation length of a text: `model_max_length` capped by the text
/// tower's position table.
pub(crate) fn text_max_len(model_max: Option<usize>, max_positions: usize) -> usize {
    model_max.map_or(max_positions, |m| m.min(max_positions))
}

/// Sets the tokenizer to truncate at `max_len` and not to pad (one text per
/// forward pass, so nothing to pad); errors name `dir/tokenizer.json`.
pub(crate) fn truncate_unpadded(
    tokenizer: &mut Tokenizer,
    dir: &Path,
    max_len: usize,
) -> Result<()> {
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| load_err(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
    Ok(())
}

/// Checks that the processor of `preprocessor_config.json` (`pre`) produces
/// the square `image_size` images the vision tower was built for.
pub(crate) fn check_processor_size(
    processor: &ImageProcessor,
    pre: &ConfigReader,
    image_size: usize,
) -> Result<()> {
    let (h, w) = match (processor.crop, processor.resize) {
        (Some(c), _) => c,
        (None, Some(crate::preprocess::ResizeTo::Exact { height, width })) => (height, width),
        _ => {
            return Err(pre.error(
                "the processor does not produce a fixed size (needs do_center_crop or size {height, width})".into(),
            ))
        }
    };
    if (h as usize, w as usize) != (image_size, image_size) {
        return Err(pre.error(format!(
            "the processor produces {h}x{w} images but config.json's vision_config.image_size is {image_size}"
        )));
    }
    Ok(())
}

/// The ids of one text with the tokenizer's special tokens.
pub(crate) fn encode_ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, true)
        .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// [`Embedder::embed_images`] for the encoders here: one forward pass per
/// image, since batched kernels change the summation order with the batch
/// size and a rank must not depend on batching.
pub(crate) fn embed_images_one_by_one(
    processor: &ImageProcessor,
    device: &Device,
    images: &[&RgbImage],
    mut embed_pixel_values: impl FnMut(&Tensor) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(images.len());
    for img in images {
        let pixels = processor.batch(&[*img], device)?;
        out.extend(embed_pixel_values(&pixels)?);
    }
    Ok(out)
}

/// [`Embedder::embed_texts`] for the encoders here: one forward pass per
/// text on its (1, L) ids, without an attention mask.
pub(crate) fn embed_texts_one_by_one(
    device: &Device,
    texts: &[String],
    tokenize: impl Fn(&str) -> Result<Vec<u32>>,
    mut embed_token_ids: impl FnMut(&Tensor) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        let ids = tokenize(t)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), device)?;
        out.extend(embed_token_ids(&ids)?);
    }
    Ok(out)
}

/// transformers' `normalize(x, dim=-1)`: x / max(|x|, 1e-12), per row.
pub(crate) fn rows_normalized(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let mut rows = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for r in rows.iter_mut() {
        let n = r
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt()
            .max(1e-12) as f32;
        r.iter_mut().for_each(|x| *x /= n);
    }
    Ok(rows)
}

fn model_type(cfg: &ConfigReader) -> Result<String> {
    cfg.str("model_type").map(String::from).ok_or_else(|| {
        cfg.error(
            "no model_type; is this a transformers config.json? (retrieval encoders: clip, siglip, blip, blip-2)"
                .into(),
        )
    })
}

fn unsupported(cfg: &ConfigReader, kind: &str) -> WorkerError {
    let hint = match kind {
        "clip_vision_model"
        | "clip_text_model"
        | "siglip_vision_model"
        | "siglip_text_model"
        | "blip_vision_model"
        | "blip_text_model" => " (one tower only; retrieval needs the full two-tower checkpoint)",
        "siglip2" => " (SigLIP 2 is not implemented)",
        _ => "",
    };
    cfg.error(format!(
        "model_type = {kind:?} is not a supported retrieval encoder{hint}; supported: clip, siglip, blip, blip-2"
    ))
}

/// A hash of everything that changes the embeddings: the configs, the
/// tokenizer, the preprocessing and the weights' identity (each file's
/// size, safetensors header and its first and last MiB).
pub(crate) fn fingerprint(
    dir: &Path,
    kind: &str,
    processor: &ImageProcessor,
    text: &TextSpec,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"mirgen-hf-encoder-v1\0");
    h.update(kind.as_bytes());
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if let Ok(b) = std::fs::read(dir.join(name)) {
            h.update(name.as_bytes());
            h.update((b.len() as u64).to_le_bytes());
            h.update(&b);
        }
    }
    h.update(processor.fingerprint().as_bytes());
    h.update(format!("{text:?}").as_bytes());
    for f in weight_files(dir)? {
        let io = |e: std::io::Error| load_err(format!("{}: {e}", f.display()));
        let mut file = std::fs::File::open(&f).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        h.update(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(len.to_le_bytes());
        let mut sample = |start: u64, n: u64| -> std::io::Result<()> {
            let mut buf = vec![0u8; n.min(len.saturating_sub(start)) as usize];
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut buf)?;
            h.update(&buf);
            Ok(())
        };
        const MIB: u64 = 1 << 20;
        sample(0, MIB).map_err(io)?;
        sample(len.saturating_sub(MIB), MIB).map_err(io)?;
    }
    Ok(format!("hf-{kind}/{}", hex::encode(&h.finalize()[..16])))
}

/// Loads a retrieval encoder from a folder or Hub id (see [`resolve`]),
/// by `config.json`'s `model_type`.
pub fn load_embedder(spec: &str, device: &Device) -> Result<Box<dyn Embedder>> {
    let (dir, source) = resolve(spec)?;
    let cfg = ConfigReader::read(&dir, "config.json")?;
    match model_type(&cfg)?.as_str() {
        "clip" | "siglip" => Ok(Box::new(HfEmbedder::load_dir(&dir, &source, device)?)),
        "blip" => Ok(Box::new(super::blip::BlipEmbedder::load_dir(
            &dir, &source, device,
        )?)),
        "blip-2" => Ok(Box::new(super::blip2::Blip2Embedder::load_dir(
            &dir, &source, device,
        )?)),
        other => Err(unsupported(&cfg, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_folders_or_hub_ids() {
        assert_eq!(
            parse_spec("openai/clip-vit-base-patch16"),
            ModelSource::Hub {
                repo: "openai/clip-vit-base-patch16".into(),
                revision: None
            }
        );
        assert_eq!(
            parse_spec("hf:google/siglip-base-patch16-224@abc123"),
            ModelSource::Hub {
                repo: "google/siglip-base-patch16-224".into(),
                revision: Some("abc123".into())
            }
        );
        assert_eq!(
            parse_spec("./models/clip"),
            ModelSource::Folder("./models/clip".into())
        );
        let here = env!("CARGO_MANIFEST_DIR");
        assert_eq!(parse_spec(here), ModelSource::Folder(here.into()));
        assert_eq!(
            parse_spec("/no/such/dir"),
            ModelSource::Folder("/no/such/dir".into())
        );
        let e = resolve("/no/such/dir").unwrap_err().to_string();
        assert!(
            e.contains("/no/such/dir") && e.contains("no such folder"),
            "{e}"
        );
    }
}
