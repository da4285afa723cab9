//! The Hugging Face dataset card (`README.md` with YAML front matter).

use std::fmt::Write;

use crate::Manifest;

/// What the card needs beyond the manifest.
pub struct CardInput<'a> {
    pub manifest: &'a Manifest,
    /// Pretty name shown on the Hub.
    pub pretty_name: &'a str,
    /// SPDX id or `other` (the licence of the corpus images decides this).
    pub license: &'a str,
    /// Free text about where the corpus images come from and their licences.
    pub corpus_note: &'a str,
    /// True when any model is a smoke-test preset with random weights or a simulation stand-in.
    pub smoke_test: bool,
    /// The prompt templates (name -> text) used by the VLM.
    pub prompts: &'a [(String, String)],
}

/// The features block of the YAML `dataset_info`, in the Hub's card syntax.
fn yaml_features() -> &'static str {
    "  features:
  - name: target_id
    dtype: string
  - name: round
    dtype: int32
  - name: target_image
    dtype: image
  - name: query
    dtype: string
  - name: feedback
    dtype: string
  - name: synthetic_image
    dtype: image
  - name: retrieved_ids
    sequence: string
  - name: retrieved_scores
    sequence: float32
  - name: target_rank
    dtype: int64
  - name: hit_at_10
    dtype: bool
  - name: status
    dtype: string
  - name: error
    dtype: string
  - name: seed
    dtype: uint64
  - name: timings
    struct:
    - name: vlm_ms
      dtype: float32
    - name: generate_ms
      dtype: float32
    - name: embed_ms
      dtype: float32
    - name: search_ms
      dtype: float32
"
}

fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// Renders the dataset card.
pub fn render_card(input: &CardInput) -> String {
    let m = input.manifest;
    let mut out = String::new();
    let mut tags = vec![
        "mental-image-retrieval",
        "multi-round-retrieval",
        "synthetic",
        "mirgen",
    ];
    if input.smoke_test {
        tags.push("smoke-test");
    }
    out.push_str("---\n");
    let _ = writeln!(out, "license: {}", input.license);
    let _ = writeln!(out, "pretty_name: {}", yaml_string(input.pretty_name));
    out.push_str(
        "task_categories:\n- text-to-image\n- image-to-text\n- image-feature-extraction\n",
    );
    out.push_str("tags:\n");
    for t in &tags {
        let _ = writeln!(out, "- {t}");
    }
    let size = match m.stats.rows {
        0..=999 => "n<1K",
        1000..=9_999 => "1K<n<10K",
        10_000..=99_999 => "10K<n<100K",
        100_000..=999_999 => "100K<n<1M",
        _ => "1M<n<10M",
    };
    let _ = writeln!(out, "size_categories:\n- {size}");
    out.push_str("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n");
    out.push_str("dataset_info:\n");
    out.push_str(yaml_features());
    let _ = writeln!(
        out,
        "  splits:\n  - name: train\n    num_bytes: {bytes}\n    num_examples: {}\n  download_size: {bytes}\n  dataset_size: {bytes}",
        m.stats.rows,
        bytes = m.stats.data_bytes
    );
    out.push_str("---\n\n");

    let _ = writeln!(out, "# {}\n", input.pretty_name);
    if input.smoke_test {
        out.push_str(
            "> **Smoke-test dataset.** At least one model of this run is a `tiny` preset with \
             random weights or a `simulation` stand-in (hashed outputs, no model at all): its queries and comparisons are noise and its images are not \
             drawings of anything. It shows the format and the pipeline, not a usable benchmark.\n\n",
        );
    }
    let _ = writeln!(
        out,
        "A multi-round Mental Image Retrieval (MIR) dataset made by mirgen \
         following GenIR (arXiv 2506.06220): for each target image a vision-language model writes \
         a query, a diffusion model draws it, a retrieval encoder ranks the corpus with the \
         drawing, and the VLM compares target and drawing to refine the query. One row per \
         (target, round), rounds 0..={}.\n",
        m.rounds
    );
    out.push_str("## Contents\n\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| targets | {} |", m.stats.targets);
    let _ = writeln!(out, "| rows | {} |", m.stats.rows);
    let _ = writeln!(out, "| failed rows | {} |", m.stats.failed_rows);
    let _ = writeln!(out, "| corpus images | {} |", m.stats.corpus_size);
    let _ = writeln!(
        out,
        "| corpus images that failed to decode | {} |",
        m.stats.corpus_failures.len()
    );
    let _ = writeln!(out, "| seed | {} |", m.seed);
    let _ = writeln!(out, "| config hash | `{}` |", m.config_hash);
    let _ = writeln!(out, "| mirgen version | {} |\n", m.mirgen_version);

    out.push_str("## Hits@K per round\n\nCumulative Hits@K = % of targets whose first hit (rank < K) came at a round <= t (ChatIR/GenIR definition, every target counted); per-round = % with a hit at round t.\n\n");
    out.push_str(
        "| round | Hits@1 | Hits@5 | Hits@10 | per-round Hits@10 |\n|---|---|---|---|---|\n",
    );
    let s = &m.stats;
    let cell = |v: &Vec<f64>, r: usize| {
        v.get(r)
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "-".into())
    };
    for r in 0..s.cumulative_hits_at_10.len() {
        let _ = writeln!(
            out,
            "| {r} | {} | {} | {} | {} |",
            cell(&s.cumulative_hits_at_1, r),
            cell(&s.cumulative_hits_at_5, r),
            cell(&s.cumulative_hits_at_10, r),
            cell(&s.per_round_hits_at_10, r)
        );
    }
    out.push_str("\n## Models\n\n| role | model |\n|---|---|\n");
    for (role, desc) in &m.models {
        let _ = writeln!(out, "| {role} | `{}` |", desc);
    }
    if !input.prompts.is_empty() {
        out.push_str("\n## Prompts\n\n");
        for (name, text) in input.prompts {
            let _ = writeln!(out, "**{name}**\n\n```text\n{text}\n```\n");
        }
    }
    out.push_str("\n## Corpus and licence\n\n");
    let _ = writeln!(out, "{}\n", input.corpus_note);
    out.push_str(
        "## Columns\n\n- `target_id`, `target_image`: the image the user has in mind.\n\
         - `round`: 0..=R. `query`: the text query of this round. `feedback`: the VLM's comparison \
         of the target with the previous round's synthetic image (null at round 0).\n\
         - `synthetic_image`: the diffusion model's drawing of `query`.\n\
         - `retrieved_ids`, `retrieved_scores`: top-K corpus ids by cosine similarity with the drawing.\n\
         - `target_rank`: 0-based rank of the target in the whole corpus; `hit_at_10` = rank < 10.\n\
         - `status`, `error`: `ok`, or `failed` with the reason (the row is kept, not dropped).\n\
         - `seed`: generation seed of the round; `timings`: amortised milliseconds per stage.\n\n\
         ## Loading\n\n```python\nfrom datasets import load_dataset\nds = load_dataset(\"path/or/org/name\", split=\"train\")\n```\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Manifest, RunStats};

    #[test]
    fn card_has_front_matter_and_smoke_warning() {
        let m = Manifest {
            format: crate::manifest::MANIFEST_FORMAT.into(),
            mirgen_version: "0.1.0".into(),
            config_hash: "abc".into(),
            config: serde_json::json!({}),
            models: Default::default(),
            seed: 1,
            rounds: 10,
            data_files: vec![],
            stats: RunStats {
                rows: 22,
                targets: 2,
                cumulative_hits_at_10: vec![50.0],
                per_round_hits_at_10: vec![50.0],
                ..Default::default()
            },
            created_unix: 0,
        };
        let card = render_card(&CardInput {
            manifest: &m,
            pretty_name: "demo",
            license: "other",
            corpus_note: "sample",
            smoke_test: true,
            prompts: &[],
        });
        assert!(card.starts_with("---\nlicense: other\n"));
        assert!(card.contains("num_examples: 22"));
        assert!(card.contains("Smoke-test dataset"));
        assert!(card.contains("- smoke-test"));
        assert!(card.contains("| 0 | - | - | 50.0 | 50.0 |"), "{card}");
    }
}
