//! FLUX.1 text-to-image pipelines in the diffusers layout, computing what
//! diffusers' `FluxPipeline` computes.
//!
//! - FLUX.1: Black Forest Labs, Hugging Face `black-forest-labs/FLUX.1-schnell`
//!   (timestep-distilled, no guidance embedding, static shift) and
//!   `black-forest-labs/FLUX.1-dev` (guidance-distilled: the guidance scale is
//!   an input of the transformer, dynamic shifting); rectified flow
//!   (Esser et al., *Scaling Rectified Flow Transformers for High-Resolution
//!   Image Synthesis*, arXiv 2403.03206).
//!
//! A pipeline folder holds `model_index.json` (`FluxPipeline`), `tokenizer/`
//! (CLIP BPE, see [`PromptTokenizer`]), `text_encoder/` (transformers
//! `CLIPTextModel`, its pooled output), `tokenizer_2/` (T5 `tokenizer.json`),
//! `text_encoder_2/` (transformers `T5EncoderModel`, candle's T5),
//! `transformer/` (`FluxTransformer2DModel`, diffusers' weight names, written
//! here: candle's `models::flux` has BFL's fused layout), `vae/`
//! (`AutoencoderKL` with `shift_factor`) and `scheduler/`
//! (`FlowMatchEulerDiscreteScheduler`). The loop is diffusers':
//!
//! 1. pooled = CLIP(tokenizer(prompt, padding max_length 77)).pooler_output;
//!    embeds = T5(tokenizer_2(prompt, padding/truncation to
//!    `max_sequence_length`, default 512))[0];
//! 2. latents: (1, h/2 * w/2, 4 C) packed 2x2 patches of (1, C, h, w) noise
//!    (h, w = 2 * (H // (2 vae_scale_factor)));
//! 3. sigmas = linspace(1, 1/n, n), shifted (dynamic: `mu` from the image
//!    sequence length), timesteps = 1000 sigmas; per step
//!    v = transformer(latents, t / 1000, guidance, pooled, embeds, ids);
//!    latents += (sigma_next - sigma) v;
//! 4. image = vae.decode(unpack(latents) / scaling_factor + shift_factor)
//!    / 2 + 0.5, clamped, times 255, rounded to u8.
//!
//! Parity with diffusers is tested on a tiny random checkpoint of this exact
//! layout (`tests/flux_parity.rs`, fixture made by
//! `scripts/fixtures/make_flux_fixtures.py`).

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{linear, rms_norm, Linear, RmsNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::common::{
    self, impl_diffusion_pipeline, no_note, part_var_builder, pipeline_class_is,
    DiffusionGenerator, Layout,
};
use super::sd_turbo::{
    resolve_pipeline, vae_config, weights_err, ClipTextConfig, ClipTextEncoder, PromptTokenizer,
    VaeDefaults,
};
use crate::encoders::hf::{load_err, ConfigReader};
use crate::seed::gaussian;
use crate::{GenerateRequest, Result, RgbImage, WorkerError};

// ------------------------------------------------------------------ folder

/// The sub-folders a diffusers FLUX pipeline needs.
pub const PARTS: [&str; 7] = [
    "tokenizer",
    "text_encoder",
    "tokenizer_2",
    "text_encoder_2",
    "transformer",
    "vae",
    "scheduler",
];

/// Whether a folder's `model_index.json` names a `FluxPipeline`.
pub fn is_flux_pipeline(dir: &Path) -> bool {
    pipeline_class_is(dir, "FluxPipeline")
}

fn check_layout(dir: &Path) -> Result<ConfigReader> {
    common::check_layout(
        dir,
        &Layout {
            class: "FluxPipeline",
            parts: &PARTS,
            what: "a FLUX pipeline is a diffusers folder",
            wrong_class: "the FLUX loader reads FluxPipeline folders",
            missing_note: no_note,
        },
    )
}

// ------------------------------------------------------------------ T5 tokenizer

/// `tokenizer_2/tokenizer.json` as diffusers calls it: `padding="max_length",
/// truncation=True` to `max_sequence_length` (the `</s>` is kept).
pub struct T5PromptTokenizer {
    tokenizer: Tokenizer,
    max_len: usize,
}

impl T5PromptTokenizer {
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Err(load_err(format!(
                "{}: missing; the T5 tokenizer is read from tokenizer.json (spiece.model alone is not \
                 supported: save it with T5TokenizerFast)",
                file.display()
            )));
        }
        let tokenizer = Tokenizer::from_file(&file).map_err(|e| {
            load_err(format!(
                "{}: not a tokenizer.json this version of `tokenizers` reads ({e})",
                file.display()
            ))
        })?;
        let pad_token = if dir.join("tokenizer_config.json").exists() {
            let tc = ConfigReader::read(dir, "tokenizer_config.json")?;
            let v = &tc.value()["pad_token"];
            v.as_str()
                .or_else(|| v["content"].as_str())
                .unwrap_or("<pad>")
                .to_string()
        } else {
            "<pad>".to_string()
        };
        let pad_id = tokenizer.token_to_id(&pad_token).ok_or_else(|| {
            load_err(format!(
                "{}: the pad token {pad_token:?} is not in the vocabulary",
                file.display()
            ))
        })?;
        let mut tokenizer = tokenizer;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| load_err(format!("{}: {e}", file.display())))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        Ok(T5PromptTokenizer { tokenizer, max_len })
    }

    /// Exactly `max_len` ids.
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        if ids.len() != self.max_len {
            return Err(WorkerError::Tokenizer(format!(
                "T5 tokenization gave {} ids, expected {}",
                ids.len(),
                self.max_len
            )));
        }
        Ok(ids)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// A T5 text encoder part (`T5EncoderModel`, FLUX's `text_encoder_2` and
/// SD3's `text_encoder_3`) with its tokenizer part: (tokenizer, encoder,
/// config).
pub(crate) fn load_t5(
    encoder_dir: &Path,
    tokenizer_dir: &Path,
    max_sequence_length: usize,
    device: &Device,
) -> Result<(T5PromptTokenizer, T5EncoderModel, T5Config)> {
    let t5_reader = ConfigReader::read(encoder_dir, "config.json")?;
    let t5_cfg: T5Config = serde_json::from_value(t5_reader.value().clone())
        .map_err(|e| t5_reader.error(format!("not a T5 config ({e})")))?;
    let tokenizer = T5PromptTokenizer::load(tokenizer_dir, max_sequence_length)?;
    let (vb, label) = part_var_builder(encoder_dir, "model", device)?;
    let encoder = T5EncoderModel::load(vb, &t5_cfg).map_err(|e| weights_err(&label, e))?;
    Ok((tokenizer, encoder, t5_cfg))
}

/// The T5 states (B, L, d_model) for (B, L) u32 ids (no attention mask);
/// candle's T5 needs `&mut` (its cache), hence the lock.
pub(crate) fn t5_forward(t5: &Mutex<T5EncoderModel>, ids: &Tensor) -> Result<Tensor> {
    let mut t5 = t5
        .lock()
        .map_err(|_| WorkerError::Invalid("T5 encoder lock poisoned".into()))?;
    Ok(t5.forward(ids)?)
}

// ------------------------------------------------------------------ scheduler

/// `FlowMatchEulerDiscreteScheduler`'s options FLUX uses.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    /// `time_shift_type = "exponential"` (else linear).
    pub exponential: bool,
}

impl FlowMatchConfig {
    pub fn from_diffusers(c: &ConfigReader) -> Result<Self> {
        if let Some(class) = c.str("_class_name") {
            if class != "FlowMatchEulerDiscreteScheduler" {
                return Err(c.error(format!(
                    "_class_name = {class:?}: only FlowMatchEulerDiscreteScheduler is implemented"
                )));
            }
        }
        for key in [
            "invert_sigmas",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "stochastic_sampling",
            "use_flow_sigmas",
        ] {
            if c.bool(key, false)? {
                return Err(c.error(format!("{key} = true is not supported")));
            }
        }
        if !c.value()["shift_terminal"].is_null() {
            return Err(c.error("shift_terminal is not supported".into()));
        }
        let exponential = match c.str("time_shift_type").unwrap_or("exponential") {
            "exponential" => true,
            "linear" => false,
            other => return Err(c.error(format!("time_shift_type = {other:?} is unknown"))),
        };
        Ok(FlowMatchConfig {
            num_train_timesteps: c.usize("num_train_timesteps", 1000)?,
            shift: c.f64("shift", 1.0)?,
            use_dynamic_shifting: c.bool("use_dynamic_shifting", false)?,
            base_shift: c.f64("base_shift", 0.5)?,
            max_shift: c.f64("max_shift", 1.15)?,
            base_image_seq_len: c.usize("base_image_seq_len", 256)?,
            max_image_seq_len: c.usize("max_image_seq_len", 4096)?,
            exponential,
        })
    }

    /// The pipeline's `calculate_shift`: `mu` for an image sequence length.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    /// The schedule of `steps` steps for an image of `image_seq_len` tokens,
    /// as `FluxPipeline` sets it (sigmas = linspace(1, 1/steps, steps)).
    pub fn build(&self, steps: usize, image_seq_len: usize) -> Result<FlowMatch> {
        if steps == 0 {
            return Err(WorkerError::Invalid("0 denoising steps".into()));
        }
        let mu = self.mu(image_seq_len);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                };
                let s = s as f32;
                if self.use_dynamic_shifting {
                    let x = 1.0f32 / s - 1.0;
                    if self.exponential {
                        let e = mu.exp() as f32;
                        e / (e + x)
                    } else {
                        let m = mu as f32;
                        m / (m + x)
                    }
                } else {
                    let sh = self.shift as f32;
                    sh * s / (1.0 + (sh - 1.0) * s)
                }
            })
            .collect();
        let timesteps = sigmas
            .iter()
            .map(|s| s * self.num_train_timesteps as f32)
            .collect();
        sigmas.push(0.0);
        Ok(FlowMatch { sigmas, timesteps })
    }
}

/// A flow-matching Euler schedule: `sigmas` (steps + 1, ending at 0) and
/// `timesteps` (1000 sigma).
#[derive(Clone, Debug)]
pub struct FlowMatch {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
}

impl FlowMatch {
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

/// `transformer/config.json` (`FluxTransformer2DModel`).
#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    pub fn from_diffusers(c: &ConfigReader) -> Result<Self> {
        if let Some(class) = c.str("_class_name") {
            if class != "FluxTransformer2DModel" {
                return Err(c.error(format!(
                    "_class_name = {class:?}: only FluxTransformer2DModel is implemented"
                )));
            }
        }
        if c.usize("patch_size", 1)? != 1 {
            return Err(c.error("patch_size other than 1 is not supported".into()));
        }
        let axes: Vec<usize> = match &c.value()["axes_dims_rope"] {
            Value::Null => vec![16, 56, 56],
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| c.error(format!("axes_dims_rope entry {x} is not a count")))
                })
                .collect::<Result<_>>()?,
            other => return Err(c.error(format!("axes_dims_rope = {other} is not a list"))),
        };
        let in_channels = c.usize("in_channels", 64)?;
        let cfg = FluxConfig {
            in_channels,
            out_channels: c.usize("out_channels", in_channels)?,
            num_layers: c.usize("num_layers", 19)?,
            num_single_layers: c.usize("num_single_layers", 38)?,
            attention_head_dim: c.usize("attention_head_dim", 128)?,
            num_attention_heads: c.usize("num_attention_heads", 24)?,
            joint_attention_dim: c.usize("joint_attention_dim", 4096)?,
            pooled_projection_dim: c.usize("pooled_projection_dim", 768)?,
            guidance_embeds: c.bool("guidance_embeds", false)?,
            axes_dims_rope: axes,
        };
        if cfg.axes_dims_rope.len() != 3
            || cfg.axes_dims_rope.iter().sum::<usize>() != cfg.attention_head_dim
            || cfg.axes_dims_rope.iter().any(|d| !d.is_multiple_of(2))
        {
            return Err(c.error(format!(
                "axes_dims_rope = {:?}: three even sizes summing to attention_head_dim = {} are needed",
                cfg.axes_dims_rope, cfg.attention_head_dim
            )));
        }
        if !cfg.in_channels.is_multiple_of(4) || cfg.out_channels != cfg.in_channels {
            return Err(c.error(format!(
                "in_channels = {}, out_channels = {}: packed 2x2 latents need in_channels = out_channels, \
                 a multiple of 4",
                cfg.in_channels, cfg.out_channels
            )));
        }
        Ok(cfg)
    }

    pub fn inner_dim(&self) -> usize {
        self.attention_head_dim * self.num_attention_heads
    }
}

/// LayerNorm without affine parameters.
pub(crate) fn layer_norm_plain(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_sub(&mean)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `x * (1 + scale) + shift` with (B, dim) scale and shift (FLUX and SD3).
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// diffusers' `get_timestep_embedding(t, 256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`: (B,) -> (B, 256) `[cos, sin]`.
pub(crate) fn timestep_proj(t: &Tensor) -> candle_core::Result<Tensor> {
    let half = 128usize;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// Linear, SiLU, Linear (`TimestepEmbedding`, `PixArtAlphaTextProjection`;
/// FLUX and SD3).
pub(crate) struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    pub(crate) fn new(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Mlp2 {
            linear_1: linear(i, o, vb.pp("linear_1"))?,
            linear_2: linear(o, o, vb.pp("linear_2"))?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `FeedForward(dim, activation_fn="gelu-tanh-approximate")` (FLUX; SD3's
/// "gelu-approximate" is the same tanh GELU).
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(FeedForward {
            proj: linear(dim, 4 * dim, vb.pp("net.0.proj"))?,
            out: linear(4 * dim, dim, vb.pp("net.2"))?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&self.proj.forward(x)?.gelu()?)
    }
}

/// RoPE on (B, S, H, D) with interleaved pairs; cos/sin (S, D).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, h, d) = x.dims4()?;
    let pairs = x.reshape((b, s, h, d / 2, 2))?;
    let re = pairs.narrow(4, 0, 1)?;
    let im = pairs.narrow(4, 1, 1)?;
    let rot = Tensor::cat(&[&im.neg()?, &re], 4)?.reshape((b, s, h, d))?;
    let cos = cos.reshape((1, s, 1, d))?;
    let sin = sin.reshape((1, s, 1, d))?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// q, k, v (B, S, H, D) -> (B, S, H * D).
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, h, d) = q.dims4()?;
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let att = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * d))
}

/// The q, k, v projections of an attention (FLUX and SD3), with RMS-normed
/// q and k when `qk_norm` (FLUX always; SD3.5 `qk_norm="rms_norm"`).
pub(crate) struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm: Option<(RmsNorm, RmsNorm)>,
}

impl Qkv {
    pub(crate) fn new(
        dim: usize,
        hd: usize,
        qk_norm: bool,
        names: [&str; 5],
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Qkv {
            q: linear(dim, dim, vb.pp(names[0]))?,
            k: linear(dim, dim, vb.pp(names[1]))?,
            v: linear(dim, dim, vb.pp(names[2]))?,
            norm: if qk_norm {
                Some((
                    rms_norm(hd, 1e-6, vb.pp(names[3]))?,
                    rms_norm(hd, 1e-6, vb.pp(names[4]))?,
                ))
            } else {
                None
            },
        })
    }
    /// (B, S, dim) -> (normalized) q, k and v as (B, S, H, D).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        heads: usize,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, s, dim) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, heads, dim / heads));
        let mut q = split(self.q.forward(x)?)?;
        let mut k = split(self.k.forward(x)?)?;
        if let Some((nq, nk)) = &self.norm {
            q = nq.forward(&q)?;
            k = nk.forward(&k)?;
        }
        let v = split(self.v.forward(x)?)?;
        Ok((q, k, v))
    }
}

/// `FluxTransformerBlock` (a double-stream block).
struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        let hd = dim / heads;
        Ok(DoubleBlock {
            norm1: linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
            img: Qkv::new(
                dim,
                hd,
                true,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &a,
            )?,
            txt: Qkv::new(
                dim,
                hd,
                true,
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
            to_add_out: linear(dim, dim, a.pp("to_add_out"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: FeedForward::new(dim, vb.pp("ff_context"))?,
            heads,
        })
    }

    /// (img, txt) -> (img, txt); `temb_act` = silu(temb).
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let m = self.norm1.forward(temb_act)?.chunk(6, 1)?;
        let c = self.norm1_context.forward(temb_act)?.chunk(6, 1)?;
        let n_img = modulate(&layer_norm_plain(img, 1e-6)?, &m[0], &m[1])?;
        let n_txt = modulate(&layer_norm_plain(txt, 1e-6)?, &c[0], &c[1])?;
        let (qi, ki, vi) = self.img.forward(&n_img, self.heads)?;
        let (qt, kt, vt) = self.txt.forward(&n_txt, self.heads)?;
        let q = apply_rope(&Tensor::cat(&[&qt, &qi], 1)?, cos, sin)?;
        let k = apply_rope(&Tensor::cat(&[&kt, &ki], 1)?, cos, sin)?;
        let v = Tensor::cat(&[&vt, &vi], 1)?;
        let out = attention(&q, &k, &v)?;
        let lt = txt.dim(1)?;
        let li = img.dim(1)?;
        let a_txt = self.to_add_out.forward(&out.narrow(1, 0, lt)?)?;
        let a_img = self.to_out.forward(&out.narrow(1, lt, li)?)?;

        let img = (img + a_img.broadcast_mul(&m[2].unsqueeze(1)?)?)?;
        let n = modulate(&layer_norm_plain(&img, 1e-6)?, &m[3], &m[4])?;
        let img = (&img + self.ff.forward(&n)?.broadcast_mul(&m[5].unsqueeze(1)?)?)?;

        let txt = (txt + a_txt.broadcast_mul(&c[2].unsqueeze(1)?)?)?;
        let n = modulate(&layer_norm_plain(&txt, 1e-6)?, &c[3], &c[4])?;
        let txt = (&txt
            + self
                .ff_context
                .forward(&n)?
                .broadcast_mul(&c[5].unsqueeze(1)?)?)?;
        Ok((img, txt))
    }
}

/// `FluxSingleTransformerBlock` on the concatenated [txt, img] sequence.
struct SingleBlock {
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        Ok(SingleBlock {
            norm: linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            qkv: Qkv::new(
                dim,
                dim / heads,
                true,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &a,
            )?,
            proj_mlp: linear(dim, 4 * dim, vb.pp("proj_mlp"))?,
            proj_out: linear(5 * dim, dim, vb.pp("proj_out"))?,
            heads,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let m = self.norm.forward(temb_act)?.chunk(3, 1)?;
        let n = modulate(&layer_norm_plain(x, 1e-6)?, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&n)?.gelu()?;
        let (q, k, v) = self.qkv.forward(&n, self.heads)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let att = attention(&q, &k, &v)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&att, &mlp], 2)?)?;
        x + out.broadcast_mul(&m[2].unsqueeze(1)?)?
    }
}

/// diffusers' `FluxTransformer2DModel` (its weight names), f32.
pub struct FluxTransformer {
    cfg: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    pub fn new(cfg: &FluxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        let heads = cfg.num_attention_heads;
        let t = vb.pp("time_text_embed");
        Ok(FluxTransformer {
            cfg: cfg.clone(),
            x_embedder: linear(cfg.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(cfg.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: Mlp2::new(256, dim, t.pp("timestep_embedder"))?,
            guidance_embedder: if cfg.guidance_embeds {
                Some(Mlp2::new(256, dim, t.pp("guidance_embedder"))?)
            } else {
                None
            },
            text_embedder: Mlp2::new(cfg.pooled_projection_dim, dim, t.pp("text_embedder"))?,
            double: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(dim, heads, vb.pp(format!("transformer_blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            single: (0..cfg.num_single_layers)
                .map(|i| {
                    SingleBlock::new(dim, heads, vb.pp(format!("single_transformer_blocks.{i}")))
                })
                .collect::<candle_core::Result<_>>()?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: linear(dim, cfg.out_channels, vb.pp("proj_out"))?,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// `FluxPosEmbed`: (S, 3) position ids -> cos, sin (S, head_dim),
    /// computed in f64 as diffusers does.
    pub fn rope(&self, ids: &[[f32; 3]], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let d: usize = self.cfg.axes_dims_rope.iter().sum();
        let mut cos = Vec::with_capacity(ids.len() * d);
        let mut sin = Vec::with_capacity(ids.len() * d);
        for id in ids {
            for (axis, &dim) in self.cfg.axes_dims_rope.iter().enumerate() {
                for j in 0..dim / 2 {
                    let freq = 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64);
                    let a = id[axis] as f64 * freq;
                    let (s, c) = (a.sin() as f32, a.cos() as f32);
                    cos.extend([c, c]);
                    sin.extend([s, s]);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (ids.len(), d), device)?,
            Tensor::from_vec(sin, (ids.len(), d), device)?,
        ))
    }

    /// The velocity for packed latents `img` (B, L_img, in_channels), T5
    /// states `txt` (B, L_txt, joint_attention_dim), CLIP `pooled` (B,
    /// pooled_projection_dim); `timestep` and `guidance` as the pipeline
    /// passes them (t / 1000; guidance scale), position ids `img_ids`,
    /// `txt_ids` (3 per token).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: f32,
        guidance: Option<f32>,
        img_ids: &[[f32; 3]],
        txt_ids: &[[f32; 3]],
    ) -> candle_core::Result<Tensor> {
        let dev = img.device();
        let b = img.dim(0)?;
        let img = self.x_embedder.forward(img)?;
        let scalar = |v: f32| Tensor::from_vec(vec![v * 1000.0; b], b, dev);
        let mut temb = self
            .timestep_embedder
            .forward(&timestep_proj(&scalar(timestep)?)?)?;
        if let Some(g) = &self.guidance_embedder {
            let gv = guidance.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this transformer embeds the guidance scale (FLUX.1-dev); pass one".into(),
                )
            })?;
            temb = (temb + g.forward(&timestep_proj(&scalar(gv)?)?)?)?;
        }
        let temb = (temb + self.text_embedder.forward(pooled)?)?;
        let temb_act = temb.silu()?;
        let mut txt = self.context_embedder.forward(txt)?;
        let ids: Vec<[f32; 3]> = txt_ids.iter().chain(img_ids.iter()).copied().collect();
        let (cos, sin) = self.rope(&ids, dev)?;
        let mut img = img;
        for blk in &self.double {
            (img, txt) = blk.forward(&img, &txt, &temb_act, &cos, &sin)?;
        }
        let lt = txt.dim(1)?;
        let li = img.dim(1)?;
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for blk in &self.single {
            x = blk.forward(&x, &temb_act, &cos, &sin)?;
        }
        let img = x.narrow(1, lt, li)?;
        let m = self.norm_out.forward(&temb_act)?.chunk(2, 1)?;
        // AdaLayerNormContinuous: scale first, then shift
        let img = modulate(&layer_norm_plain(&img, 1e-6)?, &m[1], &m[0])?;
        self.proj_out.forward(&img)
    }
}

// ------------------------------------------------------------------ latents

/// (B, C, h, w) -> (B, h/2 * w/2, 4 C): diffusers' `_pack_latents`.
pub fn pack_latents(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape(vec![b, c, h / 2, 2, w / 2, 2])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// (B, h/2 * w/2, 4 C) -> (B, C, h, w): diffusers' `_unpack_latents`.
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape(vec![b, h / 2, w / 2, c, 2, 2])?
        .permute(vec![0, 3, 1, 4, 2, 5])?
        .reshape((b, c, h, w))
}

/// `_prepare_latent_image_ids`: (0, row, col) per 2x2 patch, row-major.
pub fn image_ids(h: usize, w: usize) -> Vec<[f32; 3]> {
    let mut v = Vec::with_capacity((h / 2) * (w / 2));
    for r in 0..h / 2 {
        for c in 0..w / 2 {
            v.push([0.0, r as f32, c as f32]);
        }
    }
    v
}

// ------------------------------------------------------------------ VAE

// ------------------------------------------------------------------ pipeline

/// Diffusers' `FluxPipeline.__call__` default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// A loaded FLUX.1 pipeline.
pub struct FluxPipeline {
    tokenizer: PromptTokenizer,
    text_encoder: ClipTextEncoder,
    clip_eos: u32,
    tokenizer_2: T5PromptTokenizer,
    text_encoder_2: Mutex<T5EncoderModel>,
    transformer: FluxTransformer,
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

impl FluxPipeline {
    /// Loads a folder or Hub id (see [`resolve_pipeline`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve_pipeline(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local diffusers `FluxPipeline` folder.
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

        let tcfg = ConfigReader::read(&part("text_encoder"), "config.json")?;
        let text_cfg = ClipTextConfig::from_hf(&tcfg)?;
        let tokenizer = PromptTokenizer::load(
            &part("tokenizer"),
            text_cfg.max_position_embeddings,
            text_cfg.vocab_size,
        )?;
        let tsub = if tcfg.value()["text_config"].is_object() {
            tcfg.sub("text_config")?
        } else {
            tcfg.clone()
        };
        let clip_eos = tsub.usize("eos_token_id", 2)? as u32;
        let (vb, label) = part_var_builder(&part("text_encoder"), "model", device)?;
        let text_encoder =
            ClipTextEncoder::new(&text_cfg, vb).map_err(|e| weights_err(&label, e))?;

        let (tokenizer_2, text_encoder_2, t5_cfg) = load_t5(
            &part("text_encoder_2"),
            &part("tokenizer_2"),
            max_sequence_length,
            device,
        )?;

        let fcfg_r = ConfigReader::read(&part("transformer"), "config.json")?;
        let fcfg = FluxConfig::from_diffusers(&fcfg_r)?;
        if fcfg.joint_attention_dim != t5_cfg.d_model {
            return Err(fcfg_r.error(format!(
                "joint_attention_dim = {} but the T5 encoder's d_model is {}",
                fcfg.joint_attention_dim, t5_cfg.d_model
            )));
        }
        if fcfg.pooled_projection_dim != text_cfg.tower.hidden_size {
            return Err(fcfg_r.error(format!(
                "pooled_projection_dim = {} but the CLIP text encoder's hidden_size is {}",
                fcfg.pooled_projection_dim, text_cfg.tower.hidden_size
            )));
        }
        let (vb, label) =
            part_var_builder(&part("transformer"), "diffusion_pytorch_model", device)?;
        let transformer = FluxTransformer::new(&fcfg, vb).map_err(|e| weights_err(&label, e))?;

        let vcfg_r = ConfigReader::read(&part("vae"), "config.json")?;
        let (vcfg, scaling_factor, shift_factor, vae_scale_factor) = vae_config(
            &vcfg_r,
            VaeDefaults {
                latent_channels: 16,
                scaling_factor: 0.3611,
                shift_factor: Some(0.0),
            },
        )?;
        if vcfg.latent_channels * 4 != fcfg.in_channels {
            return Err(fcfg_r.error(format!(
                "in_channels = {} but the VAE has latent_channels = {} (packed 2x2: 4x that)",
                fcfg.in_channels, vcfg.latent_channels
            )));
        }
        let latent_channels = vcfg.latent_channels;
        let vae = common::load_vae(dir, vcfg, device)?;
        // diffusers' default: default_sample_size (128) * vae_scale_factor
        let size = 128 * vae_scale_factor;

        Ok(FluxPipeline {
            fingerprint: fingerprint(dir, max_sequence_length)?,
            tokenizer,
            text_encoder,
            clip_eos,
            tokenizer_2,
            text_encoder_2: Mutex::new(text_encoder_2),
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
    /// multiples of 2 vae_scale_factor, as diffusers' latents are).
    pub fn with_resolution(mut self, width: usize, height: usize) -> Result<Self> {
        let m = 2 * self.vae_scale_factor;
        (self.width, self.height) = common::round_resolution(width, height, m, "FLUX")?;
        Ok(self)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn transformer(&self) -> &FluxTransformer {
        &self.transformer
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    pub fn tokenizer_2(&self) -> &T5PromptTokenizer {
        &self.tokenizer_2
    }

    /// Output (width, height).
    pub fn resolution(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// (channels, h, w) of the unpacked latents.
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let f = self.vae_scale_factor;
        (self.latent_channels, self.height / f, self.width / f)
    }

    /// (tokens, channels) of the packed latents.
    pub fn packed_shape(&self) -> (usize, usize) {
        let (c, h, w) = self.latent_shape();
        ((h / 2) * (w / 2), 4 * c)
    }

    /// The schedule for `steps` steps at this resolution.
    pub fn scheduler(&self, steps: usize) -> Result<FlowMatch> {
        self.scheduler.build(steps, self.packed_shape().0)
    }

    /// CLIP's pooled output (B, hidden) for (B, L) u32 ids: the state at the
    /// first `eos_token_id` (the largest id when the config says 2, as
    /// transformers does).
    pub fn encode_clip_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text_encoder.forward(ids)?;
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut out = Vec::with_capacity(rows.len());
        for (b, row) in rows.iter().enumerate() {
            let pos = if self.clip_eos == 2 {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&x| x == max).unwrap_or(0)
            } else {
                row.iter().position(|&x| x == self.clip_eos).unwrap_or(0)
            };
            out.push(hidden.i((b, pos))?.unsqueeze(0)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The T5 states (B, L, d_model) for (B, L) u32 ids (no attention mask).
    pub fn encode_t5_ids(&self, ids: &Tensor) -> Result<Tensor> {
        t5_forward(&self.text_encoder_2, ids)
    }

    /// (pooled (1, hidden), T5 states (1, L, d_model)) of a prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let ids = self.tokenizer.ids(prompt)?;
        let n = ids.len();
        let pooled = self.encode_clip_ids(&Tensor::from_vec(ids, (1, n), &self.device)?)?;
        let ids = self.tokenizer_2.ids(prompt)?;
        let n = ids.len();
        let states = self.encode_t5_ids(&Tensor::from_vec(ids, (1, n), &self.device)?)?;
        Ok((pooled, states))
    }

    /// One transformer call at step `t` (a scheduler timestep, 0..1000).
    pub fn velocity(
        &self,
        latents: &Tensor,
        pooled: &Tensor,
        states: &Tensor,
        t: f32,
        guidance: f64,
    ) -> Result<Tensor> {
        let (_, h, w) = self.latent_shape();
        let txt_ids = vec![[0f32; 3]; states.dim(1)?];
        let g = self
            .transformer
            .config()
            .guidance_embeds
            .then_some(guidance as f32);
        Ok(self.transformer.forward(
            latents,
            states,
            pooled,
            t / 1000.0,
            g,
            &image_ids(h, w),
            &txt_ids,
        )?)
    }

    /// The denoising loop from packed initial latents (1, L, 4C).
    pub fn denoise(
        &self,
        pooled: &Tensor,
        states: &Tensor,
        latents: &Tensor,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        let sched = self.scheduler(steps)?;
        let mut latents = latents.clone();
        for (i, &t) in sched.timesteps().iter().enumerate() {
            let v = self.velocity(&latents, pooled, states, t, guidance)?;
            latents = sched.step(&v, i, &latents)?;
        }
        Ok(latents)
    }

    /// `vae.decode(unpack(latents) / scaling_factor + shift_factor)` (B, 3, H, W).
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, h, w) = self.latent_shape();
        let x = unpack_latents(latents, h, w)?;
        let x = ((x / self.scaling_factor)? + self.shift_factor)?;
        common::vae_decode_each(&self.vae, &x)
    }

    /// The image in [0, 1]: `(decode_raw / 2 + 0.5).clamp(0, 1)`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        common::unit_range(&self.decode_raw(latents)?)
    }

    /// The packed initial latents of a request: its `init_latents` (packed,
    /// (L, 4C) row-major, what diffusers' `latents=` takes; the RNG is not
    /// used), else a standard Gaussian (C, h, w) from its seed, packed.
    pub fn initial_latents(&self, r: &GenerateRequest) -> Result<Tensor> {
        let (l, c4) = self.packed_shape();
        let n = l * c4;
        match &r.init_latents {
            Some(v) if v.len() == n => Ok(Tensor::from_vec(v.clone(), (1, l, c4), &self.device)?),
            Some(v) => Err(WorkerError::Invalid(format!(
                "init_latents has {} values, the model needs {l}x{c4} = {n} (packed latents)",
                v.len()
            ))),
            None => {
                let (c, h, w) = self.latent_shape();
                let x = Tensor::from_vec(gaussian(r.seed, n), (1, c, h, w), &self.device)?;
                Ok(pack_latents(&x)?)
            }
        }
    }

    /// One image for one request.
    pub fn generate_one(
        &self,
        r: &GenerateRequest,
        steps: usize,
        guidance: f64,
    ) -> Result<RgbImage> {
        let (pooled, states) = self.encode_prompt(&r.prompt)?;
        let init = self.initial_latents(r)?;
        let latents = self.denoise(&pooled, &states, &init, steps, guidance)?;
        let image = self.decode(&latents)?;
        Ok(common::to_rgb(&image)?.remove(0))
    }
}

/// A hash of the pipeline's configs, tokenizer files and weight samples.
fn fingerprint(dir: &Path, max_sequence_length: usize) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"mirgen-flux-pipeline-v1\0");
    h.update((max_sequence_length as u64).to_le_bytes());
    let files = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "transformer/config.json",
        "vae/config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/tokenizer.json",
    ];
    let weights = [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("transformer", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ];
    common::fingerprint(h, dir, &files, &weights)
}

// ------------------------------------------------------------------ generator

/// A diffusers FLUX.1 pipeline as an [`ImageGenerator`](crate::ImageGenerator).
/// `guidance` is the embedded (distilled) guidance scale of FLUX.1-dev (3.5 is
/// diffusers' default); FLUX.1-schnell ignores it. There is no unconditional
/// pass.
pub type FluxGenerator = DiffusionGenerator<FluxPipeline>;

impl_diffusion_pipeline!(FluxPipeline, "flux", |p| {
    let (w, h) = p.resolution();
    format!("flux-pipeline-{}/{}x{}", p.fingerprint, w, h)
});
