//! BLIP-2 image-text retrieval (Li et al. 2023, "BLIP-2: Bootstrapping
//! Language-Image Pre-training with Frozen Image Encoders and Large Language
//! Models", arXiv 2301.12597), as transformers' `Blip2ForImageTextRetrieval`
//! computes it (`models/blip_2/modeling_blip_2.py`) with
//! `use_image_text_matching_head=False`, i.e. the image-text contrastive
//! (ITC) embeddings; the Hugging Face checkpoint is `Salesforce/blip2-itm-vit-g`
//! (`config.json`: `model_type = "blip-2"`, `architectures =
//! ["Blip2ForImageTextRetrieval"]`).
//!
//! - vision (`vision_model`, an EVA-style ViT): `[class; patch_embedding(x)]
//!   + position_embedding`, pre-LayerNorm layers whose attention is one
//!   `qkv` linear (bias `[q_bias, 0, v_bias]`) and a `projection`, then
//!   `post_layernorm` over the whole sequence;
//! - Q-Former (`qformer`, BERT-style post-LayerNorm layers): the
//!   `num_query_tokens` learned `query_tokens` go through `qformer.layernorm`,
//!   then every layer does self-attention, cross-attention to the vision
//!   output in every `cross_attention_frequency`-th layer (queries only), and
//!   the query feed-forward (`intermediate_query` / `output_query`);
//! - image embedding: `normalize(vision_projection(qformer(queries)))`, one
//!   vector per query token, shape (Q, D);
//! - text (`embeddings`, then the same Q-Former with no queries: no
//!   cross-attention, the text feed-forward `intermediate` / `output`, the
//!   padding mask as `(1 - mask) * -10000`): `normalize(text_projection(
//!   qformer(word + position embeddings)[:, 0]))`, the `[CLS]` position.
//!
//! The OPT/T5 `text_config` of `config.json` belongs to the generation
//! models and is not used; generation checkpoints (`blip2-opt-*`,
//! `blip2-flan-t5-*`, `Blip2ForConditionalGeneration`) have no projections
//! and are refused with that explanation.
//!
//! # Multi-vector image embeddings
//!
//! BLIP-2 scores a text against an image by the best of its Q query
//! embeddings (`logits_per_image = max_q image_embeds[q] . text_embeds`),
//! and no single vector reproduces that maximum. So an image embedding keeps
//! all Q normalised query projections, concatenated (`Q * D` floats;
//! [`Embedder::vectors_per_image`] = `num_query_tokens`, [`Embedder::dim`] =
//! `image_text_hidden_size`), and a similarity is the maximum inner product
//! over vector pairs: over the queries for text -> image (exactly
//! transformers' score) and over all Q x Q pairs for image -> image (the
//! natural extension; BLIP-2 defines no image-image score). Storing the mean
//! or the first query instead would change the ranking.
//!
//! Texts are tokenized without padding (truncated to `model_max_length`,
//! at most the Q-Former's `max_position_embeddings`); with the attention
//! mask, padding to `max_length` as the reference processor does gives the
//! same `[CLS]` embedding (tested). One forward pass per item, so an
//! embedding never depends on the batch it is in.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use tokenizers::Tokenizer;

use super::blip::{
    bert_embeddings, extended_mask, BertAttention, BertFeedForward, QkvBias, VisionTower,
    VitGeometry,
};
use super::hf::{
    check_processor_size, embed_images_one_by_one, embed_texts_one_by_one, encode_ids, fingerprint,
    load_tokenizer, model_max_length, resolve, rows_normalized, text_max_len, tokenizer_config,
    truncate_unpadded, var_builder, weights_err, ConfigReader, TextSpec,
};
use super::layers::TowerConfig;
use crate::preprocess::ImageProcessor;
use crate::{Embedder, ModelInfo, Result, RgbImage};

/// The parts of a transformers `Blip2Config` the retrieval forward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Blip2Config {
    /// `vision_config` (EVA ViT-g: 1408 wide, 39 layers).
    pub vision: TowerConfig,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    /// `vision_config.qkv_bias`: q and v biases (k has none).
    pub qkv_bias: bool,
    /// `qformer_config` (BERT-base sized).
    pub qformer: TowerConfig,
    pub qformer_vocab_size: usize,
    pub qformer_max_position_embeddings: usize,
    pub cross_attention_frequency: usize,
    /// Width of the vision output the cross-attention reads.
    pub encoder_hidden_size: usize,
    /// Q, the learned query tokens (= vectors per image).
    pub num_query_tokens: usize,
    /// D, the size of the shared embedding space.
    pub image_text_hidden_size: usize,
}

impl Blip2Config {
    /// From `config.json` (`model_type: "blip-2"`); defaults are
    /// transformers' (`Blip2Config`, `Blip2VisionConfig`,
    /// `Blip2QFormerConfig`). Errors name the file and key.
    pub fn from_hf(cfg: &ConfigReader) -> Result<Self> {
        if let Some(archs) = cfg.value()["architectures"].as_array() {
            let names: Vec<&str> = archs.iter().filter_map(|a| a.as_str()).collect();
            if !names.is_empty() && !names.contains(&"Blip2ForImageTextRetrieval") {
                return Err(cfg.error(format!(
                    "architectures = {names:?}: mirgen's BLIP-2 encoder is the retrieval model \
                     Blip2ForImageTextRetrieval (e.g. Salesforce/blip2-itm-vit-g); generation checkpoints \
                     (blip2-opt-*, blip2-flan-t5-*) have no image/text projections"
                )));
            }
        }
        let v = cfg.sub("vision_config")?;
        let q = cfg.sub("qformer_config")?;
        let vision = v.tower(1408, 6144, 39, 16, "gelu", 1e-6)?;
        let qformer = q.tower(768, 3072, 12, 12, "gelu", 1e-12)?;
        let c = Blip2Config {
            image_size: v.usize("image_size", 224)?,
            patch_size: v.usize("patch_size", 14)?,
            num_channels: v.usize("num_channels", 3)?,
            qkv_bias: v.bool("qkv_bias", true)?,
            qformer_vocab_size: q.usize("vocab_size", 30522)?,
            qformer_max_position_embeddings: q.usize("max_position_embeddings", 512)?,
            cross_attention_frequency: q.usize("cross_attention_frequency", 2)?,
            encoder_hidden_size: q.usize("encoder_hidden_size", 1408)?,
            num_query_tokens: cfg.usize("num_query_tokens", 32)?,
            image_text_hidden_size: cfg.usize("image_text_hidden_size", 256)?,
            vision,
            qformer,
        };
        if let Some(kind) = q.str("position_embedding_type") {
            if kind != "absolute" {
                return Err(q.error(format!(
                    "position_embedding_type = {kind:?} is not supported (absolute is)"
                )));
            }
        }
        if !q.bool("use_qformer_text_input", false)? {
            return Err(q.error(
                "use_qformer_text_input is not true: this Q-Former has no text feed-forward \
                 (intermediate/output), so it cannot embed texts; use a retrieval checkpoint such as \
                 Salesforce/blip2-itm-vit-g"
                    .into(),
            ));
        }
        if c.cross_attention_frequency == 0 {
            return Err(q.error("cross_attention_frequency must be at least 1".into()));
        }
        if c.encoder_hidden_size != c.vision.hidden_size {
            return Err(q.error(format!(
                "encoder_hidden_size {} differs from vision_config.hidden_size {}: the Q-Former cannot \
                 read this vision tower",
                c.encoder_hidden_size, c.vision.hidden_size
            )));
        }
        if c.patch_size == 0 || c.image_size < c.patch_size {
            return Err(v.error(format!(
                "image_size {} and patch_size {} do not make any patch",
                c.image_size, c.patch_size
            )));
        }
        if c.num_query_tokens == 0 || c.image_text_hidden_size == 0 {
            return Err(
                cfg.error("num_query_tokens and image_text_hidden_size must be positive".into())
            );
        }
        Ok(c)
    }
}

// ------------------------------------------------------------------ Q-Former
//
// The vision tower is BLIP's (`blip::VisionTower`, with the EVA `qkv` bias)
// and the Q-Former's attention and feed-forward are BLIP's BERT pieces.

/// `Blip2QFormerLayer`.
struct QfLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    text_ffn: BertFeedForward,
    query_ffn: BertFeedForward,
}

impl QfLayer {
    fn new(cfg: &Blip2Config, idx: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = &cfg.qformer;
        let cross = idx.is_multiple_of(cfg.cross_attention_frequency);
        Ok(QfLayer {
            attention: BertAttention::new(c, c.hidden_size, "attention", vb.pp("attention"))?,
            crossattention: if cross {
                Some(BertAttention::new(
                    c,
                    cfg.encoder_hidden_size,
                    "attention",
                    vb.pp("crossattention"),
                )?)
            } else {
                None
            },
            text_ffn: BertFeedForward::new(c, vb.clone(), "")?,
            query_ffn: BertFeedForward::new(c, vb, "_query")?,
        })
    }
}

// ------------------------------------------------------------------ model

/// transformers' `Blip2ForImageTextRetrieval`, contrastive (ITC) path.
pub struct Blip2Model {
    cfg: Blip2Config,
    vision: VisionTower,
    query_tokens: Tensor,
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    layernorm: LayerNorm,
    layers: Vec<QfLayer>,
    vision_projection: Linear,
    text_projection: Linear,
}

impl Blip2Model {
    pub fn new(cfg: &Blip2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let qc = &cfg.qformer;
        let h = qc.hidden_size;
        let e = vb.pp("embeddings");
        let q = vb.pp("qformer");
        let lv = q.pp("encoder").pp("layer");
        Ok(Blip2Model {
            cfg: cfg.clone(),
            vision: VisionTower::new(
                &cfg.vision,
                VitGeometry {
                    image_size: cfg.image_size,
                    patch_size: cfg.patch_size,
                    num_channels: cfg.num_channels,
                    qkv_bias: QkvBias::QueryValue(cfg.qkv_bias),
                },
                vb.pp("vision_model"),
            )?,
            query_tokens: vb.get((1, cfg.num_query_tokens, h), "query_tokens")?,
            word_embeddings: embedding(cfg.qformer_vocab_size, h, e.pp("word_embeddings"))?,
            position_embeddings: e
                .pp("position_embeddings")
                .get((cfg.qformer_max_position_embeddings, h), "weight")?,
            layernorm: layer_norm(h, qc.layer_norm_eps, q.pp("layernorm"))?,
            layers: (0..qc.num_hidden_layers)
                .map(|i| QfLayer::new(cfg, i, lv.pp(i)))
                .collect::<candle_core::Result<_>>()?,
            vision_projection: linear(h, cfg.image_text_hidden_size, vb.pp("vision_projection"))?,
            text_projection: linear(h, cfg.image_text_hidden_size, vb.pp("text_projection"))?,
        })
    }

    pub fn config(&self) -> &Blip2Config {
        &self.cfg
    }

    /// (B, 3, S, S) -> (B, Q, D): the query projections, not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let image = self
            .vision
            .encode(pixel_values)?
            .apply(&self.vision.post_layernorm)?;
        let b = image.dim(0)?;
        // all Q positions are queries (query_length = Q): cross-attention
        // where the layer has it, and the query feed-forward; the vision
        // output's attention mask is all ones (additive 0)
        let mut xs = self
            .query_tokens
            .repeat((b, 1, 1))?
            .apply(&self.layernorm)?;
        for l in &self.layers {
            xs = l.attention.forward(&xs, None, None)?;
            if let Some(cross) = &l.crossattention {
                xs = cross.forward(&xs, Some(&image), None)?;
            }
            xs = l.query_ffn.forward(&xs)?;
        }
        xs.apply(&self.vision_projection)
    }

    /// (B, L) ids + optional (B, L) 0/1 mask -> (B, D) from the `[CLS]`
    /// position, not normalised.
    pub fn text_features(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        if n == 0 || n > self.cfg.qformer_max_position_embeddings {
            candle_core::bail!(
                "{n} tokens: a text needs 1 to max_position_embeddings = {} tokens",
                self.cfg.qformer_max_position_embeddings
            );
        }
        let mut xs = bert_embeddings(
            &self.word_embeddings,
            &self.position_embeddings,
            &self.layernorm,
            input_ids,
        )?;
        // get_extended_attention_mask: (1 - mask) * -10000 over the keys
        let mask = extended_mask(attention_mask, (b, n), -10000.0)?;
        // query_length = 0: no cross-attention, the text feed-forward
        for l in &self.layers {
            xs = l.attention.forward(&xs, None, mask.as_ref())?;
            xs = l.text_ffn.forward(&xs)?;
        }
        xs.i((.., 0, ..))?.apply(&self.text_projection)
    }
}

// ------------------------------------------------------------------ embedder

/// A BLIP-2 retrieval checkpoint as an [`Embedder`] with multi-vector image
/// embeddings (see the module documentation).
pub struct Blip2Embedder {
    model: Blip2Model,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    max_len: usize,
    device: Device,
    info: ModelInfo,
}

impl Blip2Embedder {
    /// Loads a folder or Hub id (see [`resolve`]).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let (dir, source) = resolve(spec)?;
        Self::load_dir(&dir, &source, device)
    }

    /// Loads a local folder; `source` is recorded in [`ModelInfo`].
    pub fn load_dir(dir: &Path, source: &str, device: &Device) -> Result<Self> {
        let cfg = ConfigReader::read(dir, "config.json")?;
        if cfg.str("model_type") != Some("blip-2") {
            return Err(cfg.error(format!(
                "model_type = {:?}, not \"blip-2\"",
                cfg.str("model_type")
            )));
        }
        let c = Blip2Config::from_hf(&cfg)?;
        let pre = ConfigReader::read(dir, "preprocessor_config.json")?;
        let processor = ImageProcessor::from_preprocessor_config(
            pre.value(),
            &pre.file().display().to_string(),
        )?;
        // the processor must produce what the vision tower was built for
        check_processor_size(&processor, &pre, c.image_size)?;
        // the tokenizer first: a tokenizer from another checkpoint is named as such
        let mut tokenizer = load_tokenizer(dir, c.qformer_vocab_size)?;
        let model_max = model_max_length(&tokenizer_config(dir)?);
        let max_len = text_max_len(model_max, c.qformer_max_position_embeddings);
        truncate_unpadded(&mut tokenizer, dir, max_len)?;
        let (vb, label) = var_builder(dir, device)?;
        let model = Blip2Model::new(&c, vb).map_err(|e| weights_err(&label, e))?;
        let text = TextSpec {
            max_len,
            pad_to_max_with: None,
        };
        let fingerprint = fingerprint(dir, "blip-2", &processor, &text)?;
        Ok(Blip2Embedder {
            model,
            tokenizer,
            processor,
            max_len,
            device: device.clone(),
            info: ModelInfo {
                architecture: "blip-2".into(),
                source: source.to_string(),
                smoke_test: crate::encoders::hf::has_random_weights(dir),
                fingerprint,
            },
        })
    }

    pub fn config(&self) -> &Blip2Config {
        self.model.config()
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Truncation length of a text (special tokens included).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The ids the Q-Former gets for one text: `[CLS] ... [SEP]`, truncated
    /// to [`Blip2Embedder::max_len`], not padded.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        encode_ids(&self.tokenizer, text)
    }

    /// Image embeddings of preprocessed images (B, 3, S, S): per image the
    /// Q unit-norm query vectors, concatenated (Q * D floats).
    pub fn embed_pixel_values(&self, pixel_values: &Tensor) -> Result<Vec<Vec<f32>>> {
        let f = self.model.image_features(pixel_values)?;
        let (b, q, d) = f.dims3()?;
        let rows = rows_normalized(&f.reshape((b * q, d))?)?;
        Ok(rows.chunks(q).map(|c| c.concat()).collect())
    }

    /// Unit-norm text embeddings of token ids (B, L) with an optional (B, L)
    /// 0/1 attention mask (needed when the ids are padded).
    pub fn embed_token_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let f = self.model.text_features(&ids, attention_mask)?;
        rows_normalized(&f)
    }
}

impl Embedder for Blip2Embedder {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn preprocessing(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.processor).ok()
    }

    fn dim(&self) -> usize {
        self.model.cfg.image_text_hidden_size
    }

    fn vectors_per_image(&self) -> usize {
        self.model.cfg.num_query_tokens
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
