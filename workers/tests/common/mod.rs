//! Helpers shared by the parity tests: golden loading, tensor comparisons,
//! fixture copies for load-error tests. Each test file uses `mod common;`,
//! and not every file uses every helper.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mirgen_workers::preprocess::to_rgb;
use mirgen_workers::{GenerateRequest, ImageGenerator, RgbImage, SamplingConfig};

/// `workers/tests/fixtures/<rel>`.
pub fn fixture_dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The goldens of a fixture: `golden.safetensors` and `golden.json`.
pub struct Golden {
    pub t: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Golden {
    pub fn load_from(dir: &Path) -> Golden {
        let t =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
            .unwrap();
        Golden { t, meta }
    }
    pub fn get(&self, key: &str) -> &Tensor {
        self.t
            .get(key)
            .unwrap_or_else(|| panic!("golden {key} missing"))
    }
    /// The tensor `key`, flattened, as token ids.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.get(key)
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    pub fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap() as usize
    }
    pub fn f64(&self, key: &str) -> f64 {
        self.meta[key].as_f64().unwrap()
    }
    pub fn f64s(&self, key: &str) -> Vec<f64> {
        json_f64s(&self.meta[key])
    }
    pub fn run(&self, run: &str) -> &serde_json::Value {
        &self.meta["runs"][run]
    }
    /// The prompt ids of the VLM case `case`.
    pub fn input_ids(&self, case: &str) -> Vec<u32> {
        self.get(&format!("{case}.input_ids"))
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    /// The VLM prompts of `golden.json`'s `cases`.
    pub fn cases(&self) -> Vec<Case> {
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        self.meta["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Case {
                name: c["name"].as_str().unwrap().into(),
                system: c["system"].as_str().map(String::from),
                prompt: c["prompt"].as_str().unwrap().into(),
                images: c["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().into())
                    .collect(),
                text: c["text"].as_str().unwrap().into(),
                greedy: ids(&c["greedy_tokens"]),
                greedy_penalty: ids(&c["greedy_tokens_repetition_penalty_1.1"]),
                greedy_text: c["greedy_text"].as_str().unwrap().into(),
            })
            .collect()
    }
}

/// A JSON array of numbers.
pub fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// One VLM prompt of a golden and transformers' answers to it.
pub struct Case {
    pub name: String,
    pub system: Option<String>,
    pub prompt: String,
    pub images: Vec<String>,
    pub text: String,
    pub greedy: Vec<u32>,
    pub greedy_penalty: Vec<u32>,
    pub greedy_text: String,
}

/// The shared test images of `fixtures/encoders/images/`.
pub fn load_images(names: &[String]) -> Vec<RgbImage> {
    names
        .iter()
        .map(|n| to_rgb(&image::open(fixture_dir("encoders/images").join(n)).unwrap()))
        .collect()
}

/// Greedy decoding without a repetition penalty (transformers' do_sample=False).
pub fn greedy() -> SamplingConfig {
    SamplingConfig {
        temperature: 0.0,
        top_p: 1.0,
        repetition_penalty: 1.0,
    }
}

pub fn argmax(t: &Tensor) -> u32 {
    t.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The golden's new tokens without a final stop token.
pub fn strip_stop(tokens: &[u32], stop: &[u32]) -> Vec<u32> {
    match tokens.last() {
        Some(t) if stop.contains(t) => tokens[..tokens.len() - 1].to_vec(),
        _ => tokens.to_vec(),
    }
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b|; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

/// max |a - b| / max |b|.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    max_abs_diff(ours, reference) / max_abs(reference)
}

/// Asserts `rel_err(ours, reference) < tol`, and prints the error.
pub fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let e = rel_err(ours, reference);
    eprintln!("{what}: rel. err. {e:.2e}");
    assert!(e < tol, "{what}: relative error {e} >= {tol}");
}

/// The largest difference of two uint8 images, in levels.
pub fn u8_max_diff(a: &image::RgbImage, b: &image::RgbImage) -> i32 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .max()
        .unwrap()
}

/// How many uint8 values of two images differ.
pub fn u8_differing(a: &image::RgbImage, b: &image::RgbImage) -> usize {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count()
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// A temporary copy of the folder `from` with `edit` applied.
pub fn broken_copy(from: &Path, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(from, tmp.path());
    edit(tmp.path());
    tmp
}

/// Replaces `from` by `to` in the text file `dir/file`, which must hold `from`.
pub fn replace_in(dir: &Path, file: &str, from: &str, to: &str) {
    let f = dir.join(file);
    let s = std::fs::read_to_string(&f).unwrap();
    assert!(s.contains(from), "{file} has no {from}");
    std::fs::write(&f, s.replace(from, to)).unwrap();
}

/// A `broken_copy` edit: `replace_in(dir, file, from, to)`.
pub fn replacing<'a>(file: &'a str, from: &'a str, to: &'a str) -> impl FnOnce(&Path) + 'a {
    move |dir| replace_in(dir, file, from, to)
}

/// The message of a load that must fail; `what` names what was loaded.
pub fn load_err<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what} loaded but should not"),
        Err(e) => e.to_string(),
    }
}

/// FLUX and SD3: from the golden's `init_latents` the generator gives the
/// golden's PNG (in `fixture`) within one level whatever the seed; seeds are
/// reproducible, batch-independent and differ; the info names `arch`; a
/// wrong-sized `init_latents` is an error that names it.
pub fn check_generated_image(
    gen: &mut impl ImageGenerator,
    g: &Golden,
    fixture: &Path,
    arch: &str,
) {
    assert_eq!(
        gen.resolution(),
        (g.usize("width") as u32, g.usize("height") as u32)
    );
    let init: Vec<f32> = g
        .get("init_latents")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let req = |seed, init: Option<Vec<f32>>| GenerateRequest {
        prompt: g.meta["prompt"].as_str().unwrap().to_string(),
        seed,
        init_latents: init,
    };
    let imgs = gen
        .generate(&[req(1, Some(init.clone())), req(2, Some(init.clone()))])
        .unwrap();
    let png = image::open(fixture.join(g.meta["png"].as_str().unwrap()))
        .unwrap()
        .to_rgb8();
    assert_eq!(imgs[0].dimensions(), png.dimensions());
    let max = u8_max_diff(&imgs[0], &png);
    eprintln!("uint8 image max diff {max}");
    assert!(max <= 1, "uint8 image differs by {max} levels");
    assert_eq!(
        imgs[0], imgs[1],
        "explicit latents make the seed irrelevant"
    );

    // seeds: reproducible, batch-independent, different from each other
    let a = gen.generate(&[req(5, None), req(6, None)]).unwrap();
    let b = gen.generate(&[req(5, None)]).unwrap();
    assert_eq!(a[0], b[0]);
    assert_ne!(a[0], a[1]);
    let info = gen.info();
    assert_eq!(info.architecture, arch);
    assert!(info.smoke_test, "the fixture holds RANDOM_WEIGHTS.md");
    assert!(info.fingerprint.contains("steps=2/guidance=3.5"));
    let err = gen
        .generate(&[req(0, Some(vec![0.0; 3]))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("init_latents"), "{err}");
}

/// Rewrites the JSON file `path` after `f` edited its value.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Cuts the file `path` to its first half; returns its former bytes.
pub fn truncate_half(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
    bytes
}

/// Asserts that the message `e` contains each of `parts`.
pub fn assert_contains_all(e: &str, parts: &[&str]) {
    assert!(parts.iter().all(|p| e.contains(p)), "{e}");
}
