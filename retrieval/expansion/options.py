"""How a query is expanded: the methods, their tuned defaults, and the options value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from index.errors import UsageProblem

__all__ = ["DEFAULT_METHOD", "FUSIONS", "METHODS", "Expansion", "QueryExpander"]

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
