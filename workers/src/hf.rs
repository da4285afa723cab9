//! Retrieval encoders loaded from Hugging Face folders (`config.json`,
//! `model.safetensors` or a sharded `model.safetensors.index.json`,
//! `tokenizer.json`, `preprocessor_config.json`).
//!
//! - CLIP (Radford et al. 2021, arXiv 2103.00020; transformers `CLIPModel`,
//!   e.g. `openai/clip-vit-base-patch16`): candle's CLIP, QuickGELU only.
//! - SigLIP (Zhai et al. 2023, arXiv 2303.15343; transformers `SiglipModel`,
//!   e.g. `google/siglip-base-patch16-224`): candle's SigLIP.
//!
//! Parity with transformers is checked on tiny random checkpoints made by
//! `scripts/fixtures/make_encoder_fixtures.py` (tests/encoder_parity.rs).
//! Errors name the file and what to do.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{clip, siglip};

use crate::{Result, WorkerError};

fn load_err(msg: String) -> WorkerError {
    WorkerError::Load(msg)
}

/// Reads a JSON file of the folder, naming it in errors.
pub fn read_json(dir: &Path, name: &str) -> Result<serde_json::Value> {
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).map_err(|e| {
        load_err(format!(
            "{}: {e} (a Hugging Face model folder needs {name}; download the whole repository)",
            p.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| load_err(format!("{}: not valid JSON ({e})", p.display())))
}

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
            .ok_or_else(|| load_err(format!("{}: no weight_map", index.display())))?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(load_err(format!(
        "{}: no model.safetensors or model.safetensors.index.json (PyTorch .bin weights: convert them with \
         `transformers` save_pretrained(safe_serialization=True))",
        dir.display()
    )))
}

/// A VarBuilder over the folder's weights; a truncated or corrupt file is named.
pub fn var_builder(dir: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let files = weight_files(dir)?;
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| load_err(format!("{}: {e}", f.display())))?;
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            load_err(format!(
                "{}: not a readable safetensors file ({e}); the download may be truncated, fetch it again",
                f.display()
            ))
        })?;
    }
    // SAFETY: the files are memory-mapped read-only and not modified while loaded.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }
        .map_err(|e| load_err(format!("{}: {e}", dir.display())))
}

/// Wraps a candle error while building a model with the folder's name.
fn shape_err(dir: &Path, e: candle_core::Error) -> WorkerError {
    load_err(format!(
        "{}: the weights do not fit config.json ({e}); is this the checkpoint the config describes?",
        dir.display()
    ))
}

fn model_type(dir: &Path, cfg: &serde_json::Value) -> Result<String> {
    cfg["model_type"].as_str().map(String::from).ok_or_else(|| {
        load_err(format!(
            "{}: config.json has no model_type",
            dir.join("config.json").display()
        ))
    })
}

fn usize_of(v: &serde_json::Value, key: &str, default: usize) -> usize {
    v[key].as_u64().map(|x| x as usize).unwrap_or(default)
}

/// candle's CLIP configuration from a transformers `config.json`.
pub fn clip_config(dir: &Path, cfg: &serde_json::Value) -> Result<clip::ClipConfig> {
    let (t, v) = (&cfg["text_config"], &cfg["vision_config"]);
    for (part, c) in [("text_config", t), ("vision_config", v)] {
        let act = c["hidden_act"].as_str().unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(load_err(format!(
                "{}: {part}.hidden_act = {act:?}; mirgen's CLIP supports quick_gelu (OpenAI CLIP) only",
                dir.join("config.json").display()
            )));
        }
    }
    let projection_dim = usize_of(cfg, "projection_dim", 512);
    let image_size = usize_of(v, "image_size", 224);
    Ok(clip::ClipConfig {
        text_config: clip::text_model::ClipTextConfig {
            vocab_size: usize_of(t, "vocab_size", 49408),
            embed_dim: usize_of(t, "hidden_size", 512),
            activation: clip::text_model::Activation::QuickGelu,
            intermediate_size: usize_of(t, "intermediate_size", 2048),
            max_position_embeddings: usize_of(t, "max_position_embeddings", 77),
            pad_with: None,
            num_hidden_layers: usize_of(t, "num_hidden_layers", 12),
            num_attention_heads: usize_of(t, "num_attention_heads", 8),
            projection_dim,
        },
        vision_config: clip::vision_model::ClipVisionConfig {
            embed_dim: usize_of(v, "hidden_size", 768),
            activation: clip::text_model::Activation::QuickGelu,
            intermediate_size: usize_of(v, "intermediate_size", 3072),
            num_hidden_layers: usize_of(v, "num_hidden_layers", 12),
            num_attention_heads: usize_of(v, "num_attention_heads", 12),
            projection_dim,
            num_channels: usize_of(v, "num_channels", 3),
            image_size,
            patch_size: usize_of(v, "patch_size", 32),
        },
        logit_scale_init_value: 2.6592,
        image_size,
    })
}

/// A loaded encoder's forward passes (unnormalised features).
pub enum HfEncoder {
    Clip(clip::ClipModel),
    Siglip(siglip::Model),
}

impl HfEncoder {
    /// Loads a CLIP or SigLIP folder (by `config.json`'s `model_type`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = read_json(dir, "config.json")?;
        let kind = model_type(dir, &cfg)?;
        let vb = var_builder(dir, device)?;
        match kind.as_str() {
            "clip" => {
                let c = clip_config(dir, &cfg)?;
                Ok(HfEncoder::Clip(
                    clip::ClipModel::new(vb, &c).map_err(|e| shape_err(dir, e))?,
                ))
            }
            "siglip" => {
                let c: siglip::Config = serde_json::from_value(cfg.clone()).map_err(|e| {
                    load_err(format!(
                        "{}: not a SigLIP config ({e})",
                        dir.join("config.json").display()
                    ))
                })?;
                Ok(HfEncoder::Siglip(
                    siglip::Model::new(&c, vb).map_err(|e| shape_err(dir, e))?,
                ))
            }
            other => Err(load_err(format!(
                "{}: model_type {other:?} is not a supported retrieval encoder (clip, siglip)",
                dir.join("config.json").display()
            ))),
        }
    }

    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(match self {
            HfEncoder::Clip(m) => m.get_image_features(pixel_values)?,
            HfEncoder::Siglip(m) => m.get_image_features(pixel_values)?,
        })
    }

    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            HfEncoder::Clip(m) => m.get_text_features(input_ids)?,
            HfEncoder::Siglip(m) => m.get_text_features(input_ids)?,
        })
    }
}
