//! Gemma 3 multimodal (Gemma Team, "Gemma 3 Technical Report", arXiv
//! 2503.19786) as transformers' `Gemma3ForConditionalGeneration` computes it,
//! for checkpoints in the Hugging Face layout of `google/gemma-3-4b-it`
//! (also 12B/27B, which differ only in sizes):
//!
//! - vision: a SigLIP vision transformer without its pooling head
//!   (`vision_tower.vision_model`: patch conv + position embedding, pre-LN
//!   encoder, `post_layernorm`), every patch kept;
//! - projector (`multi_modal_projector`): the patch grid average-pooled to
//!   `mm_tokens_per_image` tokens, Gemma's RMSNorm (`x * (1 + w)`), then
//!   `x @ mm_input_projection_weight`;
//! - text: the Gemma 3 decoder (`language_model`): token embeddings scaled by
//!   `sqrt(hidden_size)`, each `<image_soft_token>` replaced by one projected
//!   image token, pre- and post-norm sub-layers, q/k RMSNorm, grouped-query
//!   attention scaled by `query_pre_attn_scalar^-0.5`, per-layer
//!   sliding-window or global attention (`layer_types`, or every
//!   `sliding_window_pattern`-th layer global) with their own RoPE (local base
//!   frequency; global `rope_theta` with linear scaling), an attention mask
//!   that is causal (and windowed on sliding layers) except that the tokens of
//!   one image attend to each other both ways (transformers'
//!   `create_masks_for_vision_model`, prefill only) and tied output
//!   embeddings (no soft-capping: the multimodal class of transformers
//!   applies neither `final_logit_softcapping` nor `attn_logit_softcapping`);
//! - prompt: the Gemma 3 chat template (`<bos><start_of_turn>user\n...`), each
//!   image written as `\n\n<start_of_image>` + `mm_tokens_per_image` x
//!   `<image_soft_token>` + `<end_of_image>\n\n` (`Gemma3Processor`);
//!   images resized by `preprocessor_config.json` (`Gemma3ImageProcessor`,
//!   bilinear to 896x896, mean = std = 0.5; pan-and-scan is not implemented);
//! - decoding: a KV cache per layer, greedy or seeded sampling
//!   ([`crate::sampling::Sampler`]), stopping at `generation_config.json`'s
//!   `eos_token_id` (`<eos>`, `<end_of_turn>`).
//!
//! Both weight layouts are read: the Hub's (`language_model.model.*`,
//! `vision_tower.*`, `multi_modal_projector.*`) and the one transformers >=
//! 4.52 saves (`model.language_model.*`, `model.vision_tower.*`, ...).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{layer_norm, linear_b, Conv2d, Embedding, LayerNorm, Linear, VarBuilder};
use tokenizers::Tokenizer;

use crate::encoders::hf::{
    self, load_tokenizer, resolve, special_token, tokenizer_config, var_builder, weights_err,
    ConfigReader,
};
use crate::encoders::layers::{Act, Encoder, TowerConfig};
use crate::preprocess::{ImageProcessor, ResizeTo};
use crate::sampling::Sampler;
use crate::vlms::shared::{
    decode_cached, generation_config, image_processor_config, prompt_token_ids, token_of,
    vlm_output, Attention, AttentionDims, CachedDecoder,
};
use crate::{ModelInfo, Result, RgbImage, SamplingConfig, Vlm, VlmOutput, VlmRequest, WorkerError};

// ------------------------------------------------------------------ config

/// Attention kind of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// Causal attention over the last `sliding_window` positions (local RoPE).
    Sliding,
    /// Causal attention over everything (global RoPE).
    Full,
}

/// Rotary embedding of one layer type: base frequency and linear scaling
/// (positions divided by `factor`; 1 = none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub linear_factor: f64,
}

/// transformers' `Gemma3TextConfig` (the parts the forward pass needs).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_activation: Act,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: f64,
    pub attention_bias: bool,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_global: Rope,
    pub rope_local: Rope,
    /// Read but not applied: transformers' `Gemma3ForConditionalGeneration`
    /// (unlike `Gemma3ForCausalLM`) soft-caps neither the logits nor the
    /// attention scores, and mirgen computes what it computes.
    pub final_logit_softcapping: Option<f64>,
    /// Read but not applied (see `final_logit_softcapping`).
    pub attn_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
}

/// The SigLIP vision tower's sizes (`vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3VisionConfig {
    pub tower: TowerConfig,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
}

/// transformers' `Gemma3Config` (`model_type: "gemma3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3Config {
    pub text: Gemma3TextConfig,
    pub vision: Gemma3VisionConfig,
    /// Image tokens per image after the projector's average pooling.
    pub mm_tokens_per_image: usize,
    /// `<image_soft_token>`.
    pub image_token_id: u32,
    /// `<start_of_image>`.
    pub boi_token_id: u32,
    /// `<end_of_image>`.
    pub eoi_token_id: u32,
    pub tie_word_embeddings: bool,
    /// `eos_token_id` of config.json (one id or a list).
    pub eos_token_ids: Vec<u32>,
}

fn opt_f64(c: &ConfigReader, key: &str) -> Result<Option<f64>> {
    match &c.value()[key] {
        serde_json::Value::Null => Ok(None),
        v => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| c.error(format!("{key} = {v} is not a number"))),
    }
}

/// One id or a list of ids (`eos_token_id`).
pub(crate) fn id_list(c: &ConfigReader, key: &str) -> Result<Vec<u32>> {
    let v = &c.value()[key];
    let bad = || c.error(format!("{key} = {v} is not a token id or a list of them"));
    match v {
        serde_json::Value::Null => Ok(vec![]),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as u32).ok_or_else(bad))
            .collect(),
        x => Ok(vec![x.as_u64().ok_or_else(bad)? as u32]),
    }
}

/// A rope description (`rope_scaling` or one entry of `rope_parameters`):
/// `default` or `linear` (others are refused).
fn parse_rope(c: &ConfigReader, key: &str, theta: f64) -> Result<Rope> {
    let v = &c.value()[key];
    if v.is_null() {
        return Ok(Rope {
            theta,
            linear_factor: 1.0,
        });
    }
    let r = c.sub(key)?;
    let kind = r
        .str("rope_type")
        .or_else(|| r.str("type"))
        .unwrap_or("default");
    let theta = r.f64("rope_theta", theta)?;
    match kind {
        "default" => Ok(Rope {
            theta,
            linear_factor: 1.0,
        }),
        "linear" => {
            let f = r.f64("factor", 1.0)?;
            if f <= 0.0 {
                return Err(r.error(format!("factor = {f} must be positive")));
            }
            Ok(Rope {
                theta,
                linear_factor: f,
            })
        }
        other => Err(r.error(format!(
            "rope_type = {other:?} is not supported (default and linear are)"
        ))),
    }
}

impl Gemma3TextConfig {
    /// From `text_config` (defaults are transformers' `Gemma3TextConfig`).
    pub fn from_hf(t: &ConfigReader) -> Result<Self> {
        let act_name = t
            .str("hidden_activation")
            .or_else(|| t.str("hidden_act"))
            .unwrap_or("gelu_pytorch_tanh");
        let hidden_activation = Act::parse(act_name).ok_or_else(|| {
            t.error(format!(
                "hidden_activation = {act_name:?} is not supported (gelu_pytorch_tanh, gelu, silu are)"
            ))
        })?;
        if t.bool("use_bidirectional_attention", false)? {
            return Err(t.error(
                "use_bidirectional_attention = true (an embedding model such as EmbeddingGemma) is not a \
                 generative Gemma 3"
                    .into(),
            ));
        }
        let num_hidden_layers = t.usize("num_hidden_layers", 26)?;
        let layer_types = match &t.value()["layer_types"] {
            serde_json::Value::Null => {
                let pattern = t.usize("sliding_window_pattern", 6)?;
                (0..num_hidden_layers)
                    .map(|i| {
                        if pattern > 0 && (i + 1) % pattern == 0 {
                            LayerType::Full
                        } else {
                            LayerType::Sliding
                        }
                    })
                    .collect()
            }
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| match x.as_str() {
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    Some("full_attention") => Ok(LayerType::Full),
                    _ => Err(t.error(format!(
                        "layer_types entry {x} is not \"sliding_attention\" or \"full_attention\""
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
            v => return Err(t.error(format!("layer_types = {v} is not a list"))),
        };
        if layer_types.len() != num_hidden_layers {
            return Err(t.error(format!(
                "layer_types has {} entries but num_hidden_layers is {num_hidden_layers}",
                layer_types.len()
            )));
        }
        let rope_theta = t.f64("rope_theta", 1_000_000.0)?;
        let local_theta = t.f64("rope_local_base_freq", 10_000.0)?;
        let (rope_global, rope_local) = if t.value()["rope_parameters"].is_object() {
            // transformers 5: {"full_attention": {...}, "sliding_attention": {...}}
            let p = t.sub("rope_parameters")?;
            (
                parse_rope(&p, "full_attention", rope_theta)?,
                parse_rope(&p, "sliding_attention", local_theta)?,
            )
        } else {
            (
                parse_rope(t, "rope_scaling", rope_theta)?,
                Rope {
                    theta: local_theta,
                    linear_factor: 1.0,
                },
            )
        };
        let c = Gemma3TextConfig {
            vocab_size: t.usize("vocab_size", 262_208)?,
            hidden_size: t.usize("hidden_size", 2304)?,
            intermediate_size: t.usize("intermediate_size", 9216)?,
            num_hidden_layers,
            num_attention_heads: t.usize("num_attention_heads", 8)?,
            num_key_value_heads: t.usize("num_key_value_heads", 4)?,
            head_dim: t.usize("head_dim", 256)?,
            hidden_activation,
            rms_norm_eps: t.f64("rms_norm_eps", 1e-6)?,
            query_pre_attn_scalar: t.f64("query_pre_attn_scalar", 256.0)?,
            attention_bias: t.bool("attention_bias", false)?,
            sliding_window: t.usize("sliding_window", 4096)?,
            layer_types,
            rope_global,
            rope_local,
            final_logit_softcapping: opt_f64(t, "final_logit_softcapping")?,
            attn_logit_softcapping: opt_f64(t, "attn_logit_softcapping")?,
            max_position_embeddings: t.usize("max_position_embeddings", 131_072)?,
        };
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(t.error(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) || c.sliding_window == 0 {
            return Err(t.error(format!(
                "head_dim {} must be even and sliding_window {} positive",
                c.head_dim, c.sliding_window
            )));
        }
        Ok(c)
    }
}

impl Gemma3Config {
    /// From `config.json` (`model_type: "gemma3"`); defaults are transformers'.
    pub fn from_hf(cfg: &ConfigReader) -> Result<Self> {
        let t = cfg.sub("text_config")?;
        let v = cfg.sub("vision_config")?;
        let text = Gemma3TextConfig::from_hf(&t)?;
        let tower = v.tower(1152, 4304, 27, 16, "gelu_pytorch_tanh", 1e-6)?;
        let vision = Gemma3VisionConfig {
            tower,
            image_size: v.usize("image_size", 896)?,
            patch_size: v.usize("patch_size", 14)?,
            num_channels: v.usize("num_channels", 3)?,
        };
        if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
            return Err(v.error(format!(
                "image_size {} is not a multiple of patch_size {}",
                vision.image_size, vision.patch_size
            )));
        }
        let mm = cfg.usize("mm_tokens_per_image", 256)?;
        let side = (mm as f64).sqrt().round() as usize;
        let patches = vision.image_size / vision.patch_size;
        if side * side != mm || side == 0 || !patches.is_multiple_of(side) {
            return Err(cfg.error(format!(
                "mm_tokens_per_image = {mm} must be a square whose side divides the {patches}x{patches} patch grid"
            )));
        }
        let id = |k: &str, alt: &str, d: usize| -> Result<u32> {
            Ok(match cfg.opt_usize(k)? {
                Some(x) => x as u32,
                None => cfg.usize(alt, d)? as u32,
            })
        };
        let mut eos = id_list(cfg, "eos_token_id")?;
        if eos.is_empty() {
            eos = id_list(&t, "eos_token_id")?;
        }
        Ok(Gemma3Config {
            mm_tokens_per_image: mm,
            image_token_id: id("image_token_index", "image_token_id", 262_144)?,
            boi_token_id: id("boi_token_index", "boi_token_id", 255_999)?,
            eoi_token_id: id("eoi_token_index", "eoi_token_id", 256_000)?,
            tie_word_embeddings: match &cfg.value()["tie_word_embeddings"] {
                serde_json::Value::Null => t.bool("tie_word_embeddings", true)?,
                _ => cfg.bool("tie_word_embeddings", true)?,
            },
            eos_token_ids: eos,
            text,
            vision,
        })
    }
}

// ------------------------------------------------------------------ layers

/// Gemma's RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + w)`, in f32.
#[derive(Clone, Debug)]
struct RmsNorm {
    scale: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let w = vb.get(dim, "weight")?;
        Ok(RmsNorm {
            scale: (w.to_dtype(DType::F32)? + 1.0)?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.scale)?
            .to_dtype(dtype)
    }
}

/// cos/sin (positions, head_dim / 2) for `positions`, in f32 as transformers
/// computes them (`inv_freq = 1 / theta^(2i/d)`, divided by the linear factor).
fn rope_tables(
    rope: &Rope,
    head_dim: usize,
    start: usize,
    len: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| {
            let base = (rope.theta as f32).powf(i as f32 / head_dim as f32);
            (1.0f32 / base) / rope.linear_factor as f32
        })
        .collect();
    let half = inv.len();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in start..start + len {
        for f in &inv {
            let a = f * p as f32;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, half), device)?,
        Tensor::from_vec(sin, (len, half), device)?,
    ))
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Act,
}

impl Mlp {
    fn new(c: &Gemma3TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate: linear_b(h, i, false, vb.pp("gate_proj"))?,
            up: linear_b(h, i, false, vb.pp("up_proj"))?,
            down: linear_b(i, h, false, vb.pp("down_proj"))?,
            act: c.hidden_activation,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = x.apply(&self.gate)?.apply(&self.act)?;
        (g * x.apply(&self.up)?)?.apply(&self.down)
    }
}

struct DecoderLayer {
    attn: Attention<RmsNorm>,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    kind: LayerType,
}

impl DecoderLayer {
    fn new(c: &Gemma3TextConfig, kind: LayerType, vb: VarBuilder) -> candle_core::Result<Self> {
        let norm = |name: &str| RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb.pp(name));
        Ok(DecoderLayer {
            attn: Attention::new(
                AttentionDims {
                    hidden_size: c.hidden_size,
                    num_attention_heads: c.num_attention_heads,
                    num_key_value_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    bias: c.attention_bias,
                    scale: c.query_pre_attn_scalar.powf(-0.5),
                },
                vb.pp("self_attn"),
                |vb| RmsNorm::new(c.head_dim, c.rms_norm_eps, vb),
            )?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            kind,
        })
    }
}

/// The Gemma 3 decoder with a KV cache (one sequence).
pub struct TextModel {
    cfg: Gemma3TextConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Positions in the cache.
    seq_len: usize,
}

impl TextModel {
    fn new(
        c: &Gemma3TextConfig,
        tie: bool,
        vb: VarBuilder,
        lm_head: VarBuilder,
    ) -> candle_core::Result<Self> {
        let embed_tokens =
            candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("embed_tokens"))?;
        let layers = c
            .layer_types
            .iter()
            .enumerate()
            .map(|(i, &kind)| DecoderLayer::new(c, kind, vb.pp("layers").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let lm_head = if tie {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(c.hidden_size, c.vocab_size, lm_head)?
        };
        Ok(TextModel {
            cfg: c.clone(),
            norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb.pp("norm"))?,
            embed_tokens,
            layers,
            lm_head,
            seq_len: 0,
        })
    }

    pub fn clear_cache(&mut self) {
        for l in &mut self.layers {
            l.attn.cache = None;
        }
        self.seq_len = 0;
    }

    /// Positions in the KV cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Scaled token embeddings (1, L, hidden); ids >= vocab_size (an image
    /// token outside the vocabulary) are looked up as 0, as transformers does.
    pub fn embed(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        let v = self.cfg.vocab_size as u32;
        let ids: Vec<u32> = ids.iter().map(|&i| if i >= v { 0 } else { i }).collect();
        let n = ids.len();
        let t = Tensor::from_vec(ids, (1, n), device)?;
        let scale = (self.cfg.hidden_size as f32).sqrt() as f64;
        self.embed_tokens.forward(&t)? * scale
    }

    /// Additive (1, 1, L, T+L) masks for a chunk of L new positions after T
    /// cached ones, for global and sliding layers: causal or both in the same
    /// image group (`groups`, per new position); on sliding layers also
    /// `key > query - sliding_window` (transformers'
    /// `create_masks_for_vision_model`).
    fn masks(
        &self,
        groups: &[Option<usize>],
        device: &Device,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (l, t) = (groups.len(), self.seq_len);
        let sw = self.cfg.sliding_window;
        if l == 1 && t < sw {
            return Ok((None, None));
        }
        let dtype = self.embed_tokens.embeddings().dtype();
        let build = |sliding: bool| -> candle_core::Result<Tensor> {
            let mut m = vec![0f32; l * (t + l)];
            for i in 0..l {
                let q = t + i;
                for k in 0..t + l {
                    let causal = k <= q;
                    let same_image = k >= t && groups[i].is_some() && groups[i] == groups[k - t];
                    // transformers: AND(window, OR(causal, same image block))
                    let in_window = !sliding || k + sw > q;
                    if !((causal || same_image) && in_window) {
                        m[i * (t + l) + k] = f32::NEG_INFINITY;
                    }
                }
            }
            Tensor::from_vec(m, (1, 1, l, t + l), device)?.to_dtype(dtype)
        };
        Ok((Some(build(false)?), Some(build(true)?)))
    }

    /// Runs L new positions (embeddings (1, L, hidden)) and returns the
    /// logits of the last one, (vocab,) f32. `groups`: the image each new
    /// position belongs to (image tokens of one image attend both ways).
    pub fn forward_embeds(
        &mut self,
        embeds: &Tensor,
        groups: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let (_, l, _) = embeds.dims3()?;
        if groups.len() != l {
            candle_core::bail!("{} image groups for {l} positions", groups.len());
        }
        let device = embeds.device().clone();
        let (full_mask, sliding_mask) = self.masks(groups, &device)?;
        let d = self.cfg.head_dim;
        let dtype = embeds.dtype();
        let tables = |rope: &Rope| -> candle_core::Result<(Tensor, Tensor)> {
            let (c, s) = rope_tables(rope, d, self.seq_len, l, &device)?;
            Ok((c.to_dtype(dtype)?, s.to_dtype(dtype)?))
        };
        let (gcos, gsin) = tables(&self.cfg.rope_global)?;
        let (lcos, lsin) = tables(&self.cfg.rope_local)?;
        let mut x = embeds.clone();
        for layer in &mut self.layers {
            let (cos, sin, mask) = match layer.kind {
                LayerType::Full => (&gcos, &gsin, full_mask.as_ref()),
                LayerType::Sliding => (&lcos, &lsin, sliding_mask.as_ref()),
            };
            let h = layer
                .attn
                .forward(&x.apply(&layer.input_layernorm)?, cos, sin, mask)?
                .apply(&layer.post_attention_layernorm)?;
            x = (x + h)?;
            let h = x
                .apply(&layer.pre_feedforward_layernorm)?
                .apply(&layer.mlp)?
                .apply(&layer.post_feedforward_layernorm)?;
            x = (x + h)?;
        }
        self.seq_len += l;
        // no soft-capping: transformers' Gemma3ForConditionalGeneration
        // applies neither final_logit_softcapping nor attn_logit_softcapping
        let logits = x
            .i((0, l - 1..l, ..))?
            .apply(&self.norm)?
            .apply(&self.lm_head)?;
        logits.flatten_all()?.to_dtype(DType::F32)
    }
}

/// SigLIP vision transformer without the pooling head.
struct VisionTower {
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
}

impl VisionTower {
    fn new(c: &Gemma3VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = vb.pp("embeddings");
        let h = c.tower.hidden_size;
        let n = (c.image_size / c.patch_size).pow(2);
        Ok(VisionTower {
            patch_embedding: candle_nn::conv2d(
                c.num_channels,
                h,
                c.patch_size,
                candle_nn::Conv2dConfig {
                    stride: c.patch_size,
                    ..Default::default()
                },
                e.pp("patch_embedding"),
            )?,
            position_embedding: e.pp("position_embedding").get((n, h), "weight")?,
            encoder: Encoder::new(&c.tower, vb.pp("encoder"))?,
            post_layernorm: layer_norm(h, c.tower.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// (B, 3, H, W) -> last_hidden_state (B, patches, hidden).
    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let x = pixels
            .apply(&self.patch_embedding)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.encoder.forward(&x, None)?.apply(&self.post_layernorm)
    }
}

/// `Gemma3MultiModalProjector`.
struct Projector {
    norm: RmsNorm,
    weight: Tensor,
    patches_per_side: usize,
    kernel: usize,
}

impl Projector {
    fn new(c: &Gemma3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let vh = c.vision.tower.hidden_size;
        let patches = c.vision.image_size / c.vision.patch_size;
        let side = (c.mm_tokens_per_image as f64).sqrt().round() as usize;
        Ok(Projector {
            norm: RmsNorm::new(vh, c.vision.tower.layer_norm_eps, vb.pp("mm_soft_emb_norm"))?,
            weight: vb.get((vh, c.text.hidden_size), "mm_input_projection_weight")?,
            patches_per_side: patches,
            kernel: patches / side,
        })
    }

    /// (B, patches, vision hidden) -> (B, mm_tokens, text hidden).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let p = self.patches_per_side;
        let pooled = x
            .transpose(1, 2)?
            .reshape((b, c, p, p))?
            .contiguous()?
            .avg_pool2d(self.kernel)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        pooled.apply(&self.norm)?.broadcast_matmul(&self.weight)
    }
}

/// `Gemma3ForConditionalGeneration`: vision tower, projector, decoder.
pub struct Gemma3Model {
    cfg: Gemma3Config,
    vision: VisionTower,
    projector: Projector,
    text: TextModel,
}

impl Gemma3Model {
    /// Builds the model from weights in either layout (see the module doc).
    pub fn new(cfg: &Gemma3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let new_layout = vb.contains_tensor("model.language_model.embed_tokens.weight");
        let (lm, lm_head, proj) = if new_layout {
            (
                "model.language_model",
                "lm_head",
                "model.multi_modal_projector",
            )
        } else {
            (
                "language_model.model",
                "language_model.lm_head",
                "multi_modal_projector",
            )
        };
        // the SigLIP tower: `vision_tower.vision_model.*` (Hub) or, as
        // transformers 5 saves it, without the `vision_model` level
        let candidates = [
            "vision_tower.vision_model",
            "vision_tower",
            "model.vision_tower.vision_model",
            "model.vision_tower",
        ];
        let vision = candidates
            .iter()
            .find(|p| vb.contains_tensor(&format!("{p}.embeddings.patch_embedding.weight")))
            .copied()
            .unwrap_or(candidates[if new_layout { 3 } else { 0 }]);
        let (lm, lm_head, proj, vision) = (vb.pp(lm), vb.pp(lm_head), vb.pp(proj), vb.pp(vision));
        Ok(Gemma3Model {
            vision: VisionTower::new(&cfg.vision, vision)?,
            projector: Projector::new(cfg, proj)?,
            text: TextModel::new(&cfg.text, cfg.tie_word_embeddings, lm, lm_head)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Gemma3Config {
        &self.cfg
    }

    pub fn text(&mut self) -> &mut TextModel {
        &mut self.text
    }

    /// Projected image tokens of preprocessed images: (B, 3, H, W) ->
    /// (B, mm_tokens_per_image, text hidden).
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = self.vision.position_embedding.dtype();
        let v = self.vision.forward(&pixel_values.to_dtype(dtype)?)?;
        self.projector.forward(&v)
    }

    /// Starts a sequence: clears the cache, embeds `ids` with the image
    /// tokens (`<image_soft_token>` positions, in order) replaced by the
    /// projected images (`image_features`: (N, mm_tokens, hidden)), and
    /// returns the logits of the last position (vocab,).
    pub fn prefill(
        &mut self,
        ids: &[u32],
        image_features: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.text.clear_cache();
        let device = self.vision.position_embedding.device().clone();
        let image_id = self.cfg.image_token_id;
        let mm = self.cfg.mm_tokens_per_image;
        let n_image_tokens = ids.iter().filter(|&&i| i == image_id).count();
        let n_images = match image_features {
            None => 0,
            Some(f) => f.dim(0)?,
        };
        if n_image_tokens != n_images * mm {
            candle_core::bail!(
                "the prompt has {n_image_tokens} image tokens but {n_images} image(s) x {mm} tokens were given"
            );
        }
        let text = self.text.embed(ids, &device)?;
        let mut groups = Vec::with_capacity(ids.len());
        let mut group = 0usize;
        let mut prev_image = false;
        for &id in ids {
            let is_image = id == image_id;
            if is_image && !prev_image {
                group += 1;
            }
            groups.push(is_image.then_some(group));
            prev_image = is_image;
        }
        let embeds = match image_features {
            None => text,
            Some(f) => {
                let h = self.cfg.text.hidden_size;
                let feats = f.reshape((n_images * mm, h))?.to_dtype(text.dtype())?;
                let text = text.squeeze(0)?;
                let mut parts = Vec::new();
                let (mut start, mut next) = (0usize, 0usize);
                let mut i = 0;
                while i < ids.len() {
                    if ids[i] == image_id {
                        let mut j = i;
                        while j < ids.len() && ids[j] == image_id {
                            j += 1;
                        }
                        if i > start {
                            parts.push(text.narrow(0, start, i - start)?);
                        }
                        parts.push(feats.narrow(0, next, j - i)?);
                        next += j - i;
                        start = j;
                        i = j;
                    } else {
                        i += 1;
                    }
                }
                if start < ids.len() {
                    parts.push(text.narrow(0, start, ids.len() - start)?);
                }
                Tensor::cat(&parts, 0)?.unsqueeze(0)?
            }
        };
        self.text.forward_embeds(&embeds, &groups)
    }

    /// One decoding step: the logits after `token` (vocab,).
    pub fn step(&mut self, token: u32) -> candle_core::Result<Tensor> {
        let device = self.vision.position_embedding.device().clone();
        let e = self.text.embed(&[token], &device)?;
        self.text.forward_embeds(&e, &[None])
    }
}

impl CachedDecoder for Gemma3Model {
    fn max_positions(&self) -> usize {
        self.cfg.text.max_position_embeddings
    }

    fn cache_len(&self) -> usize {
        self.text.seq_len()
    }

    fn decode_step(&mut self, token: u32) -> candle_core::Result<Tensor> {
        self.step(token)
    }
}

// ------------------------------------------------------------------ the VLM

/// The chat-template strings of `Gemma3Processor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptFormat {
    pub bos: String,
    pub boi: String,
    pub eoi: String,
    pub image_token: String,
    pub mm_tokens_per_image: usize,
}

impl PromptFormat {
    /// The Gemma 3 chat template for one user turn (images first, then the
    /// text) and the generation prompt, with each image expanded as
    /// `Gemma3Processor` does (`\n\n<start_of_image>` + soft tokens +
    /// `<end_of_image>\n\n`). A system text opens the user turn followed by
    /// `\n\n`, as the template folds it.
    pub fn render(&self, system: Option<&str>, prompt: &str, n_images: usize) -> String {
        let mut s = format!("{}<start_of_turn>user\n", self.bos);
        if let Some(sys) = system {
            s.push_str(sys);
            s.push_str("\n\n");
        }
        let image = format!(
            "\n\n{}{}{}\n\n",
            self.boi,
            self.image_token.repeat(self.mm_tokens_per_image),
            self.eoi
        );
        for _ in 0..n_images {
            s.push_str(&image);
        }
        s.push_str(prompt.trim());
        s.push_str("<end_of_turn>\n<start_of_turn>model\n");
        s
    }
}

/// A Gemma 3 checkpoint as a [`Vlm`].
pub struct Gemma3Vlm {
    model: Gemma3Model,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    format: PromptFormat,
    stop_ids: Vec<u32>,
    /// `top_k` of generation_config.json, applied when sampling.
    top_k: Option<usize>,
    sampling: SamplingConfig,
    device: Device,
    info: ModelInfo,
}

impl Gemma3Vlm {
    /// Loads a folder or Hub id (see [`crate::encoders::hf::resolve`]).
    pub fn load(spec: &str, sampling: SamplingConfig, device: &Device) -> Result<Self> {
        let (dir, source) = resolve_vlm(spec)?;
        Self::load_dir(&dir, &source, sampling, device)
    }

    /// Loads a local folder in f32; `source` is recorded in [`ModelInfo`].
    pub fn load_dir(
        dir: &Path,
        source: &str,
        sampling: SamplingConfig,
        device: &Device,
    ) -> Result<Self> {
        Self::load_dir_dtype(dir, source, sampling, device, DType::F32)
    }

    /// Loads a local folder with the weights and activations in `dtype`
    /// (F32, or BF16/F16 to halve memory on a GPU). As in transformers,
    /// RMSNorm and the attention softmax compute in f32 and RoPE tables are
    /// computed in f32 then cast; logits are returned as f32. Outputs differ
    /// from f32 by rounding; the parity tests are f32.
    pub fn load_dir_dtype(
        dir: &Path,
        source: &str,
        sampling: SamplingConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(WorkerError::Invalid(format!(
                "dtype {dtype:?}: Gemma 3 runs in F32, BF16 or F16"
            )));
        }
        let cfg_file = ConfigReader::read(dir, "config.json")?;
        match cfg_file.str("model_type") {
            Some("gemma3") => {}
            other => {
                return Err(cfg_file.error(format!(
                    "model_type = {other:?}: not a Gemma 3 multimodal checkpoint (\"gemma3\")"
                )))
            }
        }
        let cfg = Gemma3Config::from_hf(&cfg_file)?;
        // the image processor: preprocessor_config.json (the Hub's layout) or
        // processor_config.json's "image_processor" (what transformers 5 saves)
        let (pre, file) = image_processor_config(dir)?;
        let seq_len = file.opt_usize("image_seq_length")?;
        if pre.bool("do_pan_and_scan", false)? {
            return Err(pre.error(
                "do_pan_and_scan = true is not supported (mirgen resizes each image to one crop)"
                    .into(),
            ));
        }
        let processor = ImageProcessor::from_preprocessor_config(
            pre.value(),
            &pre.file().display().to_string(),
        )?;
        let size = cfg.vision.image_size as u32;
        if processor.crop.is_some()
            || processor.resize
                != Some(ResizeTo::Exact {
                    height: size,
                    width: size,
                })
        {
            return Err(pre.error(format!(
                "the processor must resize to exactly {size}x{size} (config.json's vision_config.image_size), \
                 without a crop; it has resize {:?}, crop {:?}",
                processor.resize, processor.crop
            )));
        }
        if let Some(n) = seq_len {
            if n != cfg.mm_tokens_per_image {
                return Err(pre.error(format!(
                    "image_seq_length = {n} differs from config.json's mm_tokens_per_image {}",
                    cfg.mm_tokens_per_image
                )));
            }
        }
        let tokenizer = load_tokenizer(
            dir,
            cfg.text.vocab_size.max(cfg.image_token_id as usize + 1),
        )?;
        let tc = tokenizer_config(dir)?;
        let tok_file = dir.join("tokenizer.json");
        let bos = special_token(&tc, "bos_token").unwrap_or_else(|| "<bos>".into());
        if tokenizer.token_to_id(&bos).is_none() {
            return Err(hf::load_err(format!(
                "{}: no {bos:?} token (the BOS token of tokenizer_config.json)",
                tok_file.display()
            )));
        }
        let format = PromptFormat {
            bos,
            boi: token_of(&tokenizer, dir, cfg.boi_token_id, "boi_token_index")?,
            eoi: token_of(&tokenizer, dir, cfg.eoi_token_id, "eoi_token_index")?,
            image_token: token_of(&tokenizer, dir, cfg.image_token_id, "image_token_index")?,
            mm_tokens_per_image: cfg.mm_tokens_per_image,
        };
        // stop ids: generation_config.json, else config.json + <end_of_turn>;
        // top_k as transformers merges it into a sampling call (Gemma 3: 64)
        let (mut stop_ids, top_k) = generation_config(dir)?;
        if stop_ids.is_empty() {
            stop_ids = cfg.eos_token_ids.clone();
            if let Some(id) = tokenizer.token_to_id("<end_of_turn>") {
                stop_ids.push(id);
            }
        }
        if stop_ids.is_empty() {
            return Err(hf::load_err(format!(
                "{}: no eos_token_id in generation_config.json or config.json; decoding would never stop",
                dir.display()
            )));
        }
        let (vb, label) = var_builder(dir, device)?;
        let vb = vb.set_dtype(dtype);
        let model = Gemma3Model::new(&cfg, vb).map_err(|e| weights_err(&label, e))?;
        let text_spec = hf::TextSpec {
            max_len: cfg.text.max_position_embeddings,
            pad_to_max_with: None,
        };
        let base = hf::fingerprint(dir, "gemma3", &processor, &text_spec)?;
        let gen = std::fs::read(dir.join("generation_config.json")).unwrap_or_default();
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, &gen);
        sha2::Digest::update(
            &mut h,
            format!("{sampling:?}/{stop_ids:?}/{dtype:?}").as_bytes(),
        );
        let extra = hex::encode(&sha2::Digest::finalize(h)[..8]);
        Ok(Gemma3Vlm {
            model,
            tokenizer,
            processor,
            format,
            stop_ids,
            top_k,
            sampling,
            device: device.clone(),
            info: ModelInfo {
                architecture: "gemma3".into(),
                source: source.to_string(),
                smoke_test: crate::encoders::hf::has_random_weights(dir),
                fingerprint: format!("{base}/{extra}"),
            },
        })
    }

    pub fn model(&mut self) -> &mut Gemma3Model {
        &mut self.model
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn prompt_format(&self) -> &PromptFormat {
        &self.format
    }

    /// `top_k` of generation_config.json: when sampling (temperature > 0)
    /// only the k most likely tokens are candidates, as transformers'
    /// `generate` applies it (after the repetition penalty, before top-p).
    pub fn top_k(&self) -> Option<usize> {
        self.top_k
    }

    /// Token ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The prompt's token ids (chat template, images expanded).
    pub fn prompt_ids(
        &self,
        system: Option<&str>,
        prompt: &str,
        n_images: usize,
    ) -> Result<Vec<u32>> {
        prompt_token_ids(
            &self.tokenizer,
            &self.format.render(system, prompt, n_images),
        )
    }

    /// Preprocessed pixel values (N, 3, H, W) of the images.
    pub fn pixel_values(&self, images: &[&RgbImage]) -> Result<Tensor> {
        self.processor.batch(images, &self.device)
    }

    /// Prefill: the logits (vocab,) after the prompt `ids` with the images
    /// (already preprocessed, (N, 3, H, W)).
    pub fn prefill(&mut self, ids: &[u32], pixel_values: Option<&Tensor>) -> Result<Tensor> {
        let n = ids.len();
        let max = self.model.cfg.text.max_position_embeddings;
        if n > max {
            return Err(WorkerError::Invalid(format!(
                "the prompt has {n} tokens, more than max_position_embeddings {max}"
            )));
        }
        let image_id = self.model.cfg.image_token_id;
        let mm = self.model.cfg.mm_tokens_per_image;
        let n_tokens = ids.iter().filter(|&&i| i == image_id).count();
        let n_images = match pixel_values {
            None => 0,
            Some(p) => p.dim(0)?,
        };
        if n_tokens != n_images * mm {
            return Err(WorkerError::Invalid(format!(
                "the prompt has {n_tokens} image tokens but {n_images} image(s) x {mm} tokens were given \
                 (does the prompt text contain <image_soft_token>?)"
            )));
        }
        let feats = match pixel_values {
            None => None,
            Some(p) => Some(self.model.image_features(p)?),
        };
        Ok(self.model.prefill(ids, feats.as_ref())?)
    }

    /// Decodes from prompt ids and pixel values; the generated ids (without
    /// the stop token), at most `max_new_tokens`.
    pub fn generate_ids(
        &mut self,
        ids: &[u32],
        pixel_values: Option<&Tensor>,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<u32>> {
        if max_new_tokens == 0 {
            return Ok(Vec::new());
        }
        let logits = self.prefill(ids, pixel_values)?;
        decode_cached(
            &mut self.model,
            logits,
            ids,
            &self.sampling,
            self.top_k,
            &self.stop_ids,
            max_new_tokens,
            seed,
        )
    }

    fn generate_one(&mut self, req: &VlmRequest) -> Result<VlmOutput> {
        let ids = self.prompt_ids(req.system.as_deref(), &req.prompt, req.images.len())?;
        let pixels = if req.images.is_empty() {
            None
        } else {
            let imgs: Vec<&RgbImage> = req.images.iter().map(|i| i.as_ref()).collect();
            Some(self.pixel_values(&imgs)?)
        };
        let token_ids = self.generate_ids(&ids, pixels.as_ref(), req.max_new_tokens, req.seed);
        // free the KV cache between requests
        self.model.text().clear_cache();
        vlm_output(&self.tokenizer, token_ids)
    }
}

/// The decoding loop of the VLMs, from the prompt's logits: transformers'
/// order (repetition penalty, then temperature, top-k, top-p; the penalty is
/// applied here so that top-k follows it), stopping at a stop id, at
/// `max_new_tokens`, or when `step` says the context is full (`None`).
/// Returns the generated ids without the stop token.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    mut logits: Tensor,
    prompt: &[u32],
    sampling: &SamplingConfig,
    top_k: Option<usize>,
    stop_ids: &[u32],
    max_new_tokens: usize,
    seed: u64,
    mut step: impl FnMut(u32) -> Result<Option<Tensor>>,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut context = prompt.to_vec();
    let penalty = sampling.repetition_penalty;
    let mut sampler = Sampler::new(
        &SamplingConfig {
            repetition_penalty: 1.0,
            ..sampling.clone()
        },
        seed,
    );
    let top_k = top_k.filter(|_| sampling.temperature > 0.0);
    loop {
        if (penalty - 1.0).abs() > f32::EPSILON {
            logits = candle_transformers::utils::apply_repeat_penalty(&logits, penalty, &context)?;
        }
        if let Some(k) = top_k {
            logits = keep_top_k(&logits, k)?;
        }
        let token = sampler.sample(&logits, &context)?;
        if stop_ids.contains(&token) {
            break;
        }
        out.push(token);
        context.push(token);
        if out.len() >= max_new_tokens {
            break;
        }
        match step(token)? {
            Some(next) => logits = next,
            None => break,
        }
    }
    Ok(out)
}

/// transformers' `TopKLogitsWarper`: logits below the k-th largest become
/// -inf (ties with the k-th are kept).
pub(crate) fn keep_top_k(logits: &Tensor, k: usize) -> Result<Tensor> {
    let mut v = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if k >= v.len() {
        return Ok(logits.clone());
    }
    let mut sorted = v.clone();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for x in v.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
    let n = v.len();
    Ok(Tensor::from_vec(v, n, logits.device())?)
}

impl Vlm for Gemma3Vlm {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    /// One sequence at a time (one KV cache): results never depend on how
    /// requests are batched.
    fn generate(&mut self, batch: &[VlmRequest]) -> Result<Vec<VlmOutput>> {
        batch.iter().map(|r| self.generate_one(r)).collect()
    }
}

/// Files a VLM reads beyond the encoders' set ([`resolve`] fetches that).
const VLM_EXTRA_HUB_FILES: &[&str] = &[
    "generation_config.json",
    "processor_config.json",
    "chat_template.jinja",
];

/// [`resolve`], plus the VLM's extra files for a Hub id
/// (`generation_config.json`: stop ids and top_k), fetched from the same
/// commit. They are optional: a failed fetch leaves the defaults (stop at
/// config.json's eos ids and `<end_of_turn>`, no top_k).
pub fn resolve_vlm(spec: &str) -> Result<(std::path::PathBuf, String)> {
    let (dir, source) = resolve(spec)?;
    if let hf::ModelSource::Hub { repo, revision } = hf::parse_spec(spec) {
        if !dir.join("generation_config.json").exists() {
            // the commit resolve() pinned ("hub:owner/name@<commit>")
            let revision = source
                .rsplit_once('@')
                .map(|(_, c)| c.to_string())
                .or(revision);
            let (owner, name) = repo.split_once('/').unwrap_or(("", repo.as_str()));
            if let Ok(client) = hf_hub::HFClientSync::new() {
                let _ = client
                    .model(owner, name)
                    .snapshot_download()
                    .maybe_revision(revision)
                    .allow_patterns(VLM_EXTRA_HUB_FILES.iter().map(|s| s.to_string()).collect())
                    .send();
            }
        }
    }
    Ok((dir, source))
}

/// Loads a VLM from a folder or Hub id by `config.json`'s `model_type`
/// (`gemma3`: Gemma 3 multimodal; `qwen3_vl`: Qwen3-VL).
pub fn load_vlm(spec: &str, sampling: SamplingConfig, device: &Device) -> Result<Box<dyn Vlm>> {
    let (dir, source) = resolve_vlm(spec)?;
    let cfg = ConfigReader::read(&dir, "config.json")?;
    match cfg.str("model_type") {
        Some("gemma3") => Ok(Box::new(Gemma3Vlm::load_dir(
            &dir, &source, sampling, device,
        )?)),
        Some("qwen3_vl") => Ok(Box::new(super::qwen3vl::Qwen3VlVlm::load_dir(
            &dir, &source, sampling, device,
        )?)),
        Some("gemma3_text") => Err(cfg.error(
            "model_type = \"gemma3_text\" is a text-only Gemma 3 (1B); a VLM needs the multimodal \
             checkpoint (gemma3, e.g. google/gemma-3-4b-it)"
                .into(),
        )),
        other => Err(cfg.error(format!(
            "model_type = {other:?} is not a supported VLM; supported: gemma3, qwen3_vl"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/gemma-3-4b-it's config.json (written by transformers 4.50:
    /// most text sizes are defaults, RoPE as rope_scaling).
    const GEMMA3_4B_IT: &str = r#"{
      "architectures": ["Gemma3ForConditionalGeneration"],
      "boi_token_index": 255999,
      "eoi_token_index": 256000,
      "eos_token_id": [1, 106],
      "image_token_index": 262144,
      "initializer_range": 0.02,
      "mm_tokens_per_image": 256,
      "model_type": "gemma3",
      "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024
      },
      "torch_dtype": "bfloat16",
      "transformers_version": "4.50.0.dev0",
      "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": false
      }
    }"#;

    fn reader(json: &str) -> ConfigReader {
        ConfigReader::from_value(
            serde_json::from_str(json).unwrap(),
            Path::new("config.json"),
        )
    }

    #[test]
    fn reads_the_hub_config_of_gemma_3_4b_it() {
        let c = Gemma3Config::from_hf(&reader(GEMMA3_4B_IT)).unwrap();
        let t = &c.text;
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (2560, 10240, 34)
        );
        // transformers' defaults for what the file leaves out
        assert_eq!(
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim),
            (8, 4, 256)
        );
        assert_eq!(t.vocab_size, 262_208);
        assert_eq!(t.query_pre_attn_scalar, 256.0);
        assert_eq!(t.hidden_activation, Act::Nn(candle_nn::Activation::NewGelu));
        assert_eq!(t.sliding_window, 1024);
        // every 6th layer global (sliding_window_pattern 6)
        let full: Vec<usize> = (0..34)
            .filter(|&i| t.layer_types[i] == LayerType::Full)
            .collect();
        assert_eq!(full, vec![5, 11, 17, 23, 29]);
        assert_eq!(
            t.rope_global,
            Rope {
                theta: 1_000_000.0,
                linear_factor: 8.0
            }
        );
        assert_eq!(
            t.rope_local,
            Rope {
                theta: 10_000.0,
                linear_factor: 1.0
            }
        );
        assert_eq!(c.vision.tower.hidden_size, 1152);
        assert_eq!((c.vision.image_size, c.vision.patch_size), (896, 14));
        assert_eq!(c.mm_tokens_per_image, 256);
        assert_eq!(
            (c.image_token_id, c.boi_token_id, c.eoi_token_id),
            (262_144, 255_999, 256_000)
        );
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert!(c.tie_word_embeddings);
        // the Hub's preprocessor_config.json
        let pre = serde_json::json!({
            "do_convert_rgb": null, "do_normalize": true, "do_pan_and_scan": null,
            "do_rescale": true, "do_resize": true, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": 256,
            "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": null,
            "pan_and_scan_min_crop_size": null, "pan_and_scan_min_ratio_to_activate": null,
            "processor_class": "Gemma3Processor", "resample": 2,
            "rescale_factor": 0.00392156862745098, "size": {"height": 896, "width": 896}
        });
        let p = ImageProcessor::from_preprocessor_config(&pre, "preprocessor_config.json").unwrap();
        assert_eq!(
            p.resize,
            Some(ResizeTo::Exact {
                height: 896,
                width: 896
            })
        );
        assert_eq!(p.filter, crate::encoders::pil_resize::Filter::Bilinear);
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut v: serde_json::Value = serde_json::from_str(GEMMA3_4B_IT).unwrap();
        v["text_config"]["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 8.0});
        let e = Gemma3Config::from_hf(&reader(&v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text_config.rope_scaling.") && e.contains("yarn"),
            "{e}"
        );
        let mut v: serde_json::Value = serde_json::from_str(GEMMA3_4B_IT).unwrap();
        v["text_config"]["layer_types"] = serde_json::json!(["full_attention"]);
        let e = Gemma3Config::from_hf(&reader(&v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer_types") && e.contains("34"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(GEMMA3_4B_IT).unwrap();
        v["mm_tokens_per_image"] = 100.into();
        let e = Gemma3Config::from_hf(&reader(&v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mm_tokens_per_image = 100"), "{e}");
    }

    #[test]
    fn masks_are_causal_windowed_and_bidirectional_within_an_image() {
        let dev = Device::Cpu;
        let cfg = Gemma3TextConfig::from_hf(&reader(
            r#"{"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8,
                "sliding_window": 2, "layer_types": ["sliding_attention", "full_attention"]}"#,
        ))
        .unwrap();
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let m = TextModel::new(&cfg, true, vb.clone(), vb).unwrap();
        // text, image 1 x3, text
        let groups = [None, Some(1), Some(1), Some(1), None];
        let (full, sliding) = m.masks(&groups, &dev).unwrap();
        let allowed = |t: Tensor| -> Vec<Vec<u8>> {
            t.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|r| r.iter().map(|&x| (x == 0.0) as u8).collect())
                .collect()
        };
        assert_eq!(
            allowed(full.unwrap()),
            vec![
                vec![1, 0, 0, 0, 0],
                vec![1, 1, 1, 1, 0],
                vec![1, 1, 1, 1, 0],
                vec![1, 1, 1, 1, 0],
                vec![1, 1, 1, 1, 1],
            ]
        );
        // key > query - 2, and (causal or same image)
        assert_eq!(
            allowed(sliding.unwrap()),
            vec![
                vec![1, 0, 0, 0, 0],
                vec![1, 1, 1, 1, 0],
                vec![0, 1, 1, 1, 0],
                vec![0, 0, 1, 1, 0],
                vec![0, 0, 0, 1, 1],
            ]
        );
    }
}
