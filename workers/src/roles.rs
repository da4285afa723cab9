//! The query-writer role: GenIR's three prompts (caption, compare, refine)
//! rendered from configurable templates and sent to a [`Vlm`] in batches.

use std::sync::Arc;

use crate::{Result, RgbImage, Vlm, VlmOutput, VlmRequest, WorkerError};

/// Prompt templates. Placeholders: `{max_tokens}` (caption system),
/// `{previous_caption}` (compare, refine), `{comparison_feedback}` (refine).
/// Defaults are GenIR's prompts (`genIR_CaptionImageRefinement.py`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prompts {
    /// System prompt of the round-0 caption call.
    pub caption_system: String,
    /// User prompt of the round-0 caption call (image: the target).
    pub caption_user: String,
    /// Compare call (images: target, then the previous round's synthetic image).
    pub compare: String,
    /// Refine call (image: the target).
    pub refine: String,
    /// Verbal-feedback baseline: the VLM critiques its own caption against
    /// the target, with no image of the caption (image: the target).
    pub critique: String,
}

impl Default for Prompts {
    fn default() -> Self {
        Prompts {
            caption_system: "You are an image captioning assistant that creates concise but detailed descriptions for use in text-to-image diffusion models. Keep your description under {max_tokens} tokens.".into(),
            caption_user: "Generate a detailed, descriptive caption of this image for use as a prompt in a diffusion model. Focus on visual elements, style, composition, colors, and details. Generate ONLY a detailed caption for this image. DO NOT include any introductory text or explanations. The output should be the raw caption text ready for a diffusion model.".into(),
            compare: "Here is the Original caption of the first image: {previous_caption}. Based on the caption someone drew the second image. Compare the content difference between the two images. Only tell me what's the difference. Concise and clear.".into(),
            refine: "I need you to refine the following caption for this image. The caption was used to generate a synthetic version of this image, but the result didn't fully match. Here is the comparison feedback: \n\n{comparison_feedback}\n\nPrevious caption: '{previous_caption}'\n\nPlease provide an improved caption that would help generate an image more similar to the original. Focus on correcting the issues identified in the comparison. Generate ONLY the refined caption, without any explanations or surrounding text.".into(),
            critique: "Here is a caption of this image: {previous_caption}. Compare the caption with the image. Only tell me what the caption misses or gets wrong. Concise and clear.".into(),
        }
    }
}

const ALLOWED: &[(&str, &[&str])] = &[
    ("caption_system", &["max_tokens"]),
    ("caption_user", &[]),
    ("compare", &["previous_caption"]),
    ("refine", &["previous_caption", "comparison_feedback"]),
    ("critique", &["previous_caption"]),
];

impl Prompts {
    /// Checks every `{placeholder}` is one the template can fill.
    pub fn validate(&self) -> Result<()> {
        for (name, allowed) in ALLOWED {
            let text = self.get(name);
            for p in placeholders(text) {
                if !allowed.contains(&p.as_str()) {
                    return Err(WorkerError::Invalid(format!(
                        "prompt `{name}` uses unknown placeholder {{{p}}}; allowed: {}",
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed
                                .iter()
                                .map(|a| format!("{{{a}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    )));
                }
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> &str {
        match name {
            "caption_system" => &self.caption_system,
            "caption_user" => &self.caption_user,
            "compare" => &self.compare,
            "critique" => &self.critique,
            _ => &self.refine,
        }
    }

    /// (name, text) pairs for manifests and the dataset card.
    pub fn named(&self) -> Vec<(String, String)> {
        ALLOWED
            .iter()
            .map(|(n, _)| (n.to_string(), self.get(n).to_string()))
            .collect()
    }
}

fn placeholders(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end)
                if after[..end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && end > 0 =>
            {
                out.push(after[..end].to_string());
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Token budgets of the three calls (GenIR: 500 caption, 400 compare).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenBudgets {
    pub caption: usize,
    pub compare: usize,
    pub refine: usize,
}

impl Default for TokenBudgets {
    fn default() -> Self {
        TokenBudgets {
            caption: 500,
            compare: 400,
            refine: 500,
        }
    }
}

/// Caption / compare / refine over a VLM.
pub struct QueryWriter {
    pub vlm: Box<dyn Vlm>,
    pub prompts: Prompts,
    pub budgets: TokenBudgets,
}

/// Input of one compare call.
pub struct CompareItem {
    pub target: Arc<RgbImage>,
    pub synthetic: Arc<RgbImage>,
    pub previous_caption: String,
    pub seed: u64,
}

/// Input of one refine call.
pub struct RefineItem {
    pub target: Arc<RgbImage>,
    pub feedback: String,
    pub previous_caption: String,
    pub seed: u64,
}

impl QueryWriter {
    pub fn caption_requests(&self, targets: &[(Arc<RgbImage>, u64)]) -> Vec<VlmRequest> {
        let max = self.budgets.caption.to_string();
        targets
            .iter()
            .map(|(img, seed)| VlmRequest {
                images: vec![img.clone()],
                system: Some(render(
                    &self.prompts.caption_system,
                    &[("max_tokens", &max)],
                )),
                prompt: self.prompts.caption_user.clone(),
                max_new_tokens: self.budgets.caption,
                seed: *seed,
            })
            .collect()
    }

    pub fn compare_requests(&self, items: &[CompareItem]) -> Vec<VlmRequest> {
        items
            .iter()
            .map(|i| VlmRequest {
                images: vec![i.target.clone(), i.synthetic.clone()],
                system: None,
                prompt: render(
                    &self.prompts.compare,
                    &[("previous_caption", &i.previous_caption)],
                ),
                max_new_tokens: self.budgets.compare,
                seed: i.seed,
            })
            .collect()
    }

    /// Verbal feedback: critique `previous_caption` against the target (the
    /// items' `feedback` is unused).
    pub fn critique_requests(&self, items: &[RefineItem]) -> Vec<VlmRequest> {
        items
            .iter()
            .map(|i| VlmRequest {
                images: vec![i.target.clone()],
                system: None,
                prompt: render(
                    &self.prompts.critique,
                    &[("previous_caption", &i.previous_caption)],
                ),
                max_new_tokens: self.budgets.compare,
                seed: i.seed,
            })
            .collect()
    }

    pub fn refine_requests(&self, items: &[RefineItem]) -> Vec<VlmRequest> {
        items
            .iter()
            .map(|i| VlmRequest {
                images: vec![i.target.clone()],
                system: None,
                prompt: render(
                    &self.prompts.refine,
                    &[
                        ("comparison_feedback", &i.feedback),
                        ("previous_caption", &i.previous_caption),
                    ],
                ),
                max_new_tokens: self.budgets.refine,
                seed: i.seed,
            })
            .collect()
    }

    pub fn run(&mut self, requests: &[VlmRequest]) -> Result<Vec<VlmOutput>> {
        self.vlm.generate(requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prompts_are_genir_and_valid() {
        let p = Prompts::default();
        p.validate().unwrap();
        assert!(
            p.refine.contains("{comparison_feedback}") && p.compare.contains("{previous_caption}")
        );
        let bad = Prompts {
            compare: "diff {caption}".into(),
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("compare") && e.contains("{caption}") && e.contains("{previous_caption}"),
            "{e}"
        );
        assert_eq!(render("a {x} b {y}", &[("x", "1"), ("y", "2")]), "a 1 b 2");
    }
}
