//! A PaliGemma-style VLM (Beyer et al. 2024, arXiv 2407.07726; reference:
//! transformers `PaliGemmaForConditionalGeneration`): SigLIP vision tower ->
//! linear projector -> Gemma decoder, image tokens prefixed to the prompt,
//! full attention over the prefix, causal decoding with a KV cache. Several
//! images per prompt are prefixed in order (GenIR's compare call shows the
//! target, then the synthetic image).
//!
//! This module has the smoke-test preset (tiny config, seeded random
//! weights): its text is noise. Gemma 3 / Qwen3-VL checkpoints implement the
//! same [`Vlm`] trait.

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_transformers::models::{gemma, siglip};
use tokenizers::Tokenizer;

use crate::preprocess::ImageProcessor;
use crate::sampling::Sampler;
use crate::seed::derive_seed;
use crate::{tiny, ModelInfo, Result, SamplingConfig, Vlm, VlmOutput, VlmRequest, WorkerError};

struct Parts {
    vision: siglip::VisionModel,
    projector: Linear,
    lm: gemma::Model,
}

pub struct PaliGemmaStyleVlm {
    parts: Parts,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    device: Device,
    sampling: SamplingConfig,
    bos_id: u32,
    eos_id: u32,
    /// Tokens never sampled (padding, unknown, BOS).
    suppressed: Vec<u32>,
    vocab_size: usize,
    image_scale: f64,
    info: ModelInfo,
}

impl PaliGemmaStyleVlm {
    /// The `tiny` smoke-test preset.
    pub fn tiny(seed: u64, sampling: SamplingConfig, device: &Device) -> Result<Self> {
        let tokenizer = tiny::tokenizer()?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let vision_cfg = siglip::VisionConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
            hidden_act: candle_nn::Activation::GeluPytorchTanh,
            layer_norm_eps: 1e-6,
        };
        let text_cfg = gemma::Config {
            attention_bias: false,
            head_dim: 16,
            hidden_act: Some(candle_nn::Activation::GeluPytorchTanh),
            hidden_activation: None,
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 4,
            num_hidden_layers: 2,
            num_key_value_heads: 1,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            vocab_size,
            max_position_embeddings: 2048,
        };
        let parts = tiny::build_seeded(derive_seed(seed, &["tiny-vlm"]), device, &[], |vb| {
            Ok(Parts {
                vision: siglip::VisionModel::new(
                    &vision_cfg,
                    false,
                    vb.pp("vision_tower").pp("vision_model"),
                )?,
                projector: candle_nn::linear(
                    vision_cfg.hidden_size,
                    text_cfg.hidden_size,
                    vb.pp("multi_modal_projector").pp("linear"),
                )?,
                lm: gemma::Model::new(false, &text_cfg, vb.pp("language_model"))?,
            })
        })?;
        let info = ModelInfo {
            architecture: "paligemma-style".into(),
            source: "preset:tiny (smoke test, random weights)".into(),
            smoke_test: true,
            fingerprint: format!("tiny-vlm/seed={seed}/{:?}", sampling),
        };
        let id = |t| tiny::token_id(&tokenizer, t);
        Ok(PaliGemmaStyleVlm {
            bos_id: id(tiny::BOS)?,
            eos_id: id(tiny::EOS)?,
            suppressed: vec![id(tiny::PAD)?, id(tiny::UNK)?, id(tiny::BOS)?],
            parts,
            processor: ImageProcessor::siglip(vision_cfg.image_size as u32),
            tokenizer,
            device: device.clone(),
            sampling,
            vocab_size,
            image_scale: 1.0 / (text_cfg.hidden_size as f64).sqrt(),
            info,
        })
    }

    fn generate_one(&mut self, req: &VlmRequest) -> Result<VlmOutput> {
        self.parts.lm.clear_kv_cache();
        let mut prefix = Vec::new();
        for img in &req.images {
            let pixels = self.processor.batch(&[img.as_ref()], &self.device)?;
            let feats = self
                .parts
                .vision
                .forward(&pixels)?
                .apply(&self.parts.projector)?;
            prefix.push((feats * self.image_scale)?);
        }
        let text = match &req.system {
            Some(s) => format!("{s}\n{}", req.prompt),
            None => req.prompt.clone(),
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
        let mut context: Vec<u32> = vec![self.bos_id];
        context.extend(enc.get_ids());
        let ids = Tensor::new(context.as_slice(), &self.device)?.unsqueeze(0)?;
        prefix.push(self.parts.lm.embed_tokens().forward(&ids)?);
        let embeds = Tensor::cat(&prefix, 1)?;
        let mut pos = embeds.dim(1)?;
        let mut logits = self.parts.lm.forward_embeds(&embeds, None, 0)?;
        let mut sampler = Sampler::new(&self.sampling, req.seed);
        let mut mask = vec![0f32; self.vocab_size];
        for &s in &self.suppressed {
            mask[s as usize] = f32::NEG_INFINITY;
        }
        let mask = Tensor::new(mask.as_slice(), &self.device)?;
        let mut generated = Vec::new();
        while generated.len() < req.max_new_tokens {
            let step = logits.flatten_all()?.broadcast_add(&mask)?;
            let token = sampler.sample(&step, &context)?;
            if token == self.eos_id {
                break;
            }
            generated.push(token);
            context.push(token);
            let input = Tensor::new(&[token], &self.device)?.unsqueeze(0)?;
            logits = self.parts.lm.forward(&input, pos)?;
            pos += 1;
        }
        let text = self
            .tokenizer
            .decode(&generated, true)
            .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
        Ok(VlmOutput {
            text,
            token_ids: generated,
        })
    }
}

impl Vlm for PaliGemmaStyleVlm {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    /// Decodes the requests one after another (the smoke preset keeps one
    /// KV cache); results do not depend on how requests are batched.
    fn generate(&mut self, batch: &[VlmRequest]) -> Result<Vec<VlmOutput>> {
        batch.iter().map(|r| self.generate_one(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn tiny_vlm_is_seeded_and_sees_images() {
        let mut vlm = PaliGemmaStyleVlm::tiny(1, SamplingConfig::default(), &Device::Cpu).unwrap();
        let img = Arc::new(crate::RgbImage::from_fn(48, 32, |x, y| {
            image::Rgb([x as u8 * 5, y as u8 * 7, 30])
        }));
        let other = Arc::new(crate::RgbImage::from_fn(32, 32, |_, _| {
            image::Rgb([250, 250, 250])
        }));
        let req = |images: Vec<Arc<crate::RgbImage>>, seed| VlmRequest {
            images,
            system: Some("you are an assistant".into()),
            prompt: "generate a detailed caption of this image".into(),
            max_new_tokens: 12,
            seed,
        };
        let out = vlm
            .generate(&[
                req(vec![img.clone()], 1),
                req(vec![img.clone()], 1),
                req(vec![img.clone()], 2),
            ])
            .unwrap();
        assert_eq!(out[0], out[1]);
        assert!(!out[0].token_ids.is_empty() && out[0].token_ids.len() <= 12);
        assert_ne!(out[0].token_ids, out[2].token_ids, "seed must matter");
        let mut greedy =
            PaliGemmaStyleVlm::tiny(1, SamplingConfig::greedy(), &Device::Cpu).unwrap();
        let a = greedy.generate(&[req(vec![img.clone()], 1)]).unwrap();
        let b = greedy
            .generate(&[req(vec![other.clone(), img.clone()], 1)])
            .unwrap();
        assert_ne!(
            a[0].token_ids, b[0].token_ids,
            "the images must reach the decoder"
        );
    }
}
