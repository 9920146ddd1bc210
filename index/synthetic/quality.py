"""Retrieval-quality measures on generated scenes, shared by the training script and the tests."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import COLOURS, HOLDOUT, SHAPES, Scene, caption_for, render, sample_scene

__all__ = ["QualityReport", "measure_quality"]

EncodeImages = Callable[[Sequence[Image.Image]], np.ndarray]
EncodeTexts = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class QualityReport:
    colour_shape_p10: float  # text→image precision@10 of "<colour> <shape>" seen in training
    holdout_p10: float  # the same for combinations held out of training
    caption_r5: float  # caption→image recall@5 over a gallery of `caption_gallery` scenes
    caption_gallery: int

    def as_dict(self) -> dict[str, float]:
        return {
            "colour_shape_p10": round(self.colour_shape_p10, 4),
            "holdout_p10": round(self.holdout_p10, 4),
            "caption_r5": round(self.caption_r5, 4),
            "caption_gallery": self.caption_gallery,
        }


def _balanced_gallery(seed: int, per_combo: int) -> list[Scene]:
    rng = random.Random(seed)
    return [
        sample_scene(rng, shape=shape, colour=colour)
        for colour in COLOURS
        for shape in SHAPES
        for _ in range(per_combo)
    ]


def _precision_at_10(
    scores: np.ndarray, gallery: Sequence[Scene], combos: Sequence[tuple[str, str]]
) -> float:
    hits = []
    for row, (colour, shape) in enumerate(combos):
        top = np.argsort(-scores[row])[:10]
        relevant = [gallery[i].colour == colour and gallery[i].shape == shape for i in top]
        hits.append(np.mean(relevant))
    return float(np.mean(hits))


def measure_quality(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    *,
    seed: int = 20261126,
    per_combo: int = 12,
    caption_gallery: int = 500,
    image_size: int = 224,
) -> QualityReport:
    """Measure text→image and caption→image retrieval on freshly generated scenes.

    The galleries are drawn from `seed`, which the training script never uses, and include the
    held-out colour/shape combinations.
    """
    gallery = _balanced_gallery(seed, per_combo)
    gallery_vectors = encode_images([render(s, image_size) for s in gallery])
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HOLDOUT]
    held = sorted(HOLDOUT)
    queries = encode_texts([f"{c} {s}" for c, s in seen + held])  # what a person types
    scores = queries @ gallery_vectors.T
    seen_p10 = _precision_at_10(scores[: len(seen)], gallery, seen)
    held_p10 = _precision_at_10(scores[len(seen):], gallery, held)

    rng = random.Random(seed + 1)
    scenes = [sample_scene(rng) for _ in range(caption_gallery)]
    image_vectors = encode_images([render(s, image_size) for s in scenes])
    text_vectors = encode_texts([caption_for(s, i) for i, s in enumerate(scenes)])
    sims = text_vectors @ image_vectors.T
    own = sims[np.arange(len(scenes)), np.arange(len(scenes))]
    ranks = (sims > own[:, None]).sum(axis=1)
    return QualityReport(seen_p10, held_p10, float(np.mean(ranks < 5)), caption_gallery)
