//! Stable Diffusion 3.5 text-to-image pipelines in the diffusers layout,
//! computing what diffusers' `StableDiffusion3Pipeline`
//! (`pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`) computes.
//!
//! - Stable Diffusion 3 / 3.5: Esser et al., *Scaling Rectified Flow
//!   Transformers for High-Resolution Image Synthesis*, arXiv 2403.03206
//!   (MMDiT, rectified flow); Hugging Face `stabilityai/stable-diffusion-3.5-large`
//!   (and `-large-turbo`), `stabilityai/stable-diffusion-3.5-medium` (MMDiT-X:
//!   `dual_attention_layers`, a second image-only attention in those blocks).
//!
//! A pipeline folder holds `model_index.json` (`StableDiffusion3Pipeline`),
//! `tokenizer/` + `text_encoder/` (CLIP-L, `CLIPTextModelWithProjection`),
//! `tokenizer_2/` + `text_encoder_2/` (CLIP-G, the same class),
//! `tokenizer_3/` (T5 `tokenizer.json`) + `text_encoder_3/`
//! (`T5EncoderModel`, candle's T5), `transformer/` (`SD3Transformer2DModel`,
//! written here with diffusers' weight names), `vae/` (`AutoencoderKL`, 16
//! latent channels with `shift_factor`) and `scheduler/`
//! (`FlowMatchEulerDiscreteScheduler`, shift 3.0). The loop is diffusers':
//!
//! 1. per CLIP: ids = tokenizer(prompt, padding max_length 77); states =
//!    `hidden_states[-2]` (the penultimate layer, no final LayerNorm: `clip_skip`
//!    None), pooled = `text_embeds` (projection of the final-LayerNorm state
//!    at the first eos); T5 = text_encoder_3(tokenizer_3(prompt, padding and
//!    truncation to `max_sequence_length`, default 256))[0];
//!    prompt_embeds = cat(pad(cat(L, G, -1), T5 width), T5, seq);
//!    pooled = cat(L pooled, G pooled);
//! 2. the same for the negative prompt `""` when guidance > 1;
//! 3. sigmas from `set_timesteps(n)` (linspace of the shifted training
//!    range, shifted again), timesteps = 1000 sigmas; per step
//!    v = transformer([latents, latents], t, [uncond, cond] embeds, pooled),
//!    v = v_u + g (v_c - v_u), latents += (sigma_next - sigma) v;
//! 4. image = vae.decode(latents / scaling_factor + shift_factor) / 2 + 0.5,
//!    clamped, times 255, rounded to u8.
//!
//! Parity with diffusers is tested on a tiny random checkpoint of this exact
//! layout (`tests/sd3_parity.rs`, fixture made by
//! `scripts/fixtures/make_sd3_fixtures.py`).

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{
    conv2d, embedding, layer_norm, linear, linear_no_bias, Conv2d, Conv2dConfig, Embedding,
    LayerNorm, Linear, VarBuilder,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use candle_transformers::models::t5::T5EncoderModel;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::common::{
    self, impl_diffusion_pipeline, part_var_builder, pipeline_class_is, DiffusionGenerator, Layout,
};
use super::flux::{
    attention, layer_norm_plain, load_t5, modulate, t5_forward, timestep_proj, FeedForward,
    FlowMatchConfig, Mlp2, Qkv, T5PromptTokenizer,
};
use super::sd_turbo::{
    resolve_pipeline, vae_config, weights_err, ClipTextConfig, PromptTokenizer, VaeDefaults,
};
use crate::encoders::hf::ConfigReader;
use crate::encoders::layers::{causal_mask, EncoderLayer};
use crate::{GenerateRequest, Result, RgbImage, WorkerError};

// ------------------------------------------------------------------ folder

/// The sub-folders a diffusers SD3 pipeline needs.
pub const PARTS: [&str; 9] = [
    "tokenizer",
    "text_encoder",
    "tokenizer_2",
    "text_encoder_2",
    "tokenizer_3",
    "text_encoder_3",
    "transformer",
    "vae",
    "scheduler",
];

/// Whether a folder's `model_index.json` names a `StableDiffusion3Pipeline`.
pub fn is_sd3_pipeline(dir: &Path) -> bool {
    pipeline_class_is(dir, "StableDiffusion3Pipeline")
}

fn check_layout(dir: &Path) -> Result<ConfigReader> {
    common::check_layout(
        dir,
        &Layout {
            class: "StableDiffusion3Pipeline",
            parts: &PARTS,
            what: "an SD3 pipeline is a diffusers folder",
            wrong_class: "the SD3 loader reads StableDiffusion3Pipeline folders",
            missing_note: |_| " (pipelines without the T5 encoder are not supported)".into(),
        },
    )
}

// ------------------------------------------------------------------ CLIP with projection

/// transformers' `CLIPTextModelWithProjection`: the penultimate hidden
/// state (`hidden_states[-2]`) and `text_embeds`.
pub struct ClipProjEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Linear,
    max_positions: usize,
    eos: u32,
}

impl ClipProjEncoder {
    fn load(dir: &Path, device: &Device) -> Result<(Self, ClipTextConfig, usize)> {
        let c = ConfigReader::read(dir, "config.json")?;
        let cfg = ClipTextConfig::from_hf(&c)?;
        let sub = if c.value()["text_config"].is_object() {
            c.sub("text_config")?
        } else {
            c.clone()
        };
        let eos = sub.usize("eos_token_id", 2)? as u32;
        let proj = c.usize("projection_dim", 512)?;
        if cfg.tower.num_hidden_layers < 2 {
            return Err(
                c.error("num_hidden_layers < 2: SD3 reads the penultimate layer's states".into())
            );
        }
        let (vb, label) = part_var_builder(dir, "model", device)?;
        let enc = Self::new(&cfg, proj, eos, vb).map_err(|e| weights_err(&label, e))?;
        Ok((enc, cfg, proj))
    }

    fn new(
        cfg: &ClipTextConfig,
        proj: usize,
        eos: u32,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let text_projection =
            linear_no_bias(cfg.tower.hidden_size, proj, vb.pp("text_projection"))?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let h = cfg.tower.hidden_size;
        let e = vb.pp("embeddings");
        let lv = vb.pp("encoder").pp("layers");
        Ok(ClipProjEncoder {
            token_embedding: embedding(cfg.vocab_size, h, e.pp("token_embedding"))?,
            position_embedding: e
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, h), "weight")?,
            layers: (0..cfg.tower.num_hidden_layers)
                .map(|i| EncoderLayer::new(&cfg.tower, lv.pp(i)))
                .collect::<candle_core::Result<_>>()?,
            final_layer_norm: layer_norm(h, cfg.tower.layer_norm_eps, vb.pp("final_layer_norm"))?,
            text_projection,
            max_positions: cfg.max_position_embeddings,
            eos,
        })
    }

    /// (B, L) u32 ids -> (penultimate states (B, L, hidden), text_embeds
    /// (B, projection_dim)); the pooled state sits at the first
    /// `eos_token_id` (the largest id when the config says 2, as
    /// transformers does).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, n) = ids.dims2()?;
        if n > self.max_positions {
            candle_core::bail!(
                "{n} tokens exceed max_position_embeddings {}",
                self.max_positions
            );
        }
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?)?;
        let mask = causal_mask(n, ids.device())?;
        let last = self.layers.len() - 1;
        let mut penultimate = None;
        for (i, l) in self.layers.iter().enumerate() {
            xs = l.forward(&xs, Some(&mask))?;
            if i + 1 == last {
                penultimate = Some(xs.clone());
            }
        }
        let penultimate = penultimate.unwrap_or_else(|| xs.clone());
        let hidden = xs.apply(&self.final_layer_norm)?;
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut pooled = Vec::with_capacity(rows.len());
        for (b, row) in rows.iter().enumerate() {
            let pos = if self.eos == 2 {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&x| x == max).unwrap_or(0)
            } else {
                row.iter().position(|&x| x == self.eos).unwrap_or(0)
            };
            pooled.push(hidden.i((b, pos))?.unsqueeze(0)?);
        }
        let pooled = self.text_projection.forward(&Tensor::cat(&pooled, 0)?)?;
        Ok((penultimate, pooled))
    }
}

// ------------------------------------------------------------------ scheduler

/// A flow-matching Euler schedule as `StableDiffusion3Pipeline` sets it
/// (`scheduler.set_timesteps(n)`, no explicit sigmas): `sigmas` (steps + 1,
/// ending at 0) and `timesteps` (1000 sigma).
#[derive(Clone, Debug)]
pub struct Sd3Schedule {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
}

impl Sd3Schedule {
    /// `FlowMatchEulerDiscreteScheduler.set_timesteps(steps, mu)`: `mu` is
    /// used with dynamic shifting only.
    pub fn new(cfg: &FlowMatchConfig, steps: usize, mu: f64) -> Result<Self> {
        if steps == 0 {
            return Err(WorkerError::Invalid("0 denoising steps".into()));
        }
        let n = cfg.num_train_timesteps as f64;
        // __init__: sigmas = linspace(1, N, N)[::-1] / N (f32), shifted when static
        let s0 = (1.0f32 / cfg.num_train_timesteps as f32) as f64;
        let sigma_min = if cfg.use_dynamic_shifting {
            s0
        } else {
            let s = s0 as f32;
            let sh = cfg.shift as f32;
            ((sh * s) / (1.0f32 + (sh - 1.0f32) * s)) as f64
        };
        let (start, stop) = (n, sigma_min * n);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = if steps == 1 {
                    start
                } else if i == steps - 1 {
                    stop
                } else {
                    start + i as f64 * ((stop - start) / (steps - 1) as f64)
                };
                let s = t / n;
                let s = if cfg.use_dynamic_shifting {
                    if cfg.exponential {
                        mu.exp() / (mu.exp() + (1.0 / s - 1.0))
                    } else {
                        mu / (mu + (1.0 / s - 1.0))
                    }
                } else {
                    cfg.shift * s / (1.0 + (cfg.shift - 1.0) * s)
                };
                s as f32
            })
            .collect();
        let timesteps = sigmas
            .iter()
            .map(|s| s * cfg.num_train_timesteps as f32)
            .collect();
        sigmas.push(0.0);
        Ok(Sd3Schedule { sigmas, timesteps })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    /// `sample + (sigma[i+1] - sigma[i]) * velocity`.
    pub fn step(&self, velocity: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        Ok((sample + (velocity * dt as f64)?)?)
    }
}

// ------------------------------------------------------------------ transformer

/// `transformer/config.json` of an `SD3Transformer2DModel`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sd3Config {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub pos_embed_max_size: usize,
    /// `qk_norm = "rms_norm"` (SD 3.5) or none (SD 3).
    pub qk_rms_norm: bool,
    /// Blocks with a second (image-only) attention: SD 3.5 Medium's MMDiT-X.
    pub dual_attention_layers: Vec<usize>,
}

impl Sd3Config {
    pub fn from_diffusers(c: &ConfigReader) -> Result<Self> {
        if let Some(class) = c.str("_class_name") {
            if class != "SD3Transformer2DModel" {
                return Err(c.error(format!(
                    "_class_name = {class:?}: only SD3Transformer2DModel is implemented"
                )));
            }
        }
        let v = c.value();
        let dual_attention_layers: Vec<usize> = match &v["dual_attention_layers"] {
            Value::Null => Vec::new(),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|x| x as usize).ok_or_else(|| {
                        c.error(format!(
                            "dual_attention_layers entry {x} is not a block index"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(c.error(format!(
                    "dual_attention_layers = {other} is not a list of block indexes"
                )))
            }
        };
        let qk_rms_norm = match c.str("qk_norm") {
            None => false,
            Some("rms_norm") => true,
            Some(other) => {
                return Err(c.error(format!(
                    "qk_norm = {other:?}: only \"rms_norm\" (or none) is implemented"
                )))
            }
        };
        let pos_embed_max_size = c.opt_usize("pos_embed_max_size")?.ok_or_else(|| {
            c.error("pos_embed_max_size is not set: only cropped position embeddings (SD3) are implemented".into())
        })?;
        for key in ["use_pos_embed"] {
            if !c.bool(key, true)? {
                return Err(c.error(format!("{key} = false is not supported")));
            }
        }
        let in_channels = c.usize("in_channels", 16)?;
        let cfg = Sd3Config {
            sample_size: c.usize("sample_size", 128)?,
            patch_size: c.usize("patch_size", 2)?,
            in_channels,
            out_channels: c.opt_usize("out_channels")?.unwrap_or(in_channels),
            num_layers: c.usize("num_layers", 18)?,
            attention_head_dim: c.usize("attention_head_dim", 64)?,
            num_attention_heads: c.usize("num_attention_heads", 18)?,
            joint_attention_dim: c.usize("joint_attention_dim", 4096)?,
            caption_projection_dim: c.usize("caption_projection_dim", 1152)?,
            pooled_projection_dim: c.usize("pooled_projection_dim", 2048)?,
            pos_embed_max_size,
            qk_rms_norm,
            dual_attention_layers,
        };
        if cfg.caption_projection_dim != cfg.inner_dim() {
            return Err(c.error(format!(
                "caption_projection_dim = {} differs from num_attention_heads x attention_head_dim = {}",
                cfg.caption_projection_dim,
                cfg.inner_dim()
            )));
        }
        if cfg.num_layers == 0 || cfg.patch_size == 0 {
            return Err(c.error("num_layers and patch_size must be positive".into()));
        }
        if let Some(i) = cfg
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= cfg.num_layers)
        {
            return Err(c.error(format!(
                "dual_attention_layers names block {i}, the model has {} blocks",
                cfg.num_layers
            )));
        }
        Ok(cfg)
    }

    pub fn inner_dim(&self) -> usize {
        self.attention_head_dim * self.num_attention_heads
    }
}

fn gate(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(&g.unsqueeze(1)?)
}

/// The context stream of a `JointTransformerBlock`: full (AdaLayerNormZero,
/// attention output, feed-forward) or `context_pre_only` (the last block:
/// AdaLayerNormContinuous, keys and values only).
enum ContextStream {
    Full {
        norm1: Linear,
        to_add_out: Linear,
        ff: FeedForward,
    },
    PreOnly {
        norm1: Linear,
    },
}

/// diffusers' `JointTransformerBlock` (MMDiT).
struct JointBlock {
    norm1: Linear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    /// MMDiT-X: `attn2` (image self-attention) and its `to_out.0`.
    attn2: Option<(Qkv, Linear)>,
    ff: FeedForward,
    context: ContextStream,
    heads: usize,
}

impl JointBlock {
    fn new(
        dim: usize,
        heads: usize,
        qk_norm: bool,
        pre_only: bool,
        dual: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        let hd = dim / heads;
        let context = if pre_only {
            ContextStream::PreOnly {
                norm1: linear(dim, 2 * dim, vb.pp("norm1_context.linear"))?,
            }
        } else {
            ContextStream::Full {
                norm1: linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
                to_add_out: linear(dim, dim, a.pp("to_add_out"))?,
                ff: FeedForward::new(dim, vb.pp("ff_context"))?,
            }
        };
        let attn2 = if dual {
            let a2 = vb.pp("attn2");
            Some((
                Qkv::new(
                    dim,
                    hd,
                    qk_norm,
                    ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                    &a2,
                )?,
                linear(dim, dim, a2.pp("to_out.0"))?,
            ))
        } else {
            None
        };
        let n1 = if dual { 9 } else { 6 };
        Ok(JointBlock {
            norm1: linear(dim, n1 * dim, vb.pp("norm1.linear"))?,
            attn2,
            img: Qkv::new(
                dim,
                hd,
                qk_norm,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &a,
            )?,
            txt: Qkv::new(
                dim,
                hd,
                qk_norm,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                &a,
            )?,
            to_out: linear(dim, dim, a.pp("to_out.0"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            context,
            heads,
        })
    }

    /// (img, txt) -> (img, txt; None after a `context_pre_only` block);
    /// `temb_act` = silu(temb).
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        // AdaLayerNormZero: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        // (SD35AdaLayerNormZeroX: then shift_msa2, scale_msa2, gate_msa2)
        let chunks = if self.attn2.is_some() { 9 } else { 6 };
        let m = self.norm1.forward(temb_act)?.chunk(chunks, 1)?;
        let ln_img = layer_norm_plain(img, 1e-6)?;
        let n_img = modulate(&ln_img, &m[0], &m[1])?;
        let (n_txt, c) = match &self.context {
            ContextStream::Full { norm1, .. } => {
                let c = norm1.forward(temb_act)?.chunk(6, 1)?;
                (modulate(&layer_norm_plain(txt, 1e-6)?, &c[0], &c[1])?, c)
            }
            ContextStream::PreOnly { norm1 } => {
                // AdaLayerNormContinuous: scale first, then shift
                let c = norm1.forward(temb_act)?.chunk(2, 1)?;
                (modulate(&layer_norm_plain(txt, 1e-6)?, &c[1], &c[0])?, c)
            }
        };
        let (qi, ki, vi) = self.img.forward(&n_img, self.heads)?;
        let (qt, kt, vt) = self.txt.forward(&n_txt, self.heads)?;
        // JointAttnProcessor2_0: [image, context] along the sequence
        let q = Tensor::cat(&[&qi, &qt], 1)?;
        let k = Tensor::cat(&[&ki, &kt], 1)?;
        let v = Tensor::cat(&[&vi, &vt], 1)?;
        let out = attention(&q, &k, &v)?;
        let li = img.dim(1)?;
        let lt = txt.dim(1)?;
        let a_img = self.to_out.forward(&out.narrow(1, 0, li)?)?;

        let mut img = (img + gate(&a_img, &m[2])?)?;
        if let Some((qkv, to_out)) = &self.attn2 {
            let n2 = modulate(&ln_img, &m[6], &m[7])?;
            let (q, k, v) = qkv.forward(&n2, self.heads)?;
            let a2 = to_out.forward(&attention(&q, &k, &v)?)?;
            img = (img + gate(&a2, &m[8])?)?;
        }
        let n = modulate(&layer_norm_plain(&img, 1e-6)?, &m[3], &m[4])?;
        let img = (&img + gate(&self.ff.forward(&n)?, &m[5])?)?;

        let txt = match &self.context {
            ContextStream::PreOnly { .. } => None,
            ContextStream::Full { to_add_out, ff, .. } => {
                let a_txt = to_add_out.forward(&out.narrow(1, li, lt)?)?;
                let txt = (txt + gate(&a_txt, &c[2])?)?;
                let n = modulate(&layer_norm_plain(&txt, 1e-6)?, &c[3], &c[4])?;
                Some((&txt + gate(&ff.forward(&n)?, &c[5])?)?)
            }
        };
        Ok((img, txt))
    }
}

/// diffusers' `SD3Transformer2DModel` (its weight names), f32.
pub struct Sd3Transformer {
    cfg: Sd3Config,
    proj: Conv2d,
    pos_embed: Tensor,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    text_embedder: Mlp2,
    blocks: Vec<JointBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl Sd3Transformer {
    pub fn new(cfg: &Sd3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        let heads = cfg.num_attention_heads;
        let t = vb.pp("time_text_embed");
        let p = cfg.patch_size;
        let m = cfg.pos_embed_max_size;
        Ok(Sd3Transformer {
            cfg: cfg.clone(),
            proj: conv2d(
                cfg.in_channels,
                dim,
                p,
                Conv2dConfig {
                    stride: p,
                    ..Default::default()
                },
                vb.pp("pos_embed.proj"),
            )?,
            pos_embed: vb.pp("pos_embed").get((1, m * m, dim), "pos_embed")?,
            context_embedder: linear(
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                vb.pp("context_embedder"),
            )?,
            timestep_embedder: Mlp2::new(256, dim, t.pp("timestep_embedder"))?,
            text_embedder: Mlp2::new(cfg.pooled_projection_dim, dim, t.pp("text_embedder"))?,
            blocks: (0..cfg.num_layers)
                .map(|i| {
                    JointBlock::new(
                        dim,
                        heads,
                        cfg.qk_rms_norm,
                        i + 1 == cfg.num_layers,
                        cfg.dual_attention_layers.contains(&i),
                        vb.pp(format!("transformer_blocks.{i}")),
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: linear(dim, p * p * cfg.out_channels, vb.pp("proj_out"))?,
        })
    }

    pub fn config(&self) -> &Sd3Config {
        &self.cfg
    }

    /// `PatchEmbed.cropped_pos_embed`: (1, h * w, dim) for h x w patches.
    fn cropped_pos_embed(&self, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let m = self.cfg.pos_embed_max_size;
        if h > m || w > m {
            candle_core::bail!(
                "{h}x{w} patches exceed pos_embed_max_size = {m}: the image is too large for this model"
            );
        }
        let (top, left) = ((m - h) / 2, (m - w) / 2);
        let dim = self.cfg.inner_dim();
        self.pos_embed
            .reshape((1, m, m, dim))?
            .narrow(1, top, h)?
            .narrow(2, left, w)?
            .reshape((1, h * w, dim))
    }

    /// The prediction for latents `x` (B, C, H, W), prompt embeddings
    /// `context` (B, L, joint_attention_dim), `pooled` (B,
    /// pooled_projection_dim) at scheduler timestep `timestep` (0..1000).
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        timestep: f32,
    ) -> candle_core::Result<Tensor> {
        let (b, _, hh, ww) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (h, w) = (hh / p, ww / p);
        let img = self.proj.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let mut img = img.broadcast_add(&self.cropped_pos_embed(h, w)?)?;
        let t = Tensor::from_vec(vec![timestep; b], b, x.device())?;
        let temb = (self.timestep_embedder.forward(&timestep_proj(&t)?)?
            + self.text_embedder.forward(pooled)?)?;
        let temb_act = temb.silu()?;
        let mut txt = Some(self.context_embedder.forward(context)?);
        for blk in &self.blocks {
            let ctx = txt
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("context after a pre-only block".into()))?;
            let (i, t) = blk.forward(&img, ctx, &temb_act)?;
            img = i;
            txt = t;
        }
        let m = self.norm_out.forward(&temb_act)?.chunk(2, 1)?;
        let img = modulate(&layer_norm_plain(&img, 1e-6)?, &m[1], &m[0])?;
        let out = self.proj_out.forward(&img)?;
        let c = self.cfg.out_channels;
        // "nhwpqc->nchpwq"
        out.reshape(vec![b, h, w, p, p, c])?
            .permute(vec![0, 5, 1, 3, 2, 4])?
            .reshape((b, c, h * p, w * p))
    }
}

// ------------------------------------------------------------------ VAE

// ------------------------------------------------------------------ pipeline

/// Diffusers' `StableDiffusion3Pipeline.__call__` default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 256;

/// A loaded Stable Diffusion 3.5 pipeline.
pub struct Sd3Pipeline {
    tokenizer: PromptTokenizer,
    text_encoder: ClipProjEncoder,
    tokenizer_2: PromptTokenizer,
    text_encoder_2: ClipProjEncoder,
    tokenizer_3: T5PromptTokenizer,
    text_encoder_3: Mutex<T5EncoderModel>,
    t5_width: usize,
    transformer: Sd3Transformer,
    vae: AutoEncoderKL,
    scheduler: FlowMatchConfig,
    scaling_factor: f64,
    shift_factor: f64,
    vae_scale_factor: usize,
    latent_channels: usize,
    width: usize,
    height: usize,
    device: Device,
    fingerprint: String,
    source: String,
    random_weights: bool,
}

impl Sd3Pipeline {
    /// Loads a folder or Hub id (see [`resolve_pipeline`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve_pipeline(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local diffusers `StableDiffusion3Pipeline` folder.
    pub fn load_dir(dir: &Path, source: &str, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, source, DEFAULT_MAX_SEQUENCE_LENGTH, device)
    }

    /// As [`Self::load_dir`], with the T5 prompt length.
    pub fn load_dir_with(
        dir: &Path,
        source: &str,
        max_sequence_length: usize,
        device: &Device,
    ) -> Result<Self> {
        check_layout(dir)?;
        let part = |p: &str| dir.join(p);

        let sched = ConfigReader::read(&part("scheduler"), "scheduler_config.json")?;
        let scheduler = FlowMatchConfig::from_diffusers(&sched)?;

        let (text_encoder, cfg_l, proj_l) = ClipProjEncoder::load(&part("text_encoder"), device)?;
        let tokenizer = PromptTokenizer::load(
            &part("tokenizer"),
            cfg_l.max_position_embeddings,
            cfg_l.vocab_size,
        )?;
        let (text_encoder_2, cfg_g, proj_g) =
            ClipProjEncoder::load(&part("text_encoder_2"), device)?;
        let tokenizer_2 = PromptTokenizer::load(
            &part("tokenizer_2"),
            cfg_g.max_position_embeddings,
            cfg_g.vocab_size,
        )?;

        let (tokenizer_3, text_encoder_3, t5_cfg) = load_t5(
            &part("text_encoder_3"),
            &part("tokenizer_3"),
            max_sequence_length,
            device,
        )?;

        let tcfg_r = ConfigReader::read(&part("transformer"), "config.json")?;
        let tcfg = Sd3Config::from_diffusers(&tcfg_r)?;
        if tcfg.joint_attention_dim != t5_cfg.d_model {
            return Err(tcfg_r.error(format!(
                "joint_attention_dim = {} but the T5 encoder's d_model is {}",
                tcfg.joint_attention_dim, t5_cfg.d_model
            )));
        }
        if tcfg.pooled_projection_dim != proj_l + proj_g {
            return Err(tcfg_r.error(format!(
                "pooled_projection_dim = {} but the CLIP encoders project to {proj_l} + {proj_g}",
                tcfg.pooled_projection_dim
            )));
        }
        let clip_width = cfg_l.tower.hidden_size + cfg_g.tower.hidden_size;
        if clip_width > t5_cfg.d_model {
            return Err(tcfg_r.error(format!(
                "the CLIP states ({clip_width} wide) are wider than the T5 states ({})",
                t5_cfg.d_model
            )));
        }
        let (vb, label) =
            part_var_builder(&part("transformer"), "diffusion_pytorch_model", device)?;
        let transformer = Sd3Transformer::new(&tcfg, vb).map_err(|e| weights_err(&label, e))?;

        let vcfg_r = ConfigReader::read(&part("vae"), "config.json")?;
        let (vcfg, scaling_factor, shift_factor, vae_scale_factor) = vae_config(
            &vcfg_r,
            VaeDefaults {
                latent_channels: 16,
                scaling_factor: 1.5305,
                shift_factor: Some(0.0609),
            },
        )?;
        common::check_latent_channels(
            &tcfg_r,
            tcfg.in_channels,
            tcfg.out_channels,
            vcfg.latent_channels,
        )?;
        let latent_channels = vcfg.latent_channels;
        let vae = common::load_vae(dir, vcfg, device)?;
        // diffusers' default: transformer sample_size * vae_scale_factor
        let size = tcfg.sample_size * vae_scale_factor;

        Ok(Sd3Pipeline {
            fingerprint: fingerprint(dir, max_sequence_length)?,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            tokenizer_3,
            text_encoder_3: Mutex::new(text_encoder_3),
            t5_width: t5_cfg.d_model,
            transformer,
            vae,
            scheduler,
            scaling_factor,
            shift_factor,
            vae_scale_factor,
            latent_channels,
            width: size,
            height: size,
            device: device.clone(),
            source: source.to_string(),
            random_weights: crate::encoders::hf::has_random_weights(dir),
        })
    }

    /// Sets the output size (diffusers' `width=`, `height=`; rounded down to
    /// multiples of vae_scale_factor x patch_size, which diffusers requires).
    pub fn with_resolution(mut self, width: usize, height: usize) -> Result<Self> {
        let m = self.vae_scale_factor * self.transformer.config().patch_size;
        (self.width, self.height) = common::round_resolution(width, height, m, "SD3")?;
        Ok(self)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn transformer(&self) -> &Sd3Transformer {
        &self.transformer
    }

    pub fn tokenizers(&self) -> (&PromptTokenizer, &PromptTokenizer, &T5PromptTokenizer) {
        (&self.tokenizer, &self.tokenizer_2, &self.tokenizer_3)
    }

    pub fn text_encoders(&self) -> (&ClipProjEncoder, &ClipProjEncoder) {
        (&self.text_encoder, &self.text_encoder_2)
    }

    /// Output (width, height).
    pub fn resolution(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// (channels, h, w) of the latents.
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let f = self.vae_scale_factor;
        (self.latent_channels, self.height / f, self.width / f)
    }

    /// The schedule for `steps` steps at this resolution.
    pub fn scheduler(&self, steps: usize) -> Result<Sd3Schedule> {
        let (_, h, w) = self.latent_shape();
        let p = self.transformer.config().patch_size;
        let mu = self.scheduler.mu((h / p) * (w / p));
        Sd3Schedule::new(&self.scheduler, steps, mu)
    }

    /// The T5 states (B, L, d_model) for (B, L) u32 ids (no attention mask).
    pub fn encode_t5_ids(&self, ids: &Tensor) -> Result<Tensor> {
        t5_forward(&self.text_encoder_3, ids)
    }

    /// diffusers' `encode_prompt` for one prompt: (prompt_embeds (1, 77 + L,
    /// T5 width), pooled (1, proj_L + proj_G)).
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let row = |ids: Vec<u32>| {
            let n = ids.len();
            Tensor::from_vec(ids, (1, n), &self.device)
        };
        let (l, pl) = self
            .text_encoder
            .forward(&row(self.tokenizer.ids(prompt)?)?)?;
        let (g, pg) = self
            .text_encoder_2
            .forward(&row(self.tokenizer_2.ids(prompt)?)?)?;
        let t5 = self.encode_t5_ids(&row(self.tokenizer_3.ids(prompt)?)?)?;
        let clip = Tensor::cat(&[&l, &g], 2)?;
        let pad = self.t5_width - clip.dim(2)?;
        let clip = clip.pad_with_zeros(2, 0, pad)?;
        let embeds = Tensor::cat(&[&clip, &t5], 1)?;
        let pooled = Tensor::cat(&[&pl, &pg], 1)?;
        Ok((embeds, pooled))
    }

    /// The guided prediction: with `uncond` (negative embeds, pooled) the
    /// transformer runs on the batch [uncond, cond] and
    /// `v_u + guidance (v_c - v_u)` is returned; else the conditional one.
    pub fn velocity(
        &self,
        latents: &Tensor,
        cond: &(Tensor, Tensor),
        uncond: Option<&(Tensor, Tensor)>,
        t: f32,
        guidance: f64,
    ) -> Result<Tensor> {
        match uncond {
            None => Ok(self.transformer.forward(latents, &cond.0, &cond.1, t)?),
            Some(u) => {
                let x = Tensor::cat(&[latents, latents], 0)?;
                let e = Tensor::cat(&[&u.0, &cond.0], 0)?;
                let p = Tensor::cat(&[&u.1, &cond.1], 0)?;
                let v = self.transformer.forward(&x, &e, &p, t)?;
                let (vu, vc) = (v.i(0..1)?, v.i(1..2)?);
                Ok((&vu + ((vc - &vu)? * guidance)?)?)
            }
        }
    }

    /// The denoising loop from initial latents (1, C, h, w); `uncond` as in
    /// [`Self::velocity`].
    pub fn denoise(
        &self,
        cond: &(Tensor, Tensor),
        uncond: Option<&(Tensor, Tensor)>,
        latents: &Tensor,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        let sched = self.scheduler(steps)?;
        let mut latents = latents.clone();
        for (i, &t) in sched.timesteps().iter().enumerate() {
            let v = self.velocity(&latents, cond, uncond, t, guidance)?;
            latents = sched.step(&v, i, &latents)?;
        }
        Ok(latents)
    }

    /// `vae.decode(latents / scaling_factor + shift_factor)` (B, 3, H, W).
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        let x = ((latents / self.scaling_factor)? + self.shift_factor)?;
        common::vae_decode_each(&self.vae, &x)
    }

    /// The image in [0, 1]: `(decode_raw / 2 + 0.5).clamp(0, 1)`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        common::unit_range(&self.decode_raw(latents)?)
    }

    /// The initial latents of a request: its `init_latents` ((C, h, w)
    /// row-major, what diffusers' `latents=` takes; the RNG is not used),
    /// else a standard Gaussian from its seed.
    pub fn initial_latents(&self, r: &GenerateRequest) -> Result<Tensor> {
        common::initial_latents(r, self.latent_shape(), &self.device)
    }

    /// One image for one request (classifier-free guidance with the empty
    /// negative prompt when `guidance` > 1, as diffusers).
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
        let init = self.initial_latents(r)?;
        let latents = self.denoise(&cond, uncond.as_ref(), &init, steps, guidance)?;
        let image = self.decode(&latents)?;
        Ok(common::to_rgb(&image)?.remove(0))
    }
}

/// A hash of the pipeline's configs, tokenizer files and weight samples.
fn fingerprint(dir: &Path, max_sequence_length: usize) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"mirgen-sd3-pipeline-v1\0");
    h.update((max_sequence_length as u64).to_le_bytes());
    let mut names = vec![
        "model_index.json".to_string(),
        "scheduler/scheduler_config.json".into(),
    ];
    for p in [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae",
    ] {
        names.push(format!("{p}/config.json"));
    }
    for p in ["tokenizer", "tokenizer_2", "tokenizer_3"] {
        for f in [
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
            "special_tokens_map.json",
        ] {
            names.push(format!("{p}/{f}"));
        }
    }
    let weights = [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("text_encoder_3", "model"),
        ("transformer", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ];
    common::fingerprint(h, dir, &names, &weights)
}

// ------------------------------------------------------------------ generator

/// A diffusers Stable Diffusion 3.5 pipeline as an
/// [`ImageGenerator`](crate::ImageGenerator): classifier-free guidance with
/// scale `guidance` (GenIR: 3.5) and the empty negative prompt; values <= 1
/// skip the unconditional pass.
pub type Sd3Generator = DiffusionGenerator<Sd3Pipeline>;

impl_diffusion_pipeline!(Sd3Pipeline, "sd3", |p| {
    let (w, h) = p.resolution();
    format!("sd3-pipeline-{}/{}x{}", p.fingerprint, w, h)
});
