//! Parity of mirgen's retrieval encoders with transformers, on the tiny
//! random checkpoints of `workers/tests/fixtures/encoders/<arch>/` (made by
//! `scripts/fixtures/make_encoder_fixtures.py`; see each `golden.json`):
//! preprocessing (pixel values), tokenization (ids), image and text
//! embeddings, batch independence, and the loader's error messages.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use mirgen_workers::encoders::{load_embedder, HfEmbedder};
use mirgen_workers::preprocess::to_rgb;
use mirgen_workers::{Embedder, RgbImage};

mod common;
use common::{
    assert_contains_all, copy_dir, edit_json, fixture_dir, load_err, max_abs_diff, truncate_half,
    Golden,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(arch: &str) -> PathBuf {
    fixture_dir("encoders").join(arch)
}

impl Golden {
    fn load(arch: &str) -> Golden {
        Golden::load_from(&fixture(arch))
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
    fn id_rows(&self) -> Vec<Vec<u32>> {
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
    assert!(enc.info().smoke_test, "the fixture holds RANDOM_WEIGHTS.md");

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
    let ids = g.id_rows();
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
    copy_dir(&fixture(arch), tmp.path());
    tmp
}

fn load_error(dir: &Path) -> String {
    load_err(
        load_embedder(dir.to_str().unwrap(), &Device::Cpu),
        &dir.display().to_string(),
    )
}

/// The load error of a copy of `arch`'s fixture whose JSON `file` `edit` changed.
fn json_edit_error(arch: &str, file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let d = copy_fixture(arch);
    edit_json(&d.path().join(file), edit);
    load_error(d.path())
}

#[test]
fn missing_tokenizer_is_named() {
    let d = copy_fixture("clip");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_error(d.path());
    assert_contains_all(&e, &["tokenizer.json", "save_pretrained"]);
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
    assert_contains_all(&e, &["/no/such/model/folder", "no such folder"]);
}

#[test]
fn wrong_model_type_is_named() {
    let e = json_edit_error("clip", "config.json", |v| v["model_type"] = "llama".into());
    assert_contains_all(&e, &["config.json", "llama", "clip, siglip"]);
    // a SigLIP checkpoint that claims to be CLIP: its tensors do not fit
    let e = json_edit_error("siglip", "config.json", |v| v["model_type"] = "clip".into());
    assert_contains_all(&e, &["model.safetensors", "do not fit config.json"]);
}

#[test]
fn weights_of_the_wrong_shape_are_named() {
    let e = json_edit_error("clip", "config.json", |v| {
        v["vision_config"]["patch_size"] = 16.into();
        v["vision_config"]["image_size"] = 32.into();
    });
    assert_contains_all(&e, &["model.safetensors", "shape"]);
}

#[test]
fn truncated_weights_are_named() {
    let d = copy_fixture("siglip");
    let p = d.path().join("model.safetensors");
    truncate_half(&p);
    let e = load_error(d.path());
    assert_contains_all(&e, &["model.safetensors", "truncated"]);
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
    assert_contains_all(&e, &["tokenizer.json", "vocab_size"]);
}

#[test]
fn a_processor_that_does_not_fit_the_model_is_named() {
    let e = json_edit_error("siglip", "preprocessor_config.json", |v| {
        v["size"] = serde_json::json!({"height": 48, "width": 48});
    });
    assert_contains_all(&e, &["preprocessor_config.json", "48x48"]);
}

/// Prints every loader error (run with --nocapture to read them).
#[test]
fn error_messages_read_well() {
    let d = copy_fixture("clip");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    eprintln!("missing tokenizer: {}", load_error(d.path()));
    eprintln!(
        "siglip as clip: {}",
        json_edit_error("siglip", "config.json", |v| {
            v["model_type"] = "clip".into()
        })
    );
    let d = copy_fixture("siglip");
    let p = d.path().join("model.safetensors");
    truncate_half(&p);
    eprintln!("truncated: {}", load_error(d.path()));
    let d = copy_fixture("siglip");
    std::fs::copy(
        fixture("clip").join("tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    eprintln!("foreign tokenizer: {}", load_error(d.path()));
    eprintln!(
        "wrong shape: {}",
        json_edit_error("clip", "config.json", |v| {
            v["vision_config"]["patch_size"] = 16.into()
        })
    );
}

/// Each image and text embeds as it does within the golden's whole batch;
/// returns the text embeddings of the whole batch.
fn assert_batch_independent(enc: &mut impl Embedder, g: &Golden) -> Vec<Vec<f32>> {
    let imgs = images(g);
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let all = enc.embed_images(&refs).unwrap();
    for (i, img) in refs.iter().enumerate() {
        assert_eq!(enc.embed_images(&[*img]).unwrap()[0], all[i], "image {i}");
    }
    let texts = g.strings("texts");
    let all = enc.embed_texts(&texts).unwrap();
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(
            enc.embed_texts(std::slice::from_ref(t)).unwrap()[0],
            all[i],
            "text {i}"
        );
    }
    all
}

// ------------------------------------------------------------------ BLIP (ITC)

use mirgen_workers::encoders::blip::BlipEmbedder;

fn blip() -> BlipEmbedder {
    BlipEmbedder::load(fixture("blip").to_str().unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn blip_pixel_values_match_transformers() {
    let g = Golden::load("blip");
    let enc = blip();
    let imgs = images(&g);
    let golden = &g.t["pixel_values"];
    assert_eq!(golden.dim(0).unwrap(), imgs.len());
    let mut diff = 0f32;
    for (i, img) in imgs.iter().enumerate() {
        let ours = enc.processor().batch(&[img], &Device::Cpu).unwrap();
        let want = golden.narrow(0, i, 1).unwrap();
        assert_eq!(ours.dims(), want.dims(), "blip: pixel shape of image {i}");
        diff = diff.max(max_abs_diff(&ours, &want));
    }
    eprintln!("blip: pixel values max |ours - transformers| = {diff:.3e}");
    assert!(diff <= 1e-5, "blip: preprocessing differs: {diff}");
}

#[test]
fn blip_token_ids_match_transformers() {
    let g = Golden::load("blip");
    let enc = blip();
    assert_eq!(
        Some(enc.text_spec().max_len as u64),
        g.meta["tokenizer_call"]["max_length"].as_u64()
    );
    let mask = g.t["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    for ((text, want), m) in g.strings("texts").iter().zip(g.id_rows()).zip(&mask) {
        let n = m.iter().filter(|&&x| x == 1).count();
        // the golden is padded to max_length; ours is not padded
        assert!(want[n..].iter().all(|&x| x == 0), "{text:?}: {want:?}");
        assert_eq!(
            enc.tokenize(text).unwrap(),
            want[..n],
            "blip: ids of {text:?}"
        );
    }
    // [CLS] first (no [ENC] swap on the ITC path), truncation to max_length
    let cls = enc.tokenizer().token_to_id("[CLS]").unwrap();
    assert_eq!(g.id_rows()[0][0], cls);
    let long = "a cat ".repeat(40);
    let ids = enc.tokenize(&long).unwrap();
    assert_eq!(ids.len(), enc.text_spec().max_len);
    assert_eq!(ids[0], cls);
    assert_eq!(
        *ids.last().unwrap(),
        enc.tokenizer().token_to_id("[SEP]").unwrap()
    );
}

#[test]
fn blip_embeddings_match_transformers() {
    let g = Golden::load("blip");
    let mut enc = blip();
    let img_ref = g.rows("image_embeds");
    let txt_ref = g.rows("text_embeds");
    // from the reference's own inputs (padded ids + attention mask)
    let img = enc.embed_pixel_values(&g.t["pixel_values"]).unwrap();
    let ids = g.t["input_ids"].to_dtype(DType::U32).unwrap();
    let txt = enc
        .embed_token_ids(&ids, Some(&g.t["attention_mask"]))
        .unwrap();
    // end to end through the Embedder trait (decoded images, strings)
    let imgs = images(&g);
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let img_e2e = enc.embed_images(&refs).unwrap();
    let txt_e2e = enc.embed_texts(&g.strings("texts")).unwrap();
    let errs = [
        ("image embeddings", rel_err(&img, &img_ref)),
        ("image embeddings (end to end)", rel_err(&img_e2e, &img_ref)),
        ("text embeddings", rel_err(&txt, &txt_ref)),
        ("text embeddings (end to end)", rel_err(&txt_e2e, &txt_ref)),
    ];
    for (what, e) in errs {
        eprintln!("blip: {what}: relative error {e:.2e}");
        assert!(
            e < TOL,
            "blip: {what} differ from transformers: relative error {e:.3e}"
        );
    }
    assert_eq!(enc.dim(), img_ref[0].len());
    assert_eq!(enc.dim(), txt_ref[0].len());
    assert_eq!(enc.vectors_per_image(), 1);
    // the ITC scores the reference checked against itm_score (use_itm_head=False)
    for (i, a) in img_e2e.iter().take(3).enumerate() {
        for (j, b) in txt_e2e.iter().enumerate() {
            let ours: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let want: f32 = img_ref[i].iter().zip(&txt_ref[j]).map(|(x, y)| x * y).sum();
            assert!(
                (ours - want).abs() < 1e-4,
                "score {i},{j}: {ours} vs {want}"
            );
        }
    }
}

#[test]
fn blip_embeddings_do_not_depend_on_the_batch() {
    let g = Golden::load("blip");
    let mut enc = blip();
    let all = assert_batch_independent(&mut enc, &g);
    // padding with a mask leaves an embedding (nearly) unchanged
    let padded = enc
        .embed_token_ids(
            &g.t["input_ids"].to_dtype(DType::U32).unwrap(),
            Some(&g.t["attention_mask"]),
        )
        .unwrap();
    assert!(rel_err(&padded, &all) < 1e-5);
}

#[test]
fn blip_loads_through_load_embedder() {
    let dir = fixture("blip");
    let mut boxed = load_embedder(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let mut enc = blip();
    let info = boxed.info();
    assert_eq!(info, enc.info());
    assert_eq!(info.architecture, "blip");
    assert!(info.smoke_test, "the fixture holds RANDOM_WEIGHTS.md");
    assert!(
        info.fingerprint.starts_with("hf-blip/"),
        "{}",
        info.fingerprint
    );
    assert_eq!(info.source, dir.to_str().unwrap());
    let g = Golden::load("blip");
    let texts = g.strings("texts");
    assert_eq!(
        boxed.embed_texts(&texts[..1]).unwrap(),
        enc.embed_texts(&texts[..1]).unwrap()
    );
    let e = rel_err(&boxed.embed_texts(&texts).unwrap(), &g.rows("text_embeds"));
    assert!(e < TOL, "{e}");
    // another architecture's fingerprint differs
    let clip = load_embedder(fixture("clip").to_str().unwrap(), &Device::Cpu).unwrap();
    assert_ne!(clip.info().fingerprint, info.fingerprint);
}

#[test]
fn blip_load_errors_are_named() {
    // a tensor missing from the weights
    let d = copy_fixture("blip");
    let p = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    assert!(t.remove("text_proj.weight").is_some());
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = load_error(d.path());
    eprintln!("blip, missing tensor: {e}");
    assert_contains_all(&e, &["model.safetensors", "text_proj.weight"]);

    // a config whose image size does not fit the weights
    let e = json_edit_error("blip", "config.json", |v| {
        v["vision_config"]["image_size"] = 48.into()
    });
    eprintln!("blip, image_size 48: {e}");
    assert_contains_all(&e, &["model.safetensors", "position_embedding"]);

    // a processor that does not fit the vision tower
    let e = json_edit_error("blip", "preprocessor_config.json", |v| {
        v["size"] = serde_json::json!({"height": 48, "width": 48});
    });
    eprintln!("blip, processor 48x48: {e}");
    assert_contains_all(&e, &["preprocessor_config.json", "48x48", "32"]);

    // a tokenizer larger than the text vocabulary
    let e = json_edit_error("blip", "config.json", |v| {
        v["text_config"]["vocab_size"] = 100.into()
    });
    eprintln!("blip, vocab 100: {e}");
    assert_contains_all(&e, &["tokenizer.json", "vocab_size is 100"]);
}

// ------------------------------------------------------------------ BLIP-2 (ITC, multi-vector)

use mirgen_workers::encoders::blip2::Blip2Embedder;

fn blip2() -> Blip2Embedder {
    Blip2Embedder::load(fixture("blip2").to_str().unwrap(), &Device::Cpu).unwrap()
}

/// The golden (N, Q, D) image embeddings as N rows of Q * D floats.
fn blip2_golden_images(g: &Golden) -> Vec<Vec<f32>> {
    g.t["image_embeds"]
        .to_vec3::<f32>()
        .unwrap()
        .into_iter()
        .map(|q| q.concat())
        .collect()
}

/// max over vector pairs of the inner product (the `Embedder` similarity).
fn max_over_vectors(image: &[f32], text: &[f32]) -> f32 {
    image
        .chunks(text.len())
        .map(|v| v.iter().zip(text).map(|(a, b)| a * b).sum::<f32>())
        .fold(f32::MIN, f32::max)
}

#[test]
fn blip2_pixel_values_and_token_ids_match_transformers() {
    let g = Golden::load("blip2");
    let enc = blip2();
    let imgs = images(&g);
    let golden_pixels = &g.t["pixel_values"];
    let mut pixel_diff = 0f32;
    for (i, img) in imgs.iter().enumerate() {
        let ours = enc.processor().batch(&[img], &Device::Cpu).unwrap();
        let want = golden_pixels.narrow(0, i, 1).unwrap();
        assert_eq!(ours.dims(), want.dims(), "blip2: pixel shape of image {i}");
        pixel_diff = pixel_diff.max(max_abs_diff(&ours, &want));
    }
    eprintln!("blip2: pixel values max |ours - transformers| = {pixel_diff:.3e}");
    assert!(
        pixel_diff <= 1e-5,
        "blip2: preprocessing differs: {pixel_diff}"
    );

    // transformers padded to max_length 16 with truncation (golden.json
    // "tokenizer_call"); mirgen truncates to the same length and does not pad
    let call = &g.meta["tokenizer_call"];
    assert_eq!(call["padding"], "max_length");
    let max_length = call["max_length"].as_u64().unwrap() as usize;
    assert_eq!(enc.max_len(), max_length);
    let ids = g.id_rows();
    let mask = g.t["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    for ((text, want), m) in g.strings("texts").iter().zip(&ids).zip(&mask) {
        assert_eq!(want.len(), max_length);
        let n = m.iter().filter(|&&x| x == 1).count();
        assert!(m[..n].iter().all(|&x| x == 1), "mask is a prefix");
        assert!(want[n..].iter().all(|&x| x == 0), "padding is [PAD] = 0");
        assert_eq!(
            enc.tokenize(text).unwrap(),
            &want[..n],
            "blip2: ids of {text:?}"
        );
    }
    // truncation: a long text is cut to max_length, ending in [SEP]
    let long = enc.tokenize(&"a cat ".repeat(40)).unwrap();
    assert_eq!(long.len(), max_length);
    assert_eq!(long[0], ids[0][0], "[CLS]");
    assert_eq!(
        long[max_length - 1],
        ids[0][mask[0].iter().sum::<u32>() as usize - 1]
    );
}

#[test]
fn blip2_embeddings_match_transformers() {
    let g = Golden::load("blip2");
    let mut enc = blip2();
    assert_eq!(enc.info().architecture, "blip-2");
    assert!(enc.info().smoke_test, "the fixture holds RANDOM_WEIGHTS.md");
    assert_eq!((enc.vectors_per_image(), enc.dim()), (8, 24));
    let img_ref = blip2_golden_images(&g);
    let txt_ref = g.rows("text_embeds");

    // from the reference's own inputs (padded ids + attention mask)
    let img = enc.embed_pixel_values(&g.t["pixel_values"]).unwrap();
    let e_img = rel_err(&img, &img_ref);
    let ids_t = g.t["input_ids"].clone();
    let txt = enc
        .embed_token_ids(&ids_t, Some(&g.t["attention_mask"]))
        .unwrap();
    let e_txt = rel_err(&txt, &txt_ref);
    // end to end through the Embedder trait
    let imgs = images(&g);
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let img_e2e = enc.embed_images(&refs).unwrap();
    let e_img_e2e = rel_err(&img_e2e, &img_ref);
    let texts = g.strings("texts");
    let txt_e2e = enc.embed_texts(&texts).unwrap();
    let e_txt_e2e = rel_err(&txt_e2e, &txt_ref);
    eprintln!(
        "blip2: relative error image (all 8 queries) {e_img:.2e} (end to end {e_img_e2e:.2e}), \
         text {e_txt:.2e} (end to end, unpadded {e_txt_e2e:.2e})"
    );
    for (what, e) in [
        ("image embeddings", e_img),
        ("image embeddings (end to end)", e_img_e2e),
        ("text embeddings", e_txt),
        ("text embeddings (end to end)", e_txt_e2e),
    ] {
        assert!(e < TOL, "blip2: {what} differ from transformers: {e:.3e}");
    }
    // every query vector is unit norm
    for row in &img_e2e {
        assert_eq!(row.len(), 8 * 24);
        for v in row.chunks(24) {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "{n}");
        }
    }

    // logits_per_image[n, m] = max_q image[n, q] . text[m]
    let mut worst = 0f32;
    for (oi, ri) in img_e2e.iter().zip(&img_ref) {
        for (ot, rt) in txt_e2e.iter().zip(&txt_ref) {
            let ours = max_over_vectors(oi, ot);
            let want = max_over_vectors(ri, rt);
            worst = worst.max((ours - want).abs());
        }
    }
    eprintln!("blip2: max-over-queries similarity max |ours - transformers| = {worst:.2e}");
    assert!(worst < 1e-4, "blip2: similarity matrix differs by {worst}");
}

#[test]
fn blip2_padding_with_the_mask_does_not_change_text_embeddings() {
    let g = Golden::load("blip2");
    let enc = blip2();
    let padded = g.t["input_ids"].clone();
    let mask = g.t["attention_mask"].clone();
    let with_mask = enc.embed_token_ids(&padded, Some(&mask)).unwrap();
    let lens: Vec<usize> = mask
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
        .iter()
        .map(|m| m.iter().sum::<u32>() as usize)
        .collect();
    for (i, &n) in lens.iter().enumerate() {
        let ids = padded.narrow(0, i, 1).unwrap().narrow(1, 0, n).unwrap();
        let unpadded = enc.embed_token_ids(&ids, None).unwrap();
        let e = rel_err(&unpadded, &with_mask[i..i + 1]);
        eprintln!("blip2: text {i}: unpadded vs padded + mask: relative error {e:.2e}");
        assert!(e < 1e-5, "text {i}: {e}");
    }
    // the mask matters: padding the model attends to changes the embedding
    let no_mask = enc.embed_token_ids(&padded, None).unwrap();
    let e = rel_err(&no_mask, &with_mask);
    assert!(e > 1e-3, "padding without the mask should differ: {e}");
}

#[test]
fn blip2_embeddings_do_not_depend_on_the_batch() {
    let g = Golden::load("blip2");
    let mut enc = blip2();
    assert_batch_independent(&mut enc, &g);
}

#[test]
fn blip2_loads_through_load_embedder() {
    let g = Golden::load("blip2");
    let mut enc = blip2();
    let mut boxed = load_embedder(fixture("blip2").to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(boxed.info(), enc.info());
    assert_eq!(boxed.info().architecture, "blip-2");
    assert!(boxed.info().fingerprint.starts_with("hf-blip-2/"));
    assert_eq!(boxed.vectors_per_image(), 8);
    assert_eq!(boxed.dim(), 24);
    let texts = g.strings("texts");
    assert_eq!(
        boxed.embed_texts(&texts).unwrap(),
        enc.embed_texts(&texts).unwrap()
    );
    let imgs = images(&g);
    let e = boxed.embed_images(&[&imgs[0]]).unwrap();
    assert_eq!(e[0].len(), boxed.vectors_per_image() * boxed.dim());
    assert_eq!(e, enc.embed_images(&[&imgs[0]]).unwrap());
}

#[test]
fn blip2_load_errors_name_the_file() {
    // a weight missing from the file
    let d = copy_fixture("blip2");
    let p = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    t.remove("text_projection.weight").unwrap();
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = load_error(d.path());
    eprintln!("blip2 missing tensor: {e}");
    assert_contains_all(&e, &["model.safetensors", "text_projection.weight"]);

    // the separate q_bias / v_bias of older saves are read like qkv.bias
    let d = copy_fixture("blip2");
    let p = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    for l in 0..2 {
        let pre = format!("vision_model.encoder.layers.{l}.self_attn.");
        let b = t.remove(&format!("{pre}qkv.bias")).unwrap();
        t.insert(format!("{pre}q_bias"), b.narrow(0, 0, 32).unwrap());
        t.insert(format!("{pre}v_bias"), b.narrow(0, 64, 32).unwrap());
    }
    candle_core::safetensors::save(&t, &p).unwrap();
    // (the fixture's random k bias is dropped: it shifts each query's
    // scores by a constant, which the softmax ignores)
    let mut old = Blip2Embedder::load(d.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let g = Golden::load("blip2");
    let imgs = images(&g);
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let e = rel_err(&old.embed_images(&refs).unwrap(), &blip2_golden_images(&g));
    assert!(e < TOL, "q_bias/v_bias weights: relative error {e}");

    // weights of the wrong shape
    let e = json_edit_error("blip2", "config.json", |v| v["num_query_tokens"] = 4.into());
    eprintln!("blip2 wrong shape: {e}");
    assert_contains_all(&e, &["model.safetensors", "query_tokens", "shape"]);

    // a processor that does not fit vision_config.image_size
    let e = json_edit_error("blip2", "preprocessor_config.json", |v| {
        v["size"] = serde_json::json!({"height": 48, "width": 48});
    });
    eprintln!("blip2 processor: {e}");
    assert_contains_all(&e, &["preprocessor_config.json", "48x48", "32"]);

    // a tokenizer larger than the Q-Former vocabulary
    let e = json_edit_error("blip2", "config.json", |v| {
        v["qformer_config"]["vocab_size"] = 50.into()
    });
    eprintln!("blip2 tokenizer: {e}");
    assert_contains_all(&e, &["tokenizer.json", "vocab_size is 50"]);

    // a generation checkpoint (blip2-opt-*) is not a retrieval model
    let e = json_edit_error("blip2", "config.json", |v| {
        v["architectures"] = serde_json::json!(["Blip2ForConditionalGeneration"])
    });
    eprintln!("blip2 generation checkpoint: {e}");
    assert_contains_all(&e, &["config.json", "Blip2ForImageTextRetrieval"]);

    // a Q-Former without the text feed-forward
    let e = json_edit_error("blip2", "config.json", |v| {
        v["qformer_config"]["use_qformer_text_input"] = false.into()
    });
    eprintln!("blip2 no text input: {e}");
    assert_contains_all(
        &e,
        &["config.json", "qformer_config.use_qformer_text_input"],
    );
}
