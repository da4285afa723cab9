//! SD-Turbo and Stable Diffusion 2.x-style text-to-image pipelines in the
//! diffusers layout, computing what diffusers' `StableDiffusionPipeline`
//! computes.
//!
//! - SD-Turbo: Sauer et al., *Adversarial Diffusion Distillation*
//!   (arXiv 2311.17042), Hugging Face `stabilityai/sd-turbo` (one step,
//!   guidance 0, 512x512);
//! - the latent diffusion architecture: Rombach et al., *High-Resolution
//!   Image Synthesis with Latent Diffusion Models* (arXiv 2112.10752).
//!
//! A pipeline folder holds `model_index.json` (`StableDiffusionPipeline`),
//! `tokenizer/` (CLIP BPE: `vocab.json` + `merges.txt`, or `tokenizer.json`),
//! `text_encoder/` (transformers `CLIPTextModel`), `unet/`
//! (`UNet2DConditionModel`, see [`super::unet`]), `vae/` (`AutoencoderKL`,
//! candle's implementation) and `scheduler/` (`EulerDiscreteScheduler`, see
//! [`super::euler`]). The loop is diffusers':
//!
//! 1. ids = tokenizer(prompt, padding="max_length", max_length=77,
//!    truncation=True); embeds = text_encoder(ids)[0] (last hidden state
//!    after `final_layer_norm`, causal mask only);
//! 2. latents = noise * init_noise_sigma (noise: the request's
//!    `init_latents`, else a Gaussian from its seed);
//! 3. per timestep: eps = unet(scale_model_input(latents), t, embeds), with
//!    classifier-free guidance `u + g (c - u)` on the "" prompt when
//!    guidance > 1; latents = scheduler.step(eps, latents);
//! 4. image = vae.decode(latents / scaling_factor) / 2 + 0.5, clamped to
//!    [0, 1], times 255, rounded to u8 (what `output_type="pil"` returns).
//!
//! Parity with diffusers is tested on a tiny random checkpoint of this exact
//! layout (`tests/generator_parity.rs`, fixture made by
//! `scripts/fixtures/make_generator_fixtures.py`).

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::{AddedToken, Tokenizer};

use super::common::{
    self, impl_diffusion_pipeline, no_note, part_var_builder, DiffusionGenerator, Layout,
};
use super::euler::{EulerDiscrete, EulerDiscreteConfig};
use super::unet::{UNet2DCondition, UNetConfig};
use crate::encoders::hf::{load_err, parse_spec, plain, ConfigReader, ModelSource};
use crate::encoders::layers::{causal_mask, Encoder, TowerConfig};
use crate::{GenerateRequest, Result, RgbImage, WorkerError};

// ------------------------------------------------------------------ folder

/// The sub-folders a diffusers Stable Diffusion pipeline needs.
pub const PARTS: [&str; 5] = ["tokenizer", "text_encoder", "unet", "vae", "scheduler"];

/// Files fetched from the Hub (full-precision weights only).
const HUB_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    // SD 2.x / SD-Turbo: one CLIP; SDXL: two; SD 3.5: three (the third T5);
    // FLUX: CLIP + T5. Full-precision weights only, whole or sharded.
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*-of-*.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-*-of-*.safetensors",
    "text_encoder_3/config.json",
    "text_encoder_3/model.safetensors",
    "text_encoder_3/model.safetensors.index.json",
    "text_encoder_3/model-*-of-*.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// The local folder of a spec (a folder, or a Hub id downloaded into the
/// Hugging Face cache) and a label for [`ModelInfo::source`].
pub fn resolve_pipeline(spec: &str) -> Result<(PathBuf, String)> {
    match parse_spec(spec) {
        ModelSource::Folder(dir) => {
            if !dir.is_dir() {
                return Err(load_err(format!(
                    "{}: no such folder (an image generator is a local diffusers pipeline folder with \
                     model_index.json, or a Hub id such as stabilityai/sd-turbo[@revision])",
                    dir.display()
                )));
            }
            Ok((dir.clone(), dir.display().to_string()))
        }
        ModelSource::Hub { repo, revision } => {
            let (owner, name) = repo.split_once('/').unwrap_or(("", repo.as_str()));
            let fail = |e: String| {
                load_err(format!(
                    "{spec}: downloading from the Hugging Face Hub failed ({e}); check the id and revision, the \
                     network, and HF_TOKEN for gated repositories, or pass a local folder"
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

/// Checks `model_index.json` and that every part's folder is there.
fn check_layout(dir: &Path) -> Result<ConfigReader> {
    common::check_layout(
        dir,
        &Layout {
            class: "StableDiffusionPipeline",
            parts: &PARTS,
            what: "an image generator is a diffusers pipeline folder",
            wrong_class: "only StableDiffusionPipeline (SD 1.x/2.x, SD-Turbo) is implemented",
            missing_note: no_note,
        },
    )
}

/// The safetensors weights of a part: `<stem>.safetensors`, else
/// `<stem>.fp16.safetensors`, else the shards of `<stem>.safetensors.index.json`.
pub fn part_weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        if dir.join(&name).exists() {
            return Ok(vec![dir.join(name)]);
        }
    }
    let index = format!("{stem}.safetensors.index.json");
    if dir.join(&index).exists() {
        let v = crate::encoders::hf::read_json(dir, &index)?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| {
                load_err(format!(
                    "{}: no weight_map object",
                    dir.join(&index).display()
                ))
            })?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(m) = files.iter().find(|f| !f.exists()) {
            return Err(load_err(format!(
                "{}: listed in {index} but missing; download all the shards",
                m.display()
            )));
        }
        return Ok(files);
    }
    let bin = dir.join(format!("{stem}.bin"));
    Err(load_err(format!(
        "{}: no {stem}.safetensors (or .fp16.safetensors, or a sharded index){}",
        dir.display(),
        if bin.exists() {
            format!("; only {stem}.bin, which mirgen does not read (convert it to safetensors)")
        } else {
            String::new()
        }
    )))
}

pub(crate) fn weights_err(label: &str, e: candle_core::Error) -> WorkerError {
    load_err(format!(
        "{label}: {}; the weights do not fit the part's config.json (are they from the same checkpoint?)",
        plain(e)
    ))
}

// ------------------------------------------------------------------ tokenizer

/// CLIP tokenization as diffusers calls it: `[bos] + ids + [eos]`,
/// truncated and padded to `max_len` with the pad token.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

/// transformers' `CLIPTokenizer` (tokenizers backend) built from
/// `vocab.json` + `merges.txt`: NFC, whitespace runs to one space,
/// lowercase; CLIP's regex split; byte-level; BPE with the `</w>` suffix.
fn clip_bpe_tokenizer(dir: &Path, unk: &str) -> Result<Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence as NSeq, NFC};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PSeq;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::SplitDelimiterBehavior;
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for f in [&vocab, &merges] {
        if !f.exists() {
            return Err(load_err(format!(
                "{}: missing; the tokenizer needs tokenizer.json or vocab.json + merges.txt",
                f.display()
            )));
        }
    }
    let tok_err = |e: tokenizers::Error| load_err(format!("{}: {e}", dir.display()));
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .unk_token(unk.to_string())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(tok_err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NSeq::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tok_err)?
        .into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                .into(),
        ),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tok_err)?;
    tok.with_pre_tokenizer(Some(PSeq::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(tok)
}

impl PromptTokenizer {
    /// From `tokenizer/` (`tokenizer_config.json` for the special tokens and
    /// `model_max_length`); `max_positions` caps the length.
    pub fn load(dir: &Path, max_positions: usize, vocab_size: usize) -> Result<Self> {
        let read = |name: &str| -> Result<ConfigReader> {
            if dir.join(name).exists() {
                ConfigReader::read(dir, name)
            } else {
                Ok(ConfigReader::from_value(
                    Value::Object(Default::default()),
                    &dir.join(name),
                ))
            }
        };
        let tc = read("tokenizer_config.json")?;
        let sm = read("special_tokens_map.json")?;
        let special = |key: &str, default: &str| -> String {
            let get = |c: &ConfigReader| {
                let v = &c.value()[key];
                v.as_str()
                    .or_else(|| v["content"].as_str())
                    .map(String::from)
            };
            get(&tc)
                .or_else(|| get(&sm))
                .unwrap_or_else(|| default.to_string())
        };
        let bos_t = special("bos_token", "<|startoftext|>");
        let eos_t = special("eos_token", "<|endoftext|>");
        let unk_t = special("unk_token", "<|endoftext|>");
        let pad_t = special("pad_token", &eos_t);
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
                load_err(format!(
                    "{}: not a tokenizer.json this version of `tokenizers` reads ({e})",
                    dir.join("tokenizer.json").display()
                ))
            })?
        } else {
            clip_bpe_tokenizer(dir, &unk_t)?
        };
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                load_err(format!(
                    "{}: the special token {t:?} is not in the vocabulary",
                    dir.display()
                ))
            })
        };
        let (bos, eos, pad) = (id(&bos_t)?, id(&eos_t)?, id(&pad_t)?);
        // transformers registers the special tokens as added tokens (not
        // normalized), so they are split out of the text first: with SD
        // 2.x's pad token "!", a "!" in a prompt is id 0, not "!</w>".
        let mut tokenizer = tokenizer;
        let mut specials: Vec<AddedToken> = Vec::new();
        for t in [&bos_t, &eos_t, &unk_t, &pad_t] {
            if !specials.iter().any(|a| &a.content == t) {
                specials.push(AddedToken::from(t.clone(), true));
            }
        }
        tokenizer.add_special_tokens(&specials);
        let max_id = tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= vocab_size {
            return Err(load_err(format!(
                "{}: the tokenizer has ids up to {max_id} but text_encoder/config.json's vocab_size is \
                 {vocab_size}; tokenizer and text encoder come from different checkpoints",
                dir.display()
            )));
        }
        let model_max = tc
            .opt_usize("model_max_length")
            .ok()
            .flatten()
            .filter(|&n| n > 2 && n < 1_000_000)
            .unwrap_or(max_positions);
        Ok(PromptTokenizer {
            tokenizer,
            bos,
            eos,
            pad,
            max_len: model_max.min(max_positions),
        })
    }

    /// The padded ids of one prompt (`max_len` of them).
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend(enc.get_ids().iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

// ------------------------------------------------------------------ text encoder

/// transformers' `CLIPTextModel` up to `last_hidden_state`.
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

/// The sizes of `text_encoder/config.json` (a `CLIPTextConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub tower: TowerConfig,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

impl ClipTextConfig {
    pub fn from_hf(c: &ConfigReader) -> Result<Self> {
        // a full CLIPConfig keeps the text tower under text_config
        let c = if c.value()["text_config"].is_object() {
            c.sub("text_config")?
        } else {
            c.clone()
        };
        Ok(ClipTextConfig {
            tower: c.tower(512, 2048, 12, 8, "quick_gelu", 1e-5)?,
            vocab_size: c.usize("vocab_size", 49408)?,
            max_position_embeddings: c.usize("max_position_embeddings", 77)?,
        })
    }
}

impl ClipTextEncoder {
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        // transformers 4 saves `text_model.*`; transformers 5 drops the prefix
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let h = cfg.tower.hidden_size;
        let e = vb.pp("embeddings");
        Ok(ClipTextEncoder {
            token_embedding: embedding(cfg.vocab_size, h, e.pp("token_embedding"))?,
            position_embedding: e
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, h), "weight")?,
            encoder: Encoder::new(&cfg.tower, vb.pp("encoder"))?,
            final_layer_norm: layer_norm(h, cfg.tower.layer_norm_eps, vb.pp("final_layer_norm"))?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// (B, L) u32 ids -> (B, L, hidden): `final_layer_norm(encoder(...))`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, n) = ids.dims2()?;
        if n > self.max_positions {
            candle_core::bail!(
                "{n} tokens exceed max_position_embeddings {}",
                self.max_positions
            );
        }
        let xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?)?;
        let mask = causal_mask(n, ids.device())?;
        self.encoder
            .forward(&xs, Some(&mask))?
            .apply(&self.final_layer_norm)
    }
}

// ------------------------------------------------------------------ pipeline

/// Defaults of a pipeline family's `vae/config.json` (diffusers' class
/// defaults differ by family: SD 2.x 4 latent channels and 0.18215, SDXL
/// 0.13025, SD 3.5 and FLUX 16 channels with a shift).
pub(crate) struct VaeDefaults {
    pub latent_channels: usize,
    pub scaling_factor: f64,
    /// `None`: the pipeline does not use a shift, so `shift_factor` is not read.
    pub shift_factor: Option<f64>,
}

/// An AutoencoderKL's config: candle's config, `scaling_factor`,
/// `shift_factor` (0 when the family has none) and the spatial factor
/// (2^(blocks - 1)). Anything candle's VAE cannot compute is a named error.
pub(crate) fn vae_config(
    c: &ConfigReader,
    defaults: VaeDefaults,
) -> Result<(AutoEncoderKLConfig, f64, f64, usize)> {
    if let Some(class) = c.str("_class_name") {
        if class != "AutoencoderKL" {
            return Err(c.error(format!(
                "_class_name = {class:?}: only AutoencoderKL is implemented"
            )));
        }
    }
    let v = c.value();
    let boc: Vec<usize> = match &v["block_out_channels"] {
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| c.error(format!("block_out_channels entry {x} is not a count")))
            })
            .collect::<Result<_>>()?,
        Value::Null => vec![64],
        other => return Err(c.error(format!("block_out_channels = {other} is not a list"))),
    };
    for (key, want) in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ] {
        match &v[key] {
            Value::Null => {}
            Value::Array(a) if a.iter().all(|x| x.as_str() == Some(want)) => {}
            other => {
                return Err(c.error(format!(
                    "{key} = {other}: only {want} blocks are implemented"
                )))
            }
        }
    }
    if c.str("act_fn").is_some_and(|a| a != "silu") {
        return Err(c.error("act_fn other than silu is not supported".into()));
    }
    if !c.bool("mid_block_add_attention", true)? {
        return Err(c.error("mid_block_add_attention = false is not supported".into()));
    }
    if c.usize("in_channels", 3)? != 3 || c.usize("out_channels", 3)? != 3 {
        return Err(c.error("in_channels and out_channels must be 3 (RGB)".into()));
    }
    let cfg = AutoEncoderKLConfig {
        layers_per_block: c.usize("layers_per_block", 1)?,
        latent_channels: c.usize("latent_channels", defaults.latent_channels)?,
        norm_num_groups: c.usize("norm_num_groups", 32)?,
        use_quant_conv: c.bool("use_quant_conv", true)?,
        use_post_quant_conv: c.bool("use_post_quant_conv", true)?,
        block_out_channels: boc.clone(),
    };
    if let Some(b) = boc
        .iter()
        .find(|&&b| cfg.norm_num_groups == 0 || b % cfg.norm_num_groups != 0)
    {
        return Err(c.error(format!(
            "{b} channels are not divisible into norm_num_groups = {}",
            cfg.norm_num_groups
        )));
    }
    let shift = match defaults.shift_factor {
        Some(d) => c.f64("shift_factor", d)?,
        None => 0.0,
    };
    Ok((
        cfg,
        c.f64("scaling_factor", defaults.scaling_factor)?,
        shift,
        1 << (boc.len() - 1),
    ))
}

/// A loaded SD 1.x/2.x / SD-Turbo pipeline.
pub struct SdTurboPipeline {
    tokenizer: PromptTokenizer,
    text_encoder: ClipTextEncoder,
    unet: UNet2DCondition,
    vae: AutoEncoderKL,
    scheduler: EulerDiscreteConfig,
    scaling_factor: f64,
    vae_scale_factor: usize,
    latent_channels: usize,
    device: Device,
    fingerprint: String,
    source: String,
    /// The folder holds random test weights (see `has_random_weights`).
    random_weights: bool,
}

impl SdTurboPipeline {
    /// Loads a folder or Hub id (see [`resolve_pipeline`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve_pipeline(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local diffusers pipeline folder; `source` is recorded in [`ModelInfo`].
    pub fn load_dir(dir: &Path, source: &str, device: &Device) -> Result<Self> {
        check_layout(dir)?;
        let part = |p: &str| dir.join(p);

        let sched = ConfigReader::read(&part("scheduler"), "scheduler_config.json")?;
        let scheduler = EulerDiscreteConfig::from_diffusers(&sched)?;

        let tcfg = ConfigReader::read(&part("text_encoder"), "config.json")?;
        let text_cfg = ClipTextConfig::from_hf(&tcfg)?;
        let tokenizer = PromptTokenizer::load(
            &part("tokenizer"),
            text_cfg.max_position_embeddings,
            text_cfg.vocab_size,
        )?;
        let (vb, label) = part_var_builder(&part("text_encoder"), "model", device)?;
        let text_encoder =
            ClipTextEncoder::new(&text_cfg, vb).map_err(|e| weights_err(&label, e))?;

        let ucfg_r = ConfigReader::read(&part("unet"), "config.json")?;
        let ucfg = UNetConfig::from_diffusers(&ucfg_r)?;
        if ucfg.cross_attention_dim != text_cfg.tower.hidden_size {
            return Err(ucfg_r.error(format!(
                "cross_attention_dim = {} but the text encoder's hidden_size is {}",
                ucfg.cross_attention_dim, text_cfg.tower.hidden_size
            )));
        }
        let (vb, label) = part_var_builder(&part("unet"), "diffusion_pytorch_model", device)?;
        let unet = UNet2DCondition::new(&ucfg, vb).map_err(|e| weights_err(&label, e))?;

        let vcfg_r = ConfigReader::read(&part("vae"), "config.json")?;
        let (vcfg, scaling_factor, _, vae_scale_factor) = vae_config(
            &vcfg_r,
            VaeDefaults {
                latent_channels: 4,
                scaling_factor: 0.18215,
                shift_factor: None,
            },
        )?;
        common::check_latent_channels(
            &ucfg_r,
            ucfg.in_channels,
            ucfg.out_channels,
            vcfg.latent_channels,
        )?;
        let latent_channels = vcfg.latent_channels;
        let vae = common::load_vae(dir, vcfg, device)?;

        Ok(SdTurboPipeline {
            fingerprint: fingerprint(dir)?,
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler,
            scaling_factor,
            vae_scale_factor,
            latent_channels,
            device: device.clone(),
            source: source.to_string(),
            random_weights: crate::encoders::hf::has_random_weights(dir),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    pub fn unet(&self) -> &UNet2DCondition {
        &self.unet
    }

    /// `vae/config.json`'s `scaling_factor`.
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// The schedule for `steps` steps.
    pub fn scheduler(&self, steps: usize) -> Result<EulerDiscrete> {
        self.scheduler.build(steps)
    }

    /// (channels, height, width) of the latents.
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let s = self.unet.config().sample_size;
        (self.latent_channels, s, s)
    }

    /// Output (width, height): the UNet's `sample_size` times the VAE's
    /// downsampling factor, as diffusers' default height/width.
    pub fn resolution(&self) -> (usize, usize) {
        let s = self.unet.config().sample_size * self.vae_scale_factor;
        (s, s)
    }

    /// The text encoder's hidden states (1, L, hidden) for a prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.ids(prompt)?;
        let n = ids.len();
        self.encode_ids(&Tensor::from_vec(ids, (1, n), &self.device)?)
    }

    /// The text encoder's hidden states (B, L, hidden) for (B, L) u32 ids.
    pub fn encode_ids(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.text_encoder.forward(ids)?)
    }

    /// The denoising loop from unit-variance noise (1, C, h, w) to the final
    /// latents; `uncond` (the "" prompt's states) is used when guidance > 1.
    pub fn denoise(
        &self,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        noise: &Tensor,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        let sched = self.scheduler(steps)?;
        let guided = guidance > 1.0;
        let text = match (guided, uncond) {
            (true, Some(u)) => Tensor::cat(&[u, cond], 0)?,
            (true, None) => {
                return Err(WorkerError::Invalid(
                    "classifier-free guidance needs the unconditional text states".into(),
                ))
            }
            (false, _) => cond.clone(),
        };
        let mut latents = (noise * sched.init_noise_sigma())?;
        for (i, &t) in sched.timesteps().iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sched.scale_model_input(&input, i)?;
            let eps = self.unet.forward(&input, t, &text)?;
            let eps = if guided {
                let b = latents.dim(0)?;
                let (u, c) = (eps.i(0..b)?, eps.i(b..2 * b)?);
                (&u + ((c - &u)? * guidance)?)?
            } else {
                eps
            };
            latents = sched.step(&eps, i, &latents)?;
        }
        Ok(latents)
    }

    /// `vae.decode(latents / scaling_factor)`, in [-1, 1] roughly (B, 3, H, W),
    /// one latent at a time (candle's VAE lets batch items interact).
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        common::vae_decode_each(&self.vae, &(latents / self.scaling_factor)?)
    }

    /// The image in [0, 1] (B, 3, H, W): `(decode_raw / 2 + 0.5).clamp(0, 1)`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        common::unit_range(&self.decode_raw(latents)?)
    }

    /// Images as `output_type="pil"` makes them: `(x * 255).round()` as u8.
    pub fn to_rgb(images: &Tensor) -> Result<Vec<RgbImage>> {
        common::to_rgb(images)
    }

    /// The initial noise of a request: its `init_latents` (the RNG is not
    /// used), else a standard Gaussian from its seed.
    pub fn initial_noise(&self, r: &GenerateRequest) -> Result<Tensor> {
        common::initial_latents(r, self.latent_shape(), &self.device)
    }

    /// One image for one request.
    pub fn generate_one(
        &self,
        r: &GenerateRequest,
        steps: usize,
        guidance: f64,
    ) -> Result<RgbImage> {
        let cond = self.encode_prompt(&r.prompt)?;
        let uncond = if guidance > 1.0 {
            Some(self.encode_prompt("")?)
        } else {
            None
        };
        let noise = self.initial_noise(r)?;
        let latents = self.denoise(&cond, uncond.as_ref(), &noise, steps, guidance)?;
        let image = self.decode(&latents)?;
        Ok(Self::to_rgb(&image)?.remove(0))
    }
}

/// A hash of the pipeline's configs, tokenizer files and weight samples.
fn fingerprint(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"mirgen-sd-pipeline-v1\0");
    let files = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
    ];
    let weights = [
        ("text_encoder", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ];
    common::fingerprint(h, dir, &files, &weights)
}

// ------------------------------------------------------------------ generator

/// A diffusers SD 1.x/2.x / SD-Turbo pipeline as an
/// [`ImageGenerator`](crate::ImageGenerator). SD-Turbo is meant for 1 step and
/// guidance 0 (no unconditional pass).
pub type SdTurboGenerator = DiffusionGenerator<SdTurboPipeline>;

impl_diffusion_pipeline!(SdTurboPipeline, "sd-turbo", |p| format!(
    "sd-pipeline-{}",
    p.fingerprint
));
