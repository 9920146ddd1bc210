"""open_clip's eval image transform without torch: PIL and numpy only, same numbers.

A query process that embeds an uploaded image should not pay for importing torch and
torchvision just to resize, crop and normalise it. `describe_preprocess` (run where torch is
loaded, e.g. at library creation) turns an open_clip/torchvision eval Compose into a JSON-able
spec; `ImagePrep(spec)` replays it: the PIL steps are the very Pillow calls torchvision makes
(same output sizes, same rounding, same padding), and ToTensor + Normalize are the same float32
operations in the same order, so the result is bit-identical to torch's (tested).

Spec format::

    {"steps": [...PIL steps, in order...], "mean": [m, m, m], "std": [s, s, s], "image_size": N}

with each step one of

    {"op": "resize", "size": int | [h, w], "interpolation": str, "max_size": int | None,
     "antialias": bool | None}                         torchvision Resize
    {"op": "resize_keep_ratio", "size": [h, w], "longest": float, "interpolation": str}
                                                       open_clip ResizeKeepRatio (no randomness)
    {"op": "center_crop", "size": [h, w]}              torchvision CenterCrop (pads with 0)
    {"op": "center_crop_or_pad", "size": [h, w], "fill": number | [number, ...] | None}
                                                       open_clip CenterCropOrPad
    {"op": "convert", "mode": "RGB"}                   open_clip MaybeConvertMode

`interpolation` is a torchvision InterpolationMode value ("bicubic", "bilinear", ...). The
steps are followed by ToTensor (uint8 / 255) and Normalize ((x - mean) / std), both float32.
Only transforms whose output is a fixed N×N RGB image are described; anything else is None.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImagePrep", "describe_preprocess"]

# torchvision's pil_modes_mapping, by InterpolationMode value
PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

PilStep = Callable[[Image.Image], Image.Image]


def describe_preprocess(preprocess: Any) -> dict[str, Any] | None:
    """A JSON-able spec of an eval transform's steps, or None when one is not reproduced exactly.

    Knows torchvision's Compose, Resize, CenterCrop, ToTensor and Normalize and open_clip's
    ResizeKeepRatio (without its random scale/aspect), CenterCropOrPad, MaybeConvertMode and
    MaybeToTensor, by exact type (a subclass may behave differently). The Compose must be PIL
    steps (at least one converting to RGB, none to another mode) making a fixed square size,
    then ToTensor or MaybeToTensor, then Normalize with three channels.
    """
    import torch
    from torchvision import transforms as T

    if type(preprocess) is not T.Compose or torch.get_default_dtype() != torch.float32:
        return None  # ToTensor makes torch's default float dtype; ImagePrep makes float32
    steps = list(preprocess.transforms)
    if len(steps) < 2 or type(steps[-1]) is not T.Normalize:
        return None
    oc = sys.modules.get("open_clip.transform")  # loaded wherever one of its steps exists
    to_tensor_types = (T.ToTensor, getattr(oc, "MaybeToTensor", T.ToTensor))
    if type(steps[-2]) not in to_tensor_types:
        return None
    try:
        described = [_describe_step(step, oc) for step in steps[:-2]]
    except (TypeError, ValueError):  # a step's attributes are not what its class sets
        return None
    mean, std = _channels(steps[-1].mean), _channels(steps[-1].std)
    if None in described or mean is None or std is None:
        return None
    spec: dict[str, Any] = {"steps": described, "mean": mean, "std": std}
    try:
        spec["image_size"] = _image_size(described)
        ImagePrep(spec)
    except ValueError:
        return None
    return spec


def _describe_step(step: Any, oc: Any) -> dict[str, Any] | None:
    """One PIL step as a spec entry, or None."""
    from torchvision import transforms as T

    kind = type(step)
    if kind is T.Resize:
        size = step.size if isinstance(step.size, int) else [int(s) for s in step.size]
        if isinstance(size, list) and len(size) == 1:
            size = size[0]  # F.resize reads [s] as the shorter edge, like s
        interpolation = _interpolation(step.interpolation)
        return None if interpolation is None else {
            "op": "resize", "size": size, "interpolation": interpolation,
            "max_size": step.max_size,
            "antialias": None if step.antialias is None else bool(step.antialias)}
    if kind is T.CenterCrop:
        return {"op": "center_crop", "size": [int(s) for s in step.size]}
    if oc is None:
        return None
    if kind is oc.ResizeKeepRatio:
        interpolation = _interpolation(step.interpolation)
        if interpolation is None or step.random_scale_prob > 0 or step.random_aspect_prob > 0:
            return None
        return {"op": "resize_keep_ratio", "size": [int(s) for s in step.size],
                "longest": float(step.longest), "interpolation": interpolation}
    if kind is oc.CenterCropOrPad:
        fill = list(step.fill) if isinstance(step.fill, (list, tuple)) else step.fill
        if not _valid_fill(fill):
            return None
        return {"op": "center_crop_or_pad", "size": [int(s) for s in step.size], "fill": fill}
    if kind is oc.MaybeConvertMode:
        return {"op": "convert", "mode": step.mode}
    return None


def _interpolation(mode: Any) -> str | None:
    """An InterpolationMode's value; None for anything else (e.g. a bare PIL constant)."""
    from torchvision.transforms import InterpolationMode

    return mode.value if isinstance(mode, InterpolationMode) else None


def _channels(values: Any) -> list[float] | None:
    """Normalize's mean or std as three floats (one value broadcasts, as in torch), or None."""
    try:
        floats = [float(v) for v in (values if hasattr(values, "__iter__") else [values])]
    except (TypeError, ValueError):
        return None
    if len(floats) == 1:
        floats *= 3
    return floats if len(floats) == 3 else None


def _valid_fill(fill: Any) -> bool:
    """A fill torchvision's _parse_fill takes: None, a number or a list of numbers."""
    values = fill if isinstance(fill, list) else [fill]
    return fill is None or all(type(v) in (int, float) for v in values)


def _image_size(steps: Sequence[dict[str, Any]]) -> int:
    """The side of the square output the steps always make; ValueError when there is none."""
    size: tuple[int, int] | None = None
    for step in steps:
        if step["op"] == "resize":
            size = tuple(step["size"]) if isinstance(step["size"], list) else None
        elif step["op"] == "resize_keep_ratio":
            size = None
        elif step["op"] in ("center_crop", "center_crop_or_pad"):
            size = tuple(step["size"])
    if size is None:
        raise ValueError("the output size depends on the input image")
    if size[0] != size[1]:
        raise ValueError(f"non-square output {size[0]}×{size[1]} (image_size is one int)")
    return int(size[0])


class ImagePrep:
    """Replays a `describe_preprocess` spec on PIL images; raises ValueError for a bad spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        try:
            steps, mean, std = list(spec["steps"]), _channels(spec["mean"]), _channels(spec["std"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed spec: {e!r}") from None
        self._steps = [_compile(step) for step in steps]
        converts = [step.get("mode") for step in steps if step["op"] == "convert"]
        if not converts or any(mode != "RGB" for mode in converts):
            raise ValueError("the steps must convert to RGB (and to no other mode)")
        self.image_size = _image_size(steps)
        if spec.get("image_size") != self.image_size:
            raise ValueError(f"image_size {spec.get('image_size')!r} but the steps make "
                             f"{self.image_size}×{self.image_size}")
        if mean is None or std is None:
            raise ValueError("mean and std need three values each")
        # torch.as_tensor(mean, dtype=float32): the same double -> float32 rounding
        self._mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        if not np.all(self._std != 0):
            raise ValueError("std is zero in float32")

    def pil_steps(self, image: Image.Image) -> np.ndarray:
        """Everything before ToTensor: the uint8 image_size×image_size×3 array."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        for step in self._steps:
            image = step(image)
        return np.asarray(image)

    def finish(self, arrays: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 -> N×3×H×W float32: ToTensor (/ 255), then Normalize, as torch does."""
        if arrays.dtype != np.uint8 or arrays.ndim != 4 or arrays.shape[3] != 3:
            raise ValueError(f"expected N×H×W×3 uint8, got {arrays.shape} {arrays.dtype}")
        out = np.ascontiguousarray(arrays.transpose(0, 3, 1, 2), dtype=np.float32)
        out /= np.float32(255)
        out -= self._mean
        out /= self._std
        return out

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One image -> its 3×H×W float32 tensor, as the torch preprocess makes it."""
        return self.finish(self.pil_steps(image)[None])[0]


def _compile(step: dict[str, Any]) -> PilStep:
    """A spec step as a function of a PIL image; ValueError when it is malformed."""
    try:
        op = step["op"]
        if op == "resize":
            size = step["size"]
            max_size = step["max_size"]
            if isinstance(size, list):
                _check_pair(size)
                if max_size is not None:
                    raise ValueError("max_size needs an int size")
            elif not _positive(size) or not (max_size is None or _positive(max_size)
                                             and max_size > size):
                raise ValueError(f"bad resize size {size!r} / max_size {max_size!r}")
            return functools.partial(_resize, size=size, max_size=max_size,
                                     resample=PIL_FILTERS[step["interpolation"]])
        if op == "resize_keep_ratio":
            longest = float(step["longest"])
            if not 0 <= longest <= 1:
                raise ValueError(f"longest {longest} outside [0, 1]")
            return functools.partial(_resize_keep_ratio, size=_check_pair(step["size"]),
                                     longest=longest,
                                     resample=PIL_FILTERS[step["interpolation"]])
        if op == "center_crop":
            return functools.partial(_center_crop, size=_check_pair(step["size"]), fill=0)
        if op == "center_crop_or_pad":
            if not _valid_fill(step["fill"]):
                raise ValueError(f"bad fill {step['fill']!r}")
            return functools.partial(_center_crop, size=_check_pair(step["size"]),
                                     fill=step["fill"])
        if op == "convert":
            return functools.partial(Image.Image.convert, mode=step["mode"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed step {step!r}: {e!r}") from None
    raise ValueError(f"unknown step {op!r}")


def _positive(value: Any) -> bool:
    """An int above zero (not a bool, not a float)."""
    return type(value) is int and value > 0


def _check_pair(size: Any) -> tuple[int, int]:
    """[height, width] of positive ints, as a tuple; ValueError otherwise."""
    if not (isinstance(size, list) and len(size) == 2 and all(map(_positive, size))):
        raise ValueError(f"bad size {size!r}: want [height, width]")
    return size[0], size[1]


def _resize(image: Image.Image, size: int | list[int], max_size: int | None,
            resample: Image.Resampling) -> Image.Image:
    """torchvision's F.resize on a PIL image (its _compute_resized_output_size)."""
    w, h = image.size
    if isinstance(size, list):
        new_h, new_w = size
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return image
    return image.resize((new_w, new_h), resample)


def _resize_keep_ratio(image: Image.Image, size: tuple[int, int], longest: float,
                       resample: Image.Resampling) -> Image.Image:
    """open_clip's ResizeKeepRatio (get_params with no random scale or aspect), then F.resize."""
    h, w = image.size[::-1]
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1. - longest)
    new_h, new_w = (round(x / ratio) for x in (h, w))  # open_clip's x * 1. / ratio, exactly
    return _resize(image, [new_h, new_w], None, resample)


def _center_crop(image: Image.Image, size: tuple[int, int],
                 fill: float | list[float] | None) -> Image.Image:
    """torchvision's F.center_crop / open_clip's center_crop_or_pad on a PIL image."""
    crop_h, crop_w = size
    w, h = image.size
    if crop_w > w or crop_h > h:
        ltrb = ((crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0,
                (crop_w - w + 1) // 2 if crop_w > w else 0,
                (crop_h - h + 1) // 2 if crop_h > h else 0)
        image = _pad(image, ltrb, fill)
        w, h = image.size
        if (crop_w, crop_h) == (w, h):
            return image
    top = int(round((h - crop_h) / 2.0))  # Python's round: halves to even, as torchvision
    left = int(round((w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _pad(image: Image.Image, ltrb: tuple[int, int, int, int],
         fill: float | list[float] | None) -> Image.Image:
    """torchvision's constant-mode F.pad on a PIL image (its _parse_fill included)."""
    channels = len(image.getbands())
    colour: Any = 0 if fill is None else fill
    if isinstance(colour, (int, float)) and channels > 1:
        colour = (colour,) * channels
    if isinstance(colour, (list, tuple)):
        if len(colour) == 1:
            colour = colour * channels
        elif len(colour) != channels:
            raise ValueError(f"The number of elements in 'fill' does not match the number of "
                             f"channels of the image ({len(colour)} != {channels})")
        colour = tuple(colour)
    if image.mode != "F":
        colour = tuple(int(c) for c in colour) if isinstance(colour, tuple) else int(colour)
    if image.mode == "P":
        palette = image.getpalette()
        padded = ImageOps.expand(image, border=ltrb, fill=colour)
        padded.putpalette(palette)
        return padded
    return ImageOps.expand(image, border=ltrb, fill=colour)

