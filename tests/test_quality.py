"""Retrieval quality of the shipped tiny model on freshly generated, held-out scenes.

Fixed seeds make the figures deterministic; `python scripts/quality.py` prints them.
"""

from __future__ import annotations

from index.embedder import Embedder
from index.quality import measure_quality


def test_tiny_model_retrieval_quality(tiny_embedder: Embedder) -> None:
    report = measure_quality(tiny_embedder.encode_images, tiny_embedder.encode_texts)
    print(report.as_dict())
    assert report.colour_shape_p10 >= 0.8, report
    assert report.caption_r5 >= 0.5, report
    # held-out colour/shape pairs: reported, aimed at ≥ 0.5; guarded well above chance (1/64)
    assert report.holdout_p10 >= 0.25, report
