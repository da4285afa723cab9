//! Pieces Gemma 3 and Qwen3-VL share: the grouped-query attention of their
//! text decoders (with q/k RMSNorm and a KV cache), and the loading of the
//! processor config, tokenizer tokens, generation config and prompt ids.
//! What differs between the two models is a parameter.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};
use tokenizers::Tokenizer;

use crate::encoders::hf::{self, ConfigReader};
use crate::vlms::gemma3::{decode, id_list};
use crate::{Result, SamplingConfig, VlmOutput, WorkerError};

/// A tokenizer error as a [`WorkerError`].
pub(super) fn tok_err(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Tokenizer(e.to_string())
}

/// The image processor's config: `preprocessor_config.json` (the Hub's
/// layout) or `processor_config.json`'s `"image_processor"` (what
/// transformers 5 saves). Returns it and the whole file it came from (where
/// processor-level keys such as Gemma's `image_seq_length` live).
pub(super) fn image_processor_config(dir: &Path) -> Result<(ConfigReader, ConfigReader)> {
    if dir.join("preprocessor_config.json").exists() || !dir.join("processor_config.json").exists()
    {
        let pre = ConfigReader::read(dir, "preprocessor_config.json")?;
        Ok((pre.clone(), pre))
    } else {
        let p = ConfigReader::read(dir, "processor_config.json")?;
        if !p.value()["image_processor"].is_object() {
            return Err(p.error(
                "no image_processor object (and the folder has no preprocessor_config.json)".into(),
            ));
        }
        Ok((p.sub("image_processor")?, p))
    }
}

/// The token string of a special id of `config.json` (its key: `what`);
/// the error names `dir/tokenizer.json`.
pub(super) fn token_of(tokenizer: &Tokenizer, dir: &Path, id: u32, what: &str) -> Result<String> {
    tokenizer.id_to_token(id).ok_or_else(|| {
        hf::load_err(format!(
            "{}: has no token with id {id} (config.json's {what}); tokenizer and model come from \
             different checkpoints",
            dir.join("tokenizer.json").display()
        ))
    })
}

/// `generation_config.json`'s stop ids (`eos_token_id`) and positive
/// `top_k`, when the file exists (else none of either).
pub(super) fn generation_config(dir: &Path) -> Result<(Vec<u32>, Option<usize>)> {
    if !dir.join("generation_config.json").exists() {
        return Ok((Vec::new(), None));
    }
    let g = ConfigReader::read(dir, "generation_config.json")?;
    let stop_ids = id_list(&g, "eos_token_id")?;
    let top_k = g.opt_usize("top_k")?.filter(|&k| k > 0);
    Ok((stop_ids, top_k))
}

/// The token ids of a rendered prompt (the template already holds the
/// special tokens, so the tokenizer adds none).
pub(super) fn prompt_token_ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(text, false).map_err(tok_err)?;
    Ok(enc.get_ids().to_vec())
}

/// The output of one request from its generated ids (the generation's
/// result, checked after the KV cache was freed).
pub(super) fn vlm_output(tokenizer: &Tokenizer, token_ids: Result<Vec<u32>>) -> Result<VlmOutput> {
    let token_ids = token_ids?;
    let text = tokenizer.decode(&token_ids, true).map_err(tok_err)?;
    Ok(VlmOutput { text, token_ids })
}

/// A VLM whose text decoder holds one sequence's KV cache, stepped one
/// token at a time after the prefill.
pub(super) trait CachedDecoder {
    /// `max_position_embeddings` of the text decoder.
    fn max_positions(&self) -> usize;
    /// Positions in the KV cache.
    fn cache_len(&self) -> usize;
    /// One decoding step: the logits after `token` (vocab,).
    fn decode_step(&mut self, token: u32) -> candle_core::Result<Tensor>;
}

/// [`decode`] after the prompt's `logits`, stepping `model` until a stop
/// id, `max_new_tokens`, or a full context (the cache at
/// `max_position_embeddings`).
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_cached(
    model: &mut impl CachedDecoder,
    logits: Tensor,
    prompt: &[u32],
    sampling: &SamplingConfig,
    top_k: Option<usize>,
    stop_ids: &[u32],
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    let max_pos = model.max_positions();
    decode(
        logits,
        prompt,
        sampling,
        top_k,
        stop_ids,
        max_new_tokens,
        seed,
        |token| {
            Ok(if model.cache_len() >= max_pos {
                None
            } else {
                Some(model.decode_step(token)?)
            })
        },
    )
}

/// Sizes of a decoder's [`Attention`].
pub(super) struct AttentionDims {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// `attention_bias`: biases on q/k/v/o.
    pub bias: bool,
    /// The score scale: `query_pre_attn_scalar^-0.5` in Gemma 3,
    /// `head_dim^-0.5` in Qwen3-VL.
    pub scale: f64,
}

/// The text decoders' self-attention: `q_proj`/`k_proj`/`v_proj`/`o_proj`,
/// per-head `q_norm`/`k_norm` (each model's own RMSNorm, `N`), RoPE from the
/// given tables, grouped-query heads, softmax in f32 as transformers' eager
/// attention computes it, and a KV cache (one sequence).
pub(super) struct Attention<N> {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: N,
    k_norm: N,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// Keys and values of every position so far, (1, kv_heads, T, head_dim).
    pub cache: Option<(Tensor, Tensor)>,
}

impl<N: Module> Attention<N> {
    /// `norm` builds a q/k norm of width `head_dim` from its `VarBuilder`.
    pub fn new(
        c: AttentionDims,
        vb: VarBuilder,
        norm: impl Fn(VarBuilder) -> candle_core::Result<N>,
    ) -> candle_core::Result<Self> {
        let (h, d, b) = (c.hidden_size, c.head_dim, c.bias);
        Ok(Attention {
            q: linear_b(h, c.num_attention_heads * d, b, vb.pp("q_proj"))?,
            k: linear_b(h, c.num_key_value_heads * d, b, vb.pp("k_proj"))?,
            v: linear_b(h, c.num_key_value_heads * d, b, vb.pp("v_proj"))?,
            o: linear_b(c.num_attention_heads * d, h, b, vb.pp("o_proj"))?,
            q_norm: norm(vb.pp("q_norm"))?,
            k_norm: norm(vb.pp("k_norm"))?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
            scale: c.scale,
            cache: None,
        })
    }

    pub fn forward(
        &mut self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, n, heads, self.head_dim))?.transpose(1, 2)
        };
        let q = split(x.apply(&self.q)?, self.heads)?.apply(&self.q_norm)?;
        let k = split(x.apply(&self.k)?, self.kv_heads)?.apply(&self.k_norm)?;
        let v = split(x.apply(&self.v)?, self.kv_heads)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k.contiguous()?, cos, sin)?;
        let (k, v) = match &self.cache {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        self.cache = Some((k.clone(), v.clone()));
        let groups = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        let mut w = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        // softmax in f32, as transformers' eager attention computes it
        let dtype = w.dtype();
        let w = candle_nn::ops::softmax_last_dim(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        w.matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?
            .apply(&self.o)
    }
}
