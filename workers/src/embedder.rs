//! CLIP as a retrieval embedder (Radford et al. 2021, arXiv 2103.00020;
//! reference: transformers `CLIPModel`, e.g. `openai/clip-vit-base-patch16`).
//! Image: `normalize(visual_projection(post_layernorm(vit(img)[:, 0])))`;
//! text: `normalize(text_projection(final_ln(text)[eos]))`.
//!
//! This module has the smoke-test preset (tiny config, seeded weights, the
//! word-level tokenizer); loading real checkpoints plugs in the same struct.

use candle_core::{Device, Tensor};
use candle_transformers::models::clip::{
    self,
    text_model::{Activation, ClipTextConfig},
    vision_model::ClipVisionConfig,
    ClipConfig, ClipModel,
};
use tokenizers::Tokenizer;

use crate::preprocess::ImageProcessor;
use crate::seed::derive_seed;
use crate::{tiny, Embedder, ModelInfo, Result, RgbImage, WorkerError};

pub struct ClipEmbedder {
    model: ClipModel,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    device: Device,
    dim: usize,
    max_text_tokens: usize,
    pad_id: u32,
    bos_id: Option<u32>,
    eos_id: u32,
    info: ModelInfo,
}

/// The smoke-test CLIP: 2 layers, width 32, 32x32 images, 32-d embeddings.
pub fn tiny_clip_config(vocab_size: usize) -> ClipConfig {
    ClipConfig {
        text_config: ClipTextConfig {
            vocab_size,
            embed_dim: 32,
            activation: Activation::QuickGelu,
            intermediate_size: 64,
            max_position_embeddings: 64,
            pad_with: None,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            projection_dim: 32,
        },
        vision_config: ClipVisionConfig {
            embed_dim: 32,
            activation: Activation::QuickGelu,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            projection_dim: 32,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
        },
        logit_scale_init_value: 2.6592,
        image_size: 32,
    }
}

impl ClipEmbedder {
    /// The `tiny` smoke-test preset (random weights seeded by `seed`).
    pub fn tiny(seed: u64, device: &Device) -> Result<Self> {
        let tokenizer = tiny::tokenizer()?;
        let cfg = tiny_clip_config(tokenizer.get_vocab_size(true));
        let class_embedding: &[usize] = &[cfg.vision_config.embed_dim];
        let optional = [("vision_model.embeddings.class_embedding", class_embedding)];
        let model =
            tiny::build_seeded(derive_seed(seed, &["tiny-clip"]), device, &optional, |vb| {
                ClipModel::new(vb, &cfg)
            })?;
        let processor = ImageProcessor::clip(cfg.image_size as u32);
        let info = ModelInfo {
            architecture: "clip".into(),
            source: "preset:tiny (smoke test, random weights)".into(),
            smoke_test: true,
            fingerprint: format!(
                "tiny-clip/seed={seed}/{:x}",
                derive_seed(
                    0,
                    &[
                        &processor.fingerprint(),
                        &format!("{:?}", cfg.vision_config),
                        &format!("{:?}", cfg.text_config)
                    ]
                )
            ),
        };
        Ok(ClipEmbedder {
            pad_id: tiny::token_id(&tokenizer, tiny::PAD)?,
            bos_id: Some(tiny::token_id(&tokenizer, tiny::BOS)?),
            eos_id: tiny::token_id(&tokenizer, tiny::EOS)?,
            model,
            tokenizer,
            processor,
            device: device.clone(),
            dim: cfg.text_config.projection_dim,
            max_text_tokens: cfg.text_config.max_position_embeddings,
            info,
        })
    }

    fn tokenize(&self, texts: &[String]) -> Result<Tensor> {
        let mut rows = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self
                .tokenizer
                .encode(t.as_str(), false)
                .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
            let mut ids: Vec<u32> = self.bos_id.into_iter().collect();
            ids.extend(enc.get_ids());
            ids.truncate(self.max_text_tokens - 1);
            ids.push(self.eos_id);
            rows.push(ids);
        }
        let len = rows.iter().map(Vec::len).max().unwrap_or(1);
        let flat: Vec<u32> = rows
            .into_iter()
            .flat_map(|mut r| {
                r.resize(len, self.pad_id);
                r
            })
            .collect();
        Ok(Tensor::from_vec(flat, (texts.len(), len), &self.device)?)
    }
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(clip::div_l2_norm(t)?.to_vec2::<f32>()?)
}

impl Embedder for ClipEmbedder {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn preprocessing(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.processor).ok()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    /// One forward pass per image: batched kernels change the summation
    /// order with the batch size, and a rank must not depend on batching.
    fn embed_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for img in images {
            let pixels = self.processor.batch(&[*img], &self.device)?;
            out.extend(rows(&self.model.get_image_features(&pixels)?)?);
        }
        Ok(out)
    }
    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            let ids = self.tokenize(std::slice::from_ref(t))?;
            out.extend(rows(&self.model.get_text_features(&ids)?)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_clip_gives_unit_vectors_independent_of_batch() {
        let mut e = ClipEmbedder::tiny(3, &Device::Cpu).unwrap();
        let a = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 100]));
        let b = RgbImage::from_fn(20, 50, |x, y| image::Rgb([200, x as u8 * 12, y as u8 * 5]));
        let both = e.embed_images(&[&a, &b]).unwrap();
        let single = e.embed_images(&[&b]).unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].len(), e.dim());
        for v in &both {
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        assert_eq!(both[1], single[0], "batching must not change an embedding");
        assert_ne!(both[0], both[1]);
        let t = e
            .embed_texts(&["a red sky".into(), "a dog on the grass near a tree".into()])
            .unwrap();
        assert_eq!(t.len(), 2);
        assert_ne!(t[0], t[1]);
    }
}

#[cfg(test)]
mod determinism {
    use super::*;

    /// Golden values pin the smoke-test weights: a model that draws any
    /// parameter from an unseeded RNG (as candle does for a missing CLIP
    /// `class_embedding`) changes them from process to process.
    #[test]
    fn tiny_clip_is_the_same_in_every_process() {
        let mut e = ClipEmbedder::tiny(0, &Device::Cpu).unwrap();
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * 8, y as u8 * 8, 128]));
        let v = e.embed_images(&[&img]).unwrap().remove(0);
        let fresh = ClipEmbedder::tiny(0, &Device::Cpu)
            .unwrap()
            .embed_images(&[&img])
            .unwrap()
            .remove(0);
        assert_eq!(v, fresh);
        let golden = [0.061774176f32, -0.14146735, 0.016268061, -0.19854286];
        for (a, b) in v.iter().zip(golden) {
            assert!(
                (a - b).abs() < 1e-5,
                "tiny CLIP drifted: {:?} vs golden {golden:?}",
                &v[..4]
            );
        }
    }
}
