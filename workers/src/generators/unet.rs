//! diffusers' `UNet2DConditionModel` in the Stable Diffusion 1.x/2.x form
//! (Rombach et al. 2022, arXiv 2112.10752): sinusoidal timestep embedding,
//! `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `UpBlock2D` / `CrossAttnUpBlock2D`, configured by `unet/config.json`.
//!
//! candle-transformers' `stable_diffusion::unet_2d` is close but its GEGLU
//! feed-forward uses the tanh approximation of GELU where diffusers uses the
//! exact (erf) GELU, and it cannot take per-block layer counts; so the blocks
//! are assembled here from candle's ResNet block, cross-attention and
//! timestep embedding, which compute what diffusers computes (checked against
//! diffusers goldens in `tests/generator_parity.rs`).
//!
//! SDXL's additions (Podell et al. 2023, arXiv 2307.01952) are supported
//! too: the `text_time` add-embedding (pooled text embeds and the six
//! size/crop conditioning ids, see [`TextTimeConfig`]) and per-block
//! `transformer_layers_per_block` lists.
//!
//! Legacy naming as in diffusers: `attention_head_dim` is the number of
//! heads when `num_attention_heads` is null (every SD 1.x/2.x config).

use candle_core::{Module, Tensor, D};
use candle_nn::{conv2d, group_norm, layer_norm, linear, Conv2d, GroupNorm, LayerNorm, Linear};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::attention::CrossAttention;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use serde_json::Value;

use crate::encoders::hf::ConfigReader;
use crate::Result;

type CResult<T> = candle_core::Result<T>;

/// The parts of `unet/config.json` the forward pass needs (per-block lists
/// expanded from diffusers' int-or-list keys).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Per down block: has cross-attention (`CrossAttnDownBlock2D`).
    pub down_cross_attn: Vec<bool>,
    /// Per up block (in up order): has cross-attention (`CrossAttnUpBlock2D`).
    pub up_cross_attn: Vec<bool>,
    pub layers_per_block: Vec<usize>,
    pub num_attention_heads: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    pub sample_size: usize,
    /// SDXL's `addition_embed_type: "text_time"`; `None` for SD 1.x/2.x.
    pub text_time: Option<TextTimeConfig>,
}

/// SDXL's `text_time` add-embedding: `add_embedding(cat(text_embeds,
/// sinusoid(time_ids).flatten()))` is added to the timestep embedding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim`: sinusoid channels per time id.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim` = pooled dim + 6 * time_embed_dim.
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// The pooled text embedding size this add-embedding expects (6 time ids).
    pub fn pooled_dim(&self) -> Option<usize> {
        self.input_dim.checked_sub(6 * self.time_embed_dim)
    }
}

fn per_block(c: &ConfigReader, key: &str, n: usize, default: Option<usize>) -> Result<Vec<usize>> {
    let v = &c.value()[key];
    match v {
        Value::Null => match default {
            Some(d) => Ok(vec![d; n]),
            None => Err(c.error(format!("{key} is missing"))),
        },
        Value::Number(x) => match x.as_u64() {
            Some(x) => Ok(vec![x as usize; n]),
            None => Err(c.error(format!("{key} = {x} is not a count"))),
        },
        Value::Array(a) => {
            if a.len() != n {
                return Err(c.error(format!("{key} has {} entries for {n} blocks", a.len())));
            }
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| c.error(format!("{key} entry {x} is not a count")))
                })
                .collect()
        }
        other => Err(c.error(format!("{key} = {other} is not a count or a list"))),
    }
}

impl UNetConfig {
    /// From `unet/config.json`; defaults are diffusers'. Options this UNet
    /// does not implement are errors naming the key.
    pub fn from_diffusers(c: &ConfigReader) -> Result<Self> {
        if let Some(class) = c.str("_class_name") {
            if class != "UNet2DConditionModel" {
                return Err(c.error(format!(
                    "_class_name = {class:?}: only UNet2DConditionModel is implemented"
                )));
            }
        }
        let v = c.value();
        let must_be = |key: &str, ok: &[Value]| -> Result<()> {
            let x = &v[key];
            if x.is_null() || ok.contains(x) {
                Ok(())
            } else {
                Err(c.error(format!(
                    "{key} = {x} is not supported by the SD 1.x/2.x UNet (supported: null{})",
                    ok.iter().map(|o| format!(", {o}")).collect::<String>()
                )))
            }
        };
        for key in [
            "class_embed_type",
            "time_cond_proj_dim",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_embedding_act_fn",
            "timestep_post_act",
            "cross_attention_norm",
            "num_class_embeds",
            "time_embedding_dim",
        ] {
            must_be(key, &[])?;
        }
        must_be("act_fn", &["silu".into()])?;
        must_be("time_embedding_type", &["positional".into()])?;
        must_be("resnet_time_scale_shift", &["default".into()])?;
        must_be("mid_block_type", &["UNetMidBlock2DCrossAttn".into()])?;
        must_be("conv_in_kernel", &[3.into()])?;
        must_be("conv_out_kernel", &[3.into()])?;
        must_be("attention_type", &["default".into()])?;
        must_be("only_cross_attention", &[false.into()])?;
        must_be("dual_cross_attention", &[false.into()])?;
        must_be("resnet_skip_time_act", &[false.into()])?;
        must_be("class_embeddings_concat", &[false.into()])?;
        must_be("mid_block_only_cross_attention", &[false.into()])?;
        must_be("reverse_transformer_layers_per_block", &[])?;
        if c.f64("resnet_out_scale_factor", 1.0)? != 1.0 {
            return Err(c.error("resnet_out_scale_factor other than 1.0 is not supported".into()));
        }
        let block_out_channels = per_block_list(c, "block_out_channels", &[320, 640, 1280, 1280])?;
        let n = block_out_channels.len();
        let down_types = string_list(
            c,
            "down_block_types",
            &[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
        )?;
        let up_types = string_list(
            c,
            "up_block_types",
            &[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
        )?;
        if down_types.len() != n || up_types.len() != n {
            return Err(c.error(format!(
                "{} down_block_types and {} up_block_types for {n} block_out_channels",
                down_types.len(),
                up_types.len()
            )));
        }
        let kind = |t: &str, attn: &str, plain: &str| -> Result<bool> {
            if t == attn {
                Ok(true)
            } else if t == plain {
                Ok(false)
            } else {
                Err(c.error(format!(
                    "block type {t:?} is not supported ({attn}, {plain} are)"
                )))
            }
        };
        let down_cross_attn = down_types
            .iter()
            .map(|t| kind(t, "CrossAttnDownBlock2D", "DownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up_cross_attn = up_types
            .iter()
            .map(|t| kind(t, "CrossAttnUpBlock2D", "UpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let heads = if v["num_attention_heads"].is_null() {
            per_block(c, "attention_head_dim", n, Some(8))?
        } else {
            per_block(c, "num_attention_heads", n, None)?
        };
        if !v["cross_attention_dim"].is_number() && !v["cross_attention_dim"].is_null() {
            return Err(c.error("per-block cross_attention_dim lists are not supported".into()));
        }
        let text_time = match &v["addition_embed_type"] {
            Value::Null => None,
            Value::String(t) if t == "text_time" => {
                let need = |key: &str| -> Result<usize> {
                    c.opt_usize(key)?.filter(|&x| x > 0).ok_or_else(|| {
                        c.error(format!(
                            "addition_embed_type = \"text_time\" needs a positive {key}"
                        ))
                    })
                };
                let tt = TextTimeConfig {
                    time_embed_dim: need("addition_time_embed_dim")?,
                    input_dim: need("projection_class_embeddings_input_dim")?,
                };
                if tt.pooled_dim().is_none_or(|d| d == 0) {
                    return Err(c.error(format!(
                        "projection_class_embeddings_input_dim = {} leaves no room for the pooled text \
                         embeds next to 6 time ids of addition_time_embed_dim = {}",
                        tt.input_dim, tt.time_embed_dim
                    )));
                }
                Some(tt)
            }
            other => {
                return Err(c.error(format!(
                    "addition_embed_type = {other} is not supported (null, \"text_time\" are)"
                )))
            }
        };
        let cfg = UNetConfig {
            text_time,
            in_channels: c.usize("in_channels", 4)?,
            out_channels: c.usize("out_channels", 4)?,
            down_cross_attn,
            up_cross_attn,
            layers_per_block: per_block(c, "layers_per_block", n, Some(2))?,
            num_attention_heads: heads,
            transformer_layers_per_block: per_block(c, "transformer_layers_per_block", n, Some(1))?,
            cross_attention_dim: c.usize("cross_attention_dim", 1280)?,
            norm_num_groups: c.usize("norm_num_groups", 32)?,
            norm_eps: c.f64("norm_eps", 1e-5)?,
            use_linear_projection: c.bool("use_linear_projection", false)?,
            flip_sin_to_cos: c.bool("flip_sin_to_cos", true)?,
            freq_shift: c.f64("freq_shift", 0.0)?,
            downsample_padding: c.usize("downsample_padding", 1)?,
            mid_block_scale_factor: c.f64("mid_block_scale_factor", 1.0)?,
            center_input_sample: c.bool("center_input_sample", false)?,
            sample_size: c.usize("sample_size", 64)?,
            block_out_channels,
        };
        for (i, (&ch, &h)) in cfg
            .block_out_channels
            .iter()
            .zip(&cfg.num_attention_heads)
            .enumerate()
        {
            if h == 0 || ch % h != 0 {
                return Err(c.error(format!(
                    "block {i}: {ch} channels are not divisible into {h} attention heads"
                )));
            }
            if cfg.norm_num_groups == 0 || ch % cfg.norm_num_groups != 0 {
                return Err(c.error(format!(
                    "block {i}: {ch} channels are not divisible into norm_num_groups = {}",
                    cfg.norm_num_groups
                )));
            }
        }
        Ok(cfg)
    }
}

fn per_block_list(c: &ConfigReader, key: &str, default: &[usize]) -> Result<Vec<usize>> {
    match &c.value()[key] {
        Value::Null => Ok(default.to_vec()),
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .filter(|&x| x > 0)
                    .ok_or_else(|| c.error(format!("{key} entry {x} is not a positive count")))
            })
            .collect(),
        other => Err(c.error(format!("{key} = {other} is not a non-empty list"))),
    }
}

fn string_list(c: &ConfigReader, key: &str, default: &[&str]) -> Result<Vec<String>> {
    match &c.value()[key] {
        Value::Null => Ok(default.iter().map(|s| s.to_string()).collect()),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| c.error(format!("{key} entry {x} is not a string")))
            })
            .collect(),
        other => Err(c.error(format!("{key} = {other} is not a list"))),
    }
}

// ------------------------------------------------------------------ transformer

/// diffusers `GEGLU` + `FeedForward` (exact GELU).
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> CResult<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> CResult<Tensor> {
        let h = self.proj.forward(xs)?;
        let parts = h.chunk(2, D::Minus1)?;
        (&parts[0] * parts[1].gelu_erf()?)?.apply(&self.out)
    }
}

/// diffusers `BasicTransformerBlock` (layer_norm, self- then cross-attention, GEGLU).
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(dim: usize, heads: usize, context_dim: usize, vb: VarBuilder) -> CResult<Self> {
        let d_head = dim / heads;
        Ok(TransformerBlock {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, heads, d_head, None, false)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                vb.pp("attn2"),
                dim,
                Some(context_dim),
                heads,
                d_head,
                None,
                false,
            )?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let xs = (self.attn1.forward(&xs.apply(&self.norm1)?, None)? + xs)?;
        let xs = (self.attn2.forward(&xs.apply(&self.norm2)?, Some(context))? + xs)?;
        self.ff.forward(&xs.apply(&self.norm3)?)? + xs
    }
}

enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers `Transformer2DModel` for continuous inputs.
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        cfg: &UNetConfig,
        vb: VarBuilder,
    ) -> CResult<Self> {
        let proj = |name: &str| -> CResult<Proj> {
            Ok(if cfg.use_linear_projection {
                Proj::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Proj::Conv(conv2d(
                    channels,
                    channels,
                    1,
                    Default::default(),
                    vb.pp(name),
                )?)
            })
        };
        Ok(Transformer2D {
            norm: group_norm(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::new(
                        channels,
                        heads,
                        cfg.cross_attention_dim,
                        vb.pp("transformer_blocks").pp(i),
                    )
                })
                .collect::<CResult<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = xs.apply(&self.norm)?;
        let to_seq =
            |t: &Tensor| -> CResult<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut xs = match &self.proj_in {
            Proj::Conv(p) => to_seq(&xs.apply(p)?)?,
            Proj::Linear(p) => to_seq(&xs)?.apply(p)?,
        };
        for blk in &self.blocks {
            xs = blk.forward(&xs, context)?;
        }
        let to_img = |t: &Tensor| -> CResult<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let xs = match &self.proj_out {
            Proj::Conv(p) => to_img(&xs)?.apply(p)?,
            Proj::Linear(p) => to_img(&xs.apply(p)?)?,
        };
        xs + residual
    }
}

// ------------------------------------------------------------------ blocks

fn resnet(
    in_ch: usize,
    out_ch: usize,
    temb: usize,
    cfg: &UNetConfig,
    scale: f64,
    vb: VarBuilder,
) -> CResult<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        in_ch,
        ResnetBlock2DConfig {
            out_channels: Some(out_ch),
            temb_channels: Some(temb),
            groups: cfg.norm_num_groups,
            groups_out: None,
            eps: cfg.norm_eps,
            use_in_shortcut: None,
            output_scale_factor: scale,
        },
    )
}

struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
    /// diffusers pads (0, 1, 0, 1) before a padding-0 downsampling conv.
    pad_before_down: bool,
}

impl DownBlock {
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        out: &mut Vec<Tensor>,
    ) -> CResult<Tensor> {
        let mut xs = xs.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                xs = a.forward(&xs, ctx)?;
            }
            out.push(xs.clone());
        }
        if let Some(d) = &self.downsample {
            if self.pad_before_down {
                xs = xs
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
            }
            xs = xs.apply(d)?;
            out.push(xs.clone());
        }
        Ok(xs)
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> CResult<Tensor> {
        let mut xs = xs.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip connections ran out".into()))?;
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                xs = a.forward(&xs, ctx)?;
            }
        }
        if let Some(u) = &self.upsample {
            let (_, _, h, w) = xs.dims4()?;
            let (h2, w2) = upsample_size.unwrap_or((2 * h, 2 * w));
            xs = xs.upsample_nearest2d(h2, w2)?.apply(u)?;
        }
        Ok(xs)
    }
}

struct MidBlock {
    resnet0: ResnetBlock2D,
    pairs: Vec<(Transformer2D, ResnetBlock2D)>,
}

/// diffusers' `UNet2DConditionModel` (SD 1.x/2.x form).
pub struct UNet2DCondition {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// SDXL: `add_time_proj` and `add_embedding`.
    add: Option<(Timesteps, TimestepEmbedding)>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DCondition {
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> CResult<Self> {
        let n = cfg.block_out_channels.len();
        let ch = &cfg.block_out_channels;
        let temb = ch[0] * 4;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = conv2d(cfg.in_channels, ch[0], 3, pad1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;
        let add = match &cfg.text_time {
            Some(tt) => Some((
                Timesteps::new(tt.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift),
                TimestepEmbedding::new(vb.pp("add_embedding"), tt.input_dim, temb)?,
            )),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            let vbi = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                let rin = if j == 0 { in_ch } else { out_ch };
                resnets.push(resnet(
                    rin,
                    out_ch,
                    temb,
                    cfg,
                    1.0,
                    vbi.pp("resnets").pp(j),
                )?);
                if cfg.down_cross_attn[i] {
                    attentions.push(Transformer2D::new(
                        out_ch,
                        cfg.num_attention_heads[i],
                        cfg.transformer_layers_per_block[i],
                        cfg,
                        vbi.pp("attentions").pp(j),
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                let c = Conv2dConfig {
                    padding: cfg.downsample_padding,
                    stride: 2,
                    ..Default::default()
                };
                Some(conv2d(out_ch, out_ch, 3, c, vbi.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
                pad_before_down: cfg.downsample_padding == 0,
            });
        }

        let last = ch[n - 1];
        let vbm = vb.pp("mid_block");
        let mid_layers = cfg.transformer_layers_per_block[n - 1];
        let mid = MidBlock {
            resnet0: resnet(
                last,
                last,
                temb,
                cfg,
                cfg.mid_block_scale_factor,
                vbm.pp("resnets.0"),
            )?,
            pairs: vec![(
                Transformer2D::new(
                    last,
                    cfg.num_attention_heads[n - 1],
                    mid_layers,
                    cfg,
                    vbm.pp("attentions.0"),
                )?,
                resnet(
                    last,
                    last,
                    temb,
                    cfg,
                    cfg.mid_block_scale_factor,
                    vbm.pp("resnets.1"),
                )?,
            )],
        };

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = cfg.num_attention_heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = cfg.layers_per_block.iter().rev().copied().collect();
        let rev_tl: Vec<usize> = cfg
            .transformer_layers_per_block
            .iter()
            .rev()
            .copied()
            .collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let vbi = vb.pp("up_blocks").pp(i);
            let layers = rev_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev } else { out_ch };
                resnets.push(resnet(
                    rin + skip,
                    out_ch,
                    temb,
                    cfg,
                    1.0,
                    vbi.pp("resnets").pp(j),
                )?);
                if cfg.up_cross_attn[i] {
                    attentions.push(Transformer2D::new(
                        out_ch,
                        rev_heads[i],
                        rev_tl[i],
                        cfg,
                        vbi.pp("attentions").pp(j),
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(conv2d(
                    out_ch,
                    out_ch,
                    3,
                    pad1,
                    vbi.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }
        Ok(UNet2DCondition {
            cfg: cfg.clone(),
            conv_in,
            time_proj,
            time_embedding,
            add,
            down,
            mid,
            up,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, pad1, vb.pp("conv_out"))?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The denoiser output for `sample` (B, C, H, W) at `timestep`, with the
    /// text encoder's hidden states `context` (B, L, cross_attention_dim).
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> CResult<Tensor> {
        self.forward_with_added(sample, timestep, context, None)
    }

    /// [`Self::forward`] with SDXL's added conditions `(text_embeds (B,
    /// pooled), time_ids (B, 6))`, which a `text_time` UNet requires and any
    /// other UNet refuses.
    pub fn forward_with_added(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> CResult<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let n = self.down.len();
        let factor = 1usize << (n - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        let xs = if self.cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let t = (Tensor::ones(b, xs.dtype(), xs.device())? * timestep)?;
        let emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        let emb = match (&self.add, added) {
            (None, None) => emb,
            (Some((proj, embedding)), Some((text_embeds, time_ids))) => {
                let ids = time_ids.flatten_all()?.to_dtype(xs.dtype())?;
                let n = time_ids.dim(0)?;
                let time = proj.forward(&ids)?.reshape((n, ()))?;
                let add_in = Tensor::cat(&[text_embeds, &time.to_dtype(text_embeds.dtype())?], 1)?;
                (emb + embedding.forward(&add_in)?)?
            }
            (Some(_), None) => candle_core::bail!(
                "this UNet (addition_embed_type text_time) needs the pooled text embeds and time ids"
            ),
            (None, Some(_)) => {
                candle_core::bail!("this UNet has no add-embedding for text embeds and time ids")
            }
        };
        let mut xs = xs.apply(&self.conv_in)?;
        let mut skips = vec![xs.clone()];
        for d in &self.down {
            xs = d.forward(&xs, &emb, context, &mut skips)?;
        }
        xs = self.mid.resnet0.forward(&xs, Some(&emb))?;
        for (a, r) in &self.mid.pairs {
            xs = a.forward(&xs, context)?;
            xs = r.forward(&xs, Some(&emb))?;
        }
        for (i, u) in self.up.iter().enumerate() {
            let rest = skips.len().saturating_sub(u.resnets.len());
            let size = if i + 1 < n && forward_upsample_size && rest > 0 {
                let (_, _, sh, sw) = skips[rest - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            let mut mine = skips.split_off(rest);
            xs = u.forward(&xs, &mut mine, &emb, context, size)?;
        }
        let xs = candle_nn::ops::silu(&xs.apply(&self.conv_norm_out)?)?;
        xs.apply(&self.conv_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SD 2.x `unet/config.json` as `stabilityai/sd-turbo` publishes it
    /// (transcribed: no checkpoint could be downloaded where this was written).
    const SD_TURBO_UNET: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.24.0.dev0",
      "act_fn": "silu", "addition_embed_type": null, "addition_embed_type_num_heads": 64,
      "addition_time_embed_dim": null, "attention_head_dim": [5, 10, 20, 20],
      "attention_type": "default", "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "class_embed_type": null, "class_embeddings_concat": false,
      "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 1024,
      "cross_attention_norm": null,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
      "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
      "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
      "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
      "out_channels": 4, "projection_class_embeddings_input_dim": null,
      "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
      "resnet_time_scale_shift": "default", "sample_size": 64, "time_cond_proj_dim": null,
      "time_embedding_act_fn": null, "time_embedding_dim": null,
      "time_embedding_type": "positional", "timestep_post_act": null,
      "transformer_layers_per_block": 1,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      "upcast_attention": null, "use_linear_projection": true
    }"#;

    fn reader(text: &str) -> ConfigReader {
        ConfigReader::from_value(
            serde_json::from_str(text).unwrap(),
            std::path::Path::new("unet/config.json"),
        )
    }

    #[test]
    fn sd_turbo_unet_config_parses() {
        let c = UNetConfig::from_diffusers(&reader(SD_TURBO_UNET)).unwrap();
        assert_eq!(c.num_attention_heads, vec![5, 10, 20, 20]);
        assert_eq!(c.layers_per_block, vec![2; 4]);
        assert_eq!(c.down_cross_attn, vec![true, true, true, false]);
        assert_eq!(c.up_cross_attn, vec![false, true, true, true]);
        assert_eq!((c.cross_attention_dim, c.sample_size), (1024, 64));
        assert!(c.use_linear_projection);
    }

    #[test]
    fn sdxl_unet_config_parses() {
        // stabilityai/sdxl-turbo unet/config.json (transcribed): the keys that differ
        let sdxl = SD_TURBO_UNET
            .replace(
                "\"addition_embed_type\": null",
                "\"addition_embed_type\": \"text_time\"",
            )
            .replace(
                "\"addition_time_embed_dim\": null",
                "\"addition_time_embed_dim\": 256",
            )
            .replace(
                "\"projection_class_embeddings_input_dim\": null",
                "\"projection_class_embeddings_input_dim\": 2816",
            )
            .replace("[5, 10, 20, 20]", "[5, 10, 20]")
            .replace("[320, 640, 1280, 1280]", "[320, 640, 1280]")
            .replace(
                "[\"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"DownBlock2D\"]",
                "[\"DownBlock2D\", \"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\"]",
            )
            .replace(
                "[\"UpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\"]",
                "[\"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\", \"UpBlock2D\"]",
            )
            .replace(
                "\"transformer_layers_per_block\": 1",
                "\"transformer_layers_per_block\": [1, 2, 10]",
            )
            .replace("\"cross_attention_dim\": 1024", "\"cross_attention_dim\": 2048");
        let c = UNetConfig::from_diffusers(&reader(&sdxl)).unwrap();
        let tt = c.text_time.unwrap();
        assert_eq!((tt.time_embed_dim, tt.input_dim), (256, 2816));
        assert_eq!(tt.pooled_dim(), Some(1280));
        assert_eq!(c.transformer_layers_per_block, vec![1, 2, 10]);
        assert_eq!(c.down_cross_attn, vec![false, true, true]);
        assert_eq!(c.num_attention_heads, vec![5, 10, 20]);
        let e = UNetConfig::from_diffusers(&reader(&sdxl.replace("2816", "null")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("projection_class_embeddings_input_dim"), "{e}");
    }

    #[test]
    fn unsupported_unet_options_are_named() {
        let sdxl_like = SD_TURBO_UNET.replace(
            "\"addition_embed_type\": null",
            "\"addition_embed_type\": \"image\"",
        );
        let e = UNetConfig::from_diffusers(&reader(&sdxl_like))
            .unwrap_err()
            .to_string();
        assert!(e.contains("addition_embed_type"), "{e}");
        let odd = SD_TURBO_UNET.replace(
            "\"attention_head_dim\": [5, 10, 20, 20]",
            "\"attention_head_dim\": [3, 10, 20, 20]",
        );
        let e = UNetConfig::from_diffusers(&reader(&odd))
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention heads"), "{e}");
    }
}
