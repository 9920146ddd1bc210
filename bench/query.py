"""Query benchmark (issues 3 and 4): warm latency, recall@10 and cold CLI time at 10k-1M vectors.

Run from the repository root (10k and 100k take about 2 minutes on 2 cores; 1M adds about
5 minutes the first time, while it builds and caches the library):

    .venv/bin/python bench/query.py --json-out bench/results/query.json
    .venv/bin/python bench/query.py --large --json-out bench/results/query-large.json

For each size a library is built by writing rows with generated vectors straight into the
SQLite store (SQLAlchemy bulk inserts; model meta `tiny`, dim 128), and `VectorIndex.open(...,
save=True)` builds the index the library's size calls for (Flat up to flat_max_vectors(DIM), IVF
above). Vectors come from an anisotropic Gaussian mixture with a shared mean direction, like
CLIP embeddings, not uniform noise (which defeats every ANN index). Libraries are cached under
--workdir. Then, side by side:
  * warm `Searcher` latency for text queries, split into encode / search / hydrate
    (`SearchResult.timings_ms`), median over the queries;
  * recall@10 of the library's index against exact search, for held-out mixture samples
    run through `Searcher.search_vector` (the full read path: index, re-rank, hydration);
  * a brute-force baseline the way rclip searches: every query reads all vector BLOBs from
    SQLite, numpy.frombuffer per row, stacks, takes dot products and sorts in Python;
  * the cold CLI: `clipdex --home H search "a red circle" --top 10` in a fresh process,
    median wall time from start to results printed.
Figures from a shared machine are noisy: compare ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

DIM = 128  # the tiny model's embedding size; --model ViT-B-32:random makes it 512
MODEL = "tiny"
DIMS = {"tiny": 128, "ViT-B-32:random": 512}
K = 10
INSERT_CHUNK = 50_000
CLUSTERS = 2_000
QUERY_TEXTS = (
    "a red circle", "two blue squares", "a green triangle on a white background",
    "three yellow stars", "a small purple circle in the top left corner",
    "an orange square next to a blue circle", "a black background with white shapes",
    "four red triangles", "a large green square", "a pink circle at the bottom",
)
CLI_QUERY = "a red circle"


# --- generated vectors ------------------------------------------------------------------------
@dataclass(frozen=True)
class Mixture:
    """Clustered, anisotropic unit vectors: normalise(mean + centre_k + spread_k · A·z).

    A shared mean direction (CLIP embeddings of photos have cosine ~0.3-0.5 to each other), a
    few thousand cluster centres with Zipf-like sizes (a library has many beach photos and few
    of receipts), and within-cluster noise with a decaying spectrum under a random rotation.
    """

    mean: np.ndarray
    centres: np.ndarray
    weights: np.ndarray
    spreads: np.ndarray
    transform: np.ndarray  # DIM×DIM: rotation · diag(decaying scales)

    @classmethod
    def make(cls, seed: int, dim: int | None = None, clusters: int = CLUSTERS) -> "Mixture":
        dim = dim or DIM  # read at call time: --model changes DIM
        rng = np.random.default_rng(seed)
        mean = _unit(rng.normal(size=dim)) * 0.75
        centres = _unit(rng.normal(size=(clusters, dim))) * 0.75
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
        scales = 1.0 / np.arange(1, dim + 1) ** 0.6
        scales /= np.sqrt(np.sum(scales**2))  # E|A·z|^2 = 1
        rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        return cls(mean, centres, weights / weights.sum(), rng.uniform(0.45, 0.8, clusters),
                   (rotation * scales).T.astype(np.float32))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n unit vectors (float32) and the cluster each came from."""
        labels = rng.choice(len(self.centres), size=n, p=self.weights)
        noise = rng.standard_normal((n, len(self.mean)), dtype=np.float32) @ self.transform
        x = self.mean + self.centres[labels] + self.spreads[labels, None] * noise
        return _unit(x).astype(np.float32), labels


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def library_vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The library's n vectors and labels, regenerated identically on every run."""
    mixture, rng = Mixture.make(seed), np.random.default_rng((seed, n))
    return mixture.sample(rng, n)


def query_vectors(n: int, seed: int, count: int) -> np.ndarray:
    """Held-out samples of the same mixture: image-to-image style queries."""
    return Mixture.make(seed).sample(np.random.default_rng((seed, n, 1)), count)[0]


def data_stats(vectors: np.ndarray, seed: int) -> dict:
    """How clustered the data is: mean cosine of random pairs and of nearest neighbours."""
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), size=min(200, len(vectors)), replace=False)]
    pairs = sample @ sample.T
    nearest = np.concatenate([  # the second best: the best is the vector itself
        np.partition(sample[i:i + 25] @ vectors.T, -2, axis=1)[:, -2]
        for i in range(0, len(sample), 25)])
    return {"random_pair_cos_mean": float(pairs[np.triu_indices(len(sample), 1)].mean()),
            "nearest_neighbour_cos_mean": float(nearest.mean())}


# --- building a library -----------------------------------------------------------------------
def build_library(home: Path, vectors: np.ndarray, labels: np.ndarray) -> dict:
    """Rows written straight into the store, then the index built by VectorIndex.open."""
    from index.store import Store

    home.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{home / 'library.db'}")
    try:
        store.claim_model(MODEL, DIM, _tiny_preprocess())
        started = time.perf_counter()
        insert_rows(store, vectors, labels)
        inserted = time.perf_counter()
        index_info = build_index(store, home)
        return {"insert_s": inserted - started, "index_s": time.perf_counter() - inserted,
                **index_info}
    finally:
        store.close()


def _tiny_preprocess() -> str:
    from index import get_embedder

    return get_embedder(MODEL, device="cpu").fingerprint()["preprocess"]


def insert_rows(store, vectors: np.ndarray, labels: np.ndarray) -> None:
    from sqlalchemy import insert

    from index.store import ImageRow, ImageVectorRow, vector_blob

    stamp = time.time()
    for start in range(0, len(vectors), INSERT_CHUNK):
        chunk = range(start, min(start + INSERT_CHUNK, len(vectors)))
        rows = [{"id": i + 1, "path": f"/bench/library/c{labels[i]:04d}/img_{i:07d}.jpg",
                 "size": 3_500_000, "mtime_ns": 1_700_000_000_000_000_000 + i,
                 "content_hash": f"{i:064x}",
                 "width": 4000, "height": 3000, "added_at": stamp}
                for i in chunk]
        with store.engine.begin() as conn:
            conn.execute(insert(ImageRow), rows)
            conn.execute(insert(ImageVectorRow),
                         [{"id": i + 1, "vector": vector_blob(vectors[i])} for i in chunk])
    with store.session() as s, s.begin():
        store.bump_generation(s, "image")


def build_index(store, home: Path) -> dict:
    """`VectorIndex.open(save=True)` as the write path does; falls back (and says so) if it fails.

    The fallback exists because a store above the Flat threshold with no index file yet made
    `open` add vectors to an untrained IVF index ("'is_trained' failed") when this was written.
    """
    from index.vectors import VectorIndex

    directory = home / "vectors"
    try:
        vi = VectorIndex.open(store, "image", DIM, directory, save=True)
        return {"index": vi.describe(), "index_note": "VectorIndex.open(save=True)"}
    except RuntimeError as exc:
        if "is_trained" not in str(exc):
            raise
        log("  VectorIndex.open failed on an untrained IVF index; rebuilding explicitly")
        vi = VectorIndex.empty("image", DIM, directory, "IDMap2,Flat")
        vi.rebuild(store)
        vi.save()
        return {"index": vi.describe(),
                "index_note": "VectorIndex.open failed ('is_trained'); used rebuild() + save()"}


def rebuild_index(home: Path) -> dict:
    """A fresh index of the type the library's size calls for, from the cached store."""
    from index.store import Store
    from index.vectors import VectorIndex

    store = Store(f"sqlite:///{home / 'library.db'}")
    try:
        started = time.perf_counter()
        vi = VectorIndex.empty("image", DIM, home / "vectors", "IDMap2,Flat")
        vi.rebuild(store)
        vi.save()
        return {"index_s": time.perf_counter() - started, "index": vi.describe(),
                "index_note": "VectorIndex.rebuild() + save()"}
    finally:
        store.close()


def cached_library(workdir: Path, n: int, seed: int, rebuild: bool,
                   vectors: np.ndarray, labels: np.ndarray) -> tuple[Path, dict]:
    slug = "" if MODEL == "tiny" else "-" + MODEL.replace(":", "-").replace("/", "-")
    home = workdir / f"library-{n}-seed{seed}{slug}"
    marker = home / "bench-build.json"
    if marker.exists() and not rebuild:
        info = json.loads(marker.read_text())
        from index.vectors import index_type_for

        if info.get("index", {}).get("type") == index_type_for(n, DIM):
            return home, {**info, "cached": True}
        log(f"  the cached library's index ({info.get('index', {}).get('type')}) is not the "
            f"type the library now calls for ({index_type_for(n, DIM)}): rebuilding the index only")
        info.update(rebuild_index(home))
        marker.write_text(json.dumps(info))
        return home, {**info, "cached": True}
    shutil.rmtree(home, ignore_errors=True)
    log(f"  building a {n:,}-vector library under {home}")
    info = build_library(home, vectors, labels)
    marker.write_text(json.dumps(info))
    return home, {**info, "cached": False}


# --- measurements -----------------------------------------------------------------------------
def warm_latency(searcher, rounds: int) -> dict:
    """Median encode / search / hydrate ms over the query texts, after a warm-up."""
    for text in QUERY_TEXTS[:3]:
        searcher.search(text, k=K)
    timings = [searcher.search(text, k=K).timings_ms
               for _ in range(rounds) for text in QUERY_TEXTS]
    out = {f"{key}_ms": statistics.median(t[key] for t in timings)
           for key in ("encode", "search", "hydrate")}
    totals = [sum(t.values()) for t in timings]
    out.update(total_ms=statistics.median(totals), total_p90_ms=float(np.percentile(totals, 90)),
               warm_queries=len(timings))
    return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact inner-product top-k ids (row i was inserted with id i + 1), in chunks."""
    out = []
    for start in range(0, len(queries), 32):
        scores = queries[start:start + 32] @ vectors.T
        out.append(np.argpartition(-scores, k - 1, axis=1)[:, :k] + 1)
    return np.concatenate(out)


def recall_at_k(searcher, vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Recall@10 of the full read path (index + re-rank + hydrate) vs exact search."""
    from retrieval import Query, Term

    query = Query((Term("text", "recall probe"),), k=K)
    truth = exact_top_k(vectors, queries)
    hits, search_ms = [], []
    for q in queries:
        result = searcher.search_vector(q, query, timings={})
        hits.append({h.id for h in result.hits})
        search_ms.append(result.timings_ms["search"] + result.timings_ms["hydrate"])
    recall = [len(h & set(t.tolist())) / K for h, t in zip(hits, truth)]
    return {"recall_at_10": float(np.mean(recall)), "recall_min": float(np.min(recall)),
            "recall_queries": len(queries),
            "vector_query_search_hydrate_ms": statistics.median(search_ms)}


def rclip_style_search(db_path: Path, query: np.ndarray, k: int = K) -> list[str]:
    """rclip's way: read every (path, vector) row, frombuffer each, stack, dot, sort in Python.

    Over this store's own tables (schema 4: float16 vectors in image_vectors; rclip keeps
    float32 in its image rows)."""
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT path, vector FROM images JOIN image_vectors "
                            "USING (id)").fetchall()
    paths = [row[0] for row in rows]
    features = np.stack([np.frombuffer(row[1], np.float16).astype(np.float32) for row in rows])
    similarities = features @ query
    ranked = sorted(zip(similarities, range(len(paths))), key=lambda x: x[0], reverse=True)
    return [paths[i] for _, i in ranked[:k]]


def brute_force(db_path: Path, vectors: np.ndarray, queries: np.ndarray, runs: int) -> dict:
    """Median latency of the rclip-style search (after one page-cache warm-up run)."""
    rclip_style_search(db_path, queries[0])
    times, agree = [], []
    truth = exact_top_k(vectors, queries[:runs])
    for q, exact in zip(queries[:runs], truth):
        started = time.perf_counter()
        found = rclip_style_search(db_path, q)
        times.append(1000 * (time.perf_counter() - started))
        ids = {int(p.rsplit("_", 1)[1].split(".")[0]) + 1 for p in found}
        agree.append(len(ids & set(exact.tolist())) / K)
    return {"brute_force_ms": statistics.median(times), "brute_force_runs": len(times),
            "brute_force_recall": float(np.mean(agree))}


def cold_cli(home: Path, runs: int) -> dict:
    """Median wall time of a fresh `clipdex search` process (after one unreported warm-up)."""
    command = [clipdex_executable(), "--home", str(home), "search", CLI_QUERY, "--top", str(K)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    times = []
    for attempt in range(runs + 1):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - started
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
        if attempt:
            times.append(elapsed)
    return {"cold_cli_s": statistics.median(times), "cold_cli_runs": len(times),
            "cli_command": " ".join(command)}


COLD_STAGES = r"""
import json, sys, time
t = [time.perf_counter()]
import cli  # noqa: F401  (what `clipdex` imports before it parses arguments)
t.append(time.perf_counter())
import faiss, numpy, open_clip, sqlalchemy, torch  # noqa: F401,E401
t.append(time.perf_counter())
from retrieval import Searcher
searcher = Searcher.open(sys.argv[1], mmap=True)  # as `clipdex search` does
t.append(time.perf_counter())
embedder = searcher.embedder
t.append(time.perf_counter())
searcher.index_for("images")
t.append(time.perf_counter())
searcher.search(sys.argv[2], k=10)
t.append(time.perf_counter())
names = ["cli_import", "heavy_imports", "open_library", "model_load", "index_load", "search"]
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the (large) bench process
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"precision": embedder.precision,
                  "peak_rss_mb": hwm / 1024,
                  **{n + "_s": b - a for n, a, b in zip(names, t, t[1:])}}))
"""


def cold_breakdown(home: Path, runs: int) -> dict:
    """Where a cold query's time goes: a fresh interpreter doing the CLI's steps one by one.

    Interpreter start is the wall time of the process minus the stages it timed itself.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    samples = []
    for attempt in range(runs + 1):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", COLD_STAGES, str(home), CLI_QUERY],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"cold-start probe failed: {done.stderr[-2000:]}")
        stages = json.loads(done.stdout.strip().splitlines()[-1])
        timed = sum(v for k, v in stages.items() if k.endswith("_s"))
        stages.update(interpreter_s=wall - timed, wall_s=wall)
        if attempt:
            samples.append(stages)
    keys = [k for k in samples[0] if k.endswith("_s")]
    return {"cold_stages": {k: statistics.median(s[k] for s in samples) for k in keys},
            "cold_precision": samples[0]["precision"],
            "cold_peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in samples)}


def disk_per_vector(home: Path, n: int) -> dict:
    """Bytes per image on disk: the FAISS file(s) and the SQLite store (rows + vectors)."""
    index_bytes = sum(p.stat().st_size for p in (home / "vectors").glob("image-*.faiss"))
    store_bytes = sum(p.stat().st_size for p in home.glob("library.db*"))
    return {"index_bytes_per_vector": index_bytes / n, "store_bytes_per_vector": store_bytes / n}


def clipdex_executable() -> str:
    beside = Path(sys.executable).parent / "clipdex"
    found = str(beside) if beside.exists() else shutil.which("clipdex")
    if not found:
        raise SystemExit("the `clipdex` command is not installed (pip install -e .)")
    return found


def bench_size(n: int, args: argparse.Namespace) -> dict:
    from retrieval import Searcher

    log(f"== {n:,} vectors")
    vectors, labels = library_vectors(n, args.seed)
    home, build = cached_library(args.workdir, n, args.seed, args.rebuild, vectors, labels)
    queries = query_vectors(n, args.seed, args.queries)
    searcher = Searcher.open(home)
    try:
        warm = warm_latency(searcher, args.rounds)
        recall = recall_at_k(searcher, vectors, queries)
    finally:
        searcher.close()
    row = {"vectors": n, **build, **data_stats(vectors, args.seed), **warm, **recall,
           **brute_force(home / "library.db", vectors, queries, args.baseline_runs),
           **cold_cli(home, args.cli_runs), **cold_breakdown(home, args.cli_runs),
           **disk_per_vector(home, n)}
    row["brute_over_search"] = row["brute_force_ms"] / (row["search_ms"] + row["hydrate_ms"])
    row["brute_plus_encode_over_total"] = (row["brute_force_ms"] + row["encode_ms"]) / \
        row["total_ms"]
    log(f"  warm {row['total_ms']:.1f} ms, recall@10 {row['recall_at_10']:.3f}, "
        f"brute force {row['brute_force_ms']:.0f} ms, cold CLI {row['cold_cli_s']:.2f} s "
        f"({', '.join(f'{k[:-2]} {v:.2f}' for k, v in row['cold_stages'].items())})")
    return row


# --- report -----------------------------------------------------------------------------------
def markdown(rows: list[dict], env: dict) -> str:
    header = ["vectors", "index", "encode ms", "search ms", "hydrate ms", "warm total ms",
              "recall@10", "brute force ms (rclip-style)", "brute / (search+hydrate)",
              "brute+encode / total", "cold CLI s", "build s (insert + index)"]
    body = [[f"{r['vectors']:,}", r["index"]["type"], f"{r['encode_ms']:.2f}",
             f"{r['search_ms']:.2f}", f"{r['hydrate_ms']:.2f}", f"{r['total_ms']:.2f}",
             f"{r['recall_at_10']:.3f}", f"{r['brute_force_ms']:.0f}",
             f"{r['brute_over_search']:.0f}x", f"{r['brute_plus_encode_over_total']:.1f}x",
             f"{r['cold_cli_s']:.2f}", f"{r['insert_s']:.0f} + {r['index_s']:.0f}"
             + (" (cached)" if r["cached"] else "")] for r in rows]
    lines = [f"Machine: {env['cpus']} cores, load average at start {env['load_start']}, end "
             f"{env['load_end']}; warm latency = median over {rows[0]['warm_queries']} text "
             f"queries; shared machine: compare ratios, not absolute times.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    notes = sorted({r["index_note"] for r in rows})
    lines += ["", "Index built with: " + "; ".join(notes), "",
              f"Cold start ({MODEL}, model precision {rows[0]['cold_precision']}), median "
              f"seconds per stage of a fresh process:", ""]
    stages = list(rows[0]["cold_stages"])
    lines += ["| vectors | " + " | ".join(k[:-2] for k in stages) + " |",
              "|" + "---|" * (len(stages) + 1)]
    lines += [f"| {r['vectors']:,} | " + " | ".join(f"{r['cold_stages'][k]:.2f}" for k in stages)
              + " |" for r in rows]
    return "\n".join(lines)


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * factor)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: .venv/bin/python bench/query.py --sizes 10k,100k,1m --json-out q.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="comma-separated library sizes, e.g. 10k,100k,1m "
                                        "(default 10k,100k; with --large 10k,100k,1m)")
    parser.add_argument("--large", action="store_true", help="include 1M vectors by default")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench/query"),
                        help="where generated libraries are cached")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached libraries")
    parser.add_argument("--seed", type=int, default=0, help="mixture and sampling seed")
    parser.add_argument("--queries", type=int, default=200, help="vector queries for recall")
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes over the query texts for warm latency")
    parser.add_argument("--baseline-runs", type=int, default=3,
                        help="timed runs of the brute-force baseline per size")
    parser.add_argument("--cli-runs", type=int, default=3, help="timed cold CLI runs per size")
    parser.add_argument("--model", choices=sorted(DIMS), default="tiny",
                        help="the library's model: sets the vector size and what encodes "
                             "the text queries (ViT-B-32:random has the pretrained one's cost)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    default = "10k,100k,1m" if args.large else "10k,100k"
    args.sizes = [parse_size(s) for s in (args.sizes or default).split(",") if s.strip()]
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global MODEL, DIM
    MODEL, DIM = args.model, DIMS[args.model]
    env = {"model": MODEL, "cpus": os.cpu_count(), "load_start": _load(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rows = [bench_size(n, args) for n in args.sizes]
    env["load_end"] = _load()
    print(markdown(rows, env))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"environment": env, "results": rows}, indent=2,
                                            default=_jsonable) + "\n")
    return 0


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    sys.exit(main())
