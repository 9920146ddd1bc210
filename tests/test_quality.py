"""Retrieval quality of the shipped tiny model on freshly generated, held-out scenes.

Fixed seeds make the figures deterministic; `python scripts/quality.py` prints them. Measured
for the shipped weights (2026-11-26): precision@10 0.657 for "<colour> <shape>" queries
(held-out pairs 0.75), caption→image recall@5 1.0 over 500 scenes. The issue's target for the
first figure is 0.8 and is NOT met yet; the guard below sits just under what ships, so a
regression fails.
"""

from __future__ import annotations

from index.embedder import Embedder
from index.quality import measure_quality


def test_tiny_model_retrieval_quality(tiny_embedder: Embedder) -> None:
    report = measure_quality(tiny_embedder.encode_images, tiny_embedder.encode_texts)
    print(report.as_dict())
    assert report.colour_shape_p10 >= 0.6, report  # target 0.8: see the module docstring
    assert report.holdout_p10 >= 0.5, report
    assert report.caption_r5 >= 0.5, report
