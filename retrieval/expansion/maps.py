"""The caption–image pairs of a library and the maps learnt from them (text → image side)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from index.errors import NoTrainingPairs

from .fusion import unit
from .options import Expansion

if TYPE_CHECKING:
    from index import Library

    from .contrastive import ContrastiveConfig, ContrastiveStats
    from .prior import DiffusionPrior

__all__ = ["ContrastiveMap", "MeanShift", "Pairs", "PriorExpander", "RidgeMap",
           "training_pairs"]

RIDGE_LAMBDA = 1e-2  # relative to the mean eigenvalue of the centred text covariance


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
    pairs = library.store.caption_pairs()
    if not len(pairs.caption_ids):
        raise NoTrainingPairs(
            f"the library at {library.settings.home} has no captions linked to indexed images, "
            f"so there is nothing to learn from: index images (`clipdex index PATH`) and add "
            f"captions that name them (`clipdex captions add FILE`) first")
    return Pairs(pairs.text_vectors, pairs.image_vectors, pairs.image_ids, pairs.caption_ids)


@dataclass(frozen=True)
class MeanShift:
    """t + (mean image vector − mean text vector): closes the modality gap on average."""

    delta: np.ndarray

    @classmethod
    def fit(cls, text_vectors: np.ndarray, image_vectors: np.ndarray) -> "MeanShift":
        return cls((image_vectors.mean(0) - text_vectors.mean(0)).astype(np.float32))

    def map(self, text_vectors: np.ndarray) -> np.ndarray:
        return unit(text_vectors + self.delta)

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
        return unit((text_vectors - self.text_mean) @ self.weight + self.image_mean)

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
        return unit(text_vectors @ self.weight + self.bias)

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
