//! SigLIP (Zhai et al. 2023, arXiv 2303.15343) as transformers'
//! `SiglipModel` computes it (e.g. `google/siglip-base-patch16-224`):
//!
//! - image: `head(post_layernorm(encoder(patch_embedding(x) + position_embedding)))`,
//!   the head being multi-head attention pooling (a learned probe attends
//!   over the patches, then `probe + mlp(layernorm(probe))`, first row);
//! - text: `head(final_layer_norm(encoder(token + position))[:, -1])`: the
//!   LAST position, without an attention mask, so texts are padded to
//!   `max_length` as SigLIP was trained (`padding="max_length"`).
//!
//! The embeddings are not normalised here.

use candle_core::{IndexOp, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use super::hf::ConfigReader;
use super::layers::{patch_embedding, Encoder, Mlp, TextTransformer, TowerConfig};
use crate::Result;

/// The parts of a transformers `SiglipConfig` the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipConfig {
    pub text: TowerConfig,
    pub vision: TowerConfig,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Output size of the text head (`projection_size`, default hidden_size).
    pub projection_size: usize,
    pub pad_token_id: Option<u32>,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
}

impl SiglipConfig {
    /// From `config.json` (`model_type: "siglip"`); defaults are transformers'.
    pub fn from_hf(cfg: &ConfigReader) -> Result<Self> {
        let t = cfg.sub("text_config")?;
        let v = cfg.sub("vision_config")?;
        let text = t.tower(768, 3072, 12, 12, "gelu_pytorch_tanh", 1e-6)?;
        let vision = v.tower(768, 3072, 12, 12, "gelu_pytorch_tanh", 1e-6)?;
        if !v.bool("vision_use_head", true)? {
            return Err(v.error(
                "vision_use_head = false: this SigLIP has no pooling head, so it has no image embedding"
                    .into(),
            ));
        }
        Ok(SiglipConfig {
            vocab_size: t.usize("vocab_size", 32000)?,
            max_position_embeddings: t.usize("max_position_embeddings", 64)?,
            projection_size: t.usize("projection_size", text.hidden_size)?,
            pad_token_id: t.opt_usize("pad_token_id")?.map(|x| x as u32),
            image_size: v.usize("image_size", 224)?,
            patch_size: v.usize("patch_size", 16)?,
            num_channels: v.usize("num_channels", 3)?,
            text,
            vision,
        })
    }
}

/// `vision_model.head`: torch `nn.MultiheadAttention` with one learned query.
struct PoolingHead {
    probe: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    out_proj: Linear,
    layernorm: LayerNorm,
    mlp: Mlp,
    num_heads: usize,
}

impl PoolingHead {
    fn new(c: &TowerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let a = vb.pp("attention");
        let w = a.get((3 * h, h), "in_proj_weight")?.chunk(3, 0)?;
        let b = a.get(3 * h, "in_proj_bias")?.chunk(3, 0)?;
        let lin = |i: usize| Linear::new(w[i].clone(), Some(b[i].clone()));
        Ok(PoolingHead {
            probe: vb.get((1, 1, h), "probe")?,
            q: lin(0),
            k: lin(1),
            v: lin(2),
            out_proj: linear(h, h, a.pp("out_proj"))?,
            layernorm: layer_norm(h, c.layer_norm_eps, vb.pp("layernorm"))?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
            num_heads: c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        let d = h / self.num_heads;
        let split = |t: Tensor, len: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, len, self.num_heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let probe = self.probe.repeat((b, 1, 1))?;
        let q = split(probe.apply(&self.q)?, 1)?;
        let k = split(xs.apply(&self.k)?, n)?;
        let v = split(xs.apply(&self.v)?, n)?;
        let w = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let attn = w
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, 1, h))?
            .apply(&self.out_proj)?;
        let out = (&attn + attn.apply(&self.layernorm)?.apply(&self.mlp)?)?;
        out.i((.., 0, ..))
    }
}

struct VisionTower {
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    head: PoolingHead,
}

struct TextTower {
    transformer: TextTransformer,
    head: Linear,
}

/// transformers' `SiglipModel` (the parts retrieval uses).
pub struct SiglipModel {
    cfg: SiglipConfig,
    vision: VisionTower,
    text: TextTower,
}

impl SiglipModel {
    pub fn new(cfg: &SiglipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (vc, tc) = (&cfg.vision, &cfg.text);
        let vv = vb.pp("vision_model");
        let ve = vv.pp("embeddings");
        let num_patches = (cfg.image_size / cfg.patch_size).pow(2);
        let vision = VisionTower {
            patch_embedding: patch_embedding(
                cfg.num_channels,
                vc.hidden_size,
                cfg.patch_size,
                true,
                ve.pp("patch_embedding"),
            )?,
            position_embedding: ve
                .pp("position_embedding")
                .get((num_patches, vc.hidden_size), "weight")?,
            encoder: Encoder::new(vc, vv.pp("encoder"))?,
            post_layernorm: layer_norm(vc.hidden_size, vc.layer_norm_eps, vv.pp("post_layernorm"))?,
            head: PoolingHead::new(vc, vv.pp("head"))?,
        };
        let tv = vb.pp("text_model");
        let text = TextTower {
            transformer: TextTransformer::new(
                tc,
                cfg.vocab_size,
                cfg.max_position_embeddings,
                tv.clone(),
            )?,
            head: linear(tc.hidden_size, cfg.projection_size, tv.pp("head"))?,
        };
        Ok(SiglipModel {
            cfg: cfg.clone(),
            vision,
            text,
        })
    }

    pub fn config(&self) -> &SiglipConfig {
        &self.cfg
    }

    /// (B, 3, image_size, image_size) -> (B, hidden), not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let v = &self.vision;
        let xs = pixel_values
            .apply(&v.patch_embedding)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .broadcast_add(&v.position_embedding.unsqueeze(0)?)?;
        let xs = v.encoder.forward(&xs, None)?.apply(&v.post_layernorm)?;
        v.head.forward(&xs)
    }

    /// (B, L) u32 ids, already padded to max_length -> (B, projection_size).
    pub fn text_features(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let t = &self.text;
        let n = input_ids.dim(1)?;
        let xs = t.transformer.forward(input_ids, None)?;
        xs.i((.., n - 1, ..))?.contiguous()?.apply(&t.head)
    }
}
