"""Recall@10 and latency of IVF-Flat by nlist and nprobe on bench/query.py's harder mixture.

    .venv/bin/python bench/nprobe_sweep.py 128:100000 512:100000

Arguments are DIM:N pairs. This sweep set IVF_SCAN_VECTORS in index/vectors.py: with 2000
Zipf-sized clusters, recall follows the number of vectors scanned, not the number of lists.
"""

import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import query as qb  # noqa: E402

from index.vectors import _nlist  # noqa: E402


def _p50_ms(index, queries) -> float:
    times = []
    for q in queries[:100]:
        started = time.perf_counter()
        index.search(q[None], 10)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    faiss.omp_set_num_threads(2)
    for dim, n in ((int(a), int(b)) for a, b in (x.split(":") for x in sys.argv[1:])):
        qb.DIM = dim
        data, _ = qb.library_vectors(n, 0)
        queries = qb.query_vectors(n, 0, 200)
        flat = faiss.IndexFlatIP(dim)
        flat.add(data)
        _, truth = flat.search(queries, 10)
        print(f"dim {dim} n {n:,} Flat p50 {_p50_ms(flat, queries):.2f} ms", flush=True)
        for lists in (_nlist(n), 2 * _nlist(n)):
            ivf = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            ivf.train(data[rng.choice(n, min(n, max(100_000, 40 * lists)), replace=False)])
            ivf.add(data)
            for nprobe in (8, 16, 32, 64):
                ivf.nprobe = nprobe
                _, found = ivf.search(queries, 10)
                recall = [len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]
                print(f"  IVF{lists} nprobe {nprobe}: recall {np.mean(recall):.3f} (min "
                      f"{np.min(recall):.1f}) p50 {_p50_ms(ivf, queries):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
