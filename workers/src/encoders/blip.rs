//! BLIP (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training
//! for Unified Vision-Language Understanding and Generation", arXiv
//! 2201.12086) as an image-text contrastive (ITC) retrieval encoder, computing
//! what transformers' `BlipForImageTextRetrieval` (`modeling_blip.py`,
//! `modeling_blip_text.py`) computes with `use_itm_head=False`, for
//! checkpoints in the layout of `Salesforce/blip-itm-base-coco`
//! (`config.json` `model_type: "blip"`):
//!
//! - image: `normalize(vision_proj(post_layernorm(encoder([class_embedding;
//!   patch_embedding(x)] + position_embedding))[:, 0]))`, a ViT whose
//!   patch convolution has a bias, with pre-LayerNorm layers (fused `qkv`
//!   attention, `projection`, MLP `fc1`/`fc2`) and no LayerNorm before the
//!   encoder;
//! - text: `normalize(text_proj(text_encoder(input_ids, attention_mask)
//!   [:, 0]))`, a BERT encoder (word + absolute position embeddings, then
//!   LayerNorm; post-LayerNorm layers with bidirectional self-attention).
//!   The checkpoint's cross-attention weights (`crossattention.*`, present
//!   when `text_config.is_decoder`) are not used: without image states the
//!   reference skips them. The ids are the tokenizer's `[CLS] ... [SEP]`, as
//!   `BlipProcessor` gives them (the reference does not swap `[CLS]` for
//!   `[ENC]` on this path).
//!
//! `hidden_act` and `layer_norm_eps` come from `config.json`.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use tokenizers::Tokenizer;

use super::hf::{
    check_processor_size, embed_images_one_by_one, embed_texts_one_by_one, encode_ids, fingerprint,
    load_tokenizer, model_max_length, resolve, rows_normalized, text_max_len, tokenizer_config,
    truncate_unpadded, var_builder, weights_err, ConfigReader, TextSpec,
};
use super::layers::{patch_embedding, Act, Mlp, TowerConfig};
use crate::preprocess::ImageProcessor;
use crate::{Embedder, ModelInfo, Result, RgbImage};

/// The parts of a transformers `BlipConfig` the retrieval forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct BlipConfig {
    /// `vision_config` (`BlipVisionConfig`).
    pub vision: TowerConfig,
    /// `text_config` (`BlipTextConfig`).
    pub text: TowerConfig,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// Width of `vision_proj` / `text_proj`: the embedding size.
    pub image_text_hidden_size: usize,
}

impl BlipConfig {
    /// From `config.json` (`model_type: "blip"`); defaults are transformers'.
    pub fn from_hf(cfg: &ConfigReader) -> Result<Self> {
        let t = cfg.sub("text_config")?;
        let v = cfg.sub("vision_config")?;
        let text = t.tower(768, 3072, 12, 8, "gelu", 1e-12)?;
        let vision = v.tower(768, 3072, 12, 12, "gelu", 1e-5)?;
        let c = BlipConfig {
            vocab_size: t.usize("vocab_size", 30524)?,
            max_position_embeddings: t.usize("max_position_embeddings", 512)?,
            image_size: v.usize("image_size", 384)?,
            patch_size: v.usize("patch_size", 16)?,
            image_text_hidden_size: cfg.usize("image_text_hidden_size", 256)?,
            text,
            vision,
        };
        if c.patch_size == 0 || c.image_size < c.patch_size {
            return Err(cfg.error(format!(
                "vision_config: image_size {} and patch_size {} do not make any patch",
                c.image_size, c.patch_size
            )));
        }
        for (key, n) in [
            ("text_config.vocab_size", c.vocab_size),
            (
                "text_config.max_position_embeddings",
                c.max_position_embeddings,
            ),
            ("image_text_hidden_size", c.image_text_hidden_size),
        ] {
            if n == 0 {
                return Err(cfg.error(format!("{key} must be positive")));
            }
        }
        Ok(c)
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

// ------------------------------------------------------------------ vision
//
// The ViT and BERT pieces below are shared with BLIP-2 (`blip2.rs`), whose
// vision tower and Q-Former are the same layers under other names.

/// How the fused `qkv` linear of a BLIP / BLIP-2 vision attention keeps its
/// bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum QkvBias {
    /// BLIP: `qkv.bias`, all three parts learned.
    Full,
    /// BLIP-2 (EVA ViT): `[q_bias, 0, v_bias]` when `vision_config.qkv_bias`
    /// (saved as `qkv.bias`, or as `q_bias` / `v_bias` by older
    /// transformers), no bias otherwise.
    QueryValue(bool),
}

/// `BlipAttention` / `Blip2Attention`: one `qkv` linear (q, k, v stacked
/// along the output), scale `head_dim^-0.5`, output `projection`; no mask.
struct VisionAttention {
    qkv: Linear,
    projection: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(c: &TowerConfig, bias: QkvBias, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let qkv = match bias {
            QkvBias::Full => linear(h, 3 * h, vb.pp("qkv"))?,
            QkvBias::QueryValue(has_bias) => {
                let w = vb.get((3 * h, h), "qkv.weight")?;
                let bias = if !has_bias {
                    None
                } else if vb.contains_tensor("qkv.bias") {
                    // transformers >= 4.4x saves the concatenated bias
                    Some(vb.get(3 * h, "qkv.bias")?)
                } else {
                    // older saves keep the two learned parts
                    let q = vb.get(h, "q_bias")?;
                    let v = vb.get(h, "v_bias")?;
                    Some(Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?)
                };
                Linear::new(w, bias)
            }
        };
        Ok(VisionAttention {
            qkv,
            projection: linear(h, h, vb.pp("projection"))?,
            num_heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        // (b, n, 3, heads, hd) -> (3, b, heads, n, hd)
        let qkv = xs
            .apply(&self.qkv)?
            .reshape((b, n, 3, self.num_heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.i(0)?.contiguous()?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let w = (q.matmul(&k.t()?)? * scale)?;
        let w = candle_nn::ops::softmax(&w, D::Minus1)?;
        w.matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, h))?
            .apply(&self.projection)
    }
}

/// `BlipEncoderLayer` / `Blip2EncoderLayer` (pre-LayerNorm).
struct VisionLayer {
    layer_norm1: LayerNorm,
    self_attn: VisionAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl VisionLayer {
    fn new(c: &TowerConfig, bias: QkvBias, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(VisionLayer {
            layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: VisionAttention::new(c, bias, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&xs.apply(&self.layer_norm1)?)?;
        let xs = (h + xs)?;
        let h = xs.apply(&self.layer_norm2)?.apply(&self.mlp)?;
        h + xs
    }
}

/// The geometry of a BLIP / BLIP-2 vision tower.
#[derive(Clone, Copy, Debug)]
pub(super) struct VitGeometry {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: QkvBias,
}

/// `BlipVisionModel` / `Blip2VisionModel`.
pub(super) struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Tensor,
    layers: Vec<VisionLayer>,
    /// Applied by the caller: BLIP to the class token only, BLIP-2 to the
    /// whole sequence (the same per token).
    pub post_layernorm: LayerNorm,
}

impl VisionTower {
    pub fn new(c: &TowerConfig, g: VitGeometry, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let ve = vb.pp("embeddings");
        let num_patches = (g.image_size / g.patch_size).pow(2);
        let lv = vb.pp("encoder").pp("layers");
        Ok(VisionTower {
            class_embedding: ve.get((1, 1, h), "class_embedding")?,
            patch_embedding: patch_embedding(
                g.num_channels,
                h,
                g.patch_size,
                true,
                ve.pp("patch_embedding"),
            )?,
            position_embedding: ve.get((1, num_patches + 1, h), "position_embedding")?,
            layers: (0..c.num_hidden_layers)
                .map(|i| VisionLayer::new(c, g.qkv_bias, lv.pp(i)))
                .collect::<candle_core::Result<_>>()?,
            post_layernorm: layer_norm(h, c.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// (B, C, S, S) -> the encoder's last hidden states (B, 1 + patches,
    /// hidden), before `post_layernorm`.
    pub fn encode(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let patches = pixel_values
            .apply(&self.patch_embedding)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self.class_embedding.repeat((b, 1, 1))?;
        let mut xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding)?
            .contiguous()?;
        for l in &self.layers {
            xs = l.forward(&xs)?;
        }
        Ok(xs)
    }
}

// ------------------------------------------------------------------ text

/// BERT attention as BLIP's text encoder (`BlipTextAttention`) and BLIP-2's
/// Q-Former (`Blip2QFormerAttention`) have it: `{inner}.{query,key,value}`
/// and `output.{dense,LayerNorm}`, `LayerNorm(dense(context) + input)`
/// (post-LayerNorm). `inner` is `self` in BLIP, `attention` in BLIP-2.
pub(super) struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
}

impl BertAttention {
    /// `kv_size`: the width of what keys and values are computed from (the
    /// hidden size for self-attention, the vision width for cross-attention).
    pub fn new(
        c: &TowerConfig,
        kv_size: usize,
        inner: &str,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let a = vb.pp(inner);
        let o = vb.pp("output");
        Ok(BertAttention {
            query: linear(h, h, a.pp("query"))?,
            key: linear(kv_size, h, a.pp("key"))?,
            value: linear(kv_size, h, a.pp("value"))?,
            dense: linear(h, h, o.pp("dense"))?,
            layer_norm: layer_norm(h, c.layer_norm_eps, o.pp("LayerNorm"))?,
            num_heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    /// Self-attention (`kv = None`) or cross-attention to `kv`; `mask`:
    /// additive, broadcastable to (B, heads, queries, keys).
    pub fn forward(
        &self,
        xs: &Tensor,
        kv: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let src = kv.unwrap_or(xs);
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            let (b, n, _) = t.dims3()?;
            t.reshape((b, n, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(xs.apply(&self.query)?)?;
        let k = heads(src.apply(&self.key)?)?;
        let v = heads(src.apply(&self.value)?)?;
        let mut w = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let w = candle_nn::ops::softmax(&w, D::Minus1)?;
        let (b, n, h) = xs.dims3()?;
        let ctx = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        (ctx.apply(&self.dense)? + xs)?.apply(&self.layer_norm)
    }
}

/// BERT feed-forward, `intermediate{suffix}` + `output{suffix}`:
/// `LayerNorm(dense2(act(dense1(x))) + x)` (BLIP-2's query feed-forward has
/// the suffix `_query`).
pub(super) struct BertFeedForward {
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    act: Act,
}

impl BertFeedForward {
    pub fn new(c: &TowerConfig, vb: VarBuilder, suffix: &str) -> candle_core::Result<Self> {
        let i = vb.pp(format!("intermediate{suffix}"));
        let o = vb.pp(format!("output{suffix}"));
        Ok(BertFeedForward {
            intermediate: linear(c.hidden_size, c.intermediate_size, i.pp("dense"))?,
            output: linear(c.intermediate_size, c.hidden_size, o.pp("dense"))?,
            layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, o.pp("LayerNorm"))?,
            act: c.act,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = xs
            .apply(&self.intermediate)?
            .apply(&self.act)?
            .apply(&self.output)?;
        (h + xs)?.apply(&self.layer_norm)
    }
}

/// BERT embeddings: `LayerNorm(word_embeddings(ids) + position_embeddings[:L])`
/// for (B, L) ids; the caller checks L against the position table.
pub(super) fn bert_embeddings(
    word_embeddings: &Embedding,
    position_embeddings: &Tensor,
    norm: &LayerNorm,
    input_ids: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = input_ids.dim(1)?;
    word_embeddings
        .forward(input_ids)?
        .broadcast_add(&position_embeddings.narrow(0, 0, n)?.unsqueeze(0)?)?
        .apply(norm)
}

/// transformers' extended attention mask from a (B, L) 0/1 mask:
/// `(1 - m) * masked`, shaped (B, 1, 1, L) to add over the keys. `masked`
/// is `finfo(float32).min` in BLIP, -10000 in BLIP-2.
pub(super) fn extended_mask(
    attention_mask: Option<&Tensor>,
    (b, n): (usize, usize),
    masked: f64,
) -> candle_core::Result<Option<Tensor>> {
    attention_mask
        .map(|m| {
            m.to_dtype(DType::F32)?
                .affine(-masked, masked)?
                .reshape((b, 1, 1, n))
        })
        .transpose()
}

/// `BlipTextLayer` without its cross-attention.
struct TextLayer {
    attention: BertAttention,
    ffn: BertFeedForward,
}

impl TextLayer {
    fn new(c: &TowerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(TextLayer {
            attention: BertAttention::new(c, c.hidden_size, "self", vb.pp("attention"))?,
            ffn: BertFeedForward::new(c, vb, "")?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.ffn.forward(&self.attention.forward(xs, None, mask)?)
    }
}

/// `BlipTextModel` (`add_pooling_layer=False`) as an encoder.
struct TextTower {
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<TextLayer>,
    max_positions: usize,
}

impl TextTower {
    fn new(cfg: &BlipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = &cfg.text;
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        let lv = vb.pp("encoder").pp("layer");
        Ok(TextTower {
            word_embeddings: embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            position_embeddings: e
                .pp("position_embeddings")
                .get((cfg.max_position_embeddings, h), "weight")?,
            embeddings_norm: layer_norm(h, c.layer_norm_eps, e.pp("LayerNorm"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| TextLayer::new(c, lv.pp(i)))
                .collect::<candle_core::Result<_>>()?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// (B, L) ids (+ optional (B, L) 0/1 mask) -> the first token's last
    /// hidden state (B, hidden).
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        if n > self.max_positions {
            candle_core::bail!(
                "{n} tokens exceed max_position_embeddings {}",
                self.max_positions
            );
        }
        let mut xs = bert_embeddings(
            &self.word_embeddings,
            &self.position_embeddings,
            &self.embeddings_norm,
            input_ids,
        )?;
        // transformers' extended mask: (1 - m) * finfo.min on the keys
        let mask = extended_mask(attention_mask, (b, n), f32::MIN as f64)?;
        for l in &self.layers {
            xs = l.forward(&xs, mask.as_ref())?;
        }
        xs.i((.., 0, ..))
    }
}

// ------------------------------------------------------------------ model

/// transformers' `BlipForImageTextRetrieval`, the ITC part.
pub struct BlipModel {
    cfg: BlipConfig,
    vision: VisionTower,
    text: TextTower,
    vision_proj: Linear,
    text_proj: Linear,
}

impl BlipModel {
    /// `vb` at the checkpoint root (`vision_model.*`, `text_encoder.*`,
    /// `vision_proj`, `text_proj`).
    pub fn new(cfg: &BlipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.image_text_hidden_size;
        Ok(BlipModel {
            cfg: cfg.clone(),
            vision: VisionTower::new(
                &cfg.vision,
                VitGeometry {
                    image_size: cfg.image_size,
                    patch_size: cfg.patch_size,
                    num_channels: 3,
                    qkv_bias: QkvBias::Full,
                },
                vb.pp("vision_model"),
            )?,
            text: TextTower::new(cfg, vb.pp("text_encoder"))?,
            vision_proj: linear(cfg.vision.hidden_size, d, vb.pp("vision_proj"))?,
            text_proj: linear(cfg.text.hidden_size, d, vb.pp("text_proj"))?,
        })
    }

    pub fn config(&self) -> &BlipConfig {
        &self.cfg
    }

    /// (B, 3, image_size, image_size) -> (B, image_text_hidden_size), not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        // post_layernorm is per token: the class token's row is enough
        self.vision
            .encode(pixel_values)?
            .i((.., 0, ..))?
            .apply(&self.vision.post_layernorm)?
            .apply(&self.vision_proj)
    }

    /// (B, L) u32 ids (+ optional (B, L) 0/1 mask) -> (B, image_text_hidden_size),
    /// not normalised.
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.text
            .forward(input_ids, attention_mask)?
            .apply(&self.text_proj)
    }
}

// ------------------------------------------------------------------ embedder

/// A BLIP retrieval checkpoint as an [`Embedder`]: preprocessing from
/// `preprocessor_config.json`, tokenization from `tokenizer.json`, and one
/// forward pass per item (an embedding never depends on the batch).
pub struct BlipEmbedder {
    model: BlipModel,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    text: TextSpec,
    device: Device,
    info: ModelInfo,
}

impl BlipEmbedder {
    /// Loads a folder or Hub id (see [`resolve`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local folder; `source` is recorded in [`ModelInfo`].
    pub fn load_dir(dir: &Path, source: &str, device: &Device) -> Result<Self> {
        let cfg = ConfigReader::read(dir, "config.json")?;
        match cfg.str("model_type") {
            Some("blip") => {}
            other => {
                return Err(cfg.error(format!(
                    "model_type = {other:?}, but the BLIP encoder reads \"blip\" checkpoints \
                     (BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-base-coco)"
                )))
            }
        }
        let c = BlipConfig::from_hf(&cfg)?;
        let pre = ConfigReader::read(dir, "preprocessor_config.json")?;
        let processor = ImageProcessor::from_preprocessor_config(
            pre.value(),
            &pre.file().display().to_string(),
        )?;
        let model_max = model_max_length(&tokenizer_config(dir)?);
        // the tokenizer first: a tokenizer from another checkpoint is named as such
        let mut tokenizer = load_tokenizer(dir, c.vocab_size)?;
        let (vb, label) = var_builder(dir, device)?;
        let model = BlipModel::new(&c, vb).map_err(|e| weights_err(&label, e))?;
        // the processor must produce what the vision tower was built for
        check_processor_size(&processor, &pre, c.image_size)?;
        let max_len = text_max_len(model_max, c.max_position_embeddings);
        truncate_unpadded(&mut tokenizer, dir, max_len)?;
        let text = TextSpec {
            max_len,
            pad_to_max_with: None,
        };
        let fingerprint = fingerprint(dir, "blip", &processor, &text)?;
        Ok(BlipEmbedder {
            model,
            tokenizer,
            processor,
            text,
            device: device.clone(),
            info: ModelInfo {
                architecture: "blip".into(),
                source: source.to_string(),
                smoke_test: crate::encoders::hf::has_random_weights(dir),
                fingerprint,
            },
        })
    }

    pub fn model(&self) -> &BlipModel {
        &self.model
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn text_spec(&self) -> &TextSpec {
        &self.text
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids the text encoder gets for one text: `[CLS] ... [SEP]`,
    /// truncated to `max_len`, not padded.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        encode_ids(&self.tokenizer, text)
    }

    /// Unit-norm embeddings of preprocessed images (B, 3, H, W).
    pub fn embed_pixel_values(&self, pixel_values: &Tensor) -> Result<Vec<Vec<f32>>> {
        rows_normalized(&self.model.image_features(pixel_values)?)
    }

    /// Unit-norm embeddings of token ids (B, L) with an optional (B, L)
    /// 0/1 attention mask (padding).
    pub fn embed_token_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        rows_normalized(&self.model.text_features(input_ids, attention_mask)?)
    }
}

impl Embedder for BlipEmbedder {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn preprocessing(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.processor).ok()
    }

    fn dim(&self) -> usize {
        self.model.cfg.image_text_hidden_size
    }

    /// One forward pass per image (see [`embed_images_one_by_one`]).
    fn embed_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Vec<f32>>> {
        embed_images_one_by_one(&self.processor, &self.device, images, |p| {
            self.embed_pixel_values(p)
        })
    }

    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        embed_texts_one_by_one(
            &self.device,
            texts,
            |t| self.tokenize(t),
            |ids| self.embed_token_ids(ids, None),
        )
    }
}
