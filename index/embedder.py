"""The CLIP embedder: PIL images and strings in, L2-normalised float32 vectors out.

Built on open_clip's own registry and loaders; `tiny` is a folder shipped in this package and goes
through open_clip's `local-dir:` path like any other local model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelUnavailable, UsageProblem

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch
    from PIL import Image

__all__ = ["PRECISIONS", "Embedder", "resolve_spec"]

TINY_DIR = Path(__file__).parent / "models" / "tiny"
PRECISIONS = ("auto", "fp32", "bf16", "int8")
OFFLINE_HINT = (
    "Use --model tiny (the small offline CLIP shipped with clipdex), or point at weights on disk: "
    "--model ARCH:/path/to/checkpoint.pt or --model local-dir:/path/to/open_clip_folder."
)


@dataclass(frozen=True)
class ModelSource:
    """What open_clip is asked for: a model name (maybe with schema) and a pretrained tag/file."""

    name: str
    pretrained: str | None


def resolve_spec(spec: str) -> ModelSource:
    """Turn a user's model string into open_clip arguments (no heavy import for `tiny`)."""
    spec = spec.strip()
    if not spec:
        raise UsageProblem("empty model spec")
    if spec == "tiny":
        if not (TINY_DIR / "open_clip_model.safetensors").is_file():
            # open_clip would silently fall back to random weights
            raise ModelUnavailable(f"the tiny model's weights are missing from {TINY_DIR}; "
                                   f"reinstall clipdex or run scripts/train_tiny.py")
        return ModelSource(f"local-dir:{TINY_DIR}", None)
    if spec.startswith(("hf-hub:", "local-dir:")):
        return ModelSource(spec, None)
    if os.path.isdir(spec):
        return ModelSource(f"local-dir:{os.path.abspath(spec)}", None)
    arch, _, tag = spec.partition(":")
    import open_clip

    if arch not in open_clip.list_models():
        raise ModelUnavailable(
            f"unknown model {arch!r}. Give an open_clip architecture with a pretrained tag "
            f"(e.g. ViT-B-32:laion2b_s34b_b79k), hf-hub:ORG/REPO, local-dir:PATH or tiny."
        )
    if not tag:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none known"
        raise UsageProblem(f"model {arch!r} needs a pretrained tag or checkpoint path, e.g. "
                           f"{arch}:TAG (tags: {tags}), or {arch}:random for random weights")
    return ModelSource(arch, None if tag == "random" else tag)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs on the root logger (random init, failed downloads); we report instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def _pick_precision(precision: str, device: "torch.device") -> str:
    if precision not in PRECISIONS:
        raise UsageProblem(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    # fp32 on CPUs: on this project's Intel Xeon machines (AVX-512 BF16 reported) bf16 weights
    # ran slower than fp32, ViT-B-32 17 vs 30 img/s and tiny 1150 vs 1360 img/s
    # (bench/ingest.py, 2026-11-27), although DESIGN.md measured 2x on a Zen 4. Ask for
    # --precision bf16 where it pays.
    return "fp32"


class Embedder:
    """Encodes images and texts with one open_clip model.

    Args (to `load`):
        spec: model string (`tiny`, `ViT-B-32:laion2b_s34b_b79k`, `hf-hub:…`, `local-dir:…`,
            `ARCH:/path/to/checkpoint.pt`, `ARCH:random`).
        device: "cpu", "cuda" or None for CUDA when present.
        precision: "auto" (bf16 on a GPU, fp32 on a CPU: measured faster here), "fp32", "bf16",
            or "int8" (dynamic int8 Linear layers, CPU only).
        threads: torch intra-op threads (None leaves torch's default).
    """

    def __init__(self, spec: str, model: Any, preprocess: Callable, tokenizer: Callable,
                 device: "torch.device", precision: str) -> None:
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection")
                       and model.text_projection is not None else model.visual.output_dim)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @classmethod
    def load(cls, spec: str, *, device: str | None = None, precision: str = "auto",
             threads: int | None = None) -> "Embedder":
        import torch

        if threads:
            torch.set_num_threads(threads)
        source = resolve_spec(spec)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        chosen = _pick_precision(precision, dev)
        model, preprocess, tokenizer = _create(source, spec)
        model.eval()
        model = _apply_precision(model, chosen, dev)
        return cls(spec, model, preprocess, tokenizer, dev, chosen)

    def fingerprint(self) -> dict[str, Any]:
        """What makes vectors comparable: recorded in a library at creation."""
        return {"model": self.spec, "dim": self.dim, "preprocess": repr(self.preprocess)}

    @property
    def _dtype(self) -> "torch.dtype":
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def encode_image_tensors(self, batch: "torch.Tensor") -> np.ndarray:
        """Encode an already preprocessed N×3×H×W batch."""
        import torch

        with torch.inference_mode():
            features = self.model.encode_image(batch.to(self.device, self._dtype))
            return _normalise(features)

    def encode_images(self, images: Sequence["Image.Image"], *, batch_size: int = 64) -> np.ndarray:
        """Encode PIL images (any mode) to an N×dim float32 array of unit vectors."""
        import torch

        out = [np.empty((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk])
            out.append(self.encode_image_tensors(batch))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Encode strings to an N×dim float32 array of unit vectors."""
        import torch

        out = [np.empty((0, self.dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
                out.append(_normalise(self.model.encode_text(tokens)))
        return np.concatenate(out)


def _normalise(features: "torch.Tensor") -> np.ndarray:
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def _create(source: ModelSource, spec: str) -> tuple[Any, Callable, Callable]:
    import open_clip

    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(
                source.name, pretrained=source.pretrained)
            tokenizer = open_clip.get_tokenizer(source.name)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelUnavailable(f"could not load model {spec!r}: {exc}. {OFFLINE_HINT}") from None
    except Exception as exc:  # download failures surface as many types (RuntimeError, OSError…)
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelUnavailable(
            f"could not load model {spec!r}: its weights could not be downloaded or read "
            f"({reason}). {OFFLINE_HINT}") from None
    return model, preprocess, tokenizer


def _apply_precision(model: Any, precision: str, device: "torch.device") -> Any:
    import torch

    model = model.to(device)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "int8":
        if device.type != "cpu":
            raise UsageProblem("int8 precision runs on the CPU only")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dynamic-quantisation API is deprecated
            # ModifiedResNet's attention pool reads its Linear weights directly: keep it fp32
            names = {name for name, module in model.named_modules()
                     if type(module) is torch.nn.Linear and "attnpool" not in name}
            return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8)
    return model
