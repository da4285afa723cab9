//! Parity of mirgen's Gemma 3 VLM (`Gemma3ForConditionalGeneration`) with
//! transformers, on the tiny random checkpoint of
//! `workers/tests/fixtures/vlm/gemma3/` (made by
//! `scripts/fixtures/make_vlm_fixtures.py`; see its `golden.json`): chat
//! prompt ids, pixel values, image features, first-step logits and greedy
//! tokens (with and without a repetition penalty) for a prompt with one
//! image (and a system text), two images and none; the KV cache against a
//! full recomputation; both weight layouts; seeded sampling; load errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use mirgen_workers::vlms::gemma3::Gemma3Vlm;
use mirgen_workers::vlms::load_vlm;
use mirgen_workers::{RgbImage, SamplingConfig, Vlm, VlmRequest};

mod common;
use common::{
    argmax, assert_contains_all, copy_dir, edit_json, fixture_dir, greedy, load_images,
    max_abs_diff, rel_err, strip_stop, truncate_half, Golden,
};

fn fixture() -> PathBuf {
    fixture_dir("vlm/gemma3")
}

impl Golden {
    fn load() -> Golden {
        Golden::load_from(&fixture())
    }
}

fn load(sampling: SamplingConfig) -> Gemma3Vlm {
    Gemma3Vlm::load_dir(&fixture(), "fixture", sampling, &Device::Cpu).unwrap()
}

#[test]
fn prompts_match_the_processor() {
    let g = Golden::load();
    let vlm = load(greedy());
    let f = vlm.prompt_format().clone();
    assert_eq!(f.mm_tokens_per_image, 4);
    for c in g.cases() {
        // the template text transformers rendered, with each image expanded as
        // Gemma3Processor expands it
        let expanded = c.text.replace(
            "<start_of_image>",
            &format!(
                "\n\n<start_of_image>{}<end_of_image>\n\n",
                "<image_soft_token>".repeat(4)
            ),
        );
        assert_eq!(
            f.render(c.system.as_deref(), &c.prompt, c.images.len()),
            expanded,
            "{}: prompt text",
            c.name
        );
        let ids = vlm
            .prompt_ids(c.system.as_deref(), &c.prompt, c.images.len())
            .unwrap();
        assert_eq!(ids, g.input_ids(&c.name), "{}: input ids", c.name);
    }
}

#[test]
fn pixel_values_and_image_features_match() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    let mut checked = 0;
    for c in g.cases().iter().filter(|c| !c.images.is_empty()) {
        let imgs = load_images(&c.images);
        let refs: Vec<&RgbImage> = imgs.iter().collect();
        let ours = vlm.pixel_values(&refs).unwrap();
        let want = g.get(&format!("{}.pixel_values", c.name));
        let d = max_abs_diff(&ours, want);
        eprintln!(
            "{}: pixel values max |ours - transformers| = {d:.3e}",
            c.name
        );
        assert!(d <= 1e-6, "{}: pixel values differ by {d}", c.name);

        let feats = vlm.model().image_features(want).unwrap();
        let want = g.get(&format!("{}.image_features", c.name));
        let e = rel_err(&feats, want);
        eprintln!("{}: image features rel. err. = {e:.3e}", c.name);
        assert!(e < 1e-4, "{}: image features rel. err. {e}", c.name);
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn first_step_logits_match() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    for c in g.cases() {
        let ids = g.input_ids(&c.name);
        let pixels =
            (!c.images.is_empty()).then(|| g.get(&format!("{}.pixel_values", c.name)).clone());
        let logits = vlm.prefill(&ids, pixels.as_ref()).unwrap();
        let want = g.get(&format!("{}.logits", c.name));
        let e = rel_err(&logits, want);
        eprintln!("{}: first-step logits rel. err. = {e:.3e}", c.name);
        assert!(e < 1e-3, "{}: logits rel. err. {e}", c.name);
        assert_eq!(argmax(&logits), argmax(want), "{}: argmax", c.name);
    }
}

#[test]
fn greedy_tokens_match() {
    let g = Golden::load();
    for (penalty, sampling) in [
        (false, greedy()),
        (
            true,
            SamplingConfig {
                repetition_penalty: 1.1,
                ..greedy()
            },
        ),
    ] {
        let mut vlm = load(sampling);
        let stop = vlm.stop_ids().to_vec();
        assert_eq!(stop, vec![1, 5], "stop ids from generation_config.json");
        for c in g.cases() {
            let imgs = load_images(&c.images);
            let want = if penalty {
                &c.greedy_penalty
            } else {
                &c.greedy
            };
            let want = strip_stop(want, &stop);
            // end to end: images and texts in, as the pipeline calls it
            let req = VlmRequest {
                images: imgs.into_iter().map(Arc::new).collect(),
                system: c.system.clone(),
                prompt: c.prompt.clone(),
                max_new_tokens: 8,
                seed: 7,
            };
            let out = vlm.generate(std::slice::from_ref(&req)).unwrap();
            assert_eq!(
                out[0].token_ids, want,
                "{} (repetition penalty {penalty}): greedy tokens",
                c.name
            );
            if !penalty {
                assert_eq!(out[0].text, c.greedy_text, "{}: decoded text", c.name);
            }
        }
    }
}

#[test]
fn kv_cache_matches_recomputation() {
    // the logits after k decoding steps equal a fresh prefill of the prompt
    // plus those k tokens (sliding window 3 < the 8 steps: the window moves)
    let g = Golden::load();
    let mut vlm = load(greedy());
    for name in ["one_image", "two_images"] {
        let ids = g.input_ids(name);
        let pixels = g.get(&format!("{name}.pixel_values")).clone();
        let tokens = vlm.generate_ids(&ids, Some(&pixels), 6, 0).unwrap();
        assert_eq!(tokens.len(), 6);
        let mut last = vlm.prefill(&ids, Some(&pixels)).unwrap();
        let mut stepped = Vec::new();
        for &t in &tokens {
            last = vlm.model().step(t).unwrap();
            stepped.push(last.clone());
        }
        let mut full = ids.clone();
        full.extend(&tokens);
        let fresh = vlm.prefill(&full, Some(&pixels)).unwrap();
        let e = rel_err(&last, &fresh);
        eprintln!("{name}: cached vs recomputed logits rel. err. = {e:.3e}");
        assert!(e < 1e-4, "{name}: KV cache differs from recomputation: {e}");
    }
}

#[test]
fn both_weight_layouts_load_the_same() {
    // transformers >= 4.52 saves model.language_model.*, model.vision_tower.*
    // (no vision_model level in transformers 5), model.multi_modal_projector.*,
    // lm_head.weight; the fixture has the Hub's layout. Also the Hub's
    // preprocessor_config.json instead of processor_config.json.
    let g = Golden::load();
    let src = fixture();
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let proc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("processor_config.json")).unwrap())
            .unwrap();
    let mut pre = proc["image_processor"].clone();
    pre["image_seq_length"] = proc["image_seq_length"].clone();
    std::fs::write(
        tmp.path().join("preprocessor_config.json"),
        serde_json::to_string(&pre).unwrap(),
    )
    .unwrap();
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut renamed = HashMap::new();
    for (k, v) in w {
        let k = if let Some(r) = k.strip_prefix("language_model.model.") {
            format!("model.language_model.{r}")
        } else if let Some(r) = k.strip_prefix("vision_tower.vision_model.") {
            format!("model.vision_tower.{r}")
        } else if let Some(r) = k.strip_prefix("multi_modal_projector.") {
            format!("model.multi_modal_projector.{r}")
        } else {
            panic!("unexpected key {k}")
        };
        if k == "model.language_model.embed_tokens.weight" {
            renamed.insert("lm_head.weight".to_string(), v.clone());
        }
        renamed.insert(k, v);
    }
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let mut a = load(greedy());
    let mut b = Gemma3Vlm::load_dir(tmp.path(), "renamed", greedy(), &Device::Cpu).unwrap();
    let c = &g.cases()[1];
    let imgs = load_images(&c.images);
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let pa = a.pixel_values(&refs).unwrap();
    let pb = b.pixel_values(&refs).unwrap();
    assert_eq!(max_abs_diff(&pa, &pb), 0.0);
    let ids = g.input_ids(&c.name);
    let la = a.prefill(&ids, Some(&pa)).unwrap();
    let lb = b.prefill(&ids, Some(&pb)).unwrap();
    assert_eq!(max_abs_diff(&la, &lb), 0.0, "the layouts give other logits");
    assert_ne!(a.info().fingerprint, b.info().fingerprint);
}

#[test]
fn sampling_is_seeded_and_load_vlm_dispatches() {
    let mut vlm = load_vlm(
        fixture().to_str().unwrap(),
        SamplingConfig::default(),
        &Device::Cpu,
    )
    .unwrap();
    let info = vlm.info();
    assert_eq!(info.architecture, "gemma3");
    assert!(info.smoke_test, "the fixture holds RANDOM_WEIGHTS.md");
    let img = Arc::new(load_images(&["chelsea.png".into()]).remove(0));
    let req = |seed| VlmRequest {
        images: vec![img.clone()],
        system: None,
        prompt: "Describe this image.".into(),
        max_new_tokens: 12,
        seed,
    };
    let out = vlm.generate(&[req(1), req(1), req(2), req(3)]).unwrap();
    assert_eq!(out[0], out[1], "same seed, same text");
    assert!(out.iter().all(|o| o.token_ids.len() <= 12));
    assert!(
        out[0].token_ids != out[2].token_ids || out[0].token_ids != out[3].token_ids,
        "the seed must matter"
    );
    // other model types are named
    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders/clip");
    let e = load_vlm(
        clip.to_str().unwrap(),
        SamplingConfig::default(),
        &Device::Cpu,
    )
    .err()
    .expect("a CLIP folder is not a VLM")
    .to_string();
    assert!(
        e.contains("config.json") && e.contains("\"clip\"") && e.contains("not a supported VLM"),
        "{e}"
    );
}

#[test]
fn load_errors_name_the_file() {
    let src = fixture();
    let copy = || {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&src, tmp.path());
        tmp
    };
    let err = |dir: &Path| {
        Gemma3Vlm::load_dir(dir, "test", greedy(), &Device::Cpu)
            .err()
            .expect("loading must fail")
            .to_string()
    };

    let tmp = copy();
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = err(tmp.path());
    assert_contains_all(&e, &["tokenizer.json", "missing"]);

    let tmp = copy();
    truncate_half(&tmp.path().join("model.safetensors"));
    let e = err(tmp.path());
    assert_contains_all(&e, &["model.safetensors", "truncated"]);

    let tmp = copy();
    std::fs::remove_file(tmp.path().join("processor_config.json")).unwrap();
    let e = err(tmp.path());
    assert!(e.contains("preprocessor_config.json"), "{e}");

    // a tensor missing from the weights is named
    let tmp = copy();
    let w = tmp.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    t.remove("multi_modal_projector.mm_input_projection_weight");
    candle_core::safetensors::save(&t, &w).unwrap();
    let e = err(tmp.path());
    assert_contains_all(&e, &["model.safetensors", "mm_input_projection_weight"]);

    // a config that does not fit the weights
    let tmp = copy();
    edit_json(&tmp.path().join("config.json"), |v| {
        v["mm_tokens_per_image"] = 9.into()
    });
    let e = err(tmp.path());
    assert_contains_all(&e, &["config.json", "mm_tokens_per_image"]);

    // a vocabulary that does not fit the tokenizer (a tokenizer from another checkpoint)
    let tmp = copy();
    edit_json(&tmp.path().join("config.json"), |v| {
        v["text_config"]["vocab_size"] = 10.into()
    });
    let e = err(tmp.path());
    assert_contains_all(&e, &["tokenizer.json", "vocab_size"]);
}

#[test]
fn top_k_of_generation_config_follows_the_repetition_penalty() {
    // generation_config.json's top_k (Gemma 3 ships 64) applies when
    // sampling, after the repetition penalty (transformers' order): with
    // top_k = 1, sampling at any temperature is greedy decoding with the
    // penalty, token for token
    let g = Golden::load();
    let src = fixture();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&src, tmp.path());
    let gc = tmp.path().join("generation_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gc).unwrap()).unwrap();
    assert_eq!(v["top_k"], 64);
    assert_eq!(load(greedy()).top_k(), Some(64));
    v["top_k"] = 1.into();
    std::fs::write(&gc, v.to_string()).unwrap();
    let sampling = SamplingConfig {
        temperature: 1.5,
        top_p: 0.9,
        repetition_penalty: 1.1,
    };
    let mut vlm = Gemma3Vlm::load_dir(tmp.path(), "top-k 1", sampling, &Device::Cpu).unwrap();
    assert_eq!(vlm.top_k(), Some(1));
    let stop = vlm.stop_ids().to_vec();
    let mut differs_from_plain_greedy = false;
    for c in g.cases() {
        let ids = g.input_ids(&c.name);
        let pixels =
            (!c.images.is_empty()).then(|| g.get(&format!("{}.pixel_values", c.name)).clone());
        for seed in [1, 2] {
            let got = vlm.generate_ids(&ids, pixels.as_ref(), 8, seed).unwrap();
            assert_eq!(got, strip_stop(&c.greedy_penalty, &stop), "{}", c.name);
        }
        differs_from_plain_greedy |= c.greedy_penalty != c.greedy;
    }
    assert!(
        differs_from_plain_greedy,
        "the fixture must show the penalty"
    );
}

#[test]
fn half_precision_runs_close_to_f32() {
    // half precision on the CPU (candle has no CPU BF16 matmul; a GPU run
    // would use BF16 through the same code): rounding only
    let g = Golden::load();
    let mut vlm =
        Gemma3Vlm::load_dir_dtype(&fixture(), "fixture", greedy(), &Device::Cpu, DType::F16)
            .unwrap();
    for c in g.cases() {
        let ids = g.input_ids(&c.name);
        let pixels =
            (!c.images.is_empty()).then(|| g.get(&format!("{}.pixel_values", c.name)).clone());
        let logits = vlm.prefill(&ids, pixels.as_ref()).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let e = rel_err(&logits, g.get(&format!("{}.logits", c.name)));
        eprintln!("{}: f16 first-step logits rel. err. = {e:.3e}", c.name);
        assert!(e < 2e-2, "{}: f16 logits rel. err. {e}", c.name);
        let tokens = vlm.generate_ids(&ids, pixels.as_ref(), 4, 0).unwrap();
        assert!(tokens.len() <= 4);
    }
    assert!(Gemma3Vlm::load_dir_dtype(&fixture(), "x", greedy(), &Device::Cpu, DType::U8).is_err());
}

#[test]
fn a_genir_round_runs_through_the_query_writer() {
    // caption -> compare (target, synthetic) -> refine with GenIR's default
    // prompts, as the pipeline calls the VLM role
    use mirgen_workers::roles::TokenBudgets;
    use mirgen_workers::{Prompts, QueryWriter};
    let vlm = load_vlm(
        fixture().to_str().unwrap(),
        SamplingConfig::default(),
        &Device::Cpu,
    )
    .unwrap();
    let mut qw = QueryWriter {
        vlm,
        prompts: Prompts::default(),
        budgets: TokenBudgets {
            caption: 16,
            compare: 12,
            refine: 16,
        },
    };
    let imgs = load_images(&["chelsea.png".into(), "rocket.png".into()]);
    let target = Arc::new(imgs[0].clone());
    let synthetic = Arc::new(imgs[1].clone());
    let cap_req = qw.caption_requests(&[(target.clone(), 11)]);
    let caption = qw.run(&cap_req).unwrap().remove(0);
    assert!(caption.token_ids.len() <= 16);
    assert_eq!(qw.run(&cap_req).unwrap()[0], caption, "deterministic");
    let cmp = qw
        .run(&qw.compare_requests(&[mirgen_workers::roles::CompareItem {
            target: target.clone(),
            synthetic,
            previous_caption: caption.text.clone(),
            seed: 12,
        }]))
        .unwrap()
        .remove(0);
    assert!(cmp.token_ids.len() <= 12);
    let refined = qw
        .run(&qw.refine_requests(&[mirgen_workers::roles::RefineItem {
            target,
            feedback: cmp.text.clone(),
            previous_caption: caption.text.clone(),
            seed: 13,
        }]))
        .unwrap()
        .remove(0);
    assert!(refined.token_ids.len() <= 16);
}

#[test]
fn image_token_count_must_match_the_images() {
    let mut vlm = load(greedy());
    let ids = vlm.prompt_ids(None, "Describe.", 1).unwrap();
    let e = vlm.prefill(&ids, None).unwrap_err().to_string();
    assert_contains_all(&e, &["invalid request", "4 image tokens but 0 image(s)"]);
    // a prompt that spells out an image token
    let img = Arc::new(load_images(&["chelsea.png".into()]).remove(0));
    let e = vlm
        .generate(&[VlmRequest {
            images: vec![img],
            system: None,
            prompt: "what is <image_soft_token>?".into(),
            max_new_tokens: 2,
            seed: 0,
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 image tokens but 1 image(s)"), "{e}");
}
