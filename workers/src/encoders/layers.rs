//! Transformer pieces shared by the CLIP and SigLIP towers (transformers'
//! `CLIPEncoderLayer` / `SiglipEncoderLayer`: pre-LayerNorm, multi-head
//! self-attention with `q_proj`/`k_proj`/`v_proj`/`out_proj`, MLP
//! `fc1` -> activation -> `fc2`), with the activation and LayerNorm epsilon
//! read from `config.json` (candle's own CLIP hard-codes QuickGELU and 1e-5).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

/// A transformers `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// `quick_gelu`: x * sigmoid(1.702 x) (OpenAI CLIP).
    QuickGelu,
    /// `gelu` (exact, erf), `gelu_new` / `gelu_pytorch_tanh` (tanh), `relu`, `silu`.
    Nn(candle_nn::Activation),
}

impl Act {
    /// From a `hidden_act` string; `None` for activations not implemented.
    pub fn parse(name: &str) -> Option<Act> {
        use candle_nn::Activation as A;
        Some(match name {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Nn(A::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::Nn(A::NewGelu),
            "relu" => Act::Nn(A::Relu),
            "silu" | "swish" => Act::Nn(A::Silu),
            _ => return None,
        })
    }
}

impl Module for Act {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Act::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Act::Nn(a) => a.forward(xs),
        }
    }
}

/// Sizes of one transformer tower.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub act: Act,
}

#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        if c.num_attention_heads == 0 || !h.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                c.num_attention_heads
            );
        }
        Ok(Attention {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            num_heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    /// `mask`: additive, broadcastable to (batch, heads, queries, keys).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(xs.apply(&self.q_proj)?)?;
        let k = heads(xs.apply(&self.k_proj)?)?;
        let v = heads(xs.apply(&self.v_proj)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut w = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let w = candle_nn::ops::softmax(&w, D::Minus1)?;
        w.matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.num_heads * self.head_dim))?
            .apply(&self.out_proj)
    }
}

#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Act,
}

impl Mlp {
    pub fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("fc2"))?,
            act: c.act,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.fc1)?.apply(&self.act)?.apply(&self.fc2)
    }
}

#[derive(Clone, Debug)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    pub fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(EncoderLayer {
            layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(c, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&xs.apply(&self.layer_norm1)?, mask)?;
        let xs = (xs + h)?;
        let h = xs.apply(&self.layer_norm2)?.apply(&self.mlp)?;
        xs + h
    }
}

/// `encoder.layers.{i}`.
#[derive(Clone, Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(c, vb.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Encoder { layers })
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for l in &self.layers {
            xs = l.forward(&xs, mask)?;
        }
        Ok(xs)
    }
}

/// An additive (1, 1, n, n) mask: 0 where key <= query, a large negative
/// number above the diagonal (transformers uses the dtype's minimum).
pub fn causal_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (1, 1, n, n), device)
}

/// The text tower CLIP and SigLIP share (`text_model.*`): token + absolute
/// position embeddings, the pre-LayerNorm [`Encoder`], `final_layer_norm`.
/// What differs (mask, pooling, projection) stays with the model.
#[derive(Clone, Debug)]
pub struct TextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl TextTransformer {
    /// `vb` at `text_model`.
    pub fn new(
        c: &TowerConfig,
        vocab_size: usize,
        max_position_embeddings: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let te = vb.pp("embeddings");
        Ok(TextTransformer {
            token_embedding: embedding(vocab_size, c.hidden_size, te.pp("token_embedding"))?,
            position_embedding: te
                .pp("position_embedding")
                .get((max_position_embeddings, c.hidden_size), "weight")?,
            encoder: Encoder::new(c, vb.pp("encoder"))?,
            final_layer_norm: layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            max_positions: max_position_embeddings,
        })
    }

    /// (B, L) ids -> `final_layer_norm(encoder(token + position, mask))`
    /// (B, L, hidden); more than `max_position_embeddings` ids is an error.
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let n = input_ids.dim(1)?;
        if n > self.max_positions {
            candle_core::bail!(
                "{n} tokens exceed max_position_embeddings {}",
                self.max_positions
            );
        }
        let xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?)?;
        self.encoder
            .forward(&xs, mask)?
            .apply(&self.final_layer_norm)
    }
}

/// A ViT patch embedding (`embeddings.patch_embedding`): a `patch_size`
/// convolution with stride `patch_size`, with a bias (SigLIP, BLIP) or
/// without (CLIP).
pub fn patch_embedding(
    in_channels: usize,
    hidden_size: usize,
    patch_size: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<candle_nn::Conv2d> {
    let conv = candle_nn::Conv2dConfig {
        stride: patch_size,
        ..Default::default()
    };
    if bias {
        candle_nn::conv2d(in_channels, hidden_size, patch_size, conv, vb)
    } else {
        candle_nn::conv2d_no_bias(in_channels, hidden_size, patch_size, conv, vb)
    }
}
