//! Smoke-test presets: real candle architectures with tiny, *seeded random*
//! weights and a small word-level tokenizer built in code. Their outputs are
//! noise; they exist so the whole pipeline runs offline in seconds. Every
//! `ModelInfo` they report has `smoke_test: true`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{AddedToken, Tokenizer};

use crate::seed::{derive_seed, gaussian};
use crate::{Result, WorkerError};

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const BOS: &str = "<bos>";
pub const EOS: &str = "<eos>";

/// Words of the smoke-test vocabulary: enough to tokenize GenIR's prompts
/// roughly and to make sampled noise read as word salad rather than bytes.
const WORDS: &str = "a an the of and or in on at to with without for from by is are was be this that \
these it its as into over under near behind front left right top bottom center middle background \
foreground image images picture photo photograph caption captions description descriptions prompt \
diffusion model models generate generated generation detailed descriptive concise clear visual \
elements style composition colors color details detail only raw text ready output introductory \
explanations include do not no under tokens keep your you are assistant creates use here original \
first second someone drew based compare comparison content difference differences between two \
what's what tell me i need refine following was used synthetic version result didn't fully match \
feedback previous please provide improved would help more similar focus correcting issues \
identified surrounding explanation creating red green blue yellow orange purple pink brown black \
white gray grey gold silver dark light bright pale warm cool sky cloud clouds sun sunset sunrise \
night day water sea ocean lake river beach sand mountain mountains hill hills tree trees forest \
grass flower flowers field road street city building buildings house houses window door wall roof \
car cars bus truck train bicycle motorcycle boat plane person people man woman child children boy \
girl face faces hand hands hair eyes smile standing sitting walking running holding wearing \
looking dog dogs cat cats horse bird birds cow sheep animal animals food plate table chair bed \
room kitchen cup coffee fruit fruits apple banana orange bread cake pizza book books computer \
phone screen sign clock light lights lamp shadow shadows large small big tiny tall short long wide \
round square old new young modern vintage soft sharp blurry smooth rough wooden metal glass stone \
brick paper plastic close up view scene portrait landscape still life texture pattern striped \
spotted shiny matte several many few one three four some each other side edge corner sky-blue \
astronaut rocket space camera coffee cup chelsea cat chessboard rocket moon star stars snow ice rain";

const PUNCT: &[&str] = &[
    ".", ",", "'", ":", ";", "!", "?", "-", "(", ")", "\"", "{", "}", "_",
];

/// The smoke-test tokenizer: word-level, lowercase, whitespace/punctuation
/// split; ids: `[PAD]`=0, `[UNK]`=1, `<bos>`=2, words, punctuation, `<eos>` last
/// (CLIP pools at the highest id, so EOS must be the largest).
pub fn tokenizer() -> Result<Tokenizer> {
    let mut vocab: Vec<String> = vec![PAD.into(), UNK.into(), BOS.into()];
    for w in WORDS.split_whitespace().chain(PUNCT.iter().copied()) {
        if !vocab.iter().any(|v| v == w) {
            vocab.push(w.to_string());
        }
    }
    vocab.push(EOS.into());
    let map: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(map.into_iter().collect())
        .unk_token(UNK.into())
        .build()
        .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase));
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.add_special_tokens(&[
        AddedToken::from(PAD, true),
        AddedToken::from(UNK, true),
        AddedToken::from(BOS, true),
        AddedToken::from(EOS, true),
    ]);
    Ok(tok)
}

/// Id of a token of the smoke-test tokenizer.
pub fn token_id(tok: &Tokenizer, token: &str) -> Result<u32> {
    tok.token_to_id(token)
        .ok_or_else(|| WorkerError::Tokenizer(format!("token `{token}` is not in the vocabulary")))
}

/// Builds a model twice: once over a throw-away `VarMap` to learn every
/// parameter's name and shape, then over seeded tensors through
/// `VarBuilder::from_tensors` — the same path as weights read from files.
/// Values: 1-D `*weight` (norm scales) = 1, 1-D `*bias` = 0, others
/// N(0, 1/fan_in), each seeded by (seed, parameter name).
///
/// `optional` lists parameters a model only loads when `contains_tensor`
/// says they exist (e.g. CLIP's `class_embedding`, which candle otherwise
/// fills with *unseeded* random values): they are created too.
pub fn build_seeded<M>(
    seed: u64,
    device: &Device,
    optional: &[(&str, &[usize])],
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let mut tensors = HashMap::new();
    let data = varmap.data().lock().expect("varmap lock");
    let mut params: Vec<(String, candle_core::Shape)> = data
        .iter()
        .map(|(n, v)| (n.clone(), v.shape().clone()))
        .collect();
    params.extend(
        optional
            .iter()
            .map(|(n, s)| (n.to_string(), candle_core::Shape::from(s.to_vec()))),
    );
    for (name, shape) in params.iter() {
        let shape = shape.clone();
        let dims = shape.dims();
        let n = shape.elem_count();
        let values: Vec<f32> = if dims.len() == 1 && name.ends_with("weight") {
            vec![1.0; n]
        } else if dims.len() == 1 && name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let std = if dims.len() >= 2 {
                (1.0 / fan_in as f32).sqrt()
            } else {
                0.02
            };
            gaussian(derive_seed(seed, &[name]), n)
                .into_iter()
                .map(|v| v * std)
                .collect()
        };
        tensors.insert(name.clone(), Tensor::from_vec(values, shape, device)?);
    }
    drop(data);
    Ok(build(VarBuilder::from_tensors(
        tensors,
        DType::F32,
        device,
    ))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_has_eos_last_and_round_trips_words() {
        let tok = tokenizer().unwrap();
        let eos = token_id(&tok, EOS).unwrap();
        assert_eq!(eos as usize + 1, tok.get_vocab_size(true));
        let enc = tok.encode("A red Zeppelin, near the sea.", false).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids[0], token_id(&tok, "a").unwrap());
        assert!(
            ids.contains(&token_id(&tok, UNK).unwrap()),
            "`zeppelin` is unknown"
        );
        assert_eq!(
            tok.decode(
                &[
                    token_id(&tok, "red").unwrap(),
                    token_id(&tok, "sea").unwrap()
                ],
                true
            )
            .unwrap(),
            "red sea"
        );
    }

    #[test]
    fn seeded_weights_are_reproducible() {
        let build = |vb: VarBuilder| candle_nn::linear(4, 3, vb.pp("proj"));
        let a = build_seeded(7, &Device::Cpu, &[], build).unwrap();
        let b = build_seeded(7, &Device::Cpu, &[], build).unwrap();
        let c = build_seeded(8, &Device::Cpu, &[], build).unwrap();
        let w = |l: &candle_nn::Linear| l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        assert_eq!(a.bias().unwrap().to_vec1::<f32>().unwrap(), vec![0.0; 3]);
    }
}
