//! Parity of mirgen's retrieval encoders with transformers, on the tiny
//! random checkpoints of `workers/tests/fixtures/encoders/<arch>/` (made by
//! `scripts/fixtures/make_encoder_fixtures.py`; see each `golden.json`):
//! preprocessing (pixel values), tokenization (ids), image and text
//! embeddings, batch independence, and the loader's error messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mirgen_workers::encoders::{load_embedder, HfEmbedder};
use mirgen_workers::preprocess::to_rgb;
use mirgen_workers::{Embedder, RgbImage};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/encoders")
        .join(arch)
}

struct Golden {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Golden {
    fn load(arch: &str) -> Golden {
        let dir = fixture(arch);
        let t =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
            .unwrap();
        Golden { t, meta }
    }
    fn strings(&self, key: &str) -> Vec<String> {
        self.meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }
    fn rows(&self, key: &str) -> Vec<Vec<f32>> {
        self.t[key].to_vec2::<f32>().unwrap()
    }
    fn ids(&self) -> Vec<Vec<u32>> {
        let ids = self.t["input_ids"].to_dtype(DType::U32).unwrap();
        ids.to_vec2::<u32>().unwrap()
    }
}

/// max |a - b| / max |b|.
fn rel_err(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (a, b) in ours.iter().zip(reference) {
        assert_eq!(a.len(), b.len(), "embedding sizes differ");
        for (x, y) in a.iter().zip(b) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    diff / scale
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn images(g: &Golden) -> Vec<RgbImage> {
    g.strings("images")
        .iter()
        .map(|p| to_rgb(&image::open(root().join(p)).unwrap()))
        .collect()
}

const TOL: f32 = 1e-4;

fn check(arch: &str) {
    let g = Golden::load(arch);
    let dir = fixture(arch);
    let mut enc = HfEmbedder::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(enc.info().architecture, arch);
    assert!(!enc.info().smoke_test);

    // preprocessing: transformers' PIL processor on the same files
    let imgs = images(&g);
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let golden_pixels = &g.t["pixel_values"];
    let mut pixel_diff = 0f32;
    for (i, img) in refs.iter().enumerate() {
        let ours = enc.processor().batch(&[*img], &Device::Cpu).unwrap();
        let want = golden_pixels.narrow(0, i, 1).unwrap();
        assert_eq!(
            ours.dims(),
            want.dims(),
            "{arch}: pixel tensor shape of image {i}"
        );
        pixel_diff = pixel_diff.max(max_abs_diff(&ours, &want));
    }
    eprintln!("{arch}: pixel values max |ours - transformers| = {pixel_diff:.3e}");
    assert!(
        pixel_diff <= 1e-5,
        "{arch}: preprocessing differs from transformers: max abs diff {pixel_diff}"
    );

    // tokenization
    let ids = g.ids();
    let mask = g.t["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    for ((text, want), m) in g.strings("texts").iter().zip(&ids).zip(&mask) {
        let got = enc.tokenize(text).unwrap();
        let want = match enc.text_spec().pad_to_max_with {
            Some(_) => &want[..], // SigLIP: padded to max_length
            None => &want[..m.iter().filter(|&&x| x == 1).count()], // CLIP: no padding needed
        };
        assert_eq!(got, want, "{arch}: token ids of {text:?}");
    }

    // embeddings from the reference's own inputs
    let img_ref = g.rows("image_embeds");
    let txt_ref = g.rows("text_embeds");
    let img = enc.embed_pixel_values(golden_pixels).unwrap();
    let e_img = rel_err(&img, &img_ref);
    let ids_t = g.t["input_ids"].to_dtype(DType::U32).unwrap();
    let mask_t = g.t["attention_mask"].clone();
    let txt = enc.embed_token_ids(&ids_t, Some(&mask_t)).unwrap();
    let e_txt = rel_err(&txt, &txt_ref);
    // and end to end through the Embedder trait (images, strings)
    let img_e2e = enc.embed_images(&refs).unwrap();
    let e_img_e2e = rel_err(&img_e2e, &img_ref);
    let txt_e2e = enc.embed_texts(&g.strings("texts")).unwrap();
    let e_txt_e2e = rel_err(&txt_e2e, &txt_ref);
    eprintln!(
        "{arch}: relative error image {e_img:.2e} (end to end {e_img_e2e:.2e}), text {e_txt:.2e} (end to end {e_txt_e2e:.2e})"
    );
    for (what, e) in [
        ("image embeddings", e_img),
        ("image embeddings (end to end)", e_img_e2e),
        ("text embeddings", e_txt),
        ("text embeddings (end to end)", e_txt_e2e),
    ] {
        assert!(
            e < TOL,
            "{arch}: {what} differ from transformers: relative error {e:.3e}"
        );
    }
    assert_eq!(enc.dim(), img_ref[0].len());

    // an embedding does not depend on the batch it is in
    for (i, img) in refs.iter().enumerate() {
        assert_eq!(
            enc.embed_images(&[*img]).unwrap()[0],
            img_e2e[i],
            "{arch}: image {i}"
        );
    }
    let texts = g.strings("texts");
    assert_eq!(
        enc.embed_texts(&texts[1..2]).unwrap()[0],
        txt_e2e[1],
        "{arch}: text 1"
    );

    // the public loader gives the same model
    let mut boxed = load_embedder(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(boxed.info(), enc.info());
    assert_eq!(boxed.embed_texts(&texts[..1]).unwrap()[0], txt_e2e[0]);
}

#[test]
fn clip_matches_transformers() {
    check("clip");
}

#[test]
fn siglip_matches_transformers() {
    check("siglip");
}

/// The PNG inputs are Pillow's decoding of the sample JPEGs; the `image`
/// crate's JPEG decoder may differ from libjpeg-turbo by a unit here and
/// there. This measures that difference and bounds it.
#[test]
fn jpeg_decoding_is_close_to_pillow() {
    let g = Golden::load("clip");
    for (jpg, png) in g
        .strings("images_decoded_from")
        .iter()
        .zip(g.strings("images"))
    {
        let ours = image::open(root().join(jpg)).unwrap().to_rgb8();
        let pil = image::open(root().join(&png)).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), pil.dimensions(), "{jpg}");
        let diffs: Vec<i32> = ours
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let differing = diffs.iter().filter(|&&d| d > 0).count();
        eprintln!(
            "{jpg}: image crate vs Pillow decoding: max |diff| {max}, {differing} of {} values differ",
            diffs.len()
        );
        assert!(
            max <= 8,
            "{jpg}: JPEG decoding differs from Pillow by {max}"
        );
    }
    // what that does to the embeddings (from the JPEGs, decoded here)
    for arch in ["clip", "siglip"] {
        let g = Golden::load(arch);
        let mut enc = HfEmbedder::load(fixture(arch).to_str().unwrap(), &Device::Cpu).unwrap();
        let jpgs: Vec<RgbImage> = g
            .strings("images_decoded_from")
            .iter()
            .map(|p| image::open(root().join(p)).unwrap().to_rgb8())
            .collect();
        let refs: Vec<&RgbImage> = jpgs.iter().collect();
        let ours = enc.embed_images(&refs).unwrap();
        let e = rel_err(&ours, &g.rows("image_embeds")[..jpgs.len()]);
        eprintln!("{arch}: image embeddings from the JPEGs decoded by the image crate: relative error {e:.2e}");
        assert!(e < 0.05, "{arch}: {e}");
    }
}

// ------------------------------------------------------------------ errors

fn copy_fixture(arch: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(arch)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn load_error(dir: &Path) -> String {
    match load_embedder(dir.to_str().unwrap(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_tokenizer_is_named() {
    let d = copy_fixture("clip");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_error(d.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("save_pretrained"),
        "{e}"
    );
}

#[test]
fn missing_config_and_weights_are_named() {
    let d = copy_fixture("siglip");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_error(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_error(d.path());
    assert!(e.contains("config.json"), "{e}");
    let e = load_error(Path::new("/no/such/model/folder"));
    assert!(
        e.contains("/no/such/model/folder") && e.contains("no such folder"),
        "{e}"
    );
}

#[test]
fn wrong_model_type_is_named() {
    let d = copy_fixture("clip");
    edit_json(&d.path().join("config.json"), |v| {
        v["model_type"] = "llama".into()
    });
    let e = load_error(d.path());
    assert!(
        e.contains("config.json") && e.contains("llama") && e.contains("clip, siglip"),
        "{e}"
    );
    // a SigLIP checkpoint that claims to be CLIP: its tensors do not fit
    let d = copy_fixture("siglip");
    edit_json(&d.path().join("config.json"), |v| {
        v["model_type"] = "clip".into()
    });
    let e = load_error(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("do not fit config.json"),
        "{e}"
    );
}

#[test]
fn weights_of_the_wrong_shape_are_named() {
    let d = copy_fixture("clip");
    edit_json(&d.path().join("config.json"), |v| {
        v["vision_config"]["patch_size"] = 16.into();
        v["vision_config"]["image_size"] = 32.into();
    });
    let e = load_error(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("shape"),
        "{e}"
    );
}

#[test]
fn truncated_weights_are_named() {
    let d = copy_fixture("siglip");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_named() {
    let d = copy_fixture("siglip");
    std::fs::copy(
        fixture("clip").join("tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    let e = load_error(d.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("vocab_size"),
        "{e}"
    );
}

#[test]
fn a_processor_that_does_not_fit_the_model_is_named() {
    let d = copy_fixture("siglip");
    edit_json(&d.path().join("preprocessor_config.json"), |v| {
        v["size"] = serde_json::json!({"height": 48, "width": 48});
    });
    let e = load_error(d.path());
    assert!(
        e.contains("preprocessor_config.json") && e.contains("48x48"),
        "{e}"
    );
}

/// Prints every loader error (run with --nocapture to read them).
#[test]
fn error_messages_read_well() {
    let d = copy_fixture("clip");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    eprintln!("missing tokenizer: {}", load_error(d.path()));
    let d = copy_fixture("siglip");
    edit_json(&d.path().join("config.json"), |v| {
        v["model_type"] = "clip".into()
    });
    eprintln!("siglip as clip: {}", load_error(d.path()));
    let d = copy_fixture("siglip");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    eprintln!("truncated: {}", load_error(d.path()));
    let d = copy_fixture("siglip");
    std::fs::copy(
        fixture("clip").join("tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    eprintln!("foreign tokenizer: {}", load_error(d.path()));
    let d = copy_fixture("clip");
    edit_json(&d.path().join("config.json"), |v| {
        v["vision_config"]["patch_size"] = 16.into()
    });
    eprintln!("wrong shape: {}", load_error(d.path()));
}
