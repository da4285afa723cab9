//! Latent diffusion generator in the Stable Diffusion 1.x/2.x layout
//! (Rombach et al. 2022, arXiv 2112.10752; reference: diffusers
//! `StableDiffusionPipeline`): CLIP text encoder -> UNet2DConditionModel with
//! classifier-free guidance -> DDIM -> AutoencoderKL decode.
//!
//! This module has the smoke-test preset (tiny UNet/VAE/text encoder with
//! seeded random weights, 64x64 output). Real SD 3.5 / FLUX / Turbo
//! checkpoints implement the same [`ImageGenerator`] trait.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::stable_diffusion::{
    ddim::DDIMSchedulerConfig,
    schedulers::SchedulerConfig,
    unet_2d::{BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig},
    vae::{AutoEncoderKL, AutoEncoderKLConfig},
};
use tokenizers::Tokenizer;

use crate::seed::{derive_seed, gaussian};
use crate::{tiny, GenerateRequest, ImageGenerator, ModelInfo, Result, RgbImage, WorkerError};

/// Sampling settings of the generator.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSettings {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 disables guidance (no unconditional pass).
    pub guidance: f64,
}

struct Parts {
    text_encoder: ClipTextTransformer,
    unet: UNet2DConditionModel,
    vae: AutoEncoderKL,
}

pub struct SdGenerator {
    parts: Parts,
    tokenizer: Tokenizer,
    device: Device,
    settings: DiffusionSettings,
    width: usize,
    height: usize,
    latent_channels: usize,
    vae_scale: usize,
    vae_scaling_factor: f64,
    max_tokens: usize,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
    info: ModelInfo,
}

impl SdGenerator {
    /// The `tiny` smoke-test preset: 64x64 images from 16x16 latents.
    pub fn tiny(seed: u64, settings: DiffusionSettings, device: &Device) -> Result<Self> {
        let tokenizer = tiny::tokenizer()?;
        let text_cfg = ClipTextConfig {
            vocab_size: tokenizer.get_vocab_size(true),
            embed_dim: 32,
            activation: Activation::QuickGelu,
            intermediate_size: 64,
            max_position_embeddings: 32,
            pad_with: None,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            projection_dim: 32,
        };
        let unet_cfg = UNet2DConditionModelConfig {
            blocks: vec![
                BlockConfig {
                    out_channels: 32,
                    use_cross_attn: Some(1),
                    attention_head_dim: 8,
                },
                BlockConfig {
                    out_channels: 64,
                    use_cross_attn: Some(1),
                    attention_head_dim: 8,
                },
            ],
            layers_per_block: 1,
            norm_num_groups: 8,
            cross_attention_dim: 32,
            ..Default::default()
        };
        let vae_cfg = AutoEncoderKLConfig {
            block_out_channels: vec![16, 32, 32],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
            use_quant_conv: true,
            use_post_quant_conv: true,
        };
        let model_seed = derive_seed(seed, &["tiny-sd"]);
        let parts = tiny::build_seeded(model_seed, device, &[], |vb| {
            Ok(Parts {
                text_encoder: ClipTextTransformer::new(
                    vb.pp("text_encoder").pp("text_model"),
                    &text_cfg,
                )?,
                unet: UNet2DConditionModel::new(vb.pp("unet"), 4, 4, false, unet_cfg.clone())?,
                vae: AutoEncoderKL::new(vb.pp("vae"), 3, 3, vae_cfg.clone())?,
            })
        })?;
        let info = ModelInfo {
            architecture: "sd-unet".into(),
            source: "preset:tiny (smoke test, random weights)".into(),
            smoke_test: true,
            fingerprint: format!(
                "tiny-sd/seed={seed}/steps={}/guidance={}",
                settings.steps, settings.guidance
            ),
        };
        Ok(SdGenerator {
            pad_id: tiny::token_id(&tokenizer, tiny::PAD)?,
            bos_id: tiny::token_id(&tokenizer, tiny::BOS)?,
            eos_id: tiny::token_id(&tokenizer, tiny::EOS)?,
            parts,
            tokenizer,
            device: device.clone(),
            settings,
            width: 64,
            height: 64,
            latent_channels: 4,
            vae_scale: 4,
            vae_scaling_factor: 0.18215,
            max_tokens: text_cfg.max_position_embeddings,
            info,
        })
    }

    fn latent_shape(&self) -> (usize, usize, usize) {
        (
            self.latent_channels,
            self.height / self.vae_scale,
            self.width / self.vae_scale,
        )
    }

    fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut flat = Vec::with_capacity(prompts.len() * self.max_tokens);
        for p in prompts {
            let enc = self
                .tokenizer
                .encode(*p, false)
                .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
            let mut ids = vec![self.bos_id];
            ids.extend(enc.get_ids());
            ids.truncate(self.max_tokens - 1);
            ids.push(self.eos_id);
            ids.resize(self.max_tokens, self.pad_id);
            flat.extend(ids);
        }
        let ids = Tensor::from_vec(flat, (prompts.len(), self.max_tokens), &self.device)?;
        Ok(self
            .parts
            .text_encoder
            .forward_with_mask(&ids, usize::MAX)?)
    }

    fn initial_latents(&self, batch: &[GenerateRequest]) -> Result<Tensor> {
        let (c, h, w) = self.latent_shape();
        let n = c * h * w;
        let mut flat = Vec::with_capacity(batch.len() * n);
        for r in batch {
            match &r.init_latents {
                Some(l) if l.len() == n => flat.extend_from_slice(l),
                Some(l) => {
                    return Err(WorkerError::Invalid(format!(
                        "init_latents has {} values, the model needs {c}x{h}x{w} = {n}",
                        l.len()
                    )))
                }
                None => flat.extend(gaussian(r.seed, n)),
            }
        }
        Ok(Tensor::from_vec(
            flat,
            (batch.len(), c, h, w),
            &self.device,
        )?)
    }
}

impl ImageGenerator for SdGenerator {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn resolution(&self) -> (u32, u32) {
        (self.width as u32, self.height as u32)
    }

    /// Runs each request as its own forward pass: batched kernels change the
    /// floating-point summation order with the batch size, and records must
    /// not depend on which targets happened to share a batch.
    fn generate(&mut self, batch: &[GenerateRequest]) -> Result<Vec<RgbImage>> {
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            out.extend(self.generate_batch(std::slice::from_ref(r))?);
        }
        Ok(out)
    }
}

impl SdGenerator {
    /// One denoising loop over the whole batch (classifier-free guidance
    /// doubles it); results can differ in the last bits from single runs.
    pub fn generate_batch(&mut self, batch: &[GenerateRequest]) -> Result<Vec<RgbImage>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let b = batch.len();
        let guided = self.settings.guidance > 1.0;
        let prompts: Vec<&str> = batch.iter().map(|r| r.prompt.as_str()).collect();
        let cond = self.encode_prompts(&prompts)?;
        let text = if guided {
            let uncond = self.encode_prompts(&vec![""; b])?;
            Tensor::cat(&[uncond, cond], 0)?
        } else {
            cond
        };
        let mut scheduler = DDIMSchedulerConfig::default().build(self.settings.steps.max(1))?;
        let mut latents = (self.initial_latents(batch)? * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        for t in timesteps {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(input, t)?;
            let noise = self.parts.unet.forward(&input, t as f64, &text)?;
            let noise = if guided {
                let (u, c) = (noise.i(0..b)?, noise.i(b..2 * b)?);
                (&u + ((c - &u)? * self.settings.guidance)?)?
            } else {
                noise
            };
            latents = scheduler.step(&noise, t, &latents)?;
        }
        // candle 0.11's AutoEncoderKL::decode lets batch items interact (an
        // item decoded at batch position 1 differs from the same item decoded
        // alone), so decode one latent at a time.
        let latents = (latents / self.vae_scaling_factor)?;
        let images = (0..b)
            .map(|i| self.parts.vae.decode(&latents.i(i..i + 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let images = Tensor::cat(&images, 0)?;
        let images = ((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let images = (images * 255.0)?
            .round()?
            .to_dtype(DType::U8)?
            .to_device(&Device::Cpu)?;
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let chw = images.i(i)?.permute((1, 2, 0))?.contiguous()?;
            let (h, w, _) = chw.dims3()?;
            let data = chw.flatten_all()?.to_vec1::<u8>()?;
            out.push(
                RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| {
                    WorkerError::Invalid("decoded image has the wrong size".into())
                })?,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &RgbImage, b: &RgbImage) -> i64 {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (*x as i64 - *y as i64).abs())
            .max()
            .unwrap()
    }

    #[test]
    fn tiny_sd_is_seeded_and_accepts_injected_latents() {
        let settings = DiffusionSettings {
            steps: 2,
            guidance: 2.0,
        };
        let mut g = SdGenerator::tiny(1, settings, &Device::Cpu).unwrap();
        let req = |seed| GenerateRequest {
            prompt: "a red sky over the sea".into(),
            seed,
            init_latents: None,
        };
        let a = g.generate(&[req(5), req(6)]).unwrap();
        let b = g.generate(&[req(5)]).unwrap();
        assert_eq!(a[0].dimensions(), (64, 64));
        assert_eq!(a[0], b[0], "batching must not change an image");
        assert!(
            max_diff(&a[0], &a[1]) > 10,
            "different seeds must give different images"
        );
        let (c, h, w) = g.latent_shape();
        let injected = GenerateRequest {
            prompt: "x".into(),
            seed: 999,
            init_latents: Some(gaussian(5, c * h * w)),
        };
        let with_latents = g
            .generate(&[
                injected.clone(),
                GenerateRequest {
                    seed: 1,
                    ..injected
                },
            ])
            .unwrap();
        let single6 = g.generate(&[req(6)]).unwrap();
        assert_eq!(
            a[1], single6[0],
            "batch position 1 must match a single generation"
        );
        assert!(
            max_diff(&with_latents[0], &with_latents[1]) <= 1,
            "explicit latents must not depend on the seed: {}",
            max_diff(&with_latents[0], &with_latents[1])
        );
        let bad = GenerateRequest {
            prompt: "x".into(),
            seed: 0,
            init_latents: Some(vec![0.0; 3]),
        };
        assert!(g
            .generate(&[bad])
            .unwrap_err()
            .to_string()
            .contains("init_latents"));
    }
}
