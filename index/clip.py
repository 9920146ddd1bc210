"""The open_clip embedder: PIL images and strings in, L2-normalised float32 vectors out.

Built on open_clip's own registry and loaders; `tiny` is a folder shipped in this package and goes
through open_clip's `local-dir:` path like any other local model. Registered as the default of
index.embedder's registry: any spec no other embedder claims loads here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelUnavailable, UsageProblem
from .precision import apply_precision, checked_int8, choose_precision

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch
    from PIL import Image

__all__ = ["TINY_DIR", "ClipEmbedder", "encode_text_trimmed", "hub_reachable", "resolve_spec",
           "shorten"]

TINY_DIR = Path(__file__).parent / "models" / "tiny"
OFFLINE_HINT = (
    "Use --model tiny (the small offline CLIP shipped with clipdex), or point at weights on disk: "
    "--model ARCH:/path/to/checkpoint.pt or --model local-dir:/path/to/open_clip_folder."
)
DEFAULT_HUB = "https://huggingface.co"
HUB_PROBE_SECONDS = 2.0  # one TCP connect; a reachable hub answers in well under a second
REASON_CHARS = 300  # of a download error quoted in ours


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
    """Keep open_clip's and the hub's logs and warnings (random init, retries, failed downloads)
    off the terminal while a model loads: we report instead.

    open_clip logs through the root logger's functions, which install a stderr handler on
    first use, and huggingface_hub has a handler of its own, so a failing download printed
    each retry twice. Shown as they are when the application logs at INFO (`clipdex
    --verbose`); download progress bars are not logs and still show.
    """
    if logging.getLogger("clipdex").isEnabledFor(logging.INFO):
        yield
        return
    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    levels = root.level, hub.level
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)  # a root with a handler is never given a default one
    root.setLevel(logging.CRITICAL)
    hub.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeHandler(placeholder)
        root.setLevel(levels[0])
        hub.setLevel(levels[1])


def _needs_hub(source: ModelSource) -> bool:
    """Whether loading may download: a pretrained tag or an hf-hub: model (not a local file)."""
    if source.name.startswith("hf-hub:"):
        return True
    tag = source.pretrained
    return bool(tag) and os.sep not in tag and not os.path.isfile(tag)


def _hub_address() -> tuple[str, int]:
    """Where a download connects first: the HTTPS proxy when one is set, else the hub."""
    import urllib.request
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_HUB
    proxy = urllib.request.getproxies().get("https")
    host = urlsplit(endpoint).hostname or ""
    if proxy and not urllib.request.proxy_bypass(host):
        endpoint = proxy if "://" in proxy else f"http://{proxy}"
    url = urlsplit(endpoint)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the model hub (or the HTTPS proxy) opens within `timeout`.

    Run in a thread because a name lookup does not honour a socket timeout."""
    host, port = _hub_address()
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except (OSError, UnicodeError):
            answer.append(False)

    thread = threading.Thread(target=connect, name="clipdex-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@contextlib.contextmanager
def _offline_unless_reachable(source: ModelSource) -> Iterator[str | None]:
    """Yields why the load runs offline (None: online, or no download needed).

    Unreachable, huggingface_hub would retry every file for about a minute before failing;
    in its offline mode it answers from the local cache at once, so a cached model still
    loads. The hub reads HF_HUB_OFFLINE once, at import: its constant is set for the load.
    """
    if not _needs_hub(source):
        yield None
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield "HF_HUB_OFFLINE is set"
        return
    if hub_reachable():
        yield None
        return
    host = _hub_address()[0]
    saved = os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield f"{host} cannot be reached"
    finally:
        constants.HF_HUB_OFFLINE = False
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def shorten(text: str, limit: int = REASON_CHARS) -> str:
    """The first line of `text`, cut at a word boundary with "…" when over `limit`."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + "…"


class ClipEmbedder:
    """Encodes images and texts with one open_clip model.

    Args (to `load`):
        spec: model string (`tiny`, `ViT-B-32:laion2b_s34b_b79k`, `hf-hub:…`, `local-dir:…`,
            `ARCH:/path/to/checkpoint.pt`, `ARCH:random`).
        device: "cpu", "cuda" or None for CUDA when present.
        precision: "auto" (bf16 on a GPU; on a CPU int8 when it matches fp32 to cosine
            ≥ 0.999 on a probe, else fp32), "fp32", "bf16", or "int8" (dynamic int8 Linear
            layers, attention projections included; CPU only).
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
             threads: int | None = None) -> "ClipEmbedder":
        import torch

        if threads:
            torch.set_num_threads(threads)
        source = resolve_spec(spec)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        chosen = choose_precision(precision, dev)
        model, preprocess, tokenizer = _create(source, spec)
        model.eval()
        probe: dict[str, float] = {}
        if chosen == "auto-cpu":
            model, chosen, probe = checked_int8(model, preprocess, tokenizer, dev)
        else:
            model = apply_precision(model, chosen, dev)
        embedder = cls(spec, model, preprocess, tokenizer, dev, chosen)
        embedder.int8_probe_cosine = probe  # per tower, when auto weighed int8 against fp32
        return embedder

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

    def prepare(self, image: "Image.Image") -> "np.ndarray | torch.Tensor":
        """The per-image part of `preprocess`, for decode threads; `collate` finishes a batch.

        open_clip's usual preprocess is PIL steps (resize, crop, RGB), then ToTensor and
        Normalize. Those last two are per-pixel arithmetic: done here, image by image, they are
        many small torch calls that hold the GIL and so stall the other decode threads (two
        threads sped preprocess up 1.25-1.55x, not 2x; tiny model, 1 MP photos). So this returns the
        PIL steps' uint8 H×W×3 array and `collate` converts a whole batch at once, with the
        same arithmetic (bit-identical; tested). Another preprocess shape: the tensor, as
        `preprocess` makes it.
        """
        split = self._split_preprocess
        if split is None:
            return self.preprocess(image)
        array = np.asarray(split[0](image))
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            return self.preprocess(image)
        return array

    def collate(self, items: Sequence["np.ndarray | torch.Tensor"]) -> "torch.Tensor":
        """An N×3×H×W batch from what `prepare` returned."""
        import torch

        if all(isinstance(item, np.ndarray) for item in items):
            return self._finish(np.stack(items))
        return torch.stack([self._finish(np.stack([item]))[0] if isinstance(item, np.ndarray)
                            else item for item in items])

    def _finish(self, arrays: np.ndarray) -> "torch.Tensor":
        """N×H×W×3 uint8 → the normalised N×3×H×W float batch (ToTensor, then Normalize)."""
        import torch

        mean, std = self._split_preprocess[1]  # type: ignore[index]
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
        return batch.to(torch.float32).div(255).sub_(mean).div_(std)

    @functools.cached_property
    def _split_preprocess(self) -> tuple[Callable, tuple["torch.Tensor", "torch.Tensor"]] | None:
        """(PIL steps, (mean, std)) when preprocess ends in ToTensor + Normalize, else None."""
        import torch
        from torchvision import transforms

        steps = list(getattr(self.preprocess, "transforms", []))
        names = [type(t).__name__ for t in steps]
        if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") \
                or not isinstance(steps[-1], transforms.Normalize) or steps[-1].inplace:
            return None
        normalize = steps[-1]
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
        return transforms.Compose(steps[:-2]), (mean, std)

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

        if not len(texts):
            return np.empty((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        # similar lengths share a batch, so each batch is trimmed to its own longest text
        order = np.argsort(tokens.argmax(dim=-1).numpy(), kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = tokens[torch.from_numpy(rows)].to(self.device)
                out[rows] = _normalise(encode_text_trimmed(self.model, batch))
        return out


def encode_text_trimmed(model: Any, tokens: "torch.Tensor") -> "torch.Tensor":
    """open_clip's CLIP.encode_text, run only up to the batch's last end-of-text token.

    The text tower is causal and pools the end-of-text position, so the padding after it cannot
    change the result: a 12-token query runs 12 positions instead of the context's 77 (ViT-B-32
    text tower, one query: 44 → 19 ms measured). Models that pool otherwise or are not causal
    take the normal path.
    """
    import torch

    mask = getattr(model, "attn_mask", None)
    if (getattr(model, "text_pool_type", None) != "argmax" or mask is None
            or not hasattr(model, "positional_embedding") or not hasattr(model, "ln_final")):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1  # the end-of-text id is the largest id
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if callable(projection) else x @ projection


def _normalise(features: "torch.Tensor") -> np.ndarray:
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def _create(source: ModelSource, spec: str) -> tuple[Any, Callable, Callable]:
    import open_clip

    with _quiet_open_clip(), _offline_unless_reachable(source) as offline, _seeded(source):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                source.name, pretrained=source.pretrained)
            tokenizer = open_clip.get_tokenizer(source.name)
        except Exception as exc:  # download failures surface as many types (RuntimeError…)
            raise _unavailable(spec, exc, offline=offline) from None
    return model, preprocess, tokenizer


@contextlib.contextmanager
def _seeded(source: ModelSource) -> Iterator[None]:
    """Random weights (`ARCH:random`) from a fixed seed, whatever the process did before: the
    library's vectors and every later process's (the ONNX export too) come from one model.
    The caller's random state is left as it was."""
    if source.pretrained is not None or source.name.startswith(("local-dir:", "hf-hub:")):
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _unavailable(spec: str, exc: Exception, *, offline: str | None) -> ModelUnavailable:
    """One line: what failed, why (cut at a word), what to use instead."""
    if offline:
        return ModelUnavailable(
            f"could not load model {spec!r}: its weights are not in the local cache and "
            f"could not be downloaded ({offline}). {OFFLINE_HINT}")
    if isinstance(exc, (FileNotFoundError, ValueError)) and "download" not in str(exc).lower():
        return ModelUnavailable(f"could not load model {spec!r}: "
                                f"{shorten(str(exc)) or type(exc).__name__}. {OFFLINE_HINT}")
    return ModelUnavailable(
        f"could not load model {spec!r}: its weights could not be downloaded or read "
        f"({shorten(str(exc)) or type(exc).__name__}). {OFFLINE_HINT}")
