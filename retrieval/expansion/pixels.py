"""Pixel-space expansion: generate images from the query text, embed them as images.

Any Hugging Face diffusers text-to-image pipeline works: a hub model id (downloaded by diffusers
when a network is there) or a folder written with `pipeline.save_pretrained(...)`. The generated
images go through the library's own image encoder, so they land exactly where the library's
images do. diffusers and transformers come with the extra `diffusion` and are imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from index.errors import GeneratorUnavailable, MissingExtra, UsageProblem

from .options import Expansion

if TYPE_CHECKING:
    from index.embedder import Embedder

__all__ = ["PixelExpander", "load_pipeline"]

INSTALL_HINT = "pip install 'clipdex[diffusion]'"


def _import_diffusers() -> Any:
    try:
        import diffusers
        import transformers  # text encoders of the pipelines live here
    except ImportError as exc:
        raise MissingExtra(f"--expand pixels needs diffusers and transformers ({exc.name} is "
                           f"not installed): {INSTALL_HINT}") from None
    # their loading bars and advice (e.g. "install accelerate") would drown the results
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    return diffusers


def load_pipeline(spec: str, *, device: str | None = None) -> Any:
    """A diffusers text-to-image pipeline from a model id or a save_pretrained folder."""
    import torch

    diffusers = _import_diffusers()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        pipeline = diffusers.DiffusionPipeline.from_pretrained(spec)
    except Exception as exc:  # offline hub, missing folder, wrong layout: all one message
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise GeneratorUnavailable(
            f"cannot load the image generator {spec!r}: {reason}. Give a diffusers model id "
            f"(downloaded once, needs a network) or a folder written by save_pretrained") from None
    if not callable(pipeline) or not hasattr(pipeline, "unet") and not hasattr(
            pipeline, "transformer"):
        raise GeneratorUnavailable(f"{spec!r} is not a text-to-image diffusers pipeline")
    pipeline.set_progress_bar_config(disable=True)
    # cast after loading: the loading keyword for dtypes was renamed between diffusers versions
    return pipeline.to(device, dtype)


class PixelExpander:
    """Generates K images per query with a diffusers pipeline and embeds them.

    Args:
        pipeline: a loaded diffusers text-to-image pipeline.
        embedder: the library's embedder (its image encoder embeds the generated images).
        notify: receives a warning when generation runs on the CPU (slow).
    """

    def __init__(self, pipeline: Any, embedder: "Embedder", *,
                 notify: Callable[[str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.embedder = embedder
        self.notify = notify
        self._warned = False

    @classmethod
    def load(cls, spec: str, embedder: "Embedder", *,
             notify: Callable[[str], None] | None = None) -> "PixelExpander":
        if not spec:
            raise UsageProblem("--expand pixels needs --generator SPEC")
        return cls(load_pipeline(spec), embedder, notify=notify)

    def image_vectors(self, text_vector: np.ndarray, texts: Sequence[str],
                      expansion: Expansion) -> np.ndarray:
        images = self.generate(", ".join(texts), count=expansion.k, seed=expansion.seed,
                               steps=expansion.denoise_steps)
        return self.embedder.encode_images(images)

    def generate(self, prompt: str, *, count: int, seed: int, steps: int) -> list:
        """`count` PIL images for the prompt, deterministic for a seed on one device."""
        import torch

        device = self.pipeline.device
        if device.type == "cpu" and not self._warned and self.notify:
            self.notify("generating images on the CPU: this takes a while (a GPU is much "
                        "faster)")
            self._warned = True
        generator = torch.Generator(device=device.type).manual_seed(int(seed))
        try:
            output = self.pipeline(prompt, num_images_per_prompt=count, generator=generator,
                                   num_inference_steps=steps, output_type="pil")
        except (RuntimeError, ValueError, OSError) as exc:  # out of memory, bad prompt length…
            raise GeneratorUnavailable(f"the image generator failed: {type(exc).__name__}: "
                                       f"{str(exc)[:300]}") from None
        return list(output.images)
