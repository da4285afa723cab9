//! The `simulation` preset: **not models**. Hashed stand-ins for the three
//! roles, deterministic and nearly free, so the pipeline's own machinery
//! (dataflow, commits, crash recovery, memory with 100k+ targets) can be
//! tested and measured without model cost. Text is a few words picked by a
//! hash of the request, drawings are small hash-coloured images, embeddings
//! are seeded unit vectors of the input's hash. Every `ModelInfo` says
//! `smoke_test: true`. `MIRGEN_SIM_LATENCY_MS=N` makes the stand-in
//! generator take N ms per image, to give tests a run that lasts.

use sha2::{Digest, Sha256};

use crate::seed::{derive_seed, gaussian};
use crate::{
    Embedder, GenerateRequest, ImageGenerator, ModelInfo, Result, RgbImage, Vlm, VlmOutput,
    VlmRequest,
};

const WORDS: &[&str] = &[
    "a", "red", "blue", "green", "dog", "cat", "house", "tree", "sky", "car", "person", "field",
    "small", "large", "bright", "dark", "near", "the", "water", "road",
];

fn hash_image(h: &mut Sha256, img: &RgbImage) {
    h.update(img.width().to_le_bytes());
    h.update(img.height().to_le_bytes());
    h.update(img.as_raw());
}

fn digest(h: Sha256) -> u64 {
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn info(role: &str) -> ModelInfo {
    ModelInfo {
        architecture: "simulation".into(),
        source: format!("preset:simulation (no model: hashed stand-in {role} for pipeline tests)"),
        smoke_test: true,
        fingerprint: format!("simulation-{role}/1"),
    }
}

/// Stand-in VLM: a few words from a hash of the prompt, images and seed.
pub struct SimVlm;

impl Vlm for SimVlm {
    fn info(&self) -> ModelInfo {
        info("vlm")
    }
    fn generate(&mut self, batch: &[VlmRequest]) -> Result<Vec<VlmOutput>> {
        Ok(batch
            .iter()
            .map(|r| {
                let mut h = Sha256::new();
                h.update(r.prompt.as_bytes());
                h.update(r.seed.to_le_bytes());
                for img in &r.images {
                    hash_image(&mut h, img);
                }
                let mut x = digest(h);
                let n = 3 + (x % 5) as usize;
                let mut words = Vec::with_capacity(n);
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n.min(r.max_new_tokens.max(1)) {
                    let w = (x % WORDS.len() as u64) as usize;
                    words.push(WORDS[w]);
                    ids.push(w as u32);
                    x = x.rotate_left(7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                }
                VlmOutput {
                    text: words.join(" "),
                    token_ids: ids,
                }
            })
            .collect())
    }
}

/// Stand-in generator: a `size` x `size` image coloured by a hash of the prompt and seed.
pub struct SimGenerator {
    pub size: u32,
}

impl ImageGenerator for SimGenerator {
    fn info(&self) -> ModelInfo {
        info("generator")
    }
    fn resolution(&self) -> (u32, u32) {
        (self.size, self.size)
    }
    fn generate(&mut self, batch: &[GenerateRequest]) -> Result<Vec<RgbImage>> {
        if let Some(ms) = std::env::var("MIRGEN_SIM_LATENCY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms * batch.len() as u64));
        }
        Ok(batch
            .iter()
            .map(|r| {
                let mut h = Sha256::new();
                h.update(r.prompt.as_bytes());
                h.update(r.seed.to_le_bytes());
                let x = digest(h).to_le_bytes();
                RgbImage::from_fn(self.size, self.size, |px, py| {
                    image::Rgb([
                        x[0].wrapping_add((px * 9) as u8),
                        x[1].wrapping_add((py * 7) as u8),
                        x[2] ^ ((px + py) as u8),
                    ])
                })
            })
            .collect())
    }
}

/// Stand-in embedder: a unit vector seeded by a hash of the input.
pub struct SimEmbedder {
    pub dim: usize,
}

impl SimEmbedder {
    fn vector(&self, seed: u64) -> Vec<f32> {
        let v = gaussian(derive_seed(seed, &["sim-embed"]), self.dim);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.into_iter().map(|x| x / n).collect()
    }
}

impl Embedder for SimEmbedder {
    fn info(&self) -> ModelInfo {
        info("embedder")
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn embed_images(&mut self, images: &[&RgbImage]) -> Result<Vec<Vec<f32>>> {
        Ok(images
            .iter()
            .map(|img| {
                let mut h = Sha256::new();
                hash_image(&mut h, img);
                self.vector(digest(h))
            })
            .collect())
    }
    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut h = Sha256::new();
                h.update(t.as_bytes());
                self.vector(digest(h))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stand_ins_are_deterministic_batch_independent_and_unit() {
        let mut e = SimEmbedder { dim: 32 };
        let a = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let b = RgbImage::from_fn(4, 4, |x, _| image::Rgb([x as u8, 1, 2]));
        let both = e.embed_images(&[&a, &b]).unwrap();
        assert_eq!(both[1], e.embed_images(&[&b]).unwrap()[0]);
        assert_ne!(both[0], both[1]);
        let n: f32 = both[0].iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-5);
        let mut g = SimGenerator { size: 8 };
        let req = |p: &str, seed| GenerateRequest {
            prompt: p.into(),
            seed,
            init_latents: None,
        };
        let imgs = g.generate(&[req("a dog", 1), req("a cat", 1)]).unwrap();
        assert_eq!(imgs[0], g.generate(&[req("a dog", 1)]).unwrap()[0]);
        assert_ne!(imgs[0], imgs[1]);
        let mut v = SimVlm;
        let r = VlmRequest {
            images: vec![Arc::new(a)],
            system: None,
            prompt: "describe".into(),
            max_new_tokens: 10,
            seed: 3,
        };
        let out = v.generate(&[r.clone(), r.clone()]).unwrap();
        assert_eq!(out[0], out[1]);
        assert!(!out[0].text.is_empty());
        assert!(e.info().smoke_test && v.info().source.contains("no model"));
    }
}
