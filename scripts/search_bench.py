#!/usr/bin/env python3
"""Exact top-K search: mirgen's FlatIndex against faiss IndexFlatIP.

Same machine, same run, same data: a seeded 100k x 256 f32 corpus of unit
vectors and 1,000 unit queries. Prints (and with --json writes) both
timings (best of 3) and whether the top-10 ids are identical.

    python3 -m venv /tmp/faiss && /tmp/faiss/bin/pip install faiss-cpu numpy
    /tmp/faiss/bin/python scripts/search_bench.py                         # candle GEMM
    /tmp/faiss/bin/python scripts/search_bench.py --features openblas     # system OpenBLAS
"""
import argparse, json, os, subprocess, tempfile, time

import numpy as np
import faiss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--storage", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--features", default="", help="cargo features of the mirgen build, e.g. openblas")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((a.n, a.dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)

    index = faiss.IndexFlatIP(a.dim)
    index.add(xb)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        _, faiss_ids = index.search(xq, a.k)
        best = min(best, time.perf_counter() - t)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        cb, qb, ob = (os.path.join(d, f) for f in ("corpus.f32", "queries.f32", "ids.u32"))
        xb.astype("<f4").tofile(cb)
        xq.astype("<f4").tofile(qb)
        cmd = ["cargo", "run", "-q", "-p", "mirgen", "--example", "search_bench"]
        if a.features:
            cmd += ["--features", a.features]
        cmd += ["--",
               cb, qb, str(a.dim), str(a.k), ob, a.storage]
        out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
        mirgen = json.loads(out.strip().splitlines()[-1])
        ours = np.fromfile(ob, dtype="<u4").reshape(a.queries, a.k)

    same_rows = int((ours == faiss_ids).all(axis=1).sum())
    same_sets = int(sum(set(r1) == set(r2) for r1, r2 in zip(ours.tolist(), faiss_ids.tolist())))
    result = {
        "corpus": a.n, "dim": a.dim, "queries": a.queries, "k": a.k, "storage": a.storage,
        "mirgen_features": a.features or "default",
        "mirgen_search_s": mirgen["search_s"], "faiss_search_s": best,
        "speedup_vs_faiss": best / mirgen["search_s"],
        "identical_topk_rows": same_rows, "identical_topk_sets": same_sets,
        "faiss_version": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
