//! Parity of mirgen's Qwen3-VL VLM (`Qwen3VLForConditionalGeneration`) with
//! transformers, on the tiny random checkpoint of
//! `workers/tests/fixtures/vlm/qwen3vl/` (made by
//! `scripts/fixtures/make_qwen3vl_fixtures.py`; see its `golden.json`):
//! pixel values and image grids, prompt ids, M-RoPE positions, image and
//! DeepStack features, first-step logits and greedy tokens (with and without
//! a repetition penalty) for a prompt with one image (and a system text), two
//! images and none; the KV cache against a full recomputation; `load_vlm`
//! dispatch; load errors that name the file.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use mirgen_workers::vlms::load_vlm;
use mirgen_workers::vlms::qwen3vl::Qwen3VlVlm;
use mirgen_workers::{RgbImage, SamplingConfig, VlmRequest};

mod common;
use common::{
    argmax, assert_contains_all, copy_dir, fixture_dir, greedy, load_images, max_abs_diff, rel_err,
    strip_stop, truncate_half, Golden,
};

fn fixture() -> PathBuf {
    fixture_dir("vlm/qwen3vl")
}

impl Golden {
    fn load() -> Golden {
        Golden::load_from(&fixture())
    }

    fn grids(&self, case: &str) -> Vec<[usize; 3]> {
        self.get(&format!("{case}.image_grid_thw"))
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
            .collect()
    }
}

fn load(sampling: SamplingConfig) -> Qwen3VlVlm {
    Qwen3VlVlm::load_dir(&fixture(), "fixture", sampling, &Device::Cpu).unwrap()
}

#[test]
fn pixel_values_and_grids_match() {
    let g = Golden::load();
    let vlm = load(greedy());
    let mut checked = 0;
    for c in g.cases().iter().filter(|c| !c.images.is_empty()) {
        let imgs = load_images(&c.images);
        let refs: Vec<&RgbImage> = imgs.iter().collect();
        let (ours, grids) = vlm.pixel_values(&refs).unwrap();
        assert_eq!(grids, g.grids(&c.name), "{}: image_grid_thw", c.name);
        let d = max_abs_diff(&ours, g.get(&format!("{}.pixel_values", c.name)));
        eprintln!(
            "{}: pixel values max |ours - transformers| = {d:.3e}",
            c.name
        );
        assert!(d < 1e-5, "{}: pixel values differ by {d}", c.name);
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn prompts_and_positions_match_the_processor() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    for c in g.cases() {
        let grids = if c.images.is_empty() {
            vec![]
        } else {
            g.grids(&c.name)
        };
        let n: Vec<usize> = grids.iter().map(|g| g[1] * g[2] / 4).collect();
        let expanded = vlm
            .prompt_format()
            .render(c.system.as_deref(), &c.prompt, &n);
        // the template text transformers rendered, each image expanded as
        // Qwen3VLProcessor expands it
        let mut want = c.text.clone();
        for k in &n {
            want = want.replacen(
                "<|image_pad|><|vision_end|>",
                &format!("{}<|vision_end|>", "<|IMG|>".repeat(*k)),
                1,
            );
        }
        assert_eq!(
            expanded,
            want.replace("<|IMG|>", "<|image_pad|>"),
            "{}: prompt text",
            c.name
        );
        let ids = vlm
            .prompt_ids(c.system.as_deref(), &c.prompt, &grids)
            .unwrap();
        assert_eq!(ids, g.input_ids(&c.name), "{}: input ids", c.name);
        if !grids.is_empty() {
            let pos = vlm.model().rope_index(&ids, &grids).unwrap();
            let want: Vec<Vec<i64>> = g
                .get(&format!("{}.position_ids", c.name))
                .to_vec2()
                .unwrap();
            for axis in 0..3 {
                let ours: Vec<i64> = pos.iter().map(|p| p[axis] as i64).collect();
                assert_eq!(
                    ours, want[axis],
                    "{}: M-RoPE positions, axis {axis}",
                    c.name
                );
            }
        }
    }
}

#[test]
fn image_and_deepstack_features_match() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    for c in g.cases().iter().filter(|c| !c.images.is_empty()) {
        let px = g.get(&format!("{}.pixel_values", c.name));
        let out = vlm.model().image_features(px, &g.grids(&c.name)).unwrap();
        let e = rel_err(&out.embeds, g.get(&format!("{}.image_features", c.name)));
        eprintln!("{}: image features rel. err {e:.3e}", c.name);
        assert!(e < 1e-4, "{}: image features rel. err {e}", c.name);
        assert_eq!(out.deepstack.len(), 2);
        for (i, f) in out.deepstack.iter().enumerate() {
            let e = rel_err(f, g.get(&format!("{}.deepstack.{i}", c.name)));
            eprintln!("{}: deepstack {i} rel. err {e:.3e}", c.name);
            assert!(e < 1e-4, "{}: deepstack {i} rel. err {e}", c.name);
        }
    }
}

#[test]
fn first_step_logits_match() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    for c in g.cases() {
        let ids = g.input_ids(&c.name);
        let logits = if c.images.is_empty() {
            vlm.prefill(&ids, None).unwrap()
        } else {
            let grids = g.grids(&c.name);
            let px = g.get(&format!("{}.pixel_values", c.name)).clone();
            vlm.prefill(&ids, Some((&px, &grids))).unwrap()
        };
        let want = g.get(&format!("{}.logits", c.name));
        let e = rel_err(&logits, want);
        eprintln!("{}: first-step logits rel. err {e:.3e}", c.name);
        assert!(e < 1e-3, "{}: logits rel. err {e}", c.name);
        assert_eq!(argmax(&logits), argmax(want), "{}: argmax", c.name);
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    let stop = vlm.stop_ids().to_vec();
    let mut with_penalty = load(SamplingConfig {
        repetition_penalty: 1.1,
        ..greedy()
    });
    for c in g.cases() {
        let imgs: Vec<Arc<RgbImage>> = load_images(&c.images).into_iter().map(Arc::new).collect();
        let req = VlmRequest {
            images: imgs,
            system: c.system.clone(),
            prompt: c.prompt.clone(),
            max_new_tokens: c.greedy.len(),
            seed: 7,
        };
        let out = mirgen_workers::Vlm::generate(&mut vlm, std::slice::from_ref(&req)).unwrap();
        assert_eq!(
            out[0].token_ids,
            strip_stop(&c.greedy, &stop),
            "{}: greedy tokens",
            c.name
        );
        assert_eq!(out[0].text, c.greedy_text, "{}: greedy text", c.name);
        let out = mirgen_workers::Vlm::generate(&mut with_penalty, &[req]).unwrap();
        assert_eq!(
            out[0].token_ids,
            strip_stop(&c.greedy_penalty, &stop),
            "{}: greedy tokens with repetition penalty 1.1",
            c.name
        );
    }
}

#[test]
fn kv_cache_steps_equal_a_full_recomputation() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    let c = &g.cases()[0];
    let ids = g.input_ids(&c.name);
    let grids = g.grids(&c.name);
    let px = g.get(&format!("{}.pixel_values", c.name)).clone();
    // prompt + 2 greedy tokens through the cache, then the same as one prefill
    vlm.prefill(&ids, Some((&px, &grids))).unwrap();
    let t1 = c.greedy[0];
    let t2 = c.greedy[1];
    vlm.model().step(t1).unwrap();
    let cached = vlm.model().step(t2).unwrap();
    // text positions after the prompt continue at its largest position + 1:
    // a full recomputation with those positions is the same computation
    let mut all = ids.clone();
    all.extend([t1, t2]);
    let mut pos = vlm.model().rope_index(&ids, &grids).unwrap();
    let next = pos.iter().map(|p| p[0].max(p[1]).max(p[2])).max().unwrap() + 1;
    pos.extend([[next; 3], [next + 1; 3]]);
    let feats = vlm.model().image_features(&px, &grids).unwrap();
    let full = vlm.model().prefill(&all, &pos, Some(&feats)).unwrap();
    let e = rel_err(&cached, &full);
    eprintln!("KV cache vs full recomputation: rel. err {e:.3e}");
    assert!(e < 1e-5, "rel. err {e}");
}

#[test]
fn load_vlm_dispatches_qwen3_vl() {
    let mut vlm = load_vlm(fixture().to_str().unwrap(), greedy(), &Device::Cpu).unwrap();
    let info = vlm.info();
    assert_eq!(info.architecture, "qwen3_vl");
    assert!(info.smoke_test, "the fixture carries RANDOM_WEIGHTS.md");
    let g = Golden::load();
    let c = &g.cases()[1];
    let out = vlm
        .generate(&[VlmRequest {
            images: load_images(&c.images).into_iter().map(Arc::new).collect(),
            system: None,
            prompt: c.prompt.clone(),
            max_new_tokens: c.greedy.len(),
            seed: 1,
        }])
        .unwrap();
    assert_eq!(out[0].token_ids, strip_stop(&c.greedy, &[]));
}

#[test]
fn load_errors_name_the_file() {
    let tmp = std::env::temp_dir().join(format!("mirgen-qwen3vl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(&fixture(), &tmp);
    // truncated weights
    let w = tmp.join("model.safetensors");
    let bytes = truncate_half(&w);
    let e = Qwen3VlVlm::load_dir(&tmp, "tmp", greedy(), &Device::Cpu)
        .err()
        .expect("truncated weights must fail")
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&w, &bytes).unwrap();
    // no tokenizer.json
    std::fs::remove_file(tmp.join("tokenizer.json")).unwrap();
    let e = Qwen3VlVlm::load_dir(&tmp, "tmp", greedy(), &Device::Cpu)
        .err()
        .expect("a missing tokenizer must fail")
        .to_string();
    assert_contains_all(&e, &["tokenizer.json", "missing"]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn reads_the_image_processor_from_processor_config_json() {
    // transformers 5 saves the image processor inside processor_config.json
    let tmp = std::env::temp_dir().join(format!("mirgen-qwen3vl-proc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(&fixture(), &tmp);
    std::fs::remove_file(tmp.join("preprocessor_config.json")).unwrap();
    let pre: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    let proc = serde_json::json!({"image_processor": pre, "processor_class": "Qwen3VLProcessor"});
    std::fs::write(tmp.join("processor_config.json"), proc.to_string()).unwrap();
    let vlm = Qwen3VlVlm::load_dir(&tmp, "tmp", greedy(), &Device::Cpu).unwrap();
    assert_eq!(vlm.processor(), load(greedy()).processor());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn image_tokens_must_match_the_images() {
    let g = Golden::load();
    let mut vlm = load(greedy());
    let ids = g.input_ids("one_image");
    let px = g.get("two_images.pixel_values").clone();
    let grids = g.grids("two_images");
    let e = vlm
        .prefill(&ids, Some((&px, &grids)))
        .expect_err("8 image tokens for 2 images of 14 tokens must fail")
        .to_string();
    assert_contains_all(&e, &["8 image tokens", "14"]);
    let e = vlm.prefill(&ids, None).unwrap_err().to_string();
    assert!(e.contains("8 image tokens"), "{e}");
}
