"""Query expansion: move a text query towards the image side of CLIP's space before searching.

A text query vector t sits in the text region of the space; the images it describes sit in the
image region (the modality gap). An expander turns t into image-side vectors s₁…s_K, and the
query becomes either

  interp:  q = normalise((1 − A)·t + A·normalise(mean(sᵢ)))           (one search), or
  rrf:     the K+1 result lists of t and each sᵢ, merged by weighted reciprocal rank fusion
           (t's list weighs 1 − A, the sᵢ lists share A).

Expanders, all fitted on the library's own caption–image pairs (captions linked to images):
  meanshift    t + (mean image vector − mean text vector)        closed form
  ridge        a ridge regression text → image vector             closed form, numpy
  contrastive  a linear map text → image trained to rank each     contrastive.py,
               caption's own image first (InfoNCE)                `clipdex prior train`
  prior        K samples of a diffusion prior p(image | text)     prior.py, `clipdex prior train`
  pixels       K images generated from the text with a diffusers  pixels.py, extra `diffusion`
               pipeline, embedded with the library's image encoder

`clipdex prior train` saves the prior, the contrastive map and both baselines in the library
folder (prior.safetensors + prior.json); meanshift and ridge are fitted in memory when nothing is
saved. The default is the contrastive map: in bench/expansion.py it is the one expander that
moves R@1 beyond noise (the diffusion prior does not beat the closed-form baselines there).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from sqlalchemy import select

from index.errors import ClipdexError, ModelMismatch, UsageProblem
from index.store import CaptionRow, ImageRow, vector_from_blob

from .query import Hit, Query, SearchResult, Term
from .search import Searcher, build_terms

if TYPE_CHECKING:
    from index import Library

    from .contrastive import ContrastiveConfig, ContrastiveStats
    from .prior import DiffusionPrior, TrainConfig

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "ContrastiveMap",
    "Expansion",
    "GeneratorUnavailable",
    "MeanShift",
    "MissingExtra",
    "NoTrainingPairs",
    "Pairs",
    "PriorNotTrained",
    "QueryExpander",
    "QueryExpansion",
    "RidgeMap",
    "SavedExpanders",
    "TrainReport",
    "interpolate",
    "load_expanders",
    "reciprocal_rank_fusion",
    "train_expanders",
    "training_pairs",
]

METHODS = ("contrastive", "prior", "meanshift", "ridge", "pixels")
FUSIONS = ("interp", "rrf")
# What `--expand` with no value means: the method with the best validation R@1 in
# bench/expansion.py (tiny model, generated scenes), the contrastive map (+4-5 points of R@1 on
# test; every other method, the diffusion prior included, within ±1 point of no expansion).
DEFAULT_METHOD = "contrastive"
# Weights A and sample counts K from the validation splits of bench/expansion.py (mean-shift is
# flat over A = 0.3-0.9; ridge and the prior prefer small A; the contrastive map is best used
# alone or nearly so). pixels is untuned: no generator runs offline. Other models may want
# other weights: --expand-weight.
DEFAULT_WEIGHTS = {"contrastive": 1.0, "prior": 0.4, "meanshift": 0.5, "ridge": 0.2,
                   "pixels": 0.3}
DEFAULT_SAMPLES = {"contrastive": 1, "prior": 4, "meanshift": 1, "ridge": 1, "pixels": 4}
DEFAULT_STEPS = {"prior": 16, "pixels": 25}
RIDGE_LAMBDA = 1e-2  # relative to the mean eigenvalue of the centred text covariance
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
RRF_DEPTH = 100  # how deep each list of an RRF search is read
WEIGHTS_FILE, META_FILE = "prior.safetensors", "prior.json"
FORMAT_VERSION = 2  # 2: with the contrastive map


# --- errors -----------------------------------------------------------------------------------
class PriorNotTrained(ClipdexError):
    """`--expand prior` or `--expand contrastive` asked of a library that has not trained."""


class NoTrainingPairs(ClipdexError):
    """The library has no captions linked to indexed images to learn from."""


class GeneratorUnavailable(ClipdexError):
    """The image generator for `--expand pixels` could not be loaded or run."""


class MissingExtra(ClipdexError):
    """An optional dependency is not installed; the message names the extra."""


# --- options ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expansion:
    """How to expand a query. None fields take the method's tuned default.

    Args:
        method: "contrastive", "prior", "meanshift", "ridge" or "pixels".
        samples: K, image-side vectors drawn per query (prior, pixels).
        weight: A in [0, 1], the share of the image side in the fused query.
        seed: the sampling seed (prior, pixels): the same seed gives the same query.
        fusion: "interp" (one search with the interpolated vector) or "rrf".
        generator: a diffusers model id or save_pretrained folder (pixels only).
        steps: denoising steps (prior: DDIM steps; pixels: inference steps).
        guidance: the prior's classifier-free guidance scale (1 = none).
    """

    method: str = DEFAULT_METHOD
    samples: int | None = None
    weight: float | None = None
    seed: int = 0
    fusion: str = "interp"
    generator: str | None = None
    steps: int | None = None
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageProblem(f"--expand must be one of {', '.join(METHODS)}, not "
                               f"{self.method!r}")
        if self.fusion not in FUSIONS:
            raise UsageProblem(f"--expand-fusion must be interp or rrf, not {self.fusion!r}")
        if self.samples is not None and not 1 <= self.samples <= 256:
            raise UsageProblem(f"--expand-samples must be between 1 and 256 (got {self.samples})")
        if self.weight is not None and not 0.0 <= self.weight <= 1.0:
            raise UsageProblem(f"--expand-weight must be between 0 and 1 (got {self.weight})")
        if self.steps is not None and self.steps < 1:
            raise UsageProblem(f"--expand-steps must be at least 1 (got {self.steps})")
        if self.method == "pixels" and not self.generator:
            raise UsageProblem("--expand pixels needs --generator SPEC (a diffusers model id or "
                               "a folder saved with save_pretrained)")
        if self.generator and self.method != "pixels":
            raise UsageProblem("--generator only applies to --expand pixels")

    @classmethod
    def from_options(cls, method: str | None, *, samples: int | None = None,
                     weight: float | None = None, seed: int | None = None,
                     fusion: str | None = None, generator: str | None = None,
                     steps: int | None = None) -> "Expansion | None":
        """The expansion the CLI flags ask for; None without --expand (and without its flags)."""
        if method is None:
            given = {"--expand-samples": samples, "--expand-weight": weight,
                     "--expand-seed": seed, "--expand-fusion": fusion,
                     "--generator": generator, "--expand-steps": steps}
            named = [name for name, value in given.items() if value is not None]
            if named:
                raise UsageProblem(f"{', '.join(named)} need(s) --expand METHOD")
            return None
        return cls(method, samples=samples, weight=weight, seed=seed or 0,
                   fusion=fusion or "interp", generator=generator, steps=steps)

    @property
    def k(self) -> int:
        return self.samples or DEFAULT_SAMPLES[self.method]

    @property
    def a(self) -> float:
        return DEFAULT_WEIGHTS[self.method] if self.weight is None else self.weight

    @property
    def denoise_steps(self) -> int:
        return self.steps or DEFAULT_STEPS.get(self.method, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "samples": self.k, "weight": self.a}


class QueryExpander(Protocol):
    """Turns a unit text vector into image-side unit vectors (the K×dim `samples`)."""

    def image_vectors(self, text_vector: np.ndarray, texts: Sequence[str],
                      expansion: Expansion) -> np.ndarray: ...


# --- fusion -----------------------------------------------------------------------------------
def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def interpolate(text_vectors: np.ndarray, image_vectors: np.ndarray, weight: float) -> np.ndarray:
    """normalise((1 − A)·t + A·normalise(mean(sᵢ))); t is (…, dim), sᵢ is (…, K, dim)."""
    image_side = _unit(image_vectors.mean(axis=-2))
    return _unit((1.0 - weight) * _unit(text_vectors) + weight * image_side)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], weights: Sequence[float],
                           *, k: int = RRF_K) -> list[tuple[int, float]]:
    """Weighted RRF: score(d) = Σⱼ wⱼ / (k + rankⱼ(d)), ranks from 1; best first."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def rrf_weights(samples: int, weight: float) -> list[float]:
    """The text query's list weighs 1 − A; the K sample lists share A."""
    return [1.0 - weight] + [weight / samples] * samples


# --- training pairs and the closed-form baselines ---------------------------------------------
@dataclass(frozen=True)
class Pairs:
    """Caption–image pairs of a library: row i of each array belongs together."""

    text_vectors: np.ndarray
    image_vectors: np.ndarray
    image_ids: np.ndarray
    caption_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.caption_ids)

    def subset(self, mask: np.ndarray) -> "Pairs":
        return Pairs(self.text_vectors[mask], self.image_vectors[mask], self.image_ids[mask],
                     self.caption_ids[mask])


def training_pairs(library: "Library") -> Pairs:
    """Every caption linked to an indexed image, with both vectors from the store."""
    statement = (select(CaptionRow.id, CaptionRow.image_id, CaptionRow.vector, ImageRow.vector)
                 .join(ImageRow, ImageRow.id == CaptionRow.image_id).order_by(CaptionRow.id))
    with library.store.session() as s:
        rows = s.execute(statement).all()
    if not rows:
        raise NoTrainingPairs(
            f"the library at {library.settings.home} has no captions linked to indexed images, "
            f"so there is nothing to learn from: index images (`clipdex index PATH`) and add "
            f"captions that name them (`clipdex captions add FILE`) first")
    return Pairs(np.stack([vector_from_blob(r[2]) for r in rows]),
                 np.stack([vector_from_blob(r[3]) for r in rows]),
                 np.array([r[1] for r in rows], np.int64), np.array([r[0] for r in rows], np.int64))


@dataclass(frozen=True)
class MeanShift:
    """t + (mean image vector − mean text vector): closes the modality gap on average."""

    delta: np.ndarray

    @classmethod
    def fit(cls, text_vectors: np.ndarray, image_vectors: np.ndarray) -> "MeanShift":
        return cls((image_vectors.mean(0) - text_vectors.mean(0)).astype(np.float32))

    def map(self, text_vectors: np.ndarray) -> np.ndarray:
        return _unit(text_vectors + self.delta)

    def image_vectors(self, text_vector: np.ndarray, texts: Sequence[str],
                      expansion: Expansion) -> np.ndarray:
        return self.map(text_vector[None, :])


@dataclass(frozen=True)
class RidgeMap:
    """A linear map text → image vector, ridge-regularised, fitted in closed form."""

    weight: np.ndarray  # dim×dim
    text_mean: np.ndarray
    image_mean: np.ndarray

    @classmethod
    def fit(cls, text_vectors: np.ndarray, image_vectors: np.ndarray, *,
            lam: float = RIDGE_LAMBDA) -> "RidgeMap":
        x = text_vectors.astype(np.float64)
        y = image_vectors.astype(np.float64)
        text_mean, image_mean = x.mean(0), y.mean(0)
        x, y = x - text_mean, y - image_mean
        gram = x.T @ x
        # λ relative to the mean eigenvalue: the same λ means the same thing at any scale
        alpha = lam * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
        weight = np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), x.T @ y)
        return cls(weight.astype(np.float32), text_mean.astype(np.float32),
                   image_mean.astype(np.float32))

    def map(self, text_vectors: np.ndarray) -> np.ndarray:
        return _unit((text_vectors - self.text_mean) @ self.weight + self.image_mean)

    def image_vectors(self, text_vector: np.ndarray, texts: Sequence[str],
                      expansion: Expansion) -> np.ndarray:
        return self.map(text_vector[None, :])


@dataclass(frozen=True)
class ContrastiveMap:
    """A linear map text → image side, trained so each caption ranks its own image first."""

    weight: np.ndarray  # dim×dim
    bias: np.ndarray

    @classmethod
    def fit(cls, pairs: Pairs, *, config: "ContrastiveConfig | None" = None,
            progress: Callable[[int, int, float], None] | None = None
            ) -> tuple["ContrastiveMap", "ContrastiveStats"]:
        from .contrastive import ContrastiveConfig, train_contrastive_map

        weight, bias, stats = train_contrastive_map(
            pairs.text_vectors, pairs.image_vectors, pairs.image_ids,
            config=config or ContrastiveConfig(), progress=progress)
        return cls(weight, bias), stats

    def map(self, text_vectors: np.ndarray) -> np.ndarray:
        return _unit(text_vectors @ self.weight + self.bias)

    def image_vectors(self, text_vector: np.ndarray, texts: Sequence[str],
                      expansion: Expansion) -> np.ndarray:
        return self.map(text_vector[None, :])


class PriorExpander:
    """K samples of the diffusion prior for the text vector."""

    def __init__(self, prior: "DiffusionPrior") -> None:
        self.prior = prior

    def image_vectors(self, text_vector: np.ndarray, texts: Sequence[str],
                      expansion: Expansion) -> np.ndarray:
        return self.prior.sample(text_vector, samples=expansion.k, seed=expansion.seed,
                                 steps=expansion.denoise_steps, guidance=expansion.guidance)


# --- training and loading with a library ------------------------------------------------------
@dataclass(frozen=True)
class TrainReport:
    pairs: int
    images: int
    steps: int  # the prior's
    seconds: float
    final_loss: float
    path: str
    contrastive_steps: int = 0
    contrastive_seconds: float = 0.0
    contrastive_loss: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def prior_paths(library: "Library") -> tuple[Path, Path]:
    home = library.settings.home
    return home / WEIGHTS_FILE, home / META_FILE


def train_expanders(library: "Library", *, train: "TrainConfig | None" = None,
                    contrastive: "ContrastiveConfig | None" = None,
                    progress: Callable[[int, int, float], None] | None = None) -> TrainReport:
    """Train the diffusion prior and the contrastive map, fit both baselines; save them all.

    Args:
        library: an open library with captions linked to images.
        train: the prior's steps/epochs, seed and optimiser settings (default TrainConfig()).
        contrastive: the contrastive map's settings (default ContrastiveConfig()).
        progress: progress(done_steps, total_steps, recent_loss) over both trainings.
    Returns:
        What was trained, and where it was saved.
    """
    import torch

    from .contrastive import ContrastiveConfig
    from .prior import TrainConfig, config_dict, save_prior_files, train_diffusion_prior

    model = _library_model(library)
    pairs = training_pairs(library)
    train = train or TrainConfig()
    contrastive = contrastive or ContrastiveConfig()
    prior_steps = train.total_steps(len(pairs))
    total = prior_steps + contrastive.steps

    def prior_progress(done: int, _total: int, loss: float) -> None:
        if progress:
            progress(done, total, loss)

    def map_progress(done: int, _total: int, loss: float) -> None:
        if progress:
            progress(prior_steps + done, total, loss)

    prior, stats = train_diffusion_prior(pairs.text_vectors, pairs.image_vectors, train=train,
                                         progress=prior_progress)
    mapping, map_stats = ContrastiveMap.fit(pairs, config=contrastive, progress=map_progress)
    shift = MeanShift.fit(pairs.text_vectors, pairs.image_vectors)
    ridge = RidgeMap.fit(pairs.text_vectors, pairs.image_vectors)
    tensors = prior.tensors()
    tensors.update({"meanshift.delta": torch.from_numpy(shift.delta),
                    "ridge.weight": torch.from_numpy(ridge.weight),
                    "ridge.text_mean": torch.from_numpy(ridge.text_mean),
                    "ridge.image_mean": torch.from_numpy(ridge.image_mean),
                    "contrastive.weight": torch.from_numpy(mapping.weight),
                    "contrastive.bias": torch.from_numpy(mapping.bias)})
    images = int(len(np.unique(pairs.image_ids)))
    meta = {"format": FORMAT_VERSION, "model": model, "dim": int(pairs.text_vectors.shape[1]),
            "prior": config_dict(prior.config), "train": {**asdict(train), "steps": stats.steps},
            "ridge_lambda": RIDGE_LAMBDA, "pairs": len(pairs), "images": images,
            "seconds": round(stats.seconds, 2), "final_loss": round(stats.final_loss, 6),
            "contrastive": {**asdict(contrastive), "seconds": round(map_stats.seconds, 2),
                            "identity_penalty": map_stats.identity_penalty,
                            "final_loss": round(map_stats.final_loss, 6)},
            "trained_at": time.time()}
    weights_path, meta_path = prior_paths(library)
    save_prior_files(weights_path, meta_path, tensors, meta)
    return TrainReport(len(pairs), images, stats.steps, stats.seconds, stats.final_loss,
                       str(weights_path), map_stats.steps, map_stats.seconds,
                       map_stats.final_loss)


def _library_model(library: "Library") -> str:
    from index.errors import EmptyLibrary

    model = library.model
    if model is None:
        raise EmptyLibrary(f"the library at {library.settings.home} is empty: index images and "
                           f"add captions first")
    return model


@dataclass(frozen=True)
class SavedExpanders:
    meta: dict
    prior: "DiffusionPrior"
    meanshift: MeanShift
    ridge: RidgeMap
    contrastive: ContrastiveMap


def load_expanders(library: "Library") -> SavedExpanders | None:
    """The expanders `clipdex prior train` saved for this library, or None if never trained.

    Raises ModelMismatch when they were trained for another model (or dimension).
    """
    weights_path, meta_path = prior_paths(library)
    if not meta_path.exists() or not weights_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClipdexError(f"cannot read {meta_path}: {exc}; run `clipdex prior train` again"
                           ) from None
    _check_meta(library, meta, meta_path)
    return _load_tensors(weights_path, meta)


def _check_meta(library: "Library", meta: dict, meta_path: Path) -> None:
    model, dim = library.model, library.store.model_fingerprint()
    if meta.get("format") != FORMAT_VERSION:
        raise ClipdexError(f"{meta_path} was written by another clipdex version; run "
                           f"`clipdex prior train` again")
    if meta.get("model") != model or (dim and meta.get("dim") != dim[1]):
        raise ModelMismatch(
            f"the prior in {meta_path.parent} was trained for model {meta.get('model')!r} "
            f"({meta.get('dim')}-d), but this library uses {model!r}"
            + (f" ({dim[1]}-d)" if dim else "") + ": run `clipdex prior train` to train one "
            "for this library")


def _load_tensors(weights_path: Path, meta: dict) -> SavedExpanders:
    from safetensors.torch import load_file

    from .prior import DiffusionPrior, config_from_dict

    try:
        tensors = load_file(str(weights_path))
        prior = DiffusionPrior.from_tensors(config_from_dict(meta["prior"]), tensors)
        shift = MeanShift(tensors["meanshift.delta"].numpy())
        ridge = RidgeMap(tensors["ridge.weight"].numpy(), tensors["ridge.text_mean"].numpy(),
                         tensors["ridge.image_mean"].numpy())
        mapping = ContrastiveMap(tensors["contrastive.weight"].numpy(),
                                 tensors["contrastive.bias"].numpy())
    except Exception as exc:  # a truncated or foreign file: the user can retrain
        raise ClipdexError(f"cannot load the prior in {weights_path} ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); run `clipdex prior train` again") from None
    return SavedExpanders(meta, prior, shift, ridge, mapping)


# --- search -----------------------------------------------------------------------------------
class QueryExpansion:
    """Expanded search over a Searcher, keeping the loaded expanders warm between queries.

    Args:
        searcher: the Searcher to search with (its library's model encodes everything).
        notify: receives warnings for the user (e.g. a generator running on the CPU).
        expanders: use these instead of the ones `clipdex prior train` saved (benchmarks).
    """

    def __init__(self, searcher: Searcher, *, notify: Callable[[str], None] | None = None,
                 expanders: "SavedExpanders | None" = None) -> None:
        self.searcher = searcher
        self.notify = notify
        # False: not looked for yet; None: looked for, none saved
        self._saved: SavedExpanders | None | bool = expanders if expanders else False
        self._fitted: dict[str, QueryExpander] = {}
        self._generators: dict[str, QueryExpander] = {}

    def search(self, text: str | Sequence[str] | None = None, *,
               expansion: Expansion | None = None,
               image: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
               negatives: Sequence[str] = (), target: str = "images", k: int = 10,
               offset: int = 0, threshold: float | None = None, under: str | None = None,
               dedup: bool = False) -> SearchResult:
        """Searcher.search's arguments plus `expansion` (None: a plain search)."""
        if expansion is None:
            return self.searcher.search(text, image=image, negatives=negatives, target=target,
                                        k=k, offset=offset, threshold=threshold, under=under,
                                        dedup=dedup)
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
        terms = build_terms(texts, [str(p) for p in images], negatives)
        query = Query(terms, target=target, k=k, offset=offset, threshold=threshold,
                      under=os.path.abspath(under) if under else None, dedup=dedup,
                      expand=expansion.method)
        return self.run(query, expansion)

    def run(self, query: Query, expansion: Expansion) -> SearchResult:
        text_terms = _expandable_terms(query)
        expander = self.expander(expansion)  # before encoding: a missing prior fails fast
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        query_vector, exclude = self.searcher.query_vector(query.terms)
        text_vector = (query_vector if len(text_terms) == len(query.terms)
                       else self.searcher.query_vector(text_terms)[0])
        timings["encode"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        samples = expander.image_vectors(text_vector, [t.value for t in text_terms], expansion)
        timings["expand"] = (time.perf_counter() - t0) * 1000
        if expansion.fusion == "interp":
            fused = interpolate(query_vector, samples, expansion.a)
            return self.searcher.search_vector(fused, query, exclude=exclude, timings=timings)
        return self._rrf(query, query_vector, samples, expansion.a, exclude, timings)

    def _rrf(self, query: Query, query_vector: np.ndarray, samples: np.ndarray, weight: float,
             exclude: set[int], timings: dict) -> SearchResult:
        deep = replace(query, k=max(RRF_DEPTH, 4 * (query.offset + query.k)), offset=0)
        lists = [self.searcher.search_vector(v, deep, exclude=exclude, timings=timings).hits
                 for v in [query_vector, *samples]]
        by_id: dict[int, Hit] = {h.id: h for hits in lists for h in hits}
        fused = reciprocal_rank_fusion([[h.id for h in hits] for hits in lists],
                                       rrf_weights(len(samples), weight))
        hits = [replace(by_id[i], score=score) for i, score in fused]
        return SearchResult(query, tuple(hits[query.offset:query.offset + query.k]), timings)

    def expander(self, expansion: Expansion) -> QueryExpander:
        """The (cached) expander for a method: saved by `prior train`, or fitted now."""
        method = expansion.method
        if method == "pixels":
            return self._pixel_expander(expansion.generator or "")
        saved = self.saved()
        if method in ("prior", "contrastive"):
            if saved is None:
                what = "diffusion prior" if method == "prior" else "contrastive map"
                raise PriorNotTrained(
                    f"--expand {method} needs the library's trained {what}, and the library "
                    f"at {self.searcher.library.settings.home} has none: run `clipdex prior "
                    f"train` first (or use --expand meanshift / --expand ridge, which need "
                    f"no training)")
            return PriorExpander(saved.prior) if method == "prior" else saved.contrastive
        if saved is not None:
            return saved.meanshift if method == "meanshift" else saved.ridge
        if method not in self._fitted:
            pairs = training_pairs(self.searcher.library)
            fit = MeanShift.fit if method == "meanshift" else RidgeMap.fit
            self._fitted[method] = fit(pairs.text_vectors, pairs.image_vectors)
        return self._fitted[method]

    def saved(self) -> SavedExpanders | None:
        if self._saved is False:
            self._saved = load_expanders(self.searcher.library)
        return self._saved  # type: ignore[return-value]

    def _pixel_expander(self, generator: str) -> QueryExpander:
        if generator not in self._generators:
            from .pixels import PixelExpander

            self._generators[generator] = PixelExpander.load(
                generator, self.searcher.embedder, notify=self.notify)
        return self._generators[generator]


def _expandable_terms(query: Query) -> list[Term]:
    """The positive text terms an expansion starts from; refuses queries it cannot expand."""
    if query.target != "images":
        raise UsageProblem("--expand moves a text query towards images: it works with "
                           "--target images only")
    texts = [t for t in query.terms if t.kind == "text" and t.weight > 0]
    if not texts:
        raise UsageProblem("--expand needs a query text to expand (an --image query is "
                           "already on the image side)")
    return texts
