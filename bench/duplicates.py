"""Near-duplicate groups: pair precision/recall on generated scenes, and time at 100k vectors.

Quality: --scenes generated scenes (seed 21) indexed with `tiny`; every third one gets four
transformed copies (resized to 50%, JPEG quality 40, a 10% crop, EXIF stripped). The true
pairs are each copy with its original and the copies of one original among themselves; the
hard negatives are distinct scenes that share colour and shape. For each threshold: the pairs
`retrieval.duplicates.duplicate_pairs` finds (the range search itself, before the union of
pairs), their precision and recall, and recall per kind of copy at the default threshold.

Time: --vectors synthetic 512-d vectors from bench/query.py's clustered mixture, 1% of them
given a near copy (cosine ~0.98), in the index type clipdex picks at that size (IVF at 100k);
the wall time of range-searching every vector and grouping the pairs, and how many of the
planted copies were found.

    .venv/bin/python bench/duplicates.py --json-out bench/results/duplicates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

THRESHOLDS = (0.90, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99)
KINDS = ("half", "q40", "crop", "noexif")


def _copies(src: Path, name: str) -> dict[str, Path]:
    from PIL import Image

    im = Image.open(src / name).convert("RGB")
    w, h = im.size
    variants = {"half": (im.resize((w // 2, h // 2)), 90), "q40": (im, 40),
                "crop": (im.crop((w // 20, h // 20, w - w // 20, h - h // 20)), 90),
                "noexif": (im, 95)}
    out = {}
    for kind, (image, quality) in variants.items():
        path = src / f"copy_{kind}_{Path(name).stem}.jpg"
        image.save(path, quality=quality)
        out[kind] = path
    return out


def quality(scenes: int, seed: int) -> dict:
    from index import Library
    from index.synthetic.scenes import generate, write_scenes
    from retrieval import Searcher
    from retrieval.duplicates import DUPLICATE_COSINE, duplicate_pairs

    work = Path(tempfile.mkdtemp(prefix="clipdex-dups-"))
    src = work / "photos"
    rows = write_scenes(src, scenes, seed=seed)
    drawn = generate(scenes, seed=seed)
    copies = {rows[n][0]: _copies(src, rows[n][0]) for n in range(0, scenes, 3)}
    with Library.open(work / "home") as lib:
        lib.index([src], model="tiny")
    searcher = Searcher.open(work / "home")
    store = searcher.library.store
    paths = store.image_paths(store.ids("image").tolist())
    by_name = {Path(p).name: i for i, p in paths.items()}
    truth: set[tuple[int, int]] = set()
    kind_of: dict[tuple[int, int], str] = {}
    for original, made in copies.items():
        group = [by_name[original]] + [by_name[p.name] for p in made.values()]
        for kind, p in made.items():
            pair = tuple(sorted((by_name[original], by_name[p.name])))
            kind_of[pair] = kind
        truth |= {(a, b) for i, a in enumerate(sorted(group)) for b in sorted(group)[i + 1:]}
    vectors = store.vectors_for("image", list(paths))
    scene_of = {by_name[r[0]]: drawn[k] for k, r in enumerate(rows)}
    items = sorted(scene_of.items())
    negatives = [float(vectors[a] @ vectors[b]) for i, (a, sa) in enumerate(items)
                 for b, sb in items[i + 1:] if (sa.colour, sa.shape) == (sb.colour, sb.shape)]
    positives = [float(vectors[a] @ vectors[b]) for a, b in truth]
    vi = searcher.index_for("images")
    sweep = []
    for threshold in THRESHOLDS:
        found = {tuple(p) for p in duplicate_pairs(vi, store.iter_vectors("image"),
                                                   threshold).tolist()}
        hit = len(found & truth)
        row = {"threshold": threshold, "pairs": len(found), "true": hit,
               "precision": round(hit / max(1, len(found)), 4),
               "recall": round(hit / len(truth), 4)}
        if threshold == DUPLICATE_COSINE:
            row["recall_by_kind"] = {
                kind: round(sum(p in found for p, k in kind_of.items() if k == kind) /
                            sum(k == kind for k in kind_of.values()), 4) for kind in KINDS}
        sweep.append(row)
    searcher.close()
    return {"scenes": scenes, "images": len(paths), "true_pairs": len(truth),
            "hard_negative_pairs": len(negatives), "default_threshold": DUPLICATE_COSINE,
            "positive_cosine_p1_p5_p50": [round(float(x), 4) for x in
                                          np.percentile(positives, [1, 5, 50])],
            "hard_negative_cosine_p50_p99_max": [round(float(x), 4) for x in
                                                 np.percentile(negatives, [50, 99, 100])],
            "sweep": sweep}


def timing(n: int, seed: int, dim: int = 512) -> dict:
    import faiss
    from query import Mixture

    from index.vectors import VectorIndex, index_type_for
    from retrieval.duplicates import DUPLICATE_COSINE, duplicate_pairs, group_pairs

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(seed)
    vectors, _ = Mixture.make(seed, dim).sample(rng, n)
    vectors = np.ascontiguousarray(vectors, np.float32)
    ids = np.arange(1, n + 1, dtype=np.int64)
    planted = rng.choice(n, size=n // 100, replace=False)
    for row in planted:  # a near copy of another vector: cosine ~0.98
        noisy = vectors[(row + 1) % n] + rng.normal(0, 0.2 / np.sqrt(dim), dim)
        vectors[row] = noisy / np.linalg.norm(noisy)
    factory = index_type_for(n, dim)
    vi = VectorIndex.empty("image", dim, Path(tempfile.mkdtemp()), factory)
    started = time.perf_counter()
    if not vi.index.is_trained:
        vi.index.train(vectors[rng.choice(n, size=min(n, 100_000), replace=False)])
    vi.index.add_with_ids(vectors, ids)
    from index.vectors import _set_search_knobs

    _set_search_knobs(vi.index)
    build = time.perf_counter() - started
    cosines = np.einsum("ij,ij->i", vectors[planted], vectors[(planted + 1) % n])
    chunks = ((ids[s:s + 2048], vectors[s:s + 2048]) for s in range(0, n, 2048))
    started = time.perf_counter()
    pairs = duplicate_pairs(vi, chunks, DUPLICATE_COSINE)
    groups = group_pairs(pairs)
    seconds = time.perf_counter() - started
    found = {tuple(p) for p in pairs.tolist()}
    wanted = {tuple(sorted((int(ids[r]), int(ids[(r + 1) % n])))) for r, c in
              zip(planted, cosines) if c > DUPLICATE_COSINE}
    return {"vectors": n, "dim": dim, "index": factory, "build_seconds": round(build, 1),
            "seconds": round(seconds, 2), "pairs": len(pairs), "groups": len(groups),
            "planted_above_threshold": len(wanted),
            "planted_found": round(len(found & wanted) / max(1, len(wanted)), 4),
            "planted_cosine_p50": round(float(np.median(cosines)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    result = {"command": " ".join(sys.argv), "quality": quality(args.scenes, args.seed)}
    q = result["quality"]
    print(f"quality ({q['images']} images, {q['true_pairs']} true pairs, "
          f"{q['hard_negative_pairs']} same colour+shape pairs of distinct scenes)")
    print("| threshold | pairs found | precision | recall |\n|---|---|---|---|")
    for row in q["sweep"]:
        mark = " (default)" if row["threshold"] == q["default_threshold"] else ""
        print(f"| {row['threshold']}{mark} | {row['pairs']} | {row['precision']:.4f} | "
              f"{row['recall']:.4f} |")
    default = next(r for r in q["sweep"] if "recall_by_kind" in r)
    print("recall by kind of copy at the default:", default["recall_by_kind"])
    print("cosine of true pairs p1/p5/p50:", q["positive_cosine_p1_p5_p50"],
          " distinct same colour+shape p50/p99/max:", q["hard_negative_cosine_p50_p99_max"])
    if not args.skip_timing:
        t = result["timing"] = timing(args.vectors, args.seed)
        print(f"time: {t['vectors']} × {t['dim']}-d in {t['index']}: range search + groups "
              f"{t['seconds']} s ({t['pairs']} pairs, {t['groups']} groups; planted copies "
              f"found {t['planted_found']:.3f}; index build {t['build_seconds']} s)")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
