//! The pipeline's retrieval step: one wave's queries against a replicated
//! index, scored row by row with `similarity` (what every row costs without
//! GEMM) and with `CorpusIndex::search_batch` (one GEMM pass plus the exact
//! re-check). Both must return identical results; prints a JSON line each.
//!
//! `cargo run -p mirgen --example wave_search_bench -- [IMAGES DIM VECTORS_PER_IMAGE WAVE WAVES]`
//! (default: 50000 256 1 8 10, COCO 50k with a 256-d BLIP index, window 8).

use std::collections::BTreeMap;
use std::time::Instant;

use mirgen::index::{similarity, CorpusIndex};

/// Seeded unit vectors (SplitMix64 -> uniform -> normalized per `unit`).
fn vectors(n: usize, unit: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut v: Vec<f32> = (0..n * unit).map(|_| next()).collect();
    for row in v.chunks_mut(unit) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().expect("numbers"))
        .collect();
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (images, dim, per_image, wave, waves) = (
        get(0, 50_000),
        get(1, 256),
        get(2, 1),
        get(3, 8),
        get(4, 10),
    );
    let row = dim * per_image;
    let ids: Vec<String> = (0..images).map(|i| format!("img{i:07}")).collect();
    let index = CorpusIndex::new(
        ids.clone(),
        row,
        vectors(images * per_image, dim, 1),
        BTreeMap::new(),
    )
    .with_unit(dim);
    let queries = vectors(wave * waves * per_image, dim, 2);
    let top_k = 10;
    // row by row: every image scored with `similarity`, then a selection
    let t = Instant::now();
    let mut naive = Vec::new();
    for (qi, q) in queries.chunks(row).enumerate() {
        let target = &ids[(qi * 7919) % images];
        let scores: Vec<f32> = index
            .vectors
            .chunks(row)
            .map(|r| similarity(r, q, dim))
            .collect();
        let mut order: Vec<usize> = (0..images).collect();
        order.select_nth_unstable_by(top_k - 1, |&x, &y| {
            scores[y].total_cmp(&scores[x]).then(x.cmp(&y))
        });
        order.truncate(top_k);
        order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
        naive.push((order, index.rank_of(&scores, target)));
    }
    let naive_s = t.elapsed().as_secs_f64();
    // the pipeline: a wave's queries in one search_batch call
    let t = Instant::now();
    let mut batched = Vec::new();
    for (w, chunk) in queries.chunks(row * wave).enumerate() {
        let qs: Vec<(Option<&str>, &[f32])> = chunk
            .chunks(row)
            .enumerate()
            .map(|(j, q)| (Some(ids[((w * wave + j) * 7919) % images].as_str()), q))
            .collect();
        batched.extend(index.search_batch(&qs, top_k));
    }
    let batched_s = t.elapsed().as_secs_f64();
    let identical = naive.iter().zip(&batched).all(|((order, rank), r)| {
        r.ids == order.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>() && r.target_rank == *rank
    });
    let n = queries.len() / row;
    println!(
        "{}",
        serde_json::json!({
            "images": images, "dim": dim, "vectors_per_image": per_image, "wave": wave,
            "queries": n,
            "row_by_row_ms_per_query": naive_s * 1000.0 / n as f64,
            "search_batch_ms_per_query": batched_s * 1000.0 / n as f64,
            "speedup": naive_s / batched_s,
            "identical_results": identical,
        })
    );
    assert!(identical, "search_batch must equal scoring every row");
}
