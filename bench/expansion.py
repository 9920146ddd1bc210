"""Query-expansion benchmark (issue 6): does moving a text query towards the images help?

Run from the repository root (about 10 minutes on 2 cores the first time; the library is cached
under --workdir (default: in the temp folder) and rebuilt when the tiny model's weights change):

    .venv/bin/python bench/expansion.py --json-out bench/results/expansion.json

What it does:
  1. generates --scenes captioned scenes (index.synthetic.scenes.write_scenes) with 1–2
     captions per image (every other image gets a second phrasing), indexes them with the tiny
     model and adds the captions through the real Library API;
  2. reads the caption–image pairs from the store (retrieval.expansion.training_pairs) and
     splits them *by image* 80/10/10 (all captions of an image fall on one side);
  3. fits on train: mean-shift, ridge (λ tuned on validation), the contrastive map
     (`retrieval.expansion.ContrastiveMap.fit`, timed) and the diffusion prior
     (`retrieval.expansion.prior.train_diffusion_prior`, timed);
  4. tunes on validation, per method, the weight A (and K, guidance for the prior), each
     caption searching the validation images;
  5. tests once: each test caption searches the test images; text→image R@1/5/10 and median
     rank of its own image, with the change in R@1 against no expansion (paired bootstrap over
     test images, 95% CI) and the share of queries whose image ranks worse / better;
  6. measures the added latency per query through the real read path (Searcher.search with
     and without expand=..., on the whole library, warm, 2 threads, median).
The method with the best validation R@1 is the one `--expand` with no value should default to.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from index import Library  # noqa: E402
from index.clip import TINY_DIR  # noqa: E402
from index.synthetic.scenes import caption_for, generate, write_scenes  # noqa: E402
from retrieval.expansion import (  # noqa: E402
    ContrastiveMap,
    MeanShift,
    Pairs,
    RidgeMap,
    SavedExpanders,
    interpolate,
    training_pairs,
)
from retrieval.expansion.fusion import RRF_DEPTH, RRF_K, rrf_weights  # noqa: E402
from retrieval.expansion.options import (  # noqa: E402
    DEFAULT_METHOD,
    DEFAULT_SAMPLES,
    DEFAULT_WEIGHTS,
    Expansion,
)

WEIGHTS = tuple(round(w, 2) for w in np.arange(0.1, 1.01, 0.1))
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
GUIDANCE = (1.0, 1.5, 2.0)
PRIOR_SAMPLES = (1, 4, 16)
BOOTSTRAP = 2000


# --- the library ------------------------------------------------------------------------------
def _weights_digest() -> str:
    digest = hashlib.sha256()
    with open(TINY_DIR / "open_clip_model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def build_library(workdir: Path, scenes: int, size: int, seed: int) -> Path:
    """Generated scenes, indexed and captioned; cached while the tiny model is unchanged."""
    key = f"s{scenes}-px{size}-seed{seed}-w{_weights_digest()}"
    home, photos = workdir / key / "home", workdir / key / "photos"
    done = workdir / key / "done"
    if done.exists():
        return home
    started = time.perf_counter()
    rows = write_scenes(photos, scenes, seed=seed, size=size)
    drawn = generate(scenes, seed=seed)
    extra = [json.dumps({"path": rows[i][0], "caption": caption_for(drawn[i], i + 2)})
             for i in range(0, scenes, 2)]
    (photos / "extra.jsonl").write_text("\n".join(extra) + "\n")
    with Library.open(home) as library:
        library.index([photos], model="tiny")
        library.add_captions(photos / "captions.jsonl")
        library.add_captions(photos / "extra.jsonl")
    done.write_text(f"{time.perf_counter() - started:.1f}\n")
    return home


def split_by_image(pairs: Pairs, seed: int) -> dict[str, Pairs]:
    images = np.unique(pairs.image_ids)
    order = np.random.default_rng(seed).permutation(images)
    cut1, cut2 = int(0.8 * len(order)), int(0.9 * len(order))
    sides = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    return {name: pairs.subset(np.isin(pairs.image_ids, ids)) for name, ids in sides.items()}


def ambiguity_ceiling(home: Path, pairs: Pairs, scenes: int, seed: int) -> float:
    """The R@1 of an ideal ranker: a caption that fits m gallery images equally well finds
    its own image first 1/m of the time. Generated captions omit details (jitter, exact
    placement), so several scenes often share one caption word for word."""
    from sqlalchemy import select

    from index.store import CaptionRow, ImageRow

    drawn = generate(scenes, seed=seed)
    with Library.open(home) as library, library.store.session() as s:
        texts = dict(s.execute(select(CaptionRow.id, CaptionRow.text)).all())
        paths = dict(s.execute(select(ImageRow.id, ImageRow.path)).all())
    number = {i: int(Path(paths[i]).stem.split("_")[1]) for i in np.unique(pairs.image_ids)}
    shares = []
    for caption_id, image_id in zip(pairs.caption_ids, pairs.image_ids):
        text, own = texts[int(caption_id)], number[int(image_id)]
        variant = next(v for v in (own, own + 2) if caption_for(drawn[own], v) == text)
        same = sum(caption_for(drawn[n], variant) == text for n in number.values())
        shares.append(1.0 / same)
    return float(np.mean(shares))


# --- evaluation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Queries (caption vectors) against a gallery (the split's images), own image known."""

    queries: np.ndarray
    gallery: np.ndarray
    own: np.ndarray  # index of each query's image in the gallery
    groups: np.ndarray  # the image id of each query, for the cluster bootstrap

    @classmethod
    def of(cls, pairs: Pairs) -> "Split":
        ids, first = np.unique(pairs.image_ids, return_index=True)
        gallery = pairs.image_vectors[first]
        own = np.searchsorted(ids, pairs.image_ids)
        return cls(pairs.text_vectors, gallery, own, pairs.image_ids)

    def ranks(self, query_vectors: np.ndarray) -> np.ndarray:
        """1-based rank of each query's own image (ties count in its favour)."""
        scores = query_vectors @ self.gallery.T
        own = scores[np.arange(len(scores)), self.own]
        return (scores > own[:, None]).sum(1) + 1

    def rrf_ranks(self, query_vectors: np.ndarray, samples: np.ndarray,
                  weight: float) -> np.ndarray:
        lists = [query_vectors] + [samples[:, j] for j in range(samples.shape[1])]
        fused = np.zeros((len(query_vectors), len(self.gallery)))
        for vectors, w in zip(lists, rrf_weights(samples.shape[1], weight)):
            order = np.argsort(-(vectors @ self.gallery.T), axis=1, kind="stable")
            ranks = np.empty_like(order)
            np.put_along_axis(ranks, order, np.arange(1, order.shape[1] + 1)[None, :], axis=1)
            fused += np.where(ranks <= RRF_DEPTH, w / (RRF_K + ranks), 0.0)
        own = fused[np.arange(len(fused)), self.own]
        return (fused > own[:, None]).sum(1) + 1


def recall(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks <= k))


def bootstrap_delta(base: np.ndarray, new: np.ndarray, groups: np.ndarray, k: int = 1,
                    seed: int = 0) -> tuple[float, float]:
    """95% CI of R@k(new) − R@k(base), resampling test *images* (their captions together)."""
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(groups, return_inverse=True)
    diff = (new <= k).astype(float) - (base <= k).astype(float)
    per_image = np.bincount(inverse, weights=diff, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(float)
    draws = rng.integers(0, len(ids), size=(BOOTSTRAP, len(ids)))
    deltas = per_image[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


# --- fitting and tuning -----------------------------------------------------------------------
@dataclass
class Method:
    """One row of the table: how to turn text vectors into image-side samples, and the fusion."""

    name: str
    method: str  # the Expansion method
    samples_fn: object = None  # (text_vectors) -> N×K×dim
    fusion: str = "interp"
    k: int = 1
    guidance: float = 1.0
    weight: float = 0.0
    val_r1: float = 0.0
    extra: dict = field(default_factory=dict)


def tune_weight(split: Split, row: Method) -> None:
    samples = row.samples_fn(split.queries)
    best = (-1.0, 0.0)
    for weight in WEIGHTS:
        if row.fusion == "rrf":
            ranks = split.rrf_ranks(split.queries, samples, weight)
        else:
            ranks = split.ranks(interpolate(split.queries, samples, weight))
        best = max(best, (recall(ranks, 1), -weight))
    row.val_r1, row.weight = best[0], -best[1]


def fit_ridge(train: Pairs, val: Split) -> tuple[RidgeMap, float]:
    best = None
    for lam in LAMBDAS:
        ridge = RidgeMap.fit(train.text_vectors, train.image_vectors, lam=lam)
        score = max(recall(val.ranks(interpolate(val.queries, ridge.map(val.queries)[:, None],
                                                 w)), 1) for w in WEIGHTS)
        if best is None or score > best[0]:
            best = (score, lam, ridge)
    return best[2], best[1]


def _shipped_default(rows: list[Method]) -> Method:
    """What `clipdex search --expand` does, with the weight and K the code ships."""
    like = next(r for r in rows if r.method == DEFAULT_METHOD
                and r.k in (1, DEFAULT_SAMPLES[DEFAULT_METHOD]) and r.fusion == "interp")
    return Method(f"--expand (shipped: {DEFAULT_METHOD})", DEFAULT_METHOD, like.samples_fn,
                  k=DEFAULT_SAMPLES[DEFAULT_METHOD], guidance=1.0,
                  weight=DEFAULT_WEIGHTS[DEFAULT_METHOD])


def ranks_for(split: Split, row: Method) -> np.ndarray:
    if row.samples_fn is None:
        return split.ranks(split.queries)
    samples = row.samples_fn(split.queries)
    if row.fusion == "rrf":
        return split.rrf_ranks(split.queries, samples, row.weight)
    return split.ranks(interpolate(split.queries, samples, row.weight))


# --- latency through the real read path -------------------------------------------------------
def added_latency(home: Path, expanders: SavedExpanders, rows: list[Method], texts: list[str],
                  repeats: int = 3) -> dict[str, dict[str, float]]:
    """Median wall time per query, plain and with each expansion, measured interleaved (query by
    query, in turn) so that load from other processes falls on all of them alike."""
    from retrieval import Searcher

    searcher = Searcher.open(home, expanders=expanders)
    specs = {row.name: Expansion(row.method, samples=row.k, weight=row.weight,
                                 fusion=row.fusion, guidance=row.guidance) for row in rows}
    runs = {"none": lambda t: searcher.search(t, k=10)}
    runs.update({name: (lambda t, s=spec: searcher.search(t, k=10, expand=s))
                 for name, spec in specs.items()})
    times: dict[str, list[float]] = {name: [] for name in runs}
    expand: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for run in runs.values():  # warm: model, index, caches, the film cache
            run(texts[0])
        for _ in range(repeats):
            for text in texts:
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    result = run(text)
                    times[name].append((time.perf_counter() - t0) * 1000)
                    expand[name].append(result.timings_ms.get("expand", 0.0))
    finally:
        searcher.close()
    plain = statistics.median(times["none"])
    return {name: {"total_ms": statistics.median(times[name]),
                   "added_ms": statistics.median(times[name]) - plain,
                   "expand_ms": statistics.median(expand[name])} for name in runs}


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=6000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=40.0, help="prior training epochs")
    parser.add_argument("--steps", type=int, help="prior training steps (overrides --epochs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-queries", type=int, default=40)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "clipdex-bench-expansion")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from retrieval.expansion.prior import TrainConfig, train_diffusion_prior

    t0 = time.perf_counter()
    home = build_library(args.workdir, args.scenes, args.size, args.seed)
    print(f"library ready in {time.perf_counter() - t0:.0f}s: {home}", file=sys.stderr)
    with Library.open(home) as library:
        pairs = training_pairs(library)
    sides = split_by_image(pairs, args.seed)
    train, val, test = sides["train"], Split.of(sides["val"]), Split.of(sides["test"])

    shift = MeanShift.fit(train.text_vectors, train.image_vectors)
    fit_started = time.perf_counter()
    ridge, lam = fit_ridge(train, val)
    ridge_seconds = (time.perf_counter() - fit_started) / len(LAMBDAS)
    print(f"training the contrastive map on {len(train)} pairs…", file=sys.stderr)
    contrastive, contrastive_stats = ContrastiveMap.fit(train)
    print(f"contrastive map: {contrastive_stats.steps} steps in {contrastive_stats.seconds:.0f}s",
          file=sys.stderr)
    print(f"training the prior on {len(train)} pairs…", file=sys.stderr)
    prior, stats = train_diffusion_prior(
        train.text_vectors, train.image_vectors,
        train=TrainConfig(steps=args.steps, epochs=args.epochs, seed=args.seed))
    print(f"prior: {stats.steps} steps in {stats.seconds:.0f}s, loss {stats.final_loss:.4f}",
          file=sys.stderr)

    def prior_samples(k: int, guidance: float):
        return lambda q: prior.sample(q, samples=k, seed=args.seed, guidance=guidance)

    rows = [
        Method("mean-shift", "meanshift", lambda q: shift.map(q)[:, None]),
        Method("ridge", "ridge", lambda q: ridge.map(q)[:, None], extra={"lambda": lam}),
        Method("contrastive", "contrastive", lambda q: contrastive.map(q)[:, None]),
    ]
    for k in PRIOR_SAMPLES:
        best = None
        for guidance in GUIDANCE:
            row = Method(f"prior K={k}", "prior", prior_samples(k, guidance), k=k,
                         guidance=guidance)
            tune_weight(val, row)
            if best is None or row.val_r1 > best.val_r1:
                best = row
        rows.append(best)
    rrf_k = 4
    guidance = next(r.guidance for r in rows if r.name == f"prior K={rrf_k}")
    rows.append(Method(f"prior K={rrf_k} + RRF", "prior", prior_samples(rrf_k, guidance),
                       fusion="rrf", k=rrf_k, guidance=guidance))
    for row in rows:
        if row.name in ("mean-shift", "ridge", "contrastive", f"prior K={rrf_k} + RRF"):
            tune_weight(val, row)
    shipped = _shipped_default(rows)
    shipped.val_r1 = recall(ranks_for(val, shipped), 1)
    rows.append(shipped)
    none_val = recall(val.ranks(val.queries), 1)
    chosen = max(rows[:-1], key=lambda r: r.val_r1)

    base = ranks_for(test, Method("none", "none"))
    results = [_row("none", base, base, test, val_r1=none_val)]
    for row in rows:
        ranks = ranks_for(test, row)
        results.append(_row(row.name, ranks, base, test, val_r1=row.val_r1, weight=row.weight,
                            k=row.k, fusion=row.fusion, guidance=row.guidance, **row.extra))

    saved = SavedExpanders({}, prior, shift, ridge, contrastive)
    texts = [f"a photo of a {c} {s}" for c, s in
             [("red", "circle"), ("blue", "square"), ("green", "star"), ("white", "ring"),
              ("yellow", "cross")]]
    texts = (texts * ((args.latency_queries + len(texts) - 1) // len(texts)))[
        :args.latency_queries]
    latency = added_latency(home, saved, rows, texts)
    for result in results:
        result.update(latency.get(result["method"], {}))

    report = {
        "scenes": args.scenes, "size": args.size, "seed": args.seed, "threads": args.threads,
        "pairs": {name: len(p) for name, p in sides.items()},
        "images": {"train": int(len(np.unique(train.image_ids))), "val": len(val.gallery),
                   "test": len(test.gallery)},
        "prior_training": {"steps": stats.steps, "seconds": round(stats.seconds, 1),
                           "final_loss": round(stats.final_loss, 5), "epochs": args.epochs,
                           "hidden": prior.config.hidden, "blocks": prior.config.blocks},
        "ridge_fit_seconds": round(ridge_seconds, 3),
        "contrastive_training": {"steps": contrastive_stats.steps,
                                 "seconds": round(contrastive_stats.seconds, 1),
                                 "final_loss": round(contrastive_stats.final_loss, 5)},
        "chosen_on_validation": chosen.name,
        "ceiling_r1": ambiguity_ceiling(home, sides["test"], args.scenes, args.seed),
        "results": results,
    }
    print(_markdown(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


def _row(name: str, ranks: np.ndarray, base: np.ndarray, split: Split, **extra) -> dict:
    low, high = bootstrap_delta(base, ranks, split.groups)
    return {
        "method": name, "r1": recall(ranks, 1), "r5": recall(ranks, 5), "r10": recall(ranks, 10),
        "median_rank": float(np.median(ranks)),
        "delta_r1": recall(ranks, 1) - recall(base, 1), "delta_r1_ci": [low, high],
        "worse": float(np.mean(ranks > base)), "better": float(np.mean(ranks < base)),
        **extra,
    }


def _markdown(report: dict) -> str:
    lines = [
        f"Text→image on {report['images']['test']} test images ({report['pairs']['test']} "
        f"caption queries); trained on {report['pairs']['train']} pairs, tuned on "
        f"{report['pairs']['val']}. Prior: {report['prior_training']['steps']} steps in "
        f"{report['prior_training']['seconds']} s; contrastive map: "
        f"{report['contrastive_training']['steps']} steps in "
        f"{report['contrastive_training']['seconds']} s ({report['threads']} threads). An ideal "
        f"ranker would reach R@1 {100 * report['ceiling_r1']:.1f} (captions that fit several "
        f"test images word for word).",
        "",
        "| method | K | A | fusion | val R@1 | R@1 | ΔR@1 [95% CI] | R@5 | R@10 | med. rank "
        "| worse | better | +ms/query |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ci = r["delta_r1_ci"]
        lines.append(
            f"| {r['method']} | {r.get('k', '')} | {r.get('weight', '')} | {r.get('fusion', '')} "
            f"| {100 * r['val_r1']:.1f} | {100 * r['r1']:.1f} | {100 * r['delta_r1']:+.1f} "
            f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | {100 * r['r5']:.1f} | "
            f"{100 * r['r10']:.1f} | {r['median_rank']:.0f} | {100 * r['worse']:.1f}% | "
            f"{100 * r['better']:.1f}% | {r.get('added_ms', float('nan')):+.1f} |")
    lines.append("")
    lines.append(f"Best on validation: {report['chosen_on_validation']}. `--expand` with no "
                 f"value ships as {DEFAULT_METHOD} (A = {DEFAULT_WEIGHTS[DEFAULT_METHOD]}).")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
