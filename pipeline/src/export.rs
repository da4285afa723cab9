//! Exports of a finished dataset to other tools' formats:
//! - `genir`: GenIR's folder layout (`captions/{id}_caption_{r}.txt`,
//!   `generated_images/{id}_{r}.jpg`, `comparisons/{id}_comparison_{r}.txt`,
//!   `dialogues/{id}_dialogue.json`);
//! - `chatir`: ChatIR's dialog JSON (`[{"img": path, "dialog": [11 strings]}]`),
//!   one query per round, so ChatIR's evaluation can score it.

use std::collections::BTreeMap;
use std::path::Path;

use mirgen_schemas::Record;
use mirgen_workers::image_io::{decode_rgb, encode, ImageEncoding};

use crate::PipelineError;

/// GenIR names files by image id: the target id without its extension,
/// folders flattened with `_`.
pub fn genir_id(target_id: &str) -> String {
    let stem = target_id
        .rsplit_once('.')
        .map(|(s, _)| s)
        .unwrap_or(target_id);
    stem.replace(['/', '\\'], "_")
}

fn group(rows: &[Record]) -> BTreeMap<&str, Vec<&Record>> {
    let mut m: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in rows {
        m.entry(&r.target_id).or_default().push(r);
    }
    for v in m.values_mut() {
        v.sort_by_key(|r| r.round);
    }
    m
}

/// Writes GenIR's layout under `out`. Synthetic images are re-encoded as
/// JPEG as GenIR stores them. Returns the number of dialogues written.
pub fn export_genir(rows: &[Record], out: &Path) -> Result<usize, PipelineError> {
    let io = |e: std::io::Error| {
        PipelineError::Input(format!(
            "cannot write the GenIR export to {}: {e}",
            out.display()
        ))
    };
    for d in ["captions", "generated_images", "comparisons", "dialogues"] {
        std::fs::create_dir_all(out.join(d)).map_err(io)?;
    }
    let groups = group(rows);
    for (target, rounds) in &groups {
        let id = genir_id(target);
        let mut dialogue_rounds = Vec::new();
        for (i, r) in rounds.iter().enumerate() {
            let caption = r.query.clone().unwrap_or_default();
            std::fs::write(
                out.join(format!("captions/{id}_caption_{}.txt", r.round)),
                &caption,
            )
            .map_err(io)?;
            let image_path = match &r.synthetic_image {
                Some(cell) => {
                    let img = decode_rgb(&cell.path, &cell.bytes)?;
                    let rel = format!("generated_images/{id}_{}.jpg", r.round);
                    std::fs::write(out.join(&rel), encode(&img, ImageEncoding::Jpeg, 95)?)
                        .map_err(io)?;
                    Some(rel)
                }
                None => None,
            };
            // the comparison made after round r is the feedback of round r + 1
            let comparison = rounds.get(i + 1).and_then(|next| next.feedback.clone());
            if let Some(c) = &comparison {
                std::fs::write(
                    out.join(format!("comparisons/{id}_comparison_{}.txt", r.round)),
                    c,
                )
                .map_err(io)?;
            }
            dialogue_rounds.push(serde_json::json!({
                "round": r.round,
                "caption": caption,
                "generated_image_path": image_path,
                "comparison": comparison,
            }));
        }
        let dialogue = serde_json::json!({"image_id": id, "original_image_path": target, "rounds": dialogue_rounds});
        std::fs::write(
            out.join(format!("dialogues/{id}_dialogue.json")),
            serde_json::to_vec_pretty(&dialogue)?,
        )
        .map_err(io)?;
    }
    Ok(groups.len())
}

/// ChatIR's dialog list: `{"img": target id, "dialog": [query of each round]}`.
pub fn chatir_dialogs(rows: &[Record]) -> serde_json::Value {
    serde_json::Value::Array(
        group(rows)
            .into_iter()
            .map(|(target, rounds)| {
                serde_json::json!({
                    "img": target,
                    "dialog": rounds.iter().map(|r| r.query.clone().unwrap_or_default()).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirgen_schemas::{ImageCell, RecordStatus};

    fn row(t: &str, round: i32) -> Record {
        let img =
            image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 0]));
        let png = encode(&img, ImageEncoding::Png, 90).unwrap();
        let mut r = Record::failed(t, round, 0, String::new());
        r.status = RecordStatus::Ok;
        r.error = None;
        r.query = Some(format!("query {round}"));
        r.feedback = (round > 0).then(|| format!("difference {}", round - 1));
        r.synthetic_image = Some(ImageCell {
            bytes: png,
            path: format!("x_{round}.png"),
        });
        r
    }

    #[test]
    fn genir_layout_matches_the_reference_names() {
        let rows = vec![
            row("unlabeled2017/000000000139.jpg", 0),
            row("unlabeled2017/000000000139.jpg", 1),
        ];
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(export_genir(&rows, dir.path()).unwrap(), 1);
        let id = "unlabeled2017_000000000139";
        assert_eq!(
            std::fs::read_to_string(dir.path().join(format!("captions/{id}_caption_1.txt")))
                .unwrap(),
            "query 1"
        );
        assert_eq!(
            std::fs::read_to_string(
                dir.path()
                    .join(format!("comparisons/{id}_comparison_0.txt"))
            )
            .unwrap(),
            "difference 0"
        );
        assert!(
            !dir.path()
                .join(format!("comparisons/{id}_comparison_1.txt"))
                .exists(),
            "no comparison after the last round"
        );
        let jpg = std::fs::read(dir.path().join(format!("generated_images/{id}_0.jpg"))).unwrap();
        assert_eq!(image::guess_format(&jpg).unwrap(), image::ImageFormat::Jpeg);
        let d: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("dialogues/{id}_dialogue.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(d["original_image_path"], "unlabeled2017/000000000139.jpg");
        assert_eq!(d["rounds"][0]["comparison"], "difference 0");
        assert_eq!(
            d["rounds"][1]["generated_image_path"],
            format!("generated_images/{id}_1.jpg")
        );
        let c = chatir_dialogs(&rows);
        assert_eq!(c[0]["dialog"], serde_json::json!(["query 0", "query 1"]));
        // the ChatIR reader of mirgen accepts its own export
        assert_eq!(
            crate::corpus::parse_target_list("x", &c).unwrap(),
            vec!["unlabeled2017/000000000139.jpg"]
        );
    }
}
