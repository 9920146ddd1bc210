"""Which FAISS index at which library size: build time, latency, QPS, recall@10, bytes/vector.

    python bench/index_choice.py                       # 10k and 100k
    python bench/index_choice.py --sizes 10000,100000,1000000 --json-out /tmp/index_choice.json

Vectors are 512-d unit vectors from an anisotropic Gaussian mixture with a shared offset (the
"cone" real CLIP embeddings sit in); uniform random vectors defeat every ANN index and say
nothing about real libraries. Queries come from the same mixture with extra noise (a text query
is never one of the stored image vectors). Recall@10 is measured against exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

DIM = 512


def mixture(n: int, *, clusters: int, seed: int, noise: float = 0.6) -> np.ndarray:
    """n unit vectors: cluster centre + anisotropic noise + a shared offset, normalised."""
    rng = np.random.default_rng(seed)
    centres_rng = np.random.default_rng(1234)  # same clusters for data and queries
    centres = centres_rng.standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offset = centres_rng.standard_normal(DIM).astype(np.float32)
    offset *= 1.2 / np.linalg.norm(offset)
    spectrum = (1.0 / np.sqrt(1 + np.arange(DIM))).astype(np.float32)  # decaying variances
    spectrum *= noise / np.linalg.norm(spectrum)  # the noise vector has norm ≈ `noise`
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        labels = rng.integers(0, clusters, m)
        x = centres[labels] + rng.standard_normal((m, DIM)).astype(np.float32) * spectrum
        x += offset
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


@dataclass
class Row:
    n: int
    index: str
    knob: str
    build_s: float
    p50_ms: float
    p95_ms: float
    batch_qps: float
    recall10: float
    bytes_per_vector: float


def _latencies(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def _bytes_per_vector(index: faiss.Index, n: int) -> float:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as fh:
        faiss.write_index(index, fh.name)
        return os.path.getsize(fh.name) / n


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def _measure(n, name, knob, index, build_s, queries, truth, k=10) -> Row:
    p50, p95 = _latencies(index, queries[:200], k)
    t = time.perf_counter()
    _, found = index.search(queries, k)
    qps = len(queries) / (time.perf_counter() - t)
    return Row(n, name, knob, round(build_s, 2), round(p50, 3), round(p95, 3), round(qps, 1),
               round(_recall(found, truth), 4), round(_bytes_per_vector(index, n), 1))


def _build(factory: str, data: np.ndarray) -> tuple[faiss.Index, float]:
    t = time.perf_counter()
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = data[np.random.default_rng(0).choice(len(data), min(len(data), 100_000),
                                                      replace=False)]
        index.train(sample)
    index.add(data)
    return index, time.perf_counter() - t


def run_size(n: int, *, queries_n: int, hnsw_ms: list[int]) -> list[Row]:
    data = mixture(n, clusters=max(50, n // 1000), seed=1)
    queries = mixture(queries_n, clusters=max(50, n // 1000), seed=2, noise=0.75)
    rows = []
    flat, build = _build("Flat", data)
    _, truth = flat.search(queries, 10)
    rows.append(_measure(n, "Flat", "-", flat, build, queries, truth))
    print(_fmt(rows[-1]), flush=True)
    del flat
    nlist = 1 << int(round(np.log2(4 * np.sqrt(n))))  # the library's rule (index/vectors.py)
    for lists in (nlist // 2, nlist, nlist * 2):
        ivf, build = _build(f"IVF{lists},Flat", data)
        for nprobe in (4, 8, 16, 32, 64):
            ivf.nprobe = nprobe
            rows.append(_measure(n, f"IVF{lists},Flat", f"nprobe={nprobe}", ivf, build, queries,
                                 truth))
            print(_fmt(rows[-1]), flush=True)
        del ivf
    # 4-bit fast-scan PQ: IVF512,PQ64 with 8-bit codes spent 69 s *training* on 10k vectors
    # here (x4fs: 1.2 s), and fast-scan searches faster too
    for m in (32, 64):
        pq, build = _build(f"IVF{nlist},PQ{m}x4fs", data)
        refined = faiss.IndexRefineFlat(pq, faiss.swig_ptr(data))  # exact re-ranking
        for nprobe, factor in ((16, 1), (16, 10), (32, 10)):
            pq.nprobe, refined.k_factor = nprobe, factor
            target = pq if factor == 1 else refined
            label = f"nprobe={nprobe}" + (f",rerank×{factor}" if factor > 1 else "")
            row = _measure(n, f"IVF{nlist},PQ{m}x4fs", label, target, build, queries, truth)
            row.bytes_per_vector = round(_bytes_per_vector(pq, n), 1)  # re-ranking reads the store
            rows.append(row)
            print(_fmt(rows[-1]), flush=True)
        del pq, refined
    for m in hnsw_ms:
        hnsw, build = _build(f"HNSW{m},Flat", data)
        for ef in (32, 64, 128):
            hnsw.hnsw.efSearch = ef
            rows.append(_measure(n, f"HNSW{m},Flat", f"efSearch={ef}", hnsw, build, queries,
                                 truth))
            print(_fmt(rows[-1]), flush=True)
        del hnsw
    return rows


HEADER = ("| n | index | knob | build s | p50 ms | p95 ms | batch QPS | recall@10 | bytes/vec |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _fmt(r: Row) -> str:
    return (f"| {r.n:,} | {r.index} | {r.knob} | {r.build_s} | {r.p50_ms} | {r.p95_ms} | "
            f"{r.batch_qps} | {r.recall10} | {r.bytes_per_vector} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated library sizes (add 1000000 for the 1M row)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--hnsw", default="16,32", help="HNSW M values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {args.threads} threads, {os.cpu_count()} cores\n")
    print(HEADER, flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += run_size(n, queries_n=args.queries,
                         hnsw_ms=[int(m) for m in args.hnsw.split(",") if m])
        if args.json_out:  # after every size, so a long run keeps what it measured
            with open(args.json_out, "w") as fh:
                json.dump([asdict(r) for r in rows], fh, indent=2)


if __name__ == "__main__":
    main()
