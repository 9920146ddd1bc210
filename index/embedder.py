"""The CLIP embedder: PIL images and strings in, L2-normalised float32 vectors out.

Built on open_clip's own registry and loaders; `tiny` is a folder shipped in this package and goes
through open_clip's `local-dir:` path like any other local model.
"""

from __future__ import annotations

import contextlib
import functools
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


def is_embedder(obj: object) -> bool:
    """Whether `obj` is a loaded embedder (not a factory that makes one)."""
    return hasattr(obj, "encode_image_tensors") and hasattr(obj, "encode_texts")


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
    # CPUs: int8 when it agrees with fp32 on a probe (`_checked_int8`), else fp32. On this
    # project's Intel Xeons (AVX-512 BF16 and VNNI reported, no AMX) bf16 weights ran *slower*
    # than fp32 (ViT-B-32 17 vs 29 img/s: oneDNN's avx512_core_bf16 matmul reaches 150 GFLOPS
    # against fp32's 278), while dynamic int8 with every Linear quantised (attention included)
    # ran ~2x fp32 at cosine 0.9998 (bench/ingest.py, 2026-11-27). DESIGN.md measured bf16 2x on
    # a Zen 4: ask for --precision bf16 where it pays.
    return "auto-cpu"


INT8_MIN_COSINE = 0.999  # int8 must match fp32 this closely on the probe, or auto keeps fp32


def _checked_int8(model: Any, preprocess: Callable, tokenizer: Callable,
                  device: "torch.device") -> tuple[Any, str, dict[str, float]]:
    """Quantise each tower of a copy of `model` that agrees with fp32 on a small probe.

    The probe is a few generated scenes and their captions (no downloads). Returns the model to
    use, its precision ("int8", "int8-image", "int8-text" or "fp32": which towers run int8) and
    each tower's lowest probe cosine to fp32.
    """
    import copy

    import torch

    if not {"x86", "fbgemm", "onednn"} & set(torch.backends.quantized.supported_engines):
        return model, "fp32", {}
    from . import scenes

    probe = scenes.generate(4, seed=11)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    inputs = {
        "image": torch.stack([preprocess(scenes.render(s, size)) for s in probe]).to(device),
        "text": tokenizer([scenes.caption_for(s, i) for i, s in enumerate(probe)]).to(device),
    }
    quantised = _apply_precision(copy.deepcopy(model), "int8", device)
    cosines: dict[str, float] = {}
    with torch.inference_mode():
        for tower, data in inputs.items():
            encode = "encode_image" if tower == "image" else "encode_text"
            a = getattr(model, encode)(data).float()
            b = getattr(quantised, encode)(data).float()
            cosines[tower] = torch.nn.functional.cosine_similarity(a, b).min().item()
    passed = tuple(t for t in TOWERS if cosines[t] >= INT8_MIN_COSINE)
    if passed == TOWERS:
        return quantised, "int8", cosines
    if not passed:
        return model, "fp32", cosines
    del quantised
    return _apply_precision(model, "int8", device, passed), f"int8-{passed[0]}", cosines


class Embedder:
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
             threads: int | None = None) -> "Embedder":
        import torch

        if threads:
            torch.set_num_threads(threads)
        source = resolve_spec(spec)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        chosen = _pick_precision(precision, dev)
        model, preprocess, tokenizer = _create(source, spec)
        model.eval()
        probe: dict[str, float] = {}
        if chosen == "auto-cpu":
            model, chosen, probe = _checked_int8(model, preprocess, tokenizer, dev)
        else:
            model = _apply_precision(model, chosen, dev)
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


TOWERS = ("image", "text")


def _tower(module_name: str) -> str:
    return "image" if module_name.split(".", 1)[0] == "visual" else "text"


def _apply_precision(model: Any, precision: str, device: "torch.device",
                     towers: Sequence[str] = TOWERS) -> Any:
    """Cast or quantise `model`; int8 applies to the named towers only ("image", "text")."""
    import torch

    model = model.to(device)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "int8":
        if device.type != "cpu":
            raise UsageProblem("int8 precision runs on the CPU only")
        import warnings

        _split_attention(model, towers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dynamic-quantisation API is deprecated
            # ModifiedResNet's attention pool reads its Linear weights directly: keep it fp32
            names = {name for name, module in model.named_modules()
                     if type(module) is torch.nn.Linear and "attnpool" not in name
                     and _tower(name) in towers}
            model = torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8)
        for module in model.modules():
            if type(module).__name__ == "Linear" and callable(getattr(module, "weight", None)):
                # open_clip asks an MLP's first Linear for the dtype to cast text inputs to; a
                # quantised Linear's `weight` is a method, and open_clip reads this instead
                module.int8_original_dtype = torch.float32
    return model


def _split_attention(model: Any, towers: Sequence[str] = TOWERS) -> None:
    """Swap every nn.MultiheadAttention for a SelfAttention whose projections are plain Linears.

    nn.MultiheadAttention keeps its input projection as a bare parameter, so dynamic quantisation
    leaves it (and, via the fused fast path, the output projection) in fp32: on ViT-B-32 that is
    40% of the encoder's matmul time.
    """
    import torch

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if (type(child) is torch.nn.MultiheadAttention and child._qkv_same_embed_dim
                    and _tower(full) in towers):
                setattr(parent, name, _self_attention_class().from_mha(child))


@functools.cache
def _self_attention_class():  # built on first use: torch is imported lazily
    import torch
    import torch.nn.functional as F

    class SelfAttention(torch.nn.Module):
        """Self-attention with the call signature open_clip uses on nn.MultiheadAttention."""

        def __init__(self, embed_dim: int, num_heads: int, batch_first: bool, bias: bool) -> None:
            super().__init__()
            self.num_heads, self.batch_first = num_heads, batch_first
            self.qkv = torch.nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
            self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)

        @classmethod
        def from_mha(cls, mha: "torch.nn.MultiheadAttention") -> "SelfAttention":
            new = cls(mha.embed_dim, mha.num_heads, mha.batch_first, mha.in_proj_bias is not None)
            with torch.no_grad():
                new.qkv.weight.copy_(mha.in_proj_weight)
                new.out_proj.weight.copy_(mha.out_proj.weight)
                if mha.in_proj_bias is not None:
                    new.qkv.bias.copy_(mha.in_proj_bias)
                    new.out_proj.bias.copy_(mha.out_proj.bias)
            return new.to(mha.in_proj_weight.device)

        def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None,
                    key_padding_mask=None, **_):
            if (key is not None and key is not query) or (value is not None and value is not query):
                raise ValueError("only self-attention is supported")
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask is not supported")
            x = query if self.batch_first else query.transpose(0, 1)
            batch, length, width = x.shape
            q, k, v = (self.qkv(x).view(batch, length, 3, self.num_heads, -1)
                       .permute(2, 0, 3, 1, 4).unbind(0))
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # True means "masked out" here, "attend" in SDPA
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
            return (out if self.batch_first else out.transpose(0, 1)), None

    return SelfAttention
