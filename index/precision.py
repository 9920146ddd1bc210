"""Model precision on the CPU and GPU: the choice, the int8 probe, and int8's rewrites.

`auto` means bf16 on a GPU; on a CPU, dynamic int8 for each tower whose int8 output matches fp32
on a small probe of generated scenes (cosine >= INT8_MIN_COSINE), else fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import UsageProblem
from .settings import PRECISIONS

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch

__all__ = ["INT8_MIN_COSINE", "TOWERS", "apply_precision", "checked_int8", "choose_precision",
           "split_attention"]

def choose_precision(precision: str, device: "torch.device") -> str:
    if precision not in PRECISIONS:
        raise UsageProblem(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    # CPUs: int8 when it agrees with fp32 on a probe (`checked_int8`), else fp32. On this
    # project's Intel Xeons (AVX-512 BF16 and VNNI reported, no AMX) bf16 weights ran *slower*
    # than fp32 (ViT-B-32 17 vs 29 img/s: oneDNN's avx512_core_bf16 matmul reaches 150 GFLOPS
    # against fp32's 278), while dynamic int8 with every Linear quantised (attention included)
    # ran ~2x fp32 at cosine 0.9998 (bench/ingest.py, 2026-11-27). DESIGN.md measured bf16 2x on
    # a Zen 4: ask for --precision bf16 where it pays.
    return "auto-cpu"


INT8_MIN_COSINE = 0.999  # int8 must match fp32 this closely on the probe, or auto keeps fp32




def checked_int8(model: Any, preprocess: Callable, tokenizer: Callable,
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
    from .synthetic import scenes

    probe = scenes.generate(4, seed=11)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    inputs = {
        "image": torch.stack([preprocess(scenes.render(s, size)) for s in probe]).to(device),
        "text": tokenizer([scenes.caption_for(s, i) for i, s in enumerate(probe)]).to(device),
    }
    quantised = apply_precision(copy.deepcopy(model), "int8", device)
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
    return apply_precision(model, "int8", device, passed), f"int8-{passed[0]}", cosines


TOWERS = ("image", "text")


def _tower(module_name: str) -> str:
    return "image" if module_name.split(".", 1)[0] == "visual" else "text"


def apply_precision(model: Any, precision: str, device: "torch.device",
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

        split_attention(model, towers)
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


def split_attention(model: Any, towers: Sequence[str] = TOWERS) -> None:
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
