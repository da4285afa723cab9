//! Evaluation: Hits@K per round, cumulative (ChatIR / GenIR: % of targets
//! whose *first* hit, rank < K, came at a round <= t) and per-round (% of
//! targets with a hit at round t), plus mean and median target rank.
//!
//! The denominator is every target, as in ChatIR's `eval.py`
//! (`cumulative_hits_per_round`): a target with no rank at a round (failed
//! row, or missing) counts as a miss there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::PipelineError;

/// One (target, round) rank; `None` = no rank (a miss).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankRow {
    pub target_id: String,
    pub round: i32,
    pub rank: Option<i64>,
}

/// Metrics of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub label: String,
    pub targets: usize,
    pub rounds: usize,
    /// K -> cumulative Hits@K per round (percent).
    pub cumulative: BTreeMap<u32, Vec<f64>>,
    /// K -> per-round Hits@K (percent).
    pub per_round: BTreeMap<u32, Vec<f64>>,
    /// Mean 0-based target rank per round over targets ranked at that round.
    pub mean_rank: Vec<Option<f64>>,
    /// Median 0-based target rank per round.
    pub median_rank: Vec<Option<f64>>,
}

/// Computes the report from ranks. Rounds are 0..=max round seen.
pub fn evaluate(label: &str, rows: &[RankRow], ks: &[u32]) -> EvalReport {
    let rounds = rows
        .iter()
        .map(|r| r.round.max(0) as usize + 1)
        .max()
        .unwrap_or(0);
    let mut by_target: BTreeMap<&str, Vec<Option<i64>>> = BTreeMap::new();
    for r in rows {
        let slots = by_target
            .entry(&r.target_id)
            .or_insert_with(|| vec![None; rounds]);
        if r.round >= 0 {
            slots[r.round as usize] = r.rank;
        }
    }
    let n = by_target.len().max(1) as f64;
    let mut cumulative = BTreeMap::new();
    let mut per_round = BTreeMap::new();
    for &k in ks {
        let hit = |rank: &Option<i64>| rank.is_some_and(|r| r < k as i64);
        let first_hits: Vec<Option<usize>> = by_target
            .values()
            .map(|ranks| ranks.iter().position(hit))
            .collect();
        cumulative.insert(
            k,
            (0..rounds)
                .map(|t| {
                    100.0
                        * first_hits
                            .iter()
                            .filter(|f| f.is_some_and(|f| f <= t))
                            .count() as f64
                        / n
                })
                .collect(),
        );
        per_round.insert(
            k,
            (0..rounds)
                .map(|t| {
                    100.0 * by_target.values().filter(|ranks| hit(&ranks[t])).count() as f64 / n
                })
                .collect(),
        );
    }
    let mut mean_rank = Vec::with_capacity(rounds);
    let mut median_rank = Vec::with_capacity(rounds);
    for t in 0..rounds {
        let mut ranks: Vec<i64> = by_target.values().filter_map(|r| r[t]).collect();
        ranks.sort_unstable();
        if ranks.is_empty() {
            mean_rank.push(None);
            median_rank.push(None);
            continue;
        }
        mean_rank.push(Some(ranks.iter().sum::<i64>() as f64 / ranks.len() as f64));
        let m = ranks.len() / 2;
        median_rank.push(Some(if ranks.len() % 2 == 1 {
            ranks[m] as f64
        } else {
            (ranks[m - 1] + ranks[m]) as f64 / 2.0
        }));
    }
    EvalReport {
        label: label.to_string(),
        targets: by_target.len(),
        rounds,
        cumulative,
        per_round,
        mean_rank,
        median_rank,
    }
}

/// Reads a ranks table: CSV with a header `target_id,round,rank` (empty rank
/// = miss) or a JSON list of `{"target_id", "round", "rank"}`.
pub fn read_ranks_table(path: &str, text: &str) -> Result<Vec<RankRow>, PipelineError> {
    if path.ends_with(".json") {
        return serde_json::from_str(text).map_err(|e| {
            PipelineError::Input(format!(
                "{path}: not a JSON list of {{target_id, round, rank}}: {e}"
            ))
        });
    }
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().unwrap_or_default();
    if header.trim() != "target_id,round,rank" {
        return Err(PipelineError::Input(format!(
            "{path}: the first line must be `target_id,round,rank`, found `{header}`"
        )));
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let bad = |what: &str| {
                PipelineError::Input(format!("{path}: line {}: {what}: `{line}`", i + 2))
            };
            let mut parts = line.rsplitn(3, ',');
            let rank = parts.next().ok_or_else(|| bad("missing rank"))?.trim();
            let round = parts.next().ok_or_else(|| bad("missing round"))?.trim();
            let target = parts.next().ok_or_else(|| bad("missing target_id"))?.trim();
            Ok(RankRow {
                target_id: target.to_string(),
                round: round.parse().map_err(|_| bad("round is not an integer"))?,
                rank: if rank.is_empty() {
                    None
                } else {
                    Some(rank.parse().map_err(|_| bad("rank is not an integer"))?)
                },
            })
        })
        .collect()
}

/// The terminal table of several reports.
pub fn render_table(reports: &[EvalReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!("{} ({} targets)\n", r.label, r.targets));
        out.push_str("round");
        for k in r.cumulative.keys() {
            out.push_str(&format!("  cum@{k:<3}  rnd@{k:<3}"));
        }
        out.push_str("  mean_rank  median_rank\n");
        for t in 0..r.rounds {
            out.push_str(&format!("{t:>5}"));
            for k in r.cumulative.keys() {
                out.push_str(&format!(
                    "  {:>7.2}  {:>7.2}",
                    r.cumulative[k][t], r.per_round[k][t]
                ));
            }
            let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "  {:>9}  {:>11}\n",
                f(r.mean_rank[t]),
                f(r.median_rank[t])
            ));
        }
        out.push('\n');
    }
    out
}

/// An SVG line plot of cumulative Hits@K against the round, one line per run.
pub fn render_svg(reports: &[EvalReport], k: u32) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 400.0, 60.0, 180.0, 30.0, 50.0);
    let rounds = reports.iter().map(|r| r.rounds).max().unwrap_or(1).max(2);
    let x = |t: usize| left + (w - left - right) * t as f64 / (rounds - 1) as f64;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / 100.0);
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Cumulative Hits@{k} by round</text>\n",
        (left + w - right) / 2.0
    );
    for v in (0..=100).step_by(20) {
        let yy = y(v as f64);
        s.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v}</text>\n",
            w - right,
            left - 6.0,
            yy + 4.0
        ));
    }
    for t in 0..rounds {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{t}</text>\n",
            x(t),
            h - bottom + 18.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">round</text>\n",
        (left + w - right) / 2.0,
        h - 12.0
    ));
    for (i, r) in reports.iter().enumerate() {
        let c = colours[i % colours.len()];
        let Some(values) = r.cumulative.get(&k) else {
            continue;
        };
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(t, v)| format!("{:.1},{:.1}", x(t), y(*v)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        let ly = top + 20.0 * i as f64 + 10.0;
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            w - right + 10.0,
            w - right + 30.0,
            w - right + 35.0,
            ly + 4.0,
            xml_escape(&r.label)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Renders an SVG (as made by [`render_svg`]) to PNG bytes at its own size.
/// Labels use the system's fonts (none installed: lines and axes only).
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>, PipelineError> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // fontdb's generic sans-serif is Arial; use a font that is installed
    let installed = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "FreeSans"]
        .into_iter()
        .find(|f| {
            db.faces()
                .any(|face| face.families.iter().any(|(name, _)| name == f))
        })
        .map(str::to_string)
        .or_else(|| {
            db.faces()
                .next()
                .and_then(|f| f.families.first().map(|(n, _)| n.clone()))
        });
    if let Some(family) = installed {
        db.set_sans_serif_family(family);
    }
    let tree = usvg::Tree::from_str(svg, &opt)
        .map_err(|e| PipelineError::Input(format!("plot SVG: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| PipelineError::Input("plot has zero size".into()))?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|e| PipelineError::Input(format!("plot PNG: {e}")))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(data: &[(&str, &[Option<i64>])]) -> Vec<RankRow> {
        data.iter()
            .flat_map(|(t, ranks)| {
                ranks.iter().enumerate().map(move |(r, k)| RankRow {
                    target_id: t.to_string(),
                    round: r as i32,
                    rank: *k,
                })
            })
            .collect()
    }

    #[test]
    fn cumulative_counts_first_hits_over_all_targets() {
        let r = rows(&[
            ("a", &[Some(20), Some(3), Some(50)]),
            ("b", &[Some(0), Some(40), Some(9)]),
            ("c", &[None, Some(11), Some(12)]),
            ("d", &[Some(10), Some(10), Some(4)]),
        ]);
        let rep = evaluate("x", &r, &[1, 10]);
        assert_eq!(rep.cumulative[&10], vec![25.0, 50.0, 75.0]);
        assert_eq!(rep.per_round[&10], vec![25.0, 25.0, 50.0]);
        assert_eq!(rep.cumulative[&1], vec![25.0, 25.0, 25.0]);
        assert_eq!(rep.mean_rank[0], Some(10.0));
        assert_eq!(rep.median_rank[1], Some(10.5));
        let svg = render_svg(std::slice::from_ref(&rep), 10);
        assert!(svg.contains("<polyline") && svg.contains(">x<"));
        let png = image::load_from_memory(&svg_to_png(&svg).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(png.dimensions(), (640, 400));
        // the run's line is drawn in its colour (#1f77b4)
        assert!(png.pixels().any(|p| p.0 == [0x1f, 0x77, 0xb4]));
        assert!(render_table(&[rep]).contains("cum@10"));
    }

    #[test]
    fn ranks_table_errors_name_the_line() {
        let ok = read_ranks_table("r.csv", "target_id,round,rank\na.jpg,0,3\na.jpg,1,\n").unwrap();
        assert_eq!(ok[1].rank, None);
        let e = read_ranks_table("r.csv", "target_id,round,rank\na.jpg,x,3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.csv") && e.contains("line 2"), "{e}");
    }
}
