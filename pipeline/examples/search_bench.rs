//! Exact top-K search timing for `scripts/search_bench.py` (compared with
//! faiss `IndexFlatIP` on the same data in the same run).
//!
//! `search_bench CORPUS.f32 QUERIES.f32 DIM K OUT_IDS.u32 [f32|f16|bf16]`
//! reads raw little-endian f32 matrices, times `FlatIndex::search` (best of
//! 3 runs), writes the top-K ids as raw u32 and prints a JSON line.

use std::time::Instant;

use mirgen::search::{FlatIndex, Storage};

fn read_f32(path: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: search_bench CORPUS.f32 QUERIES.f32 DIM K OUT_IDS.u32 [f32|f16|bf16]");
        std::process::exit(2);
    }
    let dim: usize = args[3].parse().expect("DIM");
    let k: usize = args[4].parse().expect("K");
    let storage = match args.get(6).map(String::as_str).unwrap_or("f32") {
        "f16" => Storage::F16,
        "bf16" => Storage::Bf16,
        _ => Storage::F32,
    };
    let corpus = read_f32(&args[1]);
    let queries = read_f32(&args[2]);
    let t = Instant::now();
    let index = FlatIndex::new(corpus, dim, storage).expect("index");
    let build_s = t.elapsed().as_secs_f64();
    let mut best = f64::INFINITY;
    let mut result = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        result = index.search(&queries, k).expect("search");
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mut out = Vec::with_capacity(result.len() * k * 4);
    for row in &result {
        for &(id, _) in row {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    std::fs::write(&args[5], out).expect("write ids");
    println!(
        "{{\"search_s\": {best:.6}, \"build_s\": {build_s:.6}, \"queries\": {}, \"corpus\": {}, \"dim\": {dim}, \"k\": {k}, \"storage\": \"{storage:?}\", \"index_bytes\": {}}}",
        result.len(),
        index.len,
        index.bytes()
    );
}
