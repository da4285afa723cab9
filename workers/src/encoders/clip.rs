//! CLIP (Radford et al. 2021, arXiv 2103.00020) as transformers' `CLIPModel`
//! computes it (e.g. `openai/clip-vit-base-patch16`, `laion/CLIP-ViT-*`):
//!
//! - image: `visual_projection(post_layernorm(encoder(pre_layrnorm(
//!   [class_embedding; patch_embedding(x)] + position_embedding))[:, 0]))`;
//! - text: `text_projection(final_layer_norm(encoder(token + position,
//!   causal mask + padding mask))[eos])`, the eos position as transformers
//!   picks it: `argmax(input_ids)` when `eos_token_id == 2` (old configs),
//!   else the first position of `eos_token_id`.
//!
//! `hidden_act` (quick_gelu, gelu, ...) and `layer_norm_eps` come from
//! `config.json`. The embeddings are not normalised here.

use candle_core::{DType, IndexOp, Tensor};
use candle_nn::{layer_norm, linear_no_bias, LayerNorm, Linear, VarBuilder};

use super::hf::ConfigReader;
use super::layers::{causal_mask, patch_embedding, Encoder, TextTransformer, TowerConfig};
use crate::Result;

/// The parts of a transformers `CLIPConfig` the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub text: TowerConfig,
    pub vision: TowerConfig,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub eos_token_id: u32,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub projection_dim: usize,
}

impl ClipConfig {
    /// From `config.json` (`model_type: "clip"`); defaults are transformers'.
    pub fn from_hf(cfg: &ConfigReader) -> Result<Self> {
        let t = cfg.sub("text_config")?;
        let v = cfg.sub("vision_config")?;
        let text = t.tower(512, 2048, 12, 8, "quick_gelu", 1e-5)?;
        let vision = v.tower(768, 3072, 12, 12, "quick_gelu", 1e-5)?;
        Ok(ClipConfig {
            vocab_size: t.usize("vocab_size", 49408)?,
            max_position_embeddings: t.usize("max_position_embeddings", 77)?,
            eos_token_id: t.usize("eos_token_id", 49407)? as u32,
            image_size: v.usize("image_size", 224)?,
            patch_size: v.usize("patch_size", 32)?,
            num_channels: v.usize("num_channels", 3)?,
            projection_dim: cfg.usize("projection_dim", 512)?,
            text,
            vision,
        })
    }
}

struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

/// transformers' `CLIPModel` (the parts retrieval uses).
pub struct ClipModel {
    cfg: ClipConfig,
    vision: VisionTower,
    text: TextTransformer,
    visual_projection: Linear,
    text_projection: Linear,
}

impl ClipModel {
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (vc, tc) = (&cfg.vision, &cfg.text);
        let vv = vb.pp("vision_model");
        let ve = vv.pp("embeddings");
        let num_patches = (cfg.image_size / cfg.patch_size).pow(2);
        let vision = VisionTower {
            class_embedding: ve.get(vc.hidden_size, "class_embedding")?,
            patch_embedding: patch_embedding(
                cfg.num_channels,
                vc.hidden_size,
                cfg.patch_size,
                false,
                ve.pp("patch_embedding"),
            )?,
            position_embedding: ve
                .pp("position_embedding")
                .get((num_patches + 1, vc.hidden_size), "weight")?,
            pre_layrnorm: layer_norm(vc.hidden_size, vc.layer_norm_eps, vv.pp("pre_layrnorm"))?,
            encoder: Encoder::new(vc, vv.pp("encoder"))?,
            post_layernorm: layer_norm(vc.hidden_size, vc.layer_norm_eps, vv.pp("post_layernorm"))?,
        };
        let text = TextTransformer::new(
            tc,
            cfg.vocab_size,
            cfg.max_position_embeddings,
            vb.pp("text_model"),
        )?;
        Ok(ClipModel {
            cfg: cfg.clone(),
            vision,
            text,
            visual_projection: linear_no_bias(
                vc.hidden_size,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
            text_projection: linear_no_bias(
                tc.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// (B, 3, image_size, image_size) -> (B, projection_dim), not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let v = &self.vision;
        let b = pixel_values.dim(0)?;
        let h = self.cfg.vision.hidden_size;
        let patches = pixel_values
            .apply(&v.patch_embedding)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = v.class_embedding.reshape((1, 1, h))?.repeat((b, 1, 1))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&v.position_embedding.unsqueeze(0)?)?
            .apply(&v.pre_layrnorm)?;
        let xs = v.encoder.forward(&xs, None)?;
        xs.i((.., 0, ..))?
            .apply(&v.post_layernorm)?
            .apply(&self.visual_projection)
    }

    /// (B, L) u32 ids (+ optional (B, L) 0/1 mask) -> (B, projection_dim).
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let dev = input_ids.device();
        let mut mask = causal_mask(n, dev)?;
        if let Some(m) = attention_mask {
            // MIN * (1 - m): 0 for tokens, MIN for padding
            let min = f32::MIN as f64;
            let pad = m
                .to_dtype(DType::F32)?
                .affine(-min, min)?
                .reshape((b, 1, 1, n))?;
            mask = mask.broadcast_add(&pad)?;
        }
        let xs = self.text.forward(input_ids, Some(&mask))?;
        // eos positions as transformers picks them
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let eos = self.cfg.eos_token_id;
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let pos = if eos == 2 {
                    // argmax, first maximum
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                } else {
                    // first eos; transformers' argmax of an all-false row is 0
                    row.iter().position(|&x| x == eos).unwrap_or(0)
                };
                (r * n + pos) as u32
            })
            .collect();
        let idx = Tensor::from_vec(rows, b, dev)?;
        xs.reshape((b * n, ()))?
            .index_select(&idx, 0)?
            .apply(&self.text_projection)
    }
}
