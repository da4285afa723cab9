//! Parity of mirgen's CLIP and SigLIP with transformers on the tiny random
//! checkpoints of scripts/fixtures/make_encoder_fixtures.py: the same pixel
//! values and token ids in, the same normalised embeddings out (relative
//! error < 1e-4). Smoke-test weights: parity, not retrieval quality.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mirgen_workers::hf::HfEncoder;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/encoders")
        .join(arch)
}

fn golden(arch: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(arch).join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn check(arch: &str) {
    let g = golden(arch);
    let enc = HfEncoder::load(&fixture(arch), &Device::Cpu).unwrap();
    let img = enc.image_features(&g["pixel_values"]).unwrap();
    let img = candle_transformers::models::clip::div_l2_norm(&img).unwrap();
    let e = rel_err(&img, &g["image_embeds"]);
    eprintln!("{arch}: image embedding relative error {e:.2e}");
    assert!(
        e < 1e-4,
        "{arch} image embeddings differ from transformers: {e}"
    );
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let txt = enc.text_features(&ids).unwrap();
    let txt = candle_transformers::models::clip::div_l2_norm(&txt).unwrap();
    let e = rel_err(&txt, &g["text_embeds"]);
    eprintln!("{arch}: text embedding relative error {e:.2e}");
    assert!(
        e < 1e-4,
        "{arch} text embeddings differ from transformers: {e}"
    );
}

#[test]
fn clip_matches_transformers() {
    check("clip");
}

#[test]
fn siglip_matches_transformers() {
    check("siglip");
}

#[test]
fn broken_folders_fail_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture("clip")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    // truncated weights
    let w = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = HfEncoder::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // no weights at all
    std::fs::remove_file(&w).unwrap();
    let e = HfEncoder::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
    // wrong architecture
    std::fs::write(&w, bytes).unwrap();
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"clip\"", "\"bert\"");
    std::fs::write(&cfg, text).unwrap();
    let e = HfEncoder::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json") && e.contains("bert"), "{e}");
}
