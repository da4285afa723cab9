//! Exact batched top-K by inner product: queries x corpus as one matrix
//! product per block (candle's multi-threaded GEMM, or the system OpenBLAS
//! with the `openblas` feature), then a bounded selection per query row
//! while the block is in cache. This is `IndexFlatIP` in faiss terms;
//! `scripts/search_bench.py` compares the two on the same data.
//!
//! The `gemm` crate behind candle has no AVX-512 kernels on stable Rust, so
//! on AVX-512 machines the `openblas` feature (link `libopenblas`, Debian's
//! `libopenblas-dev`) is what matches faiss (which bundles OpenBLAS).

use candle_core::{DType, Device, Tensor};

use crate::PipelineError;

/// Vectors stored for search: f32, or half precision to halve memory
/// (scores are always computed in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    F16,
    Bf16,
}

impl Storage {
    fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16 => DType::F16,
            Storage::Bf16 => DType::BF16,
        }
    }
}

#[cfg(feature = "openblas")]
mod blas {
    pub const ROW_MAJOR: i32 = 101;
    pub const NO_TRANS: i32 = 111;
    pub const TRANS: i32 = 112;
    #[link(name = "openblas")]
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            layout: i32,
            transa: i32,
            transb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        pub fn openblas_set_num_threads(n: i32);
        pub fn openblas_get_num_threads() -> i32;
    }
}

/// A flat inner-product index: N vectors of `dim` floats.
pub struct FlatIndex {
    /// (N, dim) in the storage dtype.
    vectors: Tensor,
    /// The same vectors as plain f32 rows (f32 storage with the BLAS path).
    #[cfg(feature = "openblas")]
    raw: Vec<f32>,
    storage: Storage,
    pub len: usize,
    pub dim: usize,
}

/// Queries x corpus rows per matrix product (candle path): a 1024 x 4096
/// score block, scanned right after it is made.
const QUERY_BLOCK: usize = 1024;
const CORPUS_BLOCK: usize = 4096;
/// Corpus rows per single-threaded BLAS block: a 1024 x 512 score block
/// (2 MiB) stays in the core's L2 while it is selected.
#[cfg(feature = "openblas")]
const BLAS_CORPUS_BLOCK: usize = 512;

fn err(e: candle_core::Error) -> PipelineError {
    PipelineError::Input(format!("search: {e}"))
}

impl FlatIndex {
    /// Takes row-major `len x dim` vectors.
    pub fn new(vectors: Vec<f32>, dim: usize, storage: Storage) -> Result<Self, PipelineError> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(PipelineError::Input(format!(
                "search: {} floats is not a whole number of {dim}-d vectors",
                vectors.len()
            )));
        }
        let len = vectors.len() / dim;
        #[cfg(feature = "openblas")]
        let (raw, vectors) = match storage {
            Storage::F32 => (vectors, Vec::new()),
            _ => (Vec::new(), vectors),
        };
        #[cfg(feature = "openblas")]
        let t = if storage == Storage::F32 {
            Tensor::zeros((0, dim), DType::F32, &Device::Cpu)
        } else {
            Tensor::from_vec(vectors, (len, dim), &Device::Cpu)
        };
        #[cfg(not(feature = "openblas"))]
        let t = Tensor::from_vec(vectors, (len, dim), &Device::Cpu);
        let t = t.map_err(err)?.to_dtype(storage.dtype()).map_err(err)?;
        Ok(FlatIndex {
            vectors: t,
            #[cfg(feature = "openblas")]
            raw,
            storage,
            len,
            dim,
        })
    }

    /// Bytes held by the stored vectors.
    pub fn bytes(&self) -> usize {
        self.len * self.dim * self.storage.dtype().size_in_bytes()
    }

    /// The best `k` (row, score) per query, best first; ties go to the lower row.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>, PipelineError> {
        if !queries.len().is_multiple_of(self.dim) {
            return Err(PipelineError::Input(format!(
                "search: queries are not {}-d vectors",
                self.dim
            )));
        }
        let nq = queries.len() / self.dim;
        let mut best: Vec<Vec<(u32, f32)>> = vec![Vec::with_capacity(k + 1); nq];
        #[cfg(feature = "openblas")]
        if self.storage == Storage::F32 {
            return Ok(self.search_blas(queries, nq, k));
        }
        for (qb, block) in queries.chunks(QUERY_BLOCK * self.dim).enumerate() {
            let rows = block.len() / self.dim;
            let q = Tensor::from_slice(block, (rows, self.dim), &Device::Cpu).map_err(err)?;
            let mut start = 0;
            while start < self.len {
                let take = CORPUS_BLOCK.min(self.len - start);
                let part = self.vectors.narrow(0, start, take).map_err(err)?;
                let part = match self.storage {
                    Storage::F32 => part,
                    _ => part.to_dtype(DType::F32).map_err(err)?,
                };
                // (rows, take) scores of this block, read in place
                let scores = q.matmul(&part.t().map_err(err)?).map_err(err)?;
                let (storage, layout) = scores.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    return Err(PipelineError::Input("search runs on the CPU".into()));
                };
                let all = cpu.as_slice::<f32>().map_err(err)?;
                let all = &all[layout.start_offset()..layout.start_offset() + rows * take];
                let out = &mut best[qb * QUERY_BLOCK..qb * QUERY_BLOCK + rows];
                select_block(out, all, take, start, k);
                start += take;
            }
        }
        Ok(best)
    }
}

#[cfg(feature = "openblas")]
impl FlatIndex {
    /// Each core takes a contiguous range of corpus rows and runs
    /// single-threaded GEMM + selection on its own blocks (no barrier per
    /// block, scores selected while still in that core's cache); the cores'
    /// lists are merged at the end.
    fn search_blas(&self, queries: &[f32], nq: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(self.len.div_ceil(BLAS_CORPUS_BLOCK))
            .max(1);
        let per = self.len.div_ceil(threads);
        // SAFETY: plain FFI calls into OpenBLAS' thread-count setters.
        let saved = unsafe { blas::openblas_get_num_threads() };
        unsafe { blas::openblas_set_num_threads(1) };
        let partial: Vec<Vec<Vec<(u32, f32)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (lo, hi) = (t * per, ((t + 1) * per).min(self.len));
                    s.spawn(move || {
                        let mut best: Vec<Vec<(u32, f32)>> = vec![Vec::with_capacity(k + 1); nq];
                        let mut scratch = Vec::new();
                        for (qb, block) in queries.chunks(QUERY_BLOCK * self.dim).enumerate() {
                            let rows = block.len() / self.dim;
                            let mut start = lo;
                            while start < hi {
                                let take = BLAS_CORPUS_BLOCK.min(hi - start);
                                scratch.resize(rows * take, 0.0f32);
                                // SAFETY: the slices hold rows x dim, take x dim and rows x take floats.
                                unsafe {
                                    blas::cblas_sgemm(
                                        blas::ROW_MAJOR,
                                        blas::NO_TRANS,
                                        blas::TRANS,
                                        rows as i32,
                                        take as i32,
                                        self.dim as i32,
                                        1.0,
                                        block.as_ptr(),
                                        self.dim as i32,
                                        self.raw[start * self.dim..].as_ptr(),
                                        self.dim as i32,
                                        0.0,
                                        scratch.as_mut_ptr(),
                                        take as i32,
                                    );
                                }
                                for r in 0..rows {
                                    merge_top_k(
                                        &mut best[qb * QUERY_BLOCK + r],
                                        &scratch[r * take..(r + 1) * take],
                                        start as u32,
                                        k,
                                    );
                                }
                                start += take;
                            }
                        }
                        best
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("search thread"))
                .collect()
        });
        unsafe { blas::openblas_set_num_threads(saved) };
        (0..nq)
            .map(|q| {
                let mut all: Vec<(u32, f32)> =
                    partial.iter().flat_map(|p| p[q].iter().copied()).collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                all.truncate(k);
                all
            })
            .collect()
    }
}

/// Folds a (rows, take) block of scores for corpus rows `start..` into the
/// rows' running best-`k` lists, rows split over the cores.
fn select_block(out: &mut [Vec<(u32, f32)>], all: &[f32], take: usize, start: usize, k: usize) {
    let rows = out.len();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows);
    let per = rows.div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for (ci, outs) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (j, o) in outs.iter_mut().enumerate() {
                    let r = ci * per + j;
                    merge_top_k(o, &all[r * take..(r + 1) * take], start as u32, k);
                }
            });
        }
    });
}

/// Folds one block of scores (rows `offset..`) into a running best-`k` list.
fn merge_top_k(best: &mut Vec<(u32, f32)>, scores: &[f32], offset: u32, k: usize) {
    if k == 0 {
        return;
    }
    let insert = |best: &mut Vec<(u32, f32)>, i: usize, s: f32| {
        if best.len() == k {
            // equal scores keep the earlier row
            if s <= best[k - 1].1 || s.is_nan() {
                return;
            }
        }
        let at = best.partition_point(|&(_, b)| b >= s);
        best.insert(at, (offset + i as u32, s));
        best.truncate(k);
    };
    // Once the list is full almost no score beats its worst: test 32 at a
    // time with a vectorised max and look closer only when one does.
    const LANES: usize = 32;
    let mut i = 0;
    while i < scores.len() {
        let end = (i + LANES).min(scores.len());
        let chunk = &scores[i..end];
        if best.len() == k {
            let mut mx = f32::NEG_INFINITY;
            for &s in chunk {
                mx = if s > mx { s } else { mx };
            }
            if mx <= best[k - 1].1 {
                i = end;
                continue;
            }
        }
        for (j, &s) in chunk.iter().enumerate() {
            insert(best, i + j, s);
        }
        i = end;
    }
}

/// The `k` best of one score row, best first (ties: lower row first).
pub fn top_k_row(scores: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best = Vec::with_capacity(k + 1);
    merge_top_k(&mut best, scores, 0, k);
    best
}

/// `dst (m x n) = lhs (m x k) . rhs (n x k)^T`, all row-major f32, on the
/// calling thread (the caller is already one of the dataflow's workers).
pub fn gemm_nt(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    assert!(lhs.len() >= m * k && rhs.len() >= n * k && dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    // SAFETY: the asserts above bound every element the strides address:
    // lhs[i * k + p], rhs[j * k + p] and dst[i * n + j] for i < m, j < n, p < k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(corpus: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<u32> {
        let mut s: Vec<(u32, f32)> = corpus
            .chunks(dim)
            .enumerate()
            .map(|(i, r)| (i as u32, r.iter().zip(q).map(|(a, b)| a * b).sum()))
            .collect();
        s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        s.truncate(k);
        s.into_iter().map(|x| x.0).collect()
    }

    #[test]
    fn flat_search_matches_brute_force() {
        let (n, dim, nq) = (3000, 16, 300);
        let val = |i: usize| {
            let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let corpus: Vec<f32> = (0..n * dim).map(val).collect();
        let queries: Vec<f32> = (0..nq * dim).map(|i| val(i + 7_777_777)).collect();
        let idx = FlatIndex::new(corpus.clone(), dim, Storage::F32).unwrap();
        let got = idx.search(&queries, 10).unwrap();
        assert_eq!(got.len(), nq);
        for (qi, row) in got.iter().enumerate() {
            let q = &queries[qi * dim..(qi + 1) * dim];
            let ids: Vec<u32> = row.iter().map(|x| x.0).collect();
            assert_eq!(ids, brute(&corpus, dim, q, 10), "query {qi}");
        }
        let half = FlatIndex::new(corpus, dim, Storage::F16).unwrap();
        assert_eq!(half.bytes(), n * dim * 2);
        let got16 = half.search(&queries[..dim], 10).unwrap();
        let overlap = got16[0]
            .iter()
            .filter(|x| got[0].iter().any(|y| y.0 == x.0))
            .count();
        assert!(
            overlap >= 8,
            "f16 storage keeps most of the top-10: {overlap}"
        );
    }

    #[test]
    fn top_k_row_keeps_order_and_ties() {
        let r = top_k_row(&[0.1, 0.9, 0.5, 0.9, -1.0, 0.7], 3);
        assert_eq!(r, vec![(1, 0.9), (3, 0.9), (5, 0.7)]);
        assert!(top_k_row(&[1.0], 0).is_empty());
        assert_eq!(top_k_row(&[1.0, 2.0], 5).len(), 2);
    }
}
