"""Fusing a text query with its image-side samples: interpolation or reciprocal rank fusion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RRF_DEPTH", "RRF_K", "interpolate", "reciprocal_rank_fusion", "rrf_weights", "unit"]

RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
RRF_DEPTH = 100  # how deep each list of an RRF search is read


def unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def interpolate(text_vectors: np.ndarray, image_vectors: np.ndarray, weight: float) -> np.ndarray:
    """normalise((1 − A)·t + A·normalise(mean(sᵢ))); t is (…, dim), sᵢ is (…, K, dim)."""
    image_side = unit(image_vectors.mean(axis=-2))
    return unit((1.0 - weight) * unit(text_vectors) + weight * image_side)


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
