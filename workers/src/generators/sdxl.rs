//! SDXL-Turbo and SDXL-style text-to-image pipelines in the diffusers layout,
//! computing what diffusers' `StableDiffusionXLPipeline` computes.
//!
//! - SDXL: Podell et al., *SDXL: Improving Latent Diffusion Models for
//!   High-Resolution Image Synthesis* (arXiv 2307.01952);
//! - SDXL-Turbo: Sauer et al., *Adversarial Diffusion Distillation*
//!   (arXiv 2311.17042), Hugging Face `stabilityai/sdxl-turbo` (one step,
//!   guidance 0, 512x512);
//! - diffusers `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`.
//!
//! A pipeline folder holds `model_index.json` (`StableDiffusionXLPipeline`),
//! `tokenizer/` + `text_encoder/` (CLIP-L, `CLIPTextModel`), `tokenizer_2/` +
//! `text_encoder_2/` (OpenCLIP-G, `CLIPTextModelWithProjection`), `unet/`
//! (`UNet2DConditionModel` with the `text_time` add-embedding, see
//! [`super::unet`]), `vae/` (`AutoencoderKL`) and `scheduler/`
//! (`EulerAncestralDiscreteScheduler` as sdxl-turbo ships it, or
//! `EulerDiscreteScheduler`). The loop is diffusers':
//!
//! 1. per encoder: ids = tokenizer_k(prompt, padding="max_length",
//!    max_length=77, truncation=True); h_k = text_encoder_k(ids,
//!    output_hidden_states=True).hidden_states[-2]; prompt_embeds =
//!    cat(h_1, h_2, -1); pooled = text_encoder_2(ids).text_embeds;
//! 2. add_time_ids = (height, width, 0, 0, height, width);
//! 3. with guidance > 1: the negative embeds and pooled embeds are zeros
//!    when `force_zeros_for_empty_prompt` (sdxl-turbo, SDXL), else the ""
//!    prompt's; the UNet sees the batch [negative, positive];
//! 4. latents = init * init_noise_sigma; per timestep eps =
//!    unet(scale_model_input(latents), t, embeds, text_embeds=pooled,
//!    time_ids), CFG `u + g (c - u)`; latents = scheduler.step(...) (Euler
//!    ancestral: plus `sigma_up` times fresh noise);
//! 5. image = vae.decode(latents / scaling_factor) / 2 + 0.5, clamped,
//!    times 255, rounded to u8 (no invisible watermark).
//!
//! Randomness: the request's `init_latents` replace the seeded initial noise.
//! The ancestral scheduler also adds noise at every step but the last (its
//! `sigma_up` is 0 there, so a 1-step run, sdxl-turbo's, draws none); that
//! noise is derived from the request's seed, or, when the request has
//! explicit init latents, from a hash of them, so the seed is then unused
//! and the output is a function of the prompt and the latents only.
//!
//! Parity with diffusers is tested on a tiny random checkpoint of this
//! layout (`tests/sdxl_parity.rs`, fixture made by
//! `scripts/fixtures/make_sdxl_fixtures.py`).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use sha2::{Digest, Sha256};

use super::common::{
    self, impl_diffusion_pipeline, part_var_builder, pipeline_class_is, DiffusionGenerator, Layout,
};
use super::euler::{EulerDiscrete, EulerDiscreteConfig};
use super::sd_turbo::{
    resolve_pipeline, vae_config, weights_err, ClipTextConfig, PromptTokenizer, VaeDefaults,
};
use super::unet::{UNet2DCondition, UNetConfig};
use crate::encoders::hf::ConfigReader;
use crate::encoders::layers::{causal_mask, EncoderLayer};
use crate::seed::{derive_seed, gaussian};
use crate::{GenerateRequest, Result, RgbImage, WorkerError};

/// The sub-folders a diffusers SDXL pipeline needs.
pub const PARTS: [&str; 7] = [
    "tokenizer",
    "tokenizer_2",
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae",
    "scheduler",
];

/// Whether `dir/model_index.json` names `StableDiffusionXLPipeline`.
pub fn is_sdxl_pipeline(dir: &Path) -> bool {
    pipeline_class_is(dir, "StableDiffusionXLPipeline")
}

fn check_layout(dir: &Path) -> Result<ConfigReader> {
    common::check_layout(
        dir,
        &Layout {
            class: "StableDiffusionXLPipeline",
            parts: &PARTS,
            what: "an SDXL generator is a diffusers pipeline folder",
            wrong_class: "not a StableDiffusionXLPipeline",
            missing_note: |part| {
                format!(" (SDXL refiner-style pipelines without {part} are not supported)")
            },
        },
    )
}

// ------------------------------------------------------------------ text encoders

/// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` giving
/// what SDXL uses: `hidden_states[-2]` (the input of the last layer, no final
/// layer norm) and, with a projection, `text_embeds`.
pub struct SdxlTextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: u32,
    max_positions: usize,
}

impl SdxlTextEncoder {
    fn new(
        cfg: &ClipTextConfig,
        eos_token_id: u32,
        projection_dim: Option<usize>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if cfg.tower.num_hidden_layers < 2 {
            candle_core::bail!("SDXL uses hidden_states[-2]: the text encoder needs >= 2 layers");
        }
        let text_projection = match projection_dim {
            Some(p) => Some(linear_no_bias(
                cfg.tower.hidden_size,
                p,
                vb.pp("text_projection"),
            )?),
            None => None,
        };
        // transformers 4 saves `text_model.*`; transformers 5 drops the
        // prefix for CLIPTextModel but keeps it for CLIPTextModelWithProjection
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let h = cfg.tower.hidden_size;
        let e = vb.pp("embeddings");
        Ok(SdxlTextEncoder {
            token_embedding: embedding(cfg.vocab_size, h, e.pp("token_embedding"))?,
            position_embedding: e
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, h), "weight")?,
            layers: (0..cfg.tower.num_hidden_layers)
                .map(|i| EncoderLayer::new(&cfg.tower, vb.pp("encoder.layers").pp(i)))
                .collect::<candle_core::Result<_>>()?,
            final_layer_norm: layer_norm(h, cfg.tower.layer_norm_eps, vb.pp("final_layer_norm"))?,
            text_projection,
            eos_token_id,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// (B, L) u32 ids -> (`hidden_states[-2]` (B, L, hidden), `text_embeds`
    /// (B, projection_dim) when the encoder has a projection).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (b, n) = ids.dims2()?;
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
        for l in &self.layers[..last] {
            xs = l.forward(&xs, Some(&mask))?;
        }
        let penultimate = xs.clone();
        let Some(proj) = &self.text_projection else {
            return Ok((penultimate, None));
        };
        let xs = self.layers[last]
            .forward(&xs, Some(&mask))?
            .apply(&self.final_layer_norm)?;
        // transformers' pooling: the largest id (the eos token of the
        // original vocab) when eos_token_id is the legacy 2, else the
        // first eos_token_id
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut pooled = Vec::with_capacity(b);
        for (i, row) in rows.iter().enumerate() {
            let pos = if self.eos_token_id == 2 {
                row.iter()
                    .enumerate()
                    .fold(
                        (0, 0),
                        |(bp, bv), (p, &v)| if v > bv { (p, v) } else { (bp, bv) },
                    )
                    .0
            } else {
                row.iter()
                    .position(|&x| x == self.eos_token_id)
                    .unwrap_or(0)
            };
            pooled.push(xs.i((i, pos))?.unsqueeze(0)?);
        }
        let pooled = Tensor::cat(&pooled, 0)?.apply(proj)?;
        Ok((penultimate, Some(pooled)))
    }
}

// ------------------------------------------------------------------ scheduler

/// diffusers' `EulerAncestralDiscreteScheduler` (or, not ancestral,
/// `EulerDiscreteScheduler`), on [`EulerDiscrete`]'s timesteps and sigmas.
#[derive(Clone, Debug)]
pub struct SdxlScheduler {
    pub euler: EulerDiscrete,
    pub ancestral: bool,
}

impl SdxlScheduler {
    /// (sigma_down, sigma_up) of step `i`, as diffusers computes them (f32).
    pub fn ancestral_sigmas(&self, i: usize) -> (f64, f64) {
        let s = self.euler.sigmas();
        let (from, to) = (s[i] as f32, s[i + 1] as f32);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        (down as f64, up as f64)
    }

    /// One step from `i` to `i + 1`; `noise` (the shape of `sample`) is
    /// used by the ancestral scheduler only.
    pub fn step(
        &self,
        eps: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !self.ancestral {
            return self.euler.step(eps, i, sample);
        }
        if i + 1 >= self.euler.sigmas().len() {
            return Err(WorkerError::Invalid(format!(
                "step {i} of a {}-step schedule",
                self.euler.timesteps().len()
            )));
        }
        let sigma = self.euler.sigmas()[i];
        let pred_original = match self.euler.config().prediction_type {
            super::euler::PredictionType::Epsilon => (sample - (eps * sigma)?)?,
            super::euler::PredictionType::VPrediction => {
                let a = (eps * (-sigma / (sigma * sigma + 1.0).sqrt()))?;
                (a + (sample / (sigma * sigma + 1.0))?)?
            }
            super::euler::PredictionType::Sample => {
                return Err(WorkerError::Invalid(
                    "EulerAncestralDiscreteScheduler does not implement prediction_type sample"
                        .into(),
                ))
            }
        };
        let (down, up) = self.ancestral_sigmas(i);
        let derivative = ((sample - pred_original)? / sigma)?;
        let prev = (sample + (derivative * (down - sigma))?)?;
        if up == 0.0 {
            return Ok(prev);
        }
        let noise = noise
            .ok_or_else(|| WorkerError::Invalid("the ancestral Euler step needs noise".into()))?;
        Ok((prev + (noise * up)?)?)
    }
}

fn scheduler_config(c: &ConfigReader) -> Result<(EulerDiscreteConfig, bool)> {
    let class = c.str("_class_name").unwrap_or("EulerDiscreteScheduler");
    let ancestral = match class {
        "EulerAncestralDiscreteScheduler" => true,
        "EulerDiscreteScheduler" => false,
        other => {
            return Err(c.error(format!(
                "_class_name = {other:?}: only EulerAncestralDiscreteScheduler (sdxl-turbo's) and \
                 EulerDiscreteScheduler are implemented"
            )))
        }
    };
    let mut v = c.value().clone();
    v["_class_name"] = "EulerDiscreteScheduler".into();
    let cfg = EulerDiscreteConfig::from_diffusers(&ConfigReader::from_value(v, c.file()))?;
    if ancestral && cfg.prediction_type == super::euler::PredictionType::Sample {
        return Err(c.error(
            "prediction_type = sample is not supported by EulerAncestralDiscreteScheduler".into(),
        ));
    }
    Ok((cfg, ancestral))
}

// ------------------------------------------------------------------ VAE

// ------------------------------------------------------------------ pipeline

/// Text conditioning of one prompt (or of the negative side).
#[derive(Clone, Debug)]
pub struct SdxlText {
    /// `prompt_embeds` (B, 77, cross_attention_dim).
    pub embeds: Tensor,
    /// `pooled_prompt_embeds` (B, pooled dim).
    pub pooled: Tensor,
}

/// A loaded SDXL / SDXL-Turbo pipeline.
pub struct SdxlPipeline {
    tokenizer: PromptTokenizer,
    tokenizer_2: PromptTokenizer,
    text_encoder: SdxlTextEncoder,
    text_encoder_2: SdxlTextEncoder,
    unet: UNet2DCondition,
    vae: AutoEncoderKL,
    scheduler: EulerDiscreteConfig,
    ancestral: bool,
    force_zeros_for_empty_prompt: bool,
    scaling_factor: f64,
    vae_scale_factor: usize,
    latent_channels: usize,
    device: Device,
    fingerprint: String,
    source: String,
    random_weights: bool,
}

fn load_text(
    dir: &Path,
    tok: &str,
    enc: &str,
    with_projection: bool,
    device: &Device,
) -> Result<(PromptTokenizer, SdxlTextEncoder, usize, Option<usize>)> {
    let tcfg = ConfigReader::read(&dir.join(enc), "config.json")?;
    let text_cfg = ClipTextConfig::from_hf(&tcfg)?;
    let sub = if tcfg.value()["text_config"].is_object() {
        tcfg.sub("text_config")?
    } else {
        tcfg.clone()
    };
    let eos = sub.usize("eos_token_id", 2)? as u32;
    let proj = if with_projection {
        Some(tcfg.usize("projection_dim", 512)?)
    } else {
        None
    };
    let tokenizer = PromptTokenizer::load(
        &dir.join(tok),
        text_cfg.max_position_embeddings,
        text_cfg.vocab_size,
    )?;
    let (vb, label) = part_var_builder(&dir.join(enc), "model", device)?;
    let encoder =
        SdxlTextEncoder::new(&text_cfg, eos, proj, vb).map_err(|e| weights_err(&label, e))?;
    Ok((tokenizer, encoder, text_cfg.tower.hidden_size, proj))
}

impl SdxlPipeline {
    /// Loads a folder or Hub id (see [`resolve_pipeline`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve_pipeline(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local diffusers SDXL pipeline folder; `source` is recorded in [`ModelInfo`].
    pub fn load_dir(dir: &Path, source: &str, device: &Device) -> Result<Self> {
        let index = check_layout(dir)?;
        let force_zeros_for_empty_prompt = index.bool("force_zeros_for_empty_prompt", true)?;
        let part = |p: &str| dir.join(p);

        let sched = ConfigReader::read(&part("scheduler"), "scheduler_config.json")?;
        let (scheduler, ancestral) = scheduler_config(&sched)?;

        let (tokenizer, text_encoder, h1, _) =
            load_text(dir, "tokenizer", "text_encoder", false, device)?;
        let (tokenizer_2, text_encoder_2, h2, pooled_dim) =
            load_text(dir, "tokenizer_2", "text_encoder_2", true, device)?;

        let ucfg_r = ConfigReader::read(&part("unet"), "config.json")?;
        let ucfg = UNetConfig::from_diffusers(&ucfg_r)?;
        if ucfg.cross_attention_dim != h1 + h2 {
            return Err(ucfg_r.error(format!(
                "cross_attention_dim = {} but the two text encoders' hidden sizes add up to {} + {h2}",
                ucfg.cross_attention_dim, h1
            )));
        }
        let Some(tt) = ucfg.text_time else {
            return Err(ucfg_r.error(
                "an SDXL UNet needs addition_embed_type = \"text_time\" (null found)".into(),
            ));
        };
        if tt.pooled_dim() != pooled_dim {
            return Err(ucfg_r.error(format!(
                "projection_class_embeddings_input_dim = {} is not text_encoder_2's projection_dim {} \
                 + 6 * addition_time_embed_dim {}",
                tt.input_dim,
                pooled_dim.unwrap_or(0),
                tt.time_embed_dim
            )));
        }
        let (vb, label) = part_var_builder(&part("unet"), "diffusion_pytorch_model", device)?;
        let unet = UNet2DCondition::new(&ucfg, vb).map_err(|e| weights_err(&label, e))?;

        let vcfg_r = ConfigReader::read(&part("vae"), "config.json")?;
        for key in ["latents_mean", "latents_std", "shift_factor"] {
            if !vcfg_r.value()[key].is_null() {
                return Err(vcfg_r.error(format!("{key} is not supported (SDXL's VAE has none)")));
            }
        }
        let (vcfg, scaling_factor, _, vae_scale_factor) = vae_config(
            &vcfg_r,
            VaeDefaults {
                latent_channels: 4,
                scaling_factor: 0.13025,
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

        Ok(SdxlPipeline {
            fingerprint: fingerprint(dir)?,
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler,
            ancestral,
            force_zeros_for_empty_prompt,
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

    /// (`tokenizer/`, `tokenizer_2/`).
    pub fn tokenizers(&self) -> (&PromptTokenizer, &PromptTokenizer) {
        (&self.tokenizer, &self.tokenizer_2)
    }

    pub fn unet(&self) -> &UNet2DCondition {
        &self.unet
    }

    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// The schedule for `steps` steps.
    pub fn scheduler(&self, steps: usize) -> Result<SdxlScheduler> {
        Ok(SdxlScheduler {
            euler: self.scheduler.build(steps)?,
            ancestral: self.ancestral,
        })
    }

    /// (channels, height, width) of the latents.
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let s = self.unet.config().sample_size;
        (self.latent_channels, s, s)
    }

    /// Output (width, height): the UNet's `sample_size` times the VAE factor.
    pub fn resolution(&self) -> (usize, usize) {
        let s = self.unet.config().sample_size * self.vae_scale_factor;
        (s, s)
    }

    /// `hidden_states[-2]` of each encoder (1, L, hidden_k) and the pooled
    /// `text_embeds` (1, pooled) of a prompt.
    pub fn encode_parts(&self, prompt: &str) -> Result<(Tensor, Tensor, Tensor)> {
        let ids = |t: &PromptTokenizer| -> Result<Tensor> {
            let v = t.ids(prompt)?;
            let n = v.len();
            Ok(Tensor::from_vec(v, (1, n), &self.device)?)
        };
        let (h1, _) = self.text_encoder.forward(&ids(&self.tokenizer)?)?;
        let (h2, pooled) = self.text_encoder_2.forward(&ids(&self.tokenizer_2)?)?;
        let pooled = pooled.ok_or_else(|| WorkerError::Invalid("no pooled output".into()))?;
        Ok((h1, h2, pooled))
    }

    /// diffusers' `encode_prompt` for one prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<SdxlText> {
        let (h1, h2, pooled) = self.encode_parts(prompt)?;
        Ok(SdxlText {
            embeds: Tensor::cat(&[&h1, &h2], 2)?,
            pooled,
        })
    }

    /// The negative side of classifier-free guidance: zeros shaped like
    /// `cond` when `force_zeros_for_empty_prompt`, else the "" prompt's.
    pub fn negative(&self, cond: &SdxlText) -> Result<SdxlText> {
        if self.force_zeros_for_empty_prompt {
            Ok(SdxlText {
                embeds: cond.embeds.zeros_like()?,
                pooled: cond.pooled.zeros_like()?,
            })
        } else {
            self.encode_prompt("")
        }
    }

    /// `add_time_ids` (1, 6): original size, crop (0, 0), target size, all
    /// the default output size (height, width).
    pub fn add_time_ids(&self) -> Result<Tensor> {
        let (w, h) = self.resolution();
        let v = [h, w, 0, 0, h, w].map(|x| x as f32).to_vec();
        Ok(Tensor::from_vec(v, (1, 6), &self.device)?)
    }

    /// One UNet call: `sample` (B, C, h, w), text (B rows).
    pub fn unet_step(&self, sample: &Tensor, t: f64, text: &SdxlText) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let ids = self.add_time_ids()?.repeat((b, 1))?;
        Ok(self
            .unet
            .forward_with_added(sample, t, &text.embeds, Some((&text.pooled, &ids)))?)
    }

    /// The denoising loop from unit-variance `init` (1, C, h, w) to the final
    /// latents; `step_noise(i)` gives the ancestral noise of step `i`.
    pub fn denoise(
        &self,
        cond: &SdxlText,
        init: &Tensor,
        steps: usize,
        guidance: f64,
        step_noise: &mut dyn FnMut(usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let sched = self.scheduler(steps)?;
        let guided = guidance > 1.0;
        let text = if guided {
            let neg = self.negative(cond)?;
            SdxlText {
                embeds: Tensor::cat(&[&neg.embeds, &cond.embeds], 0)?,
                pooled: Tensor::cat(&[&neg.pooled, &cond.pooled], 0)?,
            }
        } else {
            cond.clone()
        };
        let mut latents = (init * sched.euler.init_noise_sigma())?;
        for (i, &t) in sched.euler.timesteps().iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sched.euler.scale_model_input(&input, i)?;
            let eps = self.unet_step(&input, t, &text)?;
            let eps = if guided {
                let b = latents.dim(0)?;
                let (u, c) = (eps.i(0..b)?, eps.i(b..2 * b)?);
                (&u + ((c - &u)? * guidance)?)?
            } else {
                eps
            };
            let noise = if sched.ancestral && sched.ancestral_sigmas(i).1 != 0.0 {
                Some(step_noise(i)?)
            } else {
                None
            };
            latents = sched.step(&eps, i, &latents, noise.as_ref())?;
        }
        Ok(latents)
    }

    /// `vae.decode(latents / scaling_factor)` (B, 3, H, W), one latent at a time.
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        common::vae_decode_each(&self.vae, &(latents / self.scaling_factor)?)
    }

    /// The image in [0, 1]: `(decode_raw / 2 + 0.5).clamp(0, 1)`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        common::unit_range(&self.decode_raw(latents)?)
    }

    /// Images as `output_type="pil"` makes them.
    pub fn to_rgb(images: &Tensor) -> Result<Vec<RgbImage>> {
        common::to_rgb(images)
    }

    fn latent_tensor(&self, v: Vec<f32>) -> Result<Tensor> {
        let (c, h, w) = self.latent_shape();
        Ok(Tensor::from_vec(v, (1, c, h, w), &self.device)?)
    }

    /// The initial noise of a request: its `init_latents`, else a Gaussian from its seed.
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
        let init = self.initial_noise(r)?;
        let (c, h, w) = self.latent_shape();
        // the ancestral step noise follows the initial noise: from the seed,
        // or from the explicit init latents (then the seed is unused)
        let base = match &r.init_latents {
            Some(l) => {
                let mut hsh = Sha256::new();
                for x in l {
                    hsh.update(x.to_le_bytes());
                }
                u64::from_le_bytes(hsh.finalize()[..8].try_into().expect("32 bytes"))
            }
            None => r.seed,
        };
        let mut noise = |i: usize| {
            let seed = derive_seed(base, &["sdxl-ancestral-step", &i.to_string()]);
            self.latent_tensor(gaussian(seed, c * h * w))
        };
        let latents = self.denoise(&cond, &init, steps, guidance, &mut noise)?;
        let image = self.decode(&latents)?;
        Ok(Self::to_rgb(&image)?.remove(0))
    }
}

/// A hash of the pipeline's configs, tokenizer files and weight samples.
fn fingerprint(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"mirgen-sdxl-pipeline-v1\0");
    let mut files = vec![
        "model_index.json".to_string(),
        "scheduler/scheduler_config.json".into(),
        "unet/config.json".into(),
        "vae/config.json".into(),
    ];
    for (tok, enc) in [
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
    ] {
        files.push(format!("{enc}/config.json"));
        for f in [
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
            "tokenizer.json",
        ] {
            files.push(format!("{tok}/{f}"));
        }
    }
    let weights = [
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ];
    common::fingerprint(h, dir, &files, &weights)
}

// ------------------------------------------------------------------ generator

/// A diffusers SDXL / SDXL-Turbo pipeline as an
/// [`ImageGenerator`](crate::ImageGenerator). SDXL-Turbo is meant for 1 step
/// and guidance 0.
pub type SdxlGenerator = DiffusionGenerator<SdxlPipeline>;

impl_diffusion_pipeline!(SdxlPipeline, "sdxl-turbo", |p| format!(
    "sdxl-pipeline-{}",
    p.fingerprint
));
