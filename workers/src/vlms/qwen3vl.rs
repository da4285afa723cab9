//! Qwen3-VL (Qwen Team; the architecture of Qwen2-VL, Wang et al.,
//! "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at
//! Any Resolution", arXiv 2409.12191, with DeepStack and interleaved
//! M-RoPE) as transformers' `Qwen3VLForConditionalGeneration` computes it,
//! for checkpoints in the Hugging Face layout of `Qwen/Qwen3-VL-4B-Instruct`
//! (`model_type: "qwen3_vl"`; also 2B/8B/32B, which differ only in sizes):
//!
//! - images (`Qwen2VLImageProcessor`, the PIL one): `smart_resize` to a
//!   multiple of `patch_size * merge_size` with the pixel count between
//!   `size.shortest_edge` and `size.longest_edge` (min/max pixels), Pillow
//!   bicubic, rescale and normalize, then patchified into rows of
//!   `3 * temporal_patch_size * patch_size^2` values (the frame repeated over
//!   the temporal patch) in spatial-merge-block order, with
//!   `image_grid_thw = (1, h / patch, w / patch)`;
//! - vision (`model.visual`): the patch embedding (a Conv3d with kernel =
//!   stride, i.e. a linear map of each row), a learned square grid of
//!   position embeddings bilinearly resampled to each image's grid
//!   (`align_corners=True`), pre-LN blocks with 2D rotary attention (row and
//!   column frequencies) within each image, the patch merger (LayerNorm,
//!   2x2 patches concatenated, MLP with exact GELU) and one DeepStack merger
//!   (LayerNorm after the concatenation) after each block of
//!   `deepstack_visual_indexes`;
//! - text (`model.language_model`): the Qwen3 decoder (RMSNorm, q/k RMSNorm
//!   per head, grouped-query attention, SwiGLU MLP), each `<|image_pad|>`
//!   replaced by one merged image token, DeepStack features added to the
//!   image positions after the first `len(deepstack_visual_indexes)`
//!   layers, and interleaved M-RoPE: 3D positions (temporal, height, width)
//!   from `get_rope_index` (text advances by one; an image's tokens take
//!   `start + (0, row, col)`; the text after it continues at
//!   `start + max(rows, cols)`), the frequency `j` of the rotary half taking
//!   the height position when `j % 3 == 1 && j < 3 * mrope_section[1]`, the
//!   width position when `j % 3 == 2 && j < 3 * mrope_section[2]`, the
//!   temporal one otherwise; decoding continues at the largest prompt
//!   position + 1 (transformers' `rope_deltas`); output embeddings tied or
//!   `lm_head`;
//! - prompt: the Qwen3-VL chat template (`<|im_start|>system\n...<|im_end|>\n`
//!   when a system text is given, `<|im_start|>user\n`, each image as
//!   `<|vision_start|>` + one `<|image_pad|>` per merged token +
//!   `<|vision_end|>`, the text, `<|im_end|>\n<|im_start|>assistant\n`);
//! - decoding: a KV cache per layer, greedy or seeded sampling
//!   ([`crate::sampling::Sampler`]), stopping at `generation_config.json`'s
//!   `eos_token_id` (`<|im_end|>`, `<|endoftext|>`).
//!
//! Videos are not implemented. The Hub's folders name the torchvision
//! processor (`Qwen2VLImageProcessorFast`), whose antialiased bicubic resize
//! differs from Pillow's by rounding; mirgen resizes as the PIL processor
//! does (what the parity fixtures check).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{layer_norm, linear_b, Embedding, LayerNorm, Linear, VarBuilder};
use tokenizers::Tokenizer;

use crate::encoders::hf::{
    self, has_random_weights, load_tokenizer, var_builder, weights_err, ConfigReader,
};
use crate::encoders::layers::Act;
use crate::encoders::pil_resize::{self, Filter};
use crate::vlms::gemma3::{id_list, resolve_vlm};
use crate::vlms::shared::{
    decode_cached, generation_config, image_processor_config, prompt_token_ids, token_of,
    vlm_output, Attention, AttentionDims, CachedDecoder,
};
use crate::{ModelInfo, Result, RgbImage, SamplingConfig, Vlm, VlmOutput, VlmRequest, WorkerError};

// ------------------------------------------------------------------ config

/// transformers' `Qwen3VLTextConfig` (the parts the forward pass needs).
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3VlTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: Act,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub rope_theta: f64,
    /// Frequencies of the rotary half given to (t, h, w); sums to head_dim / 2.
    pub mrope_section: [usize; 3],
    pub max_position_embeddings: usize,
}

/// transformers' `Qwen3VLVisionConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3VlVisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
    pub hidden_act: Act,
    pub rope_theta: f64,
}

/// transformers' `Qwen3VLConfig` (`model_type: "qwen3_vl"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3VlConfig {
    pub text: Qwen3VlTextConfig,
    pub vision: Qwen3VlVisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    pub tie_word_embeddings: bool,
    /// `eos_token_id` of config.json or its text_config (one id or a list).
    pub eos_token_ids: Vec<u32>,
}

fn act(c: &ConfigReader, key: &str, default: &str) -> Result<Act> {
    let name = c.str(key).unwrap_or(default);
    Act::parse(name).ok_or_else(|| {
        c.error(format!(
            "{key} = {name:?} is not supported (silu, gelu, gelu_pytorch_tanh are)"
        ))
    })
}

impl Qwen3VlTextConfig {
    /// From `text_config` (defaults are transformers' `Qwen3VLTextConfig`).
    pub fn from_hf(t: &ConfigReader) -> Result<Self> {
        // transformers 5: rope_parameters; older files: rope_theta + rope_scaling
        let (rope, rope_key) = if t.value()["rope_parameters"].is_object() {
            (Some(t.sub("rope_parameters")?), "rope_parameters")
        } else if t.value()["rope_scaling"].is_object() {
            (Some(t.sub("rope_scaling")?), "rope_scaling")
        } else {
            (None, "")
        };
        let mut rope_theta = t.f64("rope_theta", 500_000.0)?;
        let mut mrope_section = [24, 20, 20];
        if let Some(r) = &rope {
            let kind = r
                .str("rope_type")
                .or_else(|| r.str("type"))
                .unwrap_or("default");
            if kind != "default" && kind != "mrope" {
                return Err(r.error(format!(
                    "rope_type = {kind:?} is not supported (default is)"
                )));
            }
            rope_theta = r.f64("rope_theta", rope_theta)?;
            match &r.value()["mrope_section"] {
                serde_json::Value::Null => {}
                serde_json::Value::Array(a)
                    if a.len() == 3 && a.iter().all(serde_json::Value::is_u64) =>
                {
                    for (i, x) in a.iter().enumerate() {
                        mrope_section[i] = x.as_u64().unwrap_or(0) as usize;
                    }
                }
                v => {
                    return Err(r.error(format!("mrope_section = {v} is not a list of three sizes")))
                }
            }
        }
        let num_attention_heads = t.usize("num_attention_heads", 32)?;
        let c = Qwen3VlTextConfig {
            vocab_size: t.usize("vocab_size", 151_936)?,
            hidden_size: t.usize("hidden_size", 4096)?,
            intermediate_size: t.usize("intermediate_size", 22_016)?,
            num_hidden_layers: t.usize("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads: match t.opt_usize("num_key_value_heads")? {
                Some(n) => n,
                None => num_attention_heads,
            },
            head_dim: t.usize("head_dim", 128)?,
            hidden_act: act(t, "hidden_act", "silu")?,
            rms_norm_eps: t.f64("rms_norm_eps", 1e-6)?,
            attention_bias: t.bool("attention_bias", false)?,
            rope_theta,
            mrope_section,
            max_position_embeddings: t.usize("max_position_embeddings", 128_000)?,
        };
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(t.error(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return Err(t.error(format!("head_dim {} must be even", c.head_dim)));
        }
        let s: usize = c.mrope_section.iter().sum();
        if s != c.head_dim / 2 {
            return Err(t.error(format!(
                "{rope_key}.mrope_section {:?} sums to {s}, not head_dim / 2 = {}",
                c.mrope_section,
                c.head_dim / 2
            )));
        }
        Ok(c)
    }
}

impl Qwen3VlVisionConfig {
    /// From `vision_config` (defaults are transformers' `Qwen3VLVisionConfig`).
    pub fn from_hf(v: &ConfigReader) -> Result<Self> {
        let deepstack_visual_indexes = match &v.value()["deepstack_visual_indexes"] {
            serde_json::Value::Null => vec![8, 16, 24],
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|n| n as usize).ok_or_else(|| {
                        v.error(format!(
                            "deepstack_visual_indexes entry {x} is not a layer index"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            x => return Err(v.error(format!("deepstack_visual_indexes = {x} is not a list"))),
        };
        let rope_theta = if v.value()["rope_parameters"].is_object() {
            v.sub("rope_parameters")?.f64("rope_theta", 10_000.0)?
        } else {
            10_000.0
        };
        let c = Qwen3VlVisionConfig {
            depth: v.usize("depth", 27)?,
            hidden_size: v.usize("hidden_size", 1152)?,
            intermediate_size: v.usize("intermediate_size", 4304)?,
            num_heads: v.usize("num_heads", 16)?,
            in_channels: v.usize("in_channels", 3)?,
            patch_size: v.usize("patch_size", 16)?,
            temporal_patch_size: v.usize("temporal_patch_size", 2)?,
            spatial_merge_size: v.usize("spatial_merge_size", 2)?,
            out_hidden_size: v.usize("out_hidden_size", 3584)?,
            num_position_embeddings: v.usize("num_position_embeddings", 2304)?,
            deepstack_visual_indexes,
            hidden_act: act(v, "hidden_act", "gelu_pytorch_tanh")?,
            rope_theta,
        };
        if c.num_heads == 0 || !c.hidden_size.is_multiple_of(c.num_heads * 4) {
            return Err(v.error(format!(
                "hidden_size {} must be a multiple of 4 x num_heads {} (2D rotary halves)",
                c.hidden_size, c.num_heads
            )));
        }
        let side = (c.num_position_embeddings as f64).sqrt() as usize;
        if side * side != c.num_position_embeddings || side < 2 {
            return Err(v.error(format!(
                "num_position_embeddings = {} is not a square grid",
                c.num_position_embeddings
            )));
        }
        if let Some(&i) = c.deepstack_visual_indexes.iter().find(|&&i| i >= c.depth) {
            return Err(v.error(format!(
                "deepstack_visual_indexes has layer {i} but depth is {}",
                c.depth
            )));
        }
        if c.patch_size == 0 || c.spatial_merge_size == 0 || c.temporal_patch_size == 0 {
            return Err(v.error(
                "patch_size, spatial_merge_size and temporal_patch_size must be positive".into(),
            ));
        }
        Ok(c)
    }
}

impl Qwen3VlConfig {
    /// From `config.json` (`model_type: "qwen3_vl"`); defaults are transformers'.
    pub fn from_hf(cfg: &ConfigReader) -> Result<Self> {
        let t = cfg.sub("text_config")?;
        let v = cfg.sub("vision_config")?;
        let text = Qwen3VlTextConfig::from_hf(&t)?;
        let vision = Qwen3VlVisionConfig::from_hf(&v)?;
        if text.num_hidden_layers < vision.deepstack_visual_indexes.len() {
            return Err(cfg.error(format!(
                "{} DeepStack features but only {} text layers",
                vision.deepstack_visual_indexes.len(),
                text.num_hidden_layers
            )));
        }
        if vision.out_hidden_size != text.hidden_size {
            return Err(cfg.error(format!(
                "vision_config.out_hidden_size {} differs from text_config.hidden_size {}",
                vision.out_hidden_size, text.hidden_size
            )));
        }
        let mut eos = id_list(cfg, "eos_token_id")?;
        if eos.is_empty() {
            eos = id_list(&t, "eos_token_id")?;
        }
        Ok(Qwen3VlConfig {
            image_token_id: cfg.usize("image_token_id", 151_655)? as u32,
            vision_start_token_id: cfg.usize("vision_start_token_id", 151_652)? as u32,
            vision_end_token_id: cfg.usize("vision_end_token_id", 151_653)? as u32,
            tie_word_embeddings: match &cfg.value()["tie_word_embeddings"] {
                serde_json::Value::Null => t.bool("tie_word_embeddings", false)?,
                _ => cfg.bool("tie_word_embeddings", false)?,
            },
            eos_token_ids: eos,
            text,
            vision,
        })
    }
}

// ------------------------------------------------------------------ images

/// `Qwen2VLImageProcessor` (PIL): smart resize, rescale, normalize, patchify.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3VlImageProcessor {
    pub do_resize: bool,
    /// `size.shortest_edge` (min_pixels).
    pub min_pixels: usize,
    /// `size.longest_edge` (max_pixels).
    pub max_pixels: usize,
    pub filter: Filter,
    pub rescale: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
}

/// One preprocessed image: rows of patch values and its patch grid.
#[derive(Clone, Debug)]
pub struct ImagePatches {
    /// (grid_h * grid_w, 3 * temporal_patch_size * patch_size^2), row-major.
    pub values: Vec<f32>,
    pub grid_h: usize,
    pub grid_w: usize,
}

/// transformers' `smart_resize`: (height, width), multiples of `factor`, the
/// pixel count within [min_pixels, max_pixels], the aspect ratio nearly kept
/// (Python's `round` rounds half to even).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 || h.max(w) / h.min(w) > 200.0 {
        return Err(WorkerError::Invalid(format!(
            "image {width}x{height}: the aspect ratio must be smaller than 200"
        )));
    }
    let mut h_bar = ((h / f).round_ties_even() * f) as usize;
    let mut w_bar = ((w / f).round_ties_even() * f) as usize;
    if h_bar * w_bar > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max(((h / beta / f).floor() * f) as usize);
        w_bar = factor.max(((w / beta / f).floor() * f) as usize);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = ((h * beta / f).ceil() * f) as usize;
        w_bar = ((w * beta / f).ceil() * f) as usize;
    }
    Ok((h_bar, w_bar))
}

impl Qwen3VlImageProcessor {
    /// From `preprocessor_config.json` (or processor_config.json's
    /// `image_processor`); defaults are `Qwen2VLImageProcessor`'s.
    pub fn from_hf(p: &ConfigReader) -> Result<Self> {
        let (mut min_pixels, mut max_pixels) = (56 * 56, 28 * 28 * 1280);
        if p.value()["size"].is_object() {
            let s = p.sub("size")?;
            min_pixels = s.usize("shortest_edge", min_pixels)?;
            max_pixels = s.usize("longest_edge", max_pixels)?;
        }
        if let Some(n) = p.opt_usize("min_pixels")? {
            min_pixels = n;
        }
        if let Some(n) = p.opt_usize("max_pixels")? {
            max_pixels = n;
        }
        let code = p.usize("resample", 3)? as u64;
        let filter = Filter::from_pil_code(code).ok_or_else(|| {
            p.error(format!(
                "resample = {code} is not supported (1-5: Pillow's convolution filters)"
            ))
        })?;
        let triple = |key: &str, d: [f32; 3]| -> Result<[f32; 3]> {
            match &p.value()[key] {
                serde_json::Value::Null => Ok(d),
                serde_json::Value::Array(a) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (i, x) in a.iter().enumerate() {
                        out[i] = x
                            .as_f64()
                            .ok_or_else(|| p.error(format!("{key} entry {x} is not a number")))?
                            as f32;
                    }
                    Ok(out)
                }
                serde_json::Value::Number(n) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                v => Err(p.error(format!("{key} = {v} is not three numbers"))),
            }
        };
        let mean = triple("image_mean", crate::preprocess::CLIP_MEAN)?;
        let std = triple("image_std", crate::preprocess::CLIP_STD)?;
        let c = Qwen3VlImageProcessor {
            do_resize: p.bool("do_resize", true)?,
            min_pixels,
            max_pixels,
            filter,
            rescale: if p.bool("do_rescale", true)? {
                Some(p.f64("rescale_factor", 1.0 / 255.0)?)
            } else {
                None
            },
            normalize: if p.bool("do_normalize", true)? {
                Some((mean, std))
            } else {
                None
            },
            patch_size: p.usize("patch_size", 14)?,
            temporal_patch_size: p.usize("temporal_patch_size", 2)?,
            merge_size: p.usize("merge_size", 2)?,
        };
        if c.patch_size == 0 || c.merge_size == 0 || c.temporal_patch_size == 0 {
            return Err(
                p.error("patch_size, merge_size and temporal_patch_size must be positive".into())
            );
        }
        if c.min_pixels > c.max_pixels {
            return Err(p.error(format!(
                "size.shortest_edge (min pixels) {} exceeds size.longest_edge (max pixels) {}",
                c.min_pixels, c.max_pixels
            )));
        }
        Ok(c)
    }

    /// Values per patch row: 3 x temporal_patch_size x patch_size^2.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The (height, width) an image is resized to.
    pub fn resized_size(&self, width: u32, height: u32) -> Result<(usize, usize)> {
        let factor = self.patch_size * self.merge_size;
        if self.do_resize {
            smart_resize(
                height as usize,
                width as usize,
                factor,
                self.min_pixels,
                self.max_pixels,
            )
        } else if (height as usize).is_multiple_of(factor)
            && (width as usize).is_multiple_of(factor)
        {
            Ok((height as usize, width as usize))
        } else {
            Err(WorkerError::Invalid(format!(
                "image {width}x{height}: with do_resize = false each side must be a multiple of {factor}"
            )))
        }
    }

    /// Resize, rescale, normalize and patchify one image.
    pub fn patches(&self, img: &RgbImage) -> Result<ImagePatches> {
        let (h, w) = self.resized_size(img.width(), img.height())?;
        let img = if (w as u32, h as u32) == img.dimensions() {
            img.clone()
        } else {
            pil_resize::resize(img, w as u32, h as u32, self.filter)
        };
        let raw = img.as_raw();
        let value = |ch: usize, y: usize, x: usize| -> f32 {
            let v = raw[(y * w + x) * 3 + ch];
            let mut f = match self.rescale {
                Some(s) => (v as f64 * s) as f32,
                None => v as f32,
            };
            if let Some((mean, std)) = &self.normalize {
                f = (f - mean[ch]) / std[ch];
            }
            f
        };
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        // (gh/m, gw/m, m, m) blocks, each row (C, T, p, p), the frame repeated over T
        let mut values = Vec::with_capacity(gh * gw * self.patch_dim());
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for ih in 0..m {
                    for iw in 0..m {
                        let (py, px) = ((bh * m + ih) * p, (bw * m + iw) * p);
                        for ch in 0..3 {
                            for _ in 0..tp {
                                for y in 0..p {
                                    for x in 0..p {
                                        values.push(value(ch, py + y, px + x));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(ImagePatches {
            values,
            grid_h: gh,
            grid_w: gw,
        })
    }

    /// The processor's `pixel_values` (total patches, patch_dim) and
    /// `image_grid_thw` rows (1, h, w) of a list of images.
    pub fn batch(
        &self,
        images: &[&RgbImage],
        device: &Device,
    ) -> Result<(Tensor, Vec<[usize; 3]>)> {
        let mut data = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for img in images {
            let p = self.patches(img)?;
            data.extend(p.values);
            grids.push([1, p.grid_h, p.grid_w]);
        }
        let n = data.len() / self.patch_dim();
        Ok((
            Tensor::from_vec(data, (n, self.patch_dim()), device)?,
            grids,
        ))
    }
}

// ------------------------------------------------------------------ vision

/// (row, col) of each patch in spatial-merge-block order, for one frame.
fn block_order(h: usize, w: usize, m: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(h * w);
    for bh in 0..h / m {
        for bw in 0..w / m {
            for ih in 0..m {
                for iw in 0..m {
                    out.push((bh * m + ih, bw * m + iw));
                }
            }
        }
    }
    out
}

struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    act: Act,
    heads: usize,
}

impl VisionBlock {
    fn new(c: &Qwen3VlVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        Ok(VisionBlock {
            norm1: layer_norm(h, 1e-6, vb.pp("norm1"))?,
            norm2: layer_norm(h, 1e-6, vb.pp("norm2"))?,
            qkv: linear_b(h, 3 * h, true, vb.pp("attn").pp("qkv"))?,
            proj: linear_b(h, h, true, vb.pp("attn").pp("proj"))?,
            fc1: linear_b(h, c.intermediate_size, true, vb.pp("mlp").pp("linear_fc1"))?,
            fc2: linear_b(c.intermediate_size, h, true, vb.pp("mlp").pp("linear_fc2"))?,
            act: c.hidden_act,
            heads: c.num_heads,
        })
    }

    /// `x` (N, hidden); attention within each `[start, end)` of `spans`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        spans: &[(usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let (n, hidden) = x.dims2()?;
        let d = hidden / self.heads;
        let qkv = x
            .apply(&self.norm1)?
            .apply(&self.qkv)?
            .reshape((n, 3, self.heads, d))?
            .permute((1, 2, 0, 3))?; // (3, heads, N, d)
        let rope = |t: Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
        };
        let q = rope(qkv.i(0)?)?;
        let k = rope(qkv.i(1)?)?;
        let v = qkv.i(2)?.contiguous()?;
        let scale = (d as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(spans.len());
        for &(s, e) in spans {
            let q = q.narrow(1, s, e - s)?;
            let k = k.narrow(1, s, e - s)?;
            let v = v.narrow(1, s, e - s)?;
            let w = (q.matmul(&k.t()?)? * scale)?;
            let w = candle_nn::ops::softmax_last_dim(&w)?;
            outs.push(w.matmul(&v)?); // (heads, len, d)
        }
        let a = Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .reshape((n, hidden))?
            .apply(&self.proj)?;
        let x = (x + a)?;
        let m = x
            .apply(&self.norm2)?
            .apply(&self.fc1)?
            .apply(&self.act)?
            .apply(&self.fc2)?;
        x + m
    }
}

/// `Qwen3VLVisionPatchMerger`: LayerNorm before (merger) or after
/// (DeepStack, `use_postshuffle_norm`) concatenating each 2x2 block, then
/// fc1, exact GELU, fc2.
struct PatchMerger {
    norm: LayerNorm,
    postshuffle: bool,
    fc1: Linear,
    fc2: Linear,
    merged: usize,
}

impl PatchMerger {
    fn new(
        c: &Qwen3VlVisionConfig,
        postshuffle: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let merged = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
        let norm_dim = if postshuffle { merged } else { c.hidden_size };
        Ok(PatchMerger {
            norm: layer_norm(norm_dim, 1e-6, vb.pp("norm"))?,
            postshuffle,
            fc1: linear_b(merged, merged, true, vb.pp("linear_fc1"))?,
            fc2: linear_b(merged, c.out_hidden_size, true, vb.pp("linear_fc2"))?,
            merged,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if self.postshuffle {
            x.reshape(((), self.merged))?.apply(&self.norm)?
        } else {
            x.apply(&self.norm)?.reshape(((), self.merged))?
        };
        x.apply(&self.fc1)?.gelu_erf()?.apply(&self.fc2)
    }
}

/// The merged image tokens (tokens, out_hidden) and the DeepStack features
/// (one (tokens, out_hidden) per `deepstack_visual_indexes` entry).
pub struct VisionOutput {
    pub embeds: Tensor,
    pub deepstack: Vec<Tensor>,
}

/// `Qwen3VLVisionModel`.
struct VisionModel {
    cfg: Qwen3VlVisionConfig,
    patch_w: Tensor,
    patch_b: Tensor,
    pos_embed: Embedding,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    deepstack: Vec<PatchMerger>,
}

impl VisionModel {
    fn new(c: &Qwen3VlVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (p, t) = (c.patch_size, c.temporal_patch_size);
        let pe = vb.pp("patch_embed").pp("proj");
        // Conv3d with kernel = stride over one (C, T, p, p) row: a linear map
        let w = pe.get((c.hidden_size, c.in_channels, t, p, p), "weight")?;
        let patch_w = w.reshape((c.hidden_size, c.in_channels * t * p * p))?;
        let patch_b = pe.get(c.hidden_size, "bias")?;
        Ok(VisionModel {
            cfg: c.clone(),
            patch_w,
            patch_b,
            pos_embed: candle_nn::embedding(
                c.num_position_embeddings,
                c.hidden_size,
                vb.pp("pos_embed"),
            )?,
            blocks: (0..c.depth)
                .map(|i| VisionBlock::new(c, vb.pp("blocks").pp(i)))
                .collect::<candle_core::Result<_>>()?,
            merger: PatchMerger::new(c, false, vb.pp("merger"))?,
            deepstack: (0..c.deepstack_visual_indexes.len())
                .map(|i| PatchMerger::new(c, true, vb.pp("deepstack_merger_list").pp(i)))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Bilinear (align_corners) taps into the square position grid for each
    /// patch: 4 (index, weight) per patch, computed in f32 as transformers'
    /// `get_vision_interpolation_indices_and_weights`.
    fn interp(&self, grids: &[[usize; 3]]) -> (Vec<u32>, Vec<f32>) {
        let side = (self.cfg.num_position_embeddings as f64).sqrt() as usize;
        let m = self.cfg.spatial_merge_size;
        let axis = |i: usize, size: usize| -> [(usize, f32); 2] {
            let src = (i as f32 * (side - 1) as f32) / (size.saturating_sub(1).max(1) as f32);
            let fl = src.floor();
            let mut out = [(0usize, 0f32); 2];
            for (o, slot) in out.iter_mut().enumerate() {
                let tap = ((fl as i64) + o as i64).clamp(0, side as i64 - 1) as usize;
                let dist = (src - fl - o as f32).abs();
                *slot = (tap, (1.0 - dist).max(0.0));
            }
            out
        };
        let (mut idx, mut wts) = (Vec::new(), Vec::new());
        for &[t, h, w] in grids {
            let order = block_order(h, w, m);
            for _ in 0..t {
                for &(r, c) in &order {
                    let (hr, wc) = (axis(r, h), axis(c, w));
                    for &(hi, hw) in &hr {
                        for &(wi, ww) in &wc {
                            idx.push((hi * side + wi) as u32);
                            wts.push(hw * ww);
                        }
                    }
                }
            }
        }
        (idx, wts)
    }

    /// cos/sin (N, head_dim / 2) of the 2D rotary embedding: the row's
    /// frequencies then the column's.
    fn rotary(
        &self,
        grids: &[[usize; 3]],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.cfg.hidden_size / self.cfg.num_heads;
        let spatial = d / 2;
        let inv: Vec<f32> = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / (self.cfg.rope_theta as f32).powf(i as f32 / spatial as f32))
            .collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let mut n = 0;
        for &[t, h, w] in grids {
            let order = block_order(h, w, self.cfg.spatial_merge_size);
            for _ in 0..t {
                for &(r, c) in &order {
                    for pos in [r, c] {
                        for f in &inv {
                            let a = pos as f32 * f;
                            cos.push(a.cos());
                            sin.push(a.sin());
                        }
                    }
                    n += 1;
                }
            }
        }
        let half = 2 * inv.len();
        Ok((
            Tensor::from_vec(cos, (n, half), device)?,
            Tensor::from_vec(sin, (n, half), device)?,
        ))
    }

    fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
    ) -> candle_core::Result<VisionOutput> {
        let device = pixel_values.device();
        let dtype = self.patch_w.dtype();
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if pixel_values.dim(0)? != n {
            candle_core::bail!(
                "{} patch rows for image grids {grids:?} ({n} patches)",
                pixel_values.dim(0)?
            );
        }
        let x = pixel_values
            .to_dtype(dtype)?
            .matmul(&self.patch_w.t()?)?
            .broadcast_add(&self.patch_b)?;
        let (idx, wts) = self.interp(grids);
        let idx = Tensor::from_vec(idx, 4 * n, device)?;
        let wts = Tensor::from_vec(wts, (n, 4, 1), device)?.to_dtype(dtype)?;
        let pos = self
            .pos_embed
            .forward(&idx)?
            .reshape((n, 4, self.cfg.hidden_size))?
            .broadcast_mul(&wts)?
            .sum(1)?;
        let mut x = (x + pos)?;
        let (cos, sin) = self.rotary(grids, device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let mut spans = Vec::new();
        let mut start = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                spans.push((start, start + h * w));
                start += h * w;
            }
        }
        let mut deepstack = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &cos, &sin, &spans)?;
            if let Some(j) = self
                .cfg
                .deepstack_visual_indexes
                .iter()
                .position(|&k| k == i)
            {
                deepstack.push((j, self.deepstack[j].forward(&x)?));
            }
        }
        deepstack.sort_by_key(|(j, _)| *j);
        Ok(VisionOutput {
            embeds: self.merger.forward(&x)?,
            deepstack: deepstack.into_iter().map(|(_, t)| t).collect(),
        })
    }
}

// ------------------------------------------------------------------ text

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    /// `w * (x / sqrt(mean(x^2) + eps))`, the normalisation in f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

struct DecoderLayer {
    attn: Attention<RmsNorm>,
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Act,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(c: &Qwen3VlTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(DecoderLayer {
            attn: Attention::new(
                AttentionDims {
                    hidden_size: c.hidden_size,
                    num_attention_heads: c.num_attention_heads,
                    num_key_value_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    bias: c.attention_bias,
                    scale: (c.head_dim as f64).powf(-0.5),
                },
                vb.pp("self_attn"),
                |vb| RmsNorm::new(c.head_dim, c.rms_norm_eps, vb),
            )?,
            gate: linear_b(h, i, false, vb.pp("mlp").pp("gate_proj"))?,
            up: linear_b(h, i, false, vb.pp("mlp").pp("up_proj"))?,
            down: linear_b(i, h, false, vb.pp("mlp").pp("down_proj"))?,
            act: c.hidden_act,
            input_layernorm: RmsNorm::new(h, c.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                h,
                c.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .attn
            .forward(&x.apply(&self.input_layernorm)?, cos, sin, mask)?;
        let x = (x + h)?;
        let y = x.apply(&self.post_attention_layernorm)?;
        let m = (y.apply(&self.gate)?.apply(&self.act)? * y.apply(&self.up)?)?.apply(&self.down)?;
        x + m
    }
}

/// The Qwen3-VL text decoder with a KV cache (one sequence).
pub struct TextModel {
    cfg: Qwen3VlTextConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Positions in the cache.
    seq_len: usize,
    /// The M-RoPE position of the next decoded token (all three axes).
    next_pos: usize,
}

impl TextModel {
    fn new(
        c: &Qwen3VlTextConfig,
        tie: bool,
        vb: VarBuilder,
        lm_head: VarBuilder,
    ) -> candle_core::Result<Self> {
        let embed_tokens =
            candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("embed_tokens"))?;
        let lm_head = if tie {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(c.hidden_size, c.vocab_size, lm_head)?
        };
        Ok(TextModel {
            cfg: c.clone(),
            layers: (0..c.num_hidden_layers)
                .map(|i| DecoderLayer::new(c, vb.pp("layers").pp(i)))
                .collect::<candle_core::Result<_>>()?,
            norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb.pp("norm"))?,
            embed_tokens,
            lm_head,
            seq_len: 0,
            next_pos: 0,
        })
    }

    pub fn clear_cache(&mut self) {
        for l in &mut self.layers {
            l.attn.cache = None;
        }
        self.seq_len = 0;
        self.next_pos = 0;
    }

    /// Positions in the KV cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Token embeddings (1, L, hidden); ids >= vocab_size are looked up as 0.
    fn embed(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        let v = self.cfg.vocab_size as u32;
        let ids: Vec<u32> = ids.iter().map(|&i| if i >= v { 0 } else { i }).collect();
        let n = ids.len();
        self.embed_tokens
            .forward(&Tensor::from_vec(ids, (1, n), device)?)
    }

    /// cos/sin (L, head_dim / 2) of interleaved M-RoPE for positions (3, L).
    fn mrope(&self, pos: &[[usize; 3]], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim;
        let sec = self.cfg.mrope_section;
        let inv: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / (self.cfg.rope_theta as f32).powf(i as f32 / d as f32))
            .collect();
        let axis_of = |j: usize| -> usize {
            if j % 3 == 1 && j < 3 * sec[1] {
                1
            } else if j % 3 == 2 && j < 3 * sec[2] {
                2
            } else {
                0
            }
        };
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in pos {
            for (j, f) in inv.iter().enumerate() {
                let a = p[axis_of(j)] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let l = pos.len();
        Ok((
            Tensor::from_vec(cos, (l, inv.len()), device)?,
            Tensor::from_vec(sin, (l, inv.len()), device)?,
        ))
    }

    /// Runs L new positions (embeddings (1, L, hidden), M-RoPE positions,
    /// DeepStack features added at `visual` positions after the first
    /// layers) and returns the logits of the last one, (vocab,) f32.
    fn forward_embeds(
        &mut self,
        embeds: &Tensor,
        pos: &[[usize; 3]],
        visual: Option<(&[usize], &[Tensor])>,
    ) -> candle_core::Result<Tensor> {
        let (_, l, hidden) = embeds.dims3()?;
        let device = embeds.device().clone();
        let dtype = embeds.dtype();
        let (cos, sin) = self.mrope(pos, &device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let t = self.seq_len;
        let mask = if l > 1 {
            let mut m = vec![0f32; l * (t + l)];
            for i in 0..l {
                for k in t + i + 1..t + l {
                    m[i * (t + l) + k] = f32::NEG_INFINITY;
                }
            }
            Some(Tensor::from_vec(m, (1, 1, l, t + l), &device)?.to_dtype(dtype)?)
        } else {
            None
        };
        // (L, 1) 0/1 rows of the visual positions, and the features scattered to L rows
        let deepstack: Vec<Tensor> = match visual {
            None => vec![],
            Some((positions, feats)) => {
                let mut rows = vec![0u32; l];
                let mut is_vis = vec![0f32; l];
                for (r, &p) in positions.iter().enumerate() {
                    rows[p] = r as u32;
                    is_vis[p] = 1.0;
                }
                let rows = Tensor::from_vec(rows, l, &device)?;
                let is_vis = Tensor::from_vec(is_vis, (l, 1), &device)?.to_dtype(dtype)?;
                feats
                    .iter()
                    .map(|f| {
                        f.to_dtype(dtype)?
                            .index_select(&rows, 0)?
                            .broadcast_mul(&is_vis)?
                            .reshape((1, l, hidden))
                    })
                    .collect::<candle_core::Result<_>>()?
            }
        };
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            x = layer.forward(&x, &cos, &sin, mask.as_ref())?;
            if let Some(f) = deepstack.get(i) {
                x = (x + f)?;
            }
        }
        self.seq_len += l;
        self.next_pos = pos
            .iter()
            .map(|p| p[0].max(p[1]).max(p[2]))
            .max()
            .unwrap_or(0)
            + 1;
        let logits = x
            .i((0, l - 1..l, ..))?
            .apply(&self.norm)?
            .apply(&self.lm_head)?;
        logits.flatten_all()?.to_dtype(DType::F32)
    }
}

// ------------------------------------------------------------------ model

/// `Qwen3VLForConditionalGeneration`: vision tower, mergers, decoder.
pub struct Qwen3VlModel {
    cfg: Qwen3VlConfig,
    vision: VisionModel,
    text: TextModel,
    device: Device,
}

impl Qwen3VlModel {
    /// Weights as the Hub (and transformers >= 4.57) lay them out:
    /// `model.visual.*`, `model.language_model.*`, `lm_head.weight` (absent
    /// when tied).
    pub fn new(cfg: &Qwen3VlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        Ok(Qwen3VlModel {
            vision: VisionModel::new(&cfg.vision, vb.pp("model").pp("visual"))?,
            text: TextModel::new(
                &cfg.text,
                cfg.tie_word_embeddings,
                vb.pp("model").pp("language_model"),
                vb.pp("lm_head"),
            )?,
            cfg: cfg.clone(),
            device,
        })
    }

    pub fn config(&self) -> &Qwen3VlConfig {
        &self.cfg
    }

    pub fn text(&mut self) -> &mut TextModel {
        &mut self.text
    }

    /// `get_image_features`: merged tokens and DeepStack features of the
    /// images' patches (pixel values (patches, patch_dim), one grid per image).
    pub fn image_features(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
    ) -> candle_core::Result<VisionOutput> {
        self.vision.forward(pixel_values, grids)
    }

    /// `get_rope_index` for one sequence: (t, h, w) per position; each run
    /// of image tokens is the next image's merged grid.
    pub fn rope_index(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<Vec<[usize; 3]>> {
        let m = self.cfg.vision.spatial_merge_size;
        let image = self.cfg.image_token_id;
        let mut out = Vec::with_capacity(ids.len());
        let mut cur = 0usize;
        let mut i = 0;
        let mut next_grid = grids.iter();
        while i < ids.len() {
            if ids[i] != image {
                out.push([cur; 3]);
                cur += 1;
                i += 1;
                continue;
            }
            let run = ids[i..].iter().take_while(|&&t| t == image).count();
            let &[t, h, w] = next_grid.next().ok_or_else(|| {
                WorkerError::Invalid("more runs of image tokens than images".into())
            })?;
            let (gt, gh, gw) = (t, h / m, w / m);
            if run != gt * gh * gw {
                return Err(WorkerError::Invalid(format!(
                    "a run of {run} image tokens for an image of {} merged tokens ({gh}x{gw}); \
                     images written next to each other need <|vision_end|><|vision_start|> between them",
                    gt * gh * gw
                )));
            }
            for tt in 0..gt {
                for r in 0..gh {
                    for c in 0..gw {
                        out.push([cur + tt, cur + r, cur + c]);
                    }
                }
            }
            cur += gh.max(gw);
            i += run;
        }
        Ok(out)
    }

    /// Prefill: the logits (vocab,) after the prompt `ids` with the images'
    /// features (from [`Self::image_features`]) at the image tokens and
    /// M-RoPE positions `pos`.
    pub fn prefill(
        &mut self,
        ids: &[u32],
        pos: &[[usize; 3]],
        images: Option<&VisionOutput>,
    ) -> candle_core::Result<Tensor> {
        self.text.clear_cache();
        let mut x = self.text.embed(ids, &self.device)?;
        let positions: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.cfg.image_token_id)
            .map(|(i, _)| i)
            .collect();
        let visual = match images {
            None => None,
            Some(v) => {
                let n = v.embeds.dim(0)?;
                if n != positions.len() {
                    candle_core::bail!(
                        "image features and image tokens do not match, tokens: {}, features: {n}",
                        positions.len()
                    );
                }
                // each image token takes the next image feature
                let l = ids.len();
                let mut rows = vec![0u32; l];
                let mut is_img = vec![0f32; l];
                for (r, &p) in positions.iter().enumerate() {
                    rows[p] = r as u32;
                    is_img[p] = 1.0;
                }
                let dtype = x.dtype();
                let rows = Tensor::from_vec(rows, l, &self.device)?;
                let is_img = Tensor::from_vec(is_img, (1, l, 1), &self.device)?.to_dtype(dtype)?;
                let feats = v
                    .embeds
                    .to_dtype(dtype)?
                    .index_select(&rows, 0)?
                    .unsqueeze(0)?;
                x = (x.broadcast_mul(&(1.0 - &is_img)?)? + feats.broadcast_mul(&is_img)?)?;
                Some((positions.as_slice(), v.deepstack.as_slice()))
            }
        };
        self.text.forward_embeds(&x, pos, visual)
    }

    /// One decoding step after the cached positions: the logits (vocab,).
    pub fn step(&mut self, token: u32) -> candle_core::Result<Tensor> {
        let x = self.text.embed(&[token], &self.device)?;
        let p = self.text.next_pos;
        self.text.forward_embeds(&x, &[[p; 3]], None)
    }
}

impl CachedDecoder for Qwen3VlModel {
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

/// The chat-template strings of `Qwen3VLProcessor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptFormat {
    pub vision_start: String,
    pub vision_end: String,
    pub image_token: String,
}

impl PromptFormat {
    /// The Qwen3-VL chat template for an optional system text and one user
    /// turn (images first, then the text) with the generation prompt, each
    /// image expanded to its number of merged tokens as `Qwen3VLProcessor`
    /// does.
    pub fn render(&self, system: Option<&str>, prompt: &str, image_tokens: &[usize]) -> String {
        let mut s = String::new();
        if let Some(sys) = system {
            s.push_str("<|im_start|>system\n");
            s.push_str(sys);
            s.push_str("<|im_end|>\n");
        }
        s.push_str("<|im_start|>user\n");
        for &n in image_tokens {
            s.push_str(&self.vision_start);
            s.push_str(&self.image_token.repeat(n));
            s.push_str(&self.vision_end);
        }
        s.push_str(prompt);
        s.push_str("<|im_end|>\n<|im_start|>assistant\n");
        s
    }
}

/// A Qwen3-VL checkpoint as a [`Vlm`].
pub struct Qwen3VlVlm {
    model: Qwen3VlModel,
    tokenizer: Tokenizer,
    processor: Qwen3VlImageProcessor,
    format: PromptFormat,
    stop_ids: Vec<u32>,
    top_k: Option<usize>,
    sampling: SamplingConfig,
    device: Device,
    info: ModelInfo,
}

impl Qwen3VlVlm {
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
        let cfg_file = ConfigReader::read(dir, "config.json")?;
        match cfg_file.str("model_type") {
            Some("qwen3_vl") => {}
            other => {
                return Err(cfg_file.error(format!(
                    "model_type = {other:?}: not a Qwen3-VL checkpoint (\"qwen3_vl\")"
                )))
            }
        }
        let cfg = Qwen3VlConfig::from_hf(&cfg_file)?;
        let (pre, _) = image_processor_config(dir)?;
        let processor = Qwen3VlImageProcessor::from_hf(&pre)?;
        let v = &cfg.vision;
        if (
            processor.patch_size,
            processor.temporal_patch_size,
            processor.merge_size,
        ) != (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        {
            return Err(pre.error(format!(
                "patch_size {}, temporal_patch_size {}, merge_size {} differ from config.json's vision_config \
                 ({}, {}, {})",
                processor.patch_size,
                processor.temporal_patch_size,
                processor.merge_size,
                v.patch_size,
                v.temporal_patch_size,
                v.spatial_merge_size
            )));
        }
        let tokenizer = load_tokenizer(dir, cfg.text.vocab_size)?;
        let tok_file = dir.join("tokenizer.json");
        let format = PromptFormat {
            vision_start: token_of(
                &tokenizer,
                dir,
                cfg.vision_start_token_id,
                "vision_start_token_id",
            )?,
            vision_end: token_of(
                &tokenizer,
                dir,
                cfg.vision_end_token_id,
                "vision_end_token_id",
            )?,
            image_token: token_of(&tokenizer, dir, cfg.image_token_id, "image_token_id")?,
        };
        for t in ["<|im_start|>", "<|im_end|>"] {
            if tokenizer.token_to_id(t).is_none() {
                return Err(hf::load_err(format!(
                    "{}: no {t} token (the Qwen chat template needs it)",
                    tok_file.display()
                )));
            }
        }
        let (mut stop_ids, top_k) = generation_config(dir)?;
        if stop_ids.is_empty() {
            stop_ids = cfg.eos_token_ids.clone();
            if let Some(id) = tokenizer.token_to_id("<|im_end|>") {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let (vb, label) = var_builder(dir, device)?;
        let model = Qwen3VlModel::new(&cfg, vb).map_err(|e| weights_err(&label, e))?;
        // identity of everything that changes outputs
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        for f in [
            "config.json",
            "preprocessor_config.json",
            "processor_config.json",
            "tokenizer.json",
            "generation_config.json",
        ] {
            sha2::Digest::update(&mut h, std::fs::read(dir.join(f)).unwrap_or_default());
        }
        for f in hf::weight_files(dir)? {
            let meta = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            sha2::Digest::update(&mut h, format!("{}:{meta}", f.display()).as_bytes());
        }
        sha2::Digest::update(&mut h, format!("{sampling:?}/{stop_ids:?}").as_bytes());
        let fingerprint = format!("qwen3_vl/{}", hex::encode(&sha2::Digest::finalize(h)[..12]));
        Ok(Qwen3VlVlm {
            model,
            tokenizer,
            processor,
            format,
            stop_ids,
            top_k,
            sampling,
            device: device.clone(),
            info: ModelInfo {
                architecture: "qwen3_vl".into(),
                source: source.to_string(),
                smoke_test: has_random_weights(dir),
                fingerprint,
            },
        })
    }

    pub fn model(&mut self) -> &mut Qwen3VlModel {
        &mut self.model
    }

    pub fn processor(&self) -> &Qwen3VlImageProcessor {
        &self.processor
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn prompt_format(&self) -> &PromptFormat {
        &self.format
    }

    /// Token ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// `top_k` of generation_config.json, applied when sampling.
    pub fn top_k(&self) -> Option<usize> {
        self.top_k
    }

    /// Merged tokens of an image with this patch grid.
    fn tokens_of(&self, grid: &[usize; 3]) -> usize {
        let m = self.processor.merge_size;
        grid[0] * grid[1] * grid[2] / (m * m)
    }

    /// The prompt's token ids for images with these grids (chat template,
    /// images expanded).
    pub fn prompt_ids(
        &self,
        system: Option<&str>,
        prompt: &str,
        grids: &[[usize; 3]],
    ) -> Result<Vec<u32>> {
        let n: Vec<usize> = grids.iter().map(|g| self.tokens_of(g)).collect();
        prompt_token_ids(&self.tokenizer, &self.format.render(system, prompt, &n))
    }

    /// The processor's `pixel_values` (patches, patch_dim) and `image_grid_thw`.
    pub fn pixel_values(&self, images: &[&RgbImage]) -> Result<(Tensor, Vec<[usize; 3]>)> {
        self.processor.batch(images, &self.device)
    }

    /// Prefill: the logits (vocab,) after the prompt `ids` with the images
    /// (already preprocessed: pixel values and grids).
    pub fn prefill(
        &mut self,
        ids: &[u32],
        pixels: Option<(&Tensor, &[[usize; 3]])>,
    ) -> Result<Tensor> {
        let max = self.model.cfg.text.max_position_embeddings;
        if ids.is_empty() || ids.len() > max {
            return Err(WorkerError::Invalid(format!(
                "the prompt has {} tokens (1..={max} allowed)",
                ids.len()
            )));
        }
        let image_id = self.model.cfg.image_token_id;
        let n_tokens = ids.iter().filter(|&&i| i == image_id).count();
        let grids: &[[usize; 3]] = pixels.map(|(_, g)| g).unwrap_or(&[]);
        let expected: usize = grids.iter().map(|g| self.tokens_of(g)).sum();
        if n_tokens != expected {
            return Err(WorkerError::Invalid(format!(
                "the prompt has {n_tokens} image tokens but {} image(s) of {expected} merged tokens were given \
                 (does the prompt text contain <|image_pad|>?)",
                grids.len()
            )));
        }
        let pos = self.model.rope_index(ids, grids)?;
        let feats = match pixels {
            None => None,
            Some((p, g)) => Some(self.model.image_features(p, g)?),
        };
        Ok(self.model.prefill(ids, &pos, feats.as_ref())?)
    }

    /// Decodes from prompt ids and images; the generated ids (without the
    /// stop token), at most `max_new_tokens`.
    pub fn generate_ids(
        &mut self,
        ids: &[u32],
        pixels: Option<(&Tensor, &[[usize; 3]])>,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<u32>> {
        if max_new_tokens == 0 {
            return Ok(Vec::new());
        }
        let logits = self.prefill(ids, pixels)?;
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
        let imgs: Vec<&RgbImage> = req.images.iter().map(|i| i.as_ref()).collect();
        let (pixels, grids) = if imgs.is_empty() {
            (None, vec![])
        } else {
            let (p, g) = self.pixel_values(&imgs)?;
            (Some(p), g)
        };
        let ids = self.prompt_ids(req.system.as_deref(), &req.prompt, &grids)?;
        let px = pixels.as_ref().map(|p| (p, grids.as_slice()));
        let token_ids = self.generate_ids(&ids, px, req.max_new_tokens, req.seed);
        self.model.text().clear_cache();
        vlm_output(&self.tokenizer, token_ids)
    }
}

impl Vlm for Qwen3VlVlm {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    /// One sequence at a time (one KV cache): results never depend on how
    /// requests are batched.
    fn generate(&mut self, batch: &[VlmRequest]) -> Result<Vec<VlmOutput>> {
        batch.iter().map(|r| self.generate_one(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        // values from transformers' smart_resize (factor 32, Qwen3-VL's defaults)
        assert_eq!(
            smart_resize(300, 451, 32, 65536, 16777216).unwrap(),
            (288, 448)
        );
        // below min pixels: scaled up
        assert_eq!(smart_resize(10, 20, 16, 1024, 3072).unwrap(), (32, 48));
        // round half to even: 40/16 = 2.5 -> 2
        assert_eq!(smart_resize(40, 40, 16, 0, 1 << 20).unwrap(), (32, 32));
        assert!(smart_resize(1, 300, 16, 0, 1 << 20).is_err());
    }

    #[test]
    fn mrope_interleaves_height_and_width() {
        let c = Qwen3VlTextConfig::from_hf(&ConfigReader::from_value(
            serde_json::json!({"vocab_size": 4, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0,
                "mrope_section": [2, 3, 3]}}),
            Path::new("config.json"),
        ))
        .unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let m = TextModel::new(&c, true, vb.clone(), vb).unwrap();
        // theta 1: every inverse frequency is 1, so the angle is the axis' position
        let (cos, _) = m.mrope(&[[1, 2, 3]], &Device::Cpu).unwrap();
        let got: Vec<f32> = cos.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = [1, 2, 3, 1, 2, 3, 1, 2]
            .iter()
            .map(|&p: &i32| (p as f32).cos())
            .collect();
        assert_eq!(got, want);
    }

    /// A config.json in the layout of Qwen/Qwen3-VL-4B-Instruct's (written by
    /// transformers 4.57: RoPE as rope_scaling + rope_theta, the vision
    /// config's old model_type); transformers 5.24 reads it as checked below.
    const QWEN3_VL_4B: &str = r#"{
  "architectures": ["Qwen3VLForConditionalGeneration"],
  "image_token_id": 151655,
  "model_type": "qwen3_vl",
  "text_config": {
    "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 5000000, "tie_word_embeddings": true, "use_cache": true, "vocab_size": 151936
  },
  "tie_word_embeddings": true,
  "transformers_version": "4.57.0.dev0",
  "video_token_id": 151656,
  "vision_config": {
    "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
    "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
    "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2
  },
  "vision_end_token_id": 151653,
  "vision_start_token_id": 151652
}"#;

    #[test]
    fn reads_a_qwen3_vl_4b_config() {
        let c = Qwen3VlConfig::from_hf(&ConfigReader::from_value(
            serde_json::from_str(QWEN3_VL_4B).unwrap(),
            Path::new("config.json"),
        ))
        .unwrap();
        let t = &c.text;
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.head_dim),
            (2560, 36, 128)
        );
        assert_eq!((t.num_attention_heads, t.num_key_value_heads), (32, 8));
        assert_eq!(t.rope_theta, 5_000_000.0);
        assert_eq!(t.mrope_section, [24, 20, 20]);
        assert_eq!(t.hidden_act, Act::Nn(candle_nn::Activation::Silu));
        let v = &c.vision;
        assert_eq!(
            (v.depth, v.hidden_size, v.num_heads, v.patch_size),
            (24, 1024, 16, 16)
        );
        assert_eq!(v.deepstack_visual_indexes, vec![5, 11, 17]);
        assert_eq!(v.rope_theta, 10_000.0);
        assert_eq!(v.hidden_act, Act::Nn(candle_nn::Activation::NewGelu));
        assert_eq!(
            (
                c.image_token_id,
                c.vision_start_token_id,
                c.vision_end_token_id
            ),
            (151_655, 151_652, 151_653)
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151_645]);
        // a broken mrope_section is named
        let mut bad: serde_json::Value = serde_json::from_str(QWEN3_VL_4B).unwrap();
        bad["text_config"]["rope_scaling"]["mrope_section"] = serde_json::json!([24, 20, 10]);
        let e = Qwen3VlConfig::from_hf(&ConfigReader::from_value(bad, Path::new("config.json")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mrope_section") && e.contains("54"), "{e}");
    }
}
