"""Export a library's open_clip model to ONNX for the torch-free query runtime, checked.

Each tower is exported in fp32 (the text tower with a dynamic length, so a query runs only up to
its last end-of-text token, as `encode_text_trimmed` does in torch) and checked against torch on
a probe of generated scenes and captions: a tower whose vectors fall below EXPORT_MIN_COSINE, or
whose tokenizer or image transform cannot be reproduced without torch, is not exported and
stays on torch. An int8 variant (onnxruntime's dynamic quantisation) is kept when it passes the
same probe rule as torch's int8 (INT8_MIN_COSINE) and ran faster than fp32 on the probe; `auto`
then uses it. Every file is written atomically and the manifest last, so a killed export leaves
no half file that a reader would use.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .onnx_runtime import (
    EXPORT_FORMAT,
    MANIFEST,
    TEXT_TABLE,
    export_folder,
    text_inputs,
    weights_stamp,
)
from .precision import INT8_MIN_COSINE

__all__ = ["EXPORT_MIN_COSINE", "PREPROCESS_MAX_ABS", "export_model", "remove_export"]

EXPORT_MIN_COSINE = 0.9999  # an fp32 export must match torch fp32 this closely, per probe vector
PREPROCESS_MAX_ABS = 1e-5  # numpy's transform against torchvision's, on the input tensor
OPSET = 17
TIMING_RUNS = 15  # query-sized encodes per variant when weighing int8 against fp32 (median)
TIMING_BUDGET_S = 1.0  # ... or fewer (at least 3) once they took this long


def export_model(home: Path, spec: str, *, progress: Callable[[str], None] | None = None
                 ) -> tuple[Path, dict]:
    """Export model `spec`'s towers into `home`'s export folder; returns (folder, manifest).

    Raises whatever loading the model raises (ModelUnavailable…); a tower that fails to export
    or fails its probe is recorded in the manifest with its reason, not raised.
    """
    from .clip import _quiet_open_clip

    with _quiet_open_clip():  # onnxruntime's quantiser logs advice on the root logger
        return _export(home, spec, progress or (lambda message: None))


def _export(home: Path, spec: str, say: Callable[[str], None]) -> tuple[Path, dict]:
    import torch

    from .clip import _create, resolve_spec
    from .precision import split_attention

    model, preprocess, tokenizer = _create(resolve_spec(spec), spec)
    model = model.float().eval()
    dim = _dim(model)
    folder = export_folder(home, spec, dim)
    folder.mkdir(parents=True, exist_ok=True)
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT, "spec": spec, "dim": dim, "image_size": image_size,
        "weights": weights_stamp(spec),
        "fingerprint": {"model": spec, "dim": dim, "preprocess": repr(preprocess)},
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "towers": {}, "tokenizer": None, "preprocess": None,
    }
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch's reference vectors first, from the model as open_clip built it
        plans = {"text": _text_plan(folder, model, tokenizer),
                 "image": _image_plan(model, preprocess, image_size)}
        # then in place (no second copy in memory): nn.MultiheadAttention's traced graph
        # fixes the batch shape, the plain-Linear SelfAttention's does not
        split_attention(model)
        for tower, (plan, config) in plans.items():
            manifest["tokenizer" if tower == "text" else "preprocess"] = config
            if isinstance(plan, _Plan):
                say(f"exporting the {tower} tower")
                manifest["towers"][tower] = _tower_files(folder, plan, model)
                if tower == "text" and manifest["towers"][tower].get("files"):
                    manifest["towers"][tower]["table"] = _file_entry(folder / TEXT_TABLE)
            else:
                manifest["towers"][tower] = plan
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return folder, manifest


@dataclass
class _Plan:
    """What exporting and probing one tower needs."""

    name: str
    wrapper: Callable  # model -> the nn.Module to export
    samples: tuple  # the example inputs
    input_names: list[str]
    axes: dict
    encode: Callable  # session -> the probe's vectors
    reference: np.ndarray  # torch fp32's vectors for the probe
    timed: Callable  # session -> one query-sized run


# --- the towers ------------------------------------------------------------------------------
def _text_plan(folder: Path, model, tokenizer) -> tuple["_Plan | dict", dict | None]:
    import torch

    from .clip_tokenizer import ClipTokenizer, describe_tokenizer

    described = describe_tokenizer(tokenizer)
    if described is None:
        return {"error": f"its tokenizer ({type(tokenizer).__name__}) cannot be reproduced "
                         f"without torch"}, None
    config, vocab_source = described
    if not _trimmable(model):
        return {"error": "its text tower is not a causal CLIP text transformer"}, None
    atomic_write(folder / config["vocab"], lambda tmp: shutil.copyfile(vocab_source, tmp))
    texts = _probe_texts()
    ours = ClipTokenizer.from_config(config, folder)(texts)
    theirs = tokenizer(texts).numpy()
    if ours.shape != theirs.shape or not np.array_equal(ours, theirs):
        return {"error": "the torch-free tokenizer disagrees with open_clip's on the probe"}, None
    reference = _unit(model.encode_text(torch.from_numpy(theirs)).numpy())
    # the token-embedding table stays out of the graph, in a file the runtime maps: a query
    # reads a few rows of it, not all of it (ViT-B-32: 101 of the tower's 254 MB)
    table = model.token_embedding.weight.detach().float().numpy()
    atomic_write(folder / TEXT_TABLE, lambda tmp: _save_npy(tmp, table))
    length = int(ours.argmax(-1).max()) + 1
    sample = ours[:2, :length].astype(np.int64)
    query = ours[:1, :int(ours[0].argmax()) + 1]
    return _Plan("text", _TextTower, (torch.from_numpy(table[sample]), torch.from_numpy(sample)),
                 ["embedded", "tokens"],
                 {"embedded": {0: "batch", 1: "length"}, "tokens": {0: "batch", 1: "length"}},
                 lambda session: _run_text(session, ours, table), reference,
                 lambda session: session.run(None, text_inputs(table, query))), config


def _image_plan(model, preprocess, image_size: int) -> tuple["_Plan | dict", dict | None]:
    import torch

    from .image_prep import ImagePrep, describe_preprocess

    spec = describe_preprocess(preprocess)
    if spec is None:
        return {"error": "its image transform cannot be reproduced without torch"}, None
    images = _probe_images(image_size)
    ours = np.stack([ImagePrep(spec)(im) for im in images])
    theirs = torch.stack([preprocess(im) for im in images]).numpy()
    worst = float(np.abs(ours - theirs).max())
    if ours.shape != theirs.shape or worst > PREPROCESS_MAX_ABS:
        return {"error": f"the torch-free image transform differs from open_clip's by {worst:g} "
                         f"on the probe (at most {PREPROCESS_MAX_ABS:g} allowed)"}, spec
    reference = _unit(model.encode_image(torch.from_numpy(theirs)).numpy())
    return _Plan("image", _ImageTower, (torch.from_numpy(ours[:2]),), ["pixels"],
                 {"pixels": {0: "batch"}}, lambda session: session.run(None, {"pixels": ours})[0],
                 reference, lambda session: session.run(None, {"pixels": ours[:1]})), spec


def _tower_files(folder: Path, plan: _Plan, model) -> dict:
    """Export a tower in fp32 and int8, probe both, keep the one `auto` uses; its entry."""
    import torch

    fp32 = folder / f"{plan.name}.onnx"
    try:
        atomic_write(fp32, lambda tmp: torch.onnx.export(
            plan.wrapper(model), plan.samples, str(tmp), input_names=plan.input_names,
            output_names=["vector"], dynamic_axes={**plan.axes, "vector": {0: "batch"}},
            opset_version=OPSET, dynamo=False))
    except Exception as exc:  # the exporter raises many types for unsupported graphs
        fp32.unlink(missing_ok=True)
        return {"error": f"torch.onnx.export failed: {_first_line(exc)}"}
    session = _session(fp32)
    cosine = _min_cosine(_unit(plan.encode(session)), plan.reference)
    entry: dict[str, Any] = {"probe_cosine": {"fp32": cosine}, "files": {}, "use": "fp32"}
    if cosine < EXPORT_MIN_COSINE:
        fp32.unlink(missing_ok=True)
        entry["error"] = (f"the fp32 export matched torch only to cosine {cosine:.6f} on the "
                          f"probe (at least {EXPORT_MIN_COSINE} needed)")
        return entry
    entry["ms"] = {"fp32": _median_ms(plan.timed, session)}
    int8 = folder / f"{plan.name}.int8.onnx"
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        atomic_write(int8, lambda tmp: quantize_dynamic(str(fp32), str(tmp),
                                                        weight_type=QuantType.QInt8))
        quantised = _session(int8)
        entry["probe_cosine"]["int8"] = _min_cosine(_unit(plan.encode(quantised)),
                                                    plan.reference)
    except Exception as exc:
        entry["int8_note"] = f"quantisation failed: {_first_line(exc)}"
        quantised = None
    if quantised is not None and entry["probe_cosine"]["int8"] < INT8_MIN_COSINE:
        entry["int8_note"] = (f"int8 matched torch fp32 only to cosine "
                              f"{entry['probe_cosine']['int8']:.6f} (at least {INT8_MIN_COSINE})")
    elif quantised is not None:
        entry["ms"]["int8"] = _median_ms(plan.timed, quantised)
        if entry["ms"]["int8"] < entry["ms"]["fp32"]:
            entry["use"] = "int8"
        else:
            entry["int8_note"] = "int8 passed the probe but ran no faster than fp32"
    # only the file `auto` runs is kept (a model's towers are hundreds of MB)
    kept, dropped = (int8, fp32) if entry["use"] == "int8" else (fp32, int8)
    dropped.unlink(missing_ok=True)
    entry["files"][entry["use"]] = _file_entry(kept)
    return entry


def _run_text(session, tokens: np.ndarray, table: np.ndarray) -> np.ndarray:
    length = int(tokens.argmax(-1).max()) + 1
    return session.run(None, text_inputs(table, tokens[:, :length].astype(np.int64)))[0]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # np.save(path) would add ".npy" to the temp name
        np.save(fh, array)


def _trimmable(model) -> bool:
    return (getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None
            and hasattr(model, "positional_embedding") and hasattr(model, "ln_final")
            and hasattr(model, "token_embedding"))


def _text_tower_class():
    import torch

    class TextTower(torch.nn.Module):
        """open_clip's encode_text over as many positions as the input has (trimmed)."""

        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, embedded, tokens):
            m = self.model
            length = tokens.shape[1]
            x = embedded + m.positional_embedding[:length]
            x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
            x = m.ln_final(x)
            x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
            projection = m.text_projection
            if projection is not None:
                x = projection(x) if callable(projection) else x @ projection
            return torch.nn.functional.normalize(x, dim=-1)

    return TextTower


def _image_tower_class():
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)

    return ImageTower


def _TextTower(model):  # noqa: N802 - built lazily: torch is imported only here
    return _text_tower_class()(model).eval()


def _ImageTower(model):  # noqa: N802
    return _image_tower_class()(model).eval()


# --- probes ----------------------------------------------------------------------------------
def _probe_texts() -> list[str]:
    """Scene captions plus short, long, accented and odd texts (no download)."""
    from .synthetic import scenes

    captions = [scenes.caption_for(s, i) for i, s in enumerate(scenes.generate(12, seed=5))]
    return captions + ["red circle", "", "a photo of a dog " * 20, "Café crème brûlée",
                       "東京の夜景 🌃", "10:00 alarm clock &amp; more"]


def _probe_images(image_size: int) -> list:
    """Generated scenes at several sizes and aspect ratios, so resizing and cropping count."""
    from .synthetic import scenes

    shapes = [(2 * image_size, 2 * image_size), (3 * image_size, 2 * image_size + 1),
              (image_size + 7, 4 * image_size), (image_size // 2 + 1, image_size // 2)]
    images = []
    for (width, height), scene in zip(shapes, scenes.generate(len(shapes), seed=9)):
        images.append(scenes.render(scene, max(width, height)).resize((width, height)))
    return images


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(timed: Callable, session) -> float:
    """The median of up to TIMING_RUNS runs (fewer when they pass TIMING_BUDGET_S)."""
    timed(session)  # warm
    samples: list[float] = []
    spent = 0.0
    while len(samples) < TIMING_RUNS and (len(samples) < 3 or spent < TIMING_BUDGET_S):
        started = time.perf_counter()
        timed(session)
        samples.append(time.perf_counter() - started)
        spent += samples[-1]
    return round(float(np.median(samples)) * 1000, 3)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return round(float((a * b).sum(axis=1).min()), 7)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _file_entry(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size}


def _dim(model) -> int:
    projection = getattr(model, "text_projection", None)
    if projection is not None and hasattr(projection, "shape"):
        return int(projection.shape[1])
    return int(model.visual.output_dim)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "open_clip_torch", "onnxruntime"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def remove_export(folder: Path) -> None:
    """Drop an unusable export (its manifest first, so no reader trusts the rest)."""
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
