"""Scale benchmark (issue 17): compressed IVF codes with exact re-ranking from the store, at
1M and 10M vectors, side by side with IVF-Flat where it fits.

    .venv/bin/python bench/scale.py --n 1000000 --dim 512 --json-out bench/results/scale.json
    .venv/bin/python bench/scale.py --n 1000000 --dim 128 --json-out bench/results/scale.json
    .venv/bin/python bench/scale.py --n 1000000 --dim 512 --configs "IVF1024,PQ128x8" \
        --shard-vectors 250000 --json-out bench/results/scale.json   # the on-disk tier

A configuration of 8-bit codes (`PQ{m}x8`) is the on-disk tier: built by the library's own
code (training once, shards of --shard-vectors merged with merge_ondisk, lists in their own
memory-mapped file) with the on-disk line moved below n, and read as the library reads it.

Vectors: the harder mixture of bench/query.py (2000 Zipf-sized anisotropic clusters around a
shared mean direction), generated in chunks and kept as float16 under --workdir, because float16
is what the store keeps (so "exact" means exact over the stored vectors, as in the library).
Ground truth: exact top-10 of 200 held-out queries over those vectors. Each configuration's
index is built the way index/vectors.py builds it (train once on a sample, add in chunks),
cached under --workdir with its build time and peak RSS, then measured in a fresh process:
recall@10 and p50/p95 of single queries *including* the exact re-ranking of the top
candidates, whose vectors are read from a real SQLite `image_vectors` table (the store's own
layout, one float16 row per id) through index.store.Store.vectors_for — the library's path.
Rows are appended to --json-out (one per configuration), replacing rows of the same
n/dim/index/knob.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from bench.query import Mixture  # noqa: E402

K = 10
QUERIES = 200
CHUNK = 100_000
SEED = 7


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child would report its parent's peak."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- data ---------------------------------------------------------------------------------------
def vectors_file(workdir: Path, n: int, dim: int) -> Path:
    """n float16 unit vectors of the mixture, made in chunks (never all in float32 at once)."""
    path = workdir / f"vectors-{n}-{dim}.f16"
    if path.exists() and path.stat().st_size == n * dim * 2:
        return path
    mixture = Mixture.make(SEED, dim)
    tmp = path.with_suffix(".tmp")
    out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(n, dim))
    started = time.perf_counter()
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        out[start:start + rows] = mixture.sample(np.random.default_rng((SEED, start)), rows)[0]
        print(f"\r  generating {start + rows:,}/{n:,} vectors", end="", flush=True)
    out.flush()
    del out
    tmp.rename(path)
    print(f" ({time.perf_counter() - started:.0f} s)")
    return path


def load_vectors(workdir: Path, n: int, dim: int) -> np.ndarray:
    return np.memmap(vectors_file(workdir, n, dim), dtype=np.float16, mode="r", shape=(n, dim))


def queries(dim: int, seed: int = 9) -> np.ndarray:
    """Held-out samples of the same mixture (image-to-image style queries)."""
    return Mixture.make(SEED, dim).sample(np.random.default_rng((SEED, 1, seed)), QUERIES)[0]


def truth(workdir: Path, data: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact top-K ids (store ids are row + 1) over the float16 vectors."""
    n, dim = data.shape
    path = workdir / f"truth-{n}-{dim}.npy"
    if path.exists():
        return np.load(path)
    import faiss

    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.zeros((len(q), K), np.int64)
    for start in range(0, n, CHUNK):
        block = np.asarray(data[start:start + CHUNK], np.float32)
        s, i = faiss.knn(q, block, K, metric=faiss.METRIC_INNER_PRODUCT)
        s_all, i_all = np.hstack([best_s, s]), np.hstack([best_i, i + start + 1])
        order = np.argsort(-s_all, axis=1)[:, :K]
        best_s = np.take_along_axis(s_all, order, 1)
        best_i = np.take_along_axis(i_all, order, 1)
        print(f"\r  exact top-{K}: {start + len(block):,}/{n:,}", end="", flush=True)
    print()
    np.save(path, best_i)
    return best_i


def store_file(workdir: Path, data: np.ndarray) -> Path:
    """A real store holding the vectors (image_vectors rows, float16, ids row + 1)."""
    n, dim = data.shape
    home = workdir / f"store-{n}-{dim}"
    db = home / "library.db"
    done = home / "complete"
    if done.exists():
        return db
    import shutil

    from sqlalchemy import insert

    from index.store import ImageRow, ImageVectorRow, Store

    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    store = Store(f"sqlite:///{db}")
    store.claim_model("bench", dim, "none")
    started = time.perf_counter()
    stamp = time.time()
    for start in range(0, n, 20_000):
        ids = range(start + 1, min(n, start + 20_000) + 1)
        with store.engine.begin() as conn:
            conn.execute(insert(ImageRow), [
                {"id": i, "path": f"/bench/library/c{i % 2000:04d}/img_{i:08d}.jpg",
                 "size": 3_500_000, "mtime_ns": 1_700_000_000_000_000_000 + i,
                 "content_hash": f"{i:064x}", "width": 4000, "height": 3000,
                 "added_at": stamp} for i in ids])
            conn.execute(insert(ImageVectorRow), [
                {"id": i, "vector": data[i - 1].tobytes()} for i in ids])
        print(f"\r  store: {ids[-1]:,}/{n:,} rows", end="", flush=True)
    with store.session() as s, s.begin():
        store.bump_generation(s, "image")
    store.close()
    print(f" ({time.perf_counter() - started:.0f} s)")
    done.write_text("")
    return db


# --- building ---------------------------------------------------------------------------------
def build(workdir: Path, data: np.ndarray, factory: str) -> tuple[Path, dict]:
    """Train on a sample, add in chunks (as index/vectors.py does); cached with its figures."""
    import faiss

    n, dim = data.shape
    path = index_path(workdir, n, dim, factory)
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    from index import vectors as iv

    if iv.is_on_disk(factory) or (factory == iv.index_type_for(n, dim) and
                                  not os.environ.get("SCALE_BENCH_RAW_BUILD")):
        return _build_by_library(workdir, n, dim, factory, path, meta)
    started = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    sample_n = min(n, iv.training_size(factory, n))
    chosen = np.sort(np.random.default_rng(0).choice(n, sample_n, replace=False))
    sample = np.asarray(data[chosen], np.float32)
    print(f"  {factory}: training on {sample_n:,}", flush=True)
    index.train(sample)
    del sample
    trained = time.perf_counter() - started
    for start in range(0, n, CHUNK):
        block = np.asarray(data[start:start + CHUNK], np.float32)
        index.add_with_ids(block, np.arange(start + 1, start + len(block) + 1, dtype=np.int64))
        print(f"\r  {factory}: added {start + len(block):,}/{n:,}", end="", flush=True)
    print()
    faiss.write_index(index, str(path))
    figures = {"build_s": round(time.perf_counter() - started, 1),
               "train_s": round(trained, 1), "build_peak_rss_mb": round(_peak_rss_mb()),
               "built_by": "bench/scale.py (peak RSS includes the benchmark's own data)",
               "training_sample": sample_n}
    meta.write_text(json.dumps(figures))
    return path, figures


def index_path(workdir: Path, n: int, dim: int, factory: str) -> Path:
    from index import vectors as iv

    shards = f"-shards{SHARD_VECTORS}" if iv.is_on_disk(factory) else ""
    return workdir / f"index-{n}-{dim}-{factory.replace(',', '_')}{shards}.faiss"


SHARD_VECTORS = 2_000_000  # --shard-vectors: the on-disk tier's shard size


def _build_by_library(workdir: Path, n: int, dim: int, factory: str, path: Path,
                      meta: Path) -> tuple[Path, dict]:
    """The library's own choice is built by the library's own code, in a fresh process, from
    the real store: VectorIndex.open(save=True), as `clipdex index` does after ingesting (so
    its time and peak RSS are those of `clipdex index`'s build step)."""
    home = workdir / f"store-{n}-{dim}"
    started = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--n", str(n), "--dim", str(dim),
                            "--workdir", str(workdir), "--build-library", "--shard-vectors",
                            str(SHARD_VECTORS)] + (["--on-disk"] if "x8" in factory else []),
                           stdout=subprocess.PIPE, text=True, check=True)
    figures = json.loads(child.stdout.split("BUILT ", 1)[1])
    figures["build_s"] = round(time.perf_counter() - started, 1)
    if figures["factory"] != factory:
        raise SystemExit(f"the library built {figures['factory']}, not {factory}")
    built = next((home / "vectors").glob("image-*.faiss"))
    for lists in (home / "vectors").glob("image-*.ivfdata"):  # found beside its header
        figures["lists_file"] = f"{path.stem}-{lists.name}"
        figures["shard_vectors"] = SHARD_VECTORS
        _move_lists(built, lists, workdir / figures["lists_file"])
    os.replace(built, path)
    meta.write_text(json.dumps(figures))
    return path, figures


def _move_lists(header: Path, lists: Path, target: Path) -> None:
    """Move an on-disk index's list file and point its header at the new name (the library
    finds lists beside their header, by base name)."""
    import faiss

    from index import vectors as iv

    with iv._quiet_stdout():
        index = faiss.read_index(str(header), faiss.IO_FLAG_ONDISK_SAME_DIR |
                                 faiss.IO_FLAG_READ_ONLY)
    os.replace(lists, target)
    iv._lists(index).filename = str(target)
    faiss.write_index(index, str(header))


def build_library_child(workdir: Path, n: int, dim: int, on_disk: bool) -> None:
    from index import vectors as iv
    from index.store import Store
    from index.vectors import VectorIndex

    iv.ONDISK_SHARD_VECTORS = SHARD_VECTORS
    if on_disk:  # the on-disk tier below its line, to compare it where the others fit
        iv.ONDISK_MIN_BYTES = 0

    home = workdir / f"store-{n}-{dim}"
    store = Store(f"sqlite:///{home / 'library.db'}", create=False)
    started = time.perf_counter()
    vi = VectorIndex.open(store, "image", dim, home / "vectors", save=True,
                          progress=lambda m: print(f"  [{time.perf_counter() - started:6.0f} s]"
                                                   f" {m}", file=sys.stderr, flush=True))
    print("BUILT " + json.dumps({"factory": vi.factory, "build_peak_rss_mb": round(_peak_rss_mb()),
                                 "built_by": "VectorIndex.open(save=True)"}))


# --- measuring (in a fresh process per configuration) ------------------------------------------
def measure(workdir: Path, n: int, dim: int, factory: str, knobs: list[str], mmap: bool,
            warm: bool = True) -> list:
    import faiss

    from index import vectors as iv
    from index.store import Store

    path = index_path(workdir, n, dim, factory)
    index = iv.read_index_file(path, faiss.IO_FLAG_MMAP if mmap else 0, dim)  # as the library
    q = queries(dim)
    gt = np.load(workdir / f"truth-{n}-{dim}.npy")
    store = Store(f"sqlite:///{workdir / f'store-{n}-{dim}' / 'library.db'}", create=False)
    ivf = faiss.extract_index_ivf(index)
    exact_codes = factory.endswith(",Flat")
    if warm:  # other queries first, so the store's pages are as cached as in steady use
        started = time.perf_counter()
        for w in queries(dim, seed=10):
            _, ids = index.search(w[None, :], 800)
            if not exact_codes:
                store.vectors_for("image", ids[0][ids[0] >= 0].tolist())
        print(f"    warm-up: {QUERIES} other queries in {time.perf_counter() - started:.1f} s",
              flush=True)
    rows = []
    for knob in knobs:
        if knob == "auto":  # what the library sets
            iv._set_search_knobs(index)
            nprobe, rerank = ivf.nprobe, iv.rerank_depth(K, int(index.ntotal))
        else:
            nprobe, rerank = (int(v) for v in knob.split("/"))
        ivf.nprobe = nprobe
        times, found = [], []
        for qi in range(len(q)):
            t = time.perf_counter()
            fetch = K if exact_codes else max(K, rerank)
            scores, ids = index.search(q[qi:qi + 1], fetch)
            ids = ids[0][ids[0] >= 0]
            if not exact_codes and rerank:
                stored = store.vectors_for("image", ids.tolist())
                exact = np.array([float(stored[int(i)] @ q[qi]) for i in ids], np.float32)
                ids = ids[np.argsort(-exact, kind="stable")]
            times.append((time.perf_counter() - t) * 1000)
            found.append(ids[:K])
        recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K
                                for f, t in zip(found, gt)]))
        times = times[10:]  # the first queries warm the caches
        rows.append({"knob": ("library knobs: " if knob == "auto" else "") +
                     f"nprobe={nprobe},rerank={rerank if not exact_codes else 0}",
                     "nprobe": nprobe, "rerank": 0 if exact_codes else rerank,
                     "recall_at_10": round(recall, 4),
                     "p50_ms": round(statistics.median(times), 3),
                     "p95_ms": round(float(np.percentile(times, 95)), 3),
                     "rss_mb": round(_status_mb("VmRSS")),
                     "rss_anon_mb": round(_status_mb("RssAnon")),
                     "memory_mapped": mmap, "warmed_up": warm})
        print(f"    {factory} {rows[-1]['knob']}: recall@10 {recall:.4f} "
              f"p50 {rows[-1]['p50_ms']} ms", flush=True)
    return rows


def _index_bytes(path: Path, n: int, figures: dict) -> float:
    lists = path.parent / figures["lists_file"] if figures.get("lists_file") else None
    return (path.stat().st_size + (lists.stat().st_size if lists else 0)) / n


def _store_vector_bytes(db: Path, n: int) -> float:
    import sqlite3

    with sqlite3.connect(db) as connection:
        try:
            rows = connection.execute("SELECT sum(pgsize) FROM dbstat WHERE name = "
                                      "'image_vectors'").fetchone()
            return rows[0] / n
        except sqlite3.OperationalError:  # no dbstat in this sqlite build
            return float("nan")


def main() -> None:
    global SHARD_VECTORS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench-scale"))
    parser.add_argument("--configs", default=None,
                        help="';'-separated factory strings (default: the library's choice "
                             "for n, built by the library's own code)")
    parser.add_argument("--knobs", default="auto",
                        help="comma-separated nprobe/rerank pairs, or auto: the library's own")
    parser.add_argument("--mmap", action="store_true", help="memory-map the index files")
    parser.add_argument("--cold", action="store_true",
                        help="no warm-up queries before measuring (the store's pages as found)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard-vectors", type=int, default=SHARD_VECTORS,
                        help="vectors per shard of an on-disk (PQ…x8) build")
    parser.add_argument("--on-disk", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--build-library", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    knobs = args.knobs.split(",")
    SHARD_VECTORS = args.shard_vectors
    if args.build_library:
        build_library_child(args.workdir, args.n, args.dim, args.on_disk)
        return
    if args.measure:
        rows = measure(args.workdir, args.n, args.dim, args.measure, knobs, args.mmap,
                       warm=not args.cold)
        print("ROWS " + json.dumps(rows))
        return
    from index import vectors as iv

    n, dim = args.n, args.dim
    configs = args.configs.split(";") if args.configs else [iv.index_type_for(n, dim)]
    print(f"faiss {faiss.__version__}, {args.threads} threads; n={n:,} dim={dim}")
    data = load_vectors(args.workdir, n, dim)
    gt = truth(args.workdir, data, queries(dim))
    db = store_file(args.workdir, data)
    store_bytes = _store_vector_bytes(db, n)
    out = []
    for factory in configs:
        path, figures = build(args.workdir, data, factory)
        child = subprocess.run(
            [sys.executable, __file__, "--n", str(n), "--dim", str(dim), "--workdir",
             str(args.workdir), "--measure", factory, "--knobs", args.knobs,
             "--threads", str(args.threads), "--shard-vectors", str(SHARD_VECTORS)] +
            (["--mmap"] if args.mmap else []) +
            (["--cold"] if args.cold else []),
            capture_output=True, text=True, check=True)
        print("".join(line + "\n" for line in child.stdout.splitlines()
                      if not line.startswith("ROWS ")), end="")
        rows = json.loads(child.stdout.split("ROWS ", 1)[1])
        for row in rows:
            out.append({"n": n, "dim": dim, "index": factory, **row, **figures,
                        "index_bytes_per_vector": round(_index_bytes(path, n, figures), 1),
                        "store_vector_bytes_per_vector": round(store_bytes, 1),
                        "disk_bytes_per_vector": round(_index_bytes(path, n, figures) +
                                                       store_bytes, 1)})
    del gt
    if args.json_out:
        previous = json.loads(args.json_out.read_text()) if args.json_out.exists() else []
        key = lambda r: (r["n"], r["dim"], r["index"], r["knob"], r["memory_mapped"],  # noqa
                         r.get("warmed_up", False), r.get("shard_vectors"))
        fresh = {key(r) for r in out}
        args.json_out.write_text(json.dumps([r for r in previous if key(r) not in fresh] + out,
                                            indent=2) + "\n")
    print("\n| n | dim | index | knob | recall@10 | p50 ms | p95 ms | RSS MB | disk B/vec | "
          "build s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['n']:,} | {r['dim']} | {r['index']} | {r['knob']} | {r['recall_at_10']} | "
              f"{r['p50_ms']} | {r['p95_ms']} | {r['rss_mb']} | {r['disk_bytes_per_vector']} | "
              f"{r['build_s']} |")


if __name__ == "__main__":
    main()
