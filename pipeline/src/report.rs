//! A static HTML report of a finished dataset: run statistics, the Hits@K
//! plot, and a filmstrip per target (target image, then per round the
//! drawing, query, feedback and rank). Images are written beside the page,
//! so the report opens from disk with no server and no scripts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use mirgen_schemas::{Manifest, Record, RecordStatus};

use crate::commit::rank_rows;
use crate::eval::{evaluate, render_svg};
use crate::PipelineError;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `out_dir/index.html` and `out_dir/img/*`. `max_targets` bounds the
/// filmstrips (a 100k-target dataset does not need 100k of them).
pub fn write_report(
    manifest: &Manifest,
    rows: &[Record],
    out_dir: &Path,
    title: &str,
    max_targets: usize,
) -> Result<(), PipelineError> {
    let io = |e: std::io::Error| {
        PipelineError::Input(format!(
            "cannot write the report to {}: {e}",
            out_dir.display()
        ))
    };
    std::fs::create_dir_all(out_dir.join("img")).map_err(io)?;
    let report = evaluate(title, &rank_rows(rows), &[1, 5, 10]);
    let smoke = manifest.models.values().any(|v| v["smoke_test"] == true);
    let mut by_target: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in rows {
        by_target.entry(&r.target_id).or_default().push(r);
    }
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         .warn{{background:#fff3cd;border:1px solid #e0c36c;padding:8px 12px}} .strip{{display:flex;gap:8px;overflow-x:auto;margin:8px 0 24px}}\
         .card{{flex:0 0 180px;border:1px solid #ddd;padding:6px;font-size:12px}} .card img{{width:168px;height:168px;object-fit:contain;background:#f4f4f4}}\
         .hit{{color:#080;font-weight:bold}} .miss{{color:#a00}} .failed{{background:#fdd}} .q{{max-height:90px;overflow:auto}}</style></head><body>\n\
         <h1>{t}</h1>\n",
        t = esc(title)
    );
    if smoke {
        h.push_str("<p class=\"warn\"><b>Smoke-test dataset:</b> the models are tiny presets with random weights or simulation stand-ins (no model at all); the text is noise and the drawings depict nothing.</p>\n");
    }
    let s = &manifest.stats;
    let _ = writeln!(
        h,
        "<h2>Run</h2><table><tr><th>targets</th><td>{}</td></tr><tr><th>rows</th><td>{}</td></tr><tr><th>failed rows</th><td>{}</td></tr>\
         <tr><th>corpus images</th><td>{}</td></tr><tr><th>unreadable corpus images</th><td>{}</td></tr><tr><th>rounds</th><td>0..={}</td></tr>\
         <tr><th>mode</th><td>{}</td></tr><tr><th>config hash</th><td>{}</td></tr></table>",
        s.targets,
        s.rows,
        s.failed_rows,
        s.corpus_size,
        s.corpus_failures.len(),
        manifest.rounds,
        esc(manifest.config["run"]["mode"].as_str().unwrap_or("genir")),
        esc(&manifest.config_hash)
    );
    h.push_str("<h2>Hits@K</h2>\n");
    h.push_str(&render_svg(std::slice::from_ref(&report), 10));
    h.push_str("<table><tr><th>round</th><th>Hits@1</th><th>Hits@5</th><th>Hits@10</th><th>per-round Hits@10</th><th>median rank</th></tr>\n");
    for t in 0..report.rounds {
        let _ = writeln!(
            h,
            "<tr><td>{t}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
            report.cumulative[&1][t],
            report.cumulative[&5][t],
            report.cumulative[&10][t],
            report.per_round[&10][t],
            report.median_rank[t].map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into())
        );
    }
    h.push_str("</table>\n<h2>Targets</h2>\n");
    for (n, (target, rounds)) in by_target.iter().enumerate() {
        if n >= max_targets {
            let _ = writeln!(
                h,
                "<p>… and {} more targets.</p>",
                by_target.len() - max_targets
            );
            break;
        }
        let _ = writeln!(h, "<h3>{}</h3><div class=\"strip\">", esc(target));
        let base = safe_name(target);
        if let Some(cell) = rounds.iter().find_map(|r| r.target_image.as_ref()) {
            let ext = cell.path.rsplit('.').next().unwrap_or("img");
            let file = format!("img/{base}_target.{}", safe_name(ext));
            std::fs::write(out_dir.join(&file), &cell.bytes).map_err(io)?;
            let _ = writeln!(h, "<div class=\"card\"><img src=\"{file}\" alt=\"target\"><div><b>target</b></div></div>");
        }
        for r in rounds {
            let img = match &r.synthetic_image {
                Some(cell) => {
                    let ext = cell.path.rsplit('.').next().unwrap_or("img");
                    let file = format!("img/{base}_{}.{}", r.round, safe_name(ext));
                    std::fs::write(out_dir.join(&file), &cell.bytes).map_err(io)?;
                    format!("<img src=\"{file}\" alt=\"round {}\">", r.round)
                }
                None => String::new(),
            };
            let rank = match r.target_rank {
                Some(k) if k < 10 => format!("<span class=\"hit\">rank {k}</span>"),
                Some(k) => format!("<span class=\"miss\">rank {k}</span>"),
                None => "no rank".into(),
            };
            let failed = r.status == RecordStatus::Failed;
            let _ = writeln!(
                h,
                "<div class=\"card{}\">{img}<div><b>round {}</b> · {rank}</div><div class=\"q\"><i>query:</i> {}</div>{}{}</div>",
                if failed { " failed" } else { "" },
                r.round,
                esc(r.query.as_deref().unwrap_or("-")),
                r.feedback.as_deref().map(|f| format!("<div class=\"q\"><i>feedback:</i> {}</div>", esc(f))).unwrap_or_default(),
                r.error.as_deref().map(|e| format!("<div><i>error:</i> {}</div>", esc(e))).unwrap_or_default(),
            );
        }
        h.push_str("</div>\n");
    }
    h.push_str("</body></html>\n");
    std::fs::write(out_dir.join("index.html"), h).map_err(io)?;
    Ok(())
}
