"""index.image_prep against open_clip's own eval transforms: the same pixels, without torch.

Each comparison runs the torch transform once, split where ImagePrep splits it: the PIL steps'
uint8 arrays must be equal, the final float32 tensors within 1e-5 (they are bit-identical).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import (
    CenterCropOrPad,
    MaybeConvertMode,
    MaybeToTensor,
    ResizeKeepRatio,
)
from PIL import Image
from torchvision import transforms as T

from index.clip import TINY_DIR
from index.image_prep import ImagePrep, describe_preprocess
from index.synthetic import scenes

REPO = TINY_DIR.parents[2]
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
TAIL = [MaybeConvertMode(), MaybeToTensor(), T.Normalize(MEAN, STD)]
# (width, height): tiny, odd, exactly the crop, one off, halves that round to even, 1 MP, extreme
SIZES = [(1, 1), (2, 3), (3, 2), (50, 37), (63, 64), (64, 64), (65, 64), (67, 64), (64, 69),
         (100, 37), (223, 225), (224, 224), (225, 224), (227, 224), (224, 229), (301, 199),
         (1000, 1000), (1280, 800), (4000, 10), (10, 4000)]
MODES = ["RGB", "L", "RGBA", "P", "LA", "PA", "1", "I;16", "I", "F", "CMYK"]
MODE_SIZES = [(2, 3), (50, 37), (97, 130)]
OTHER_SIZES = [(1, 1), (2, 3), (50, 37), (63, 64), (64, 64), (65, 64), (223, 225), (301, 199)]
EXTREME = [(4000, 10), (10, 4000)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """These tensors are small: on a busy machine torch's thread pool made them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def transforms() -> dict[str, T.Compose]:
    """open_clip's eval transforms (the shipped tiny model's; ViT-B-32's; the other resize
    modes) and two hand-made Composes that pad: a bare CenterCrop and a Resize with max_size."""
    tiny = open_clip.create_model_and_transforms(f"local-dir:{TINY_DIR}")[2]
    return {
        "tiny": tiny,
        "vit": open_clip.image_transform(224, is_train=False),
        "longest": open_clip.image_transform(224, is_train=False, resize_mode="longest",
                                             fill_color=128),
        "squash": open_clip.image_transform(64, is_train=False, resize_mode="squash",
                                            interpolation="bilinear"),
        "crop": T.Compose([T.CenterCrop(64), *TAIL]),
        "max_size": T.Compose([T.Resize(48, max_size=60), T.CenterCrop(56), *TAIL]),
    }


def random_image(rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    """Seeded noise in `mode` (noise is the hardest case for a resampler)."""
    shape = (height, width)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-2**20, 2**20, shape, dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(100, 80, shape).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, shape).astype(bool))
    bands = {"L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (*shape, bands), dtype=np.uint8)
    if mode == "CMYK":
        return Image.frombytes(mode, (width, height), pixels.tobytes())
    image = Image.fromarray(pixels[..., 0] if bands == 1 else pixels)
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    assert image.mode == mode
    return image


def assert_matches(preprocess: T.Compose, image: Image.Image) -> float:
    """ImagePrep(describe_preprocess(preprocess)) makes what preprocess makes; the max diff."""
    prep = ImagePrep(describe_preprocess(preprocess))
    steps = preprocess.transforms
    theirs_pil = np.array(T.Compose(steps[:-2])(image))
    theirs = T.Compose(steps[-2:])(theirs_pil).numpy()  # the rest of preprocess(image)
    ours_pil = prep.pil_steps(image)
    ours = prep.finish(ours_pil[None])[0]
    np.testing.assert_array_equal(ours_pil, theirs_pil)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape \
        == (3, prep.image_size, prep.image_size)
    diff = float(np.abs(ours - theirs).max())
    assert diff <= 1e-5
    return diff


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["tiny", "vit"])
def test_rgb_sizes(transforms: dict[str, T.Compose], name: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng([size[0], size[1]])
    assert_matches(transforms[name], random_image(rng, "RGB", *size))


@pytest.mark.parametrize(("name", "size"), [
    (name, size) for name in ("longest", "squash", "crop", "max_size")
    for size in OTHER_SIZES + (EXTREME if name != "max_size" else [])  # else 60×0: see below
], ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else v)
def test_other_shapes(transforms: dict[str, T.Compose], name: str,
                      size: tuple[int, int]) -> None:
    rng = np.random.default_rng([size[0], size[1], 1])
    assert_matches(transforms[name], random_image(rng, "RGB", *size))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tiny", "vit", "longest", "crop"])
def test_modes(transforms: dict[str, T.Compose], name: str, mode: str) -> None:
    """Resize and pad run before the RGB convert, in the image's own mode (P resizes nearest,
    RGBA premultiplied, P pads keep the palette): all of that must match too."""
    rng = np.random.default_rng(len(mode))
    for size in MODE_SIZES:
        assert_matches(transforms[name], random_image(rng, mode, *size))


@pytest.mark.parametrize("name", ["tiny", "vit"])
def test_rendered_scenes(transforms: dict[str, T.Compose], name: str) -> None:
    for scene, size in zip(scenes.generate(6, seed=11), [224, 97, 300, 64, 65, 513]):
        assert_matches(transforms[name], scenes.render(scene, size))


def test_batch_finish_equals_single_images(transforms: dict[str, T.Compose]) -> None:
    preprocess = transforms["tiny"]
    prep = ImagePrep(describe_preprocess(preprocess))
    rng = np.random.default_rng(5)
    images = [random_image(rng, mode, *size)
              for mode, size in zip(MODES, [(1, 1), (70, 64), (300, 211), (64, 200), (9, 5)])]
    batch = prep.finish(np.stack([prep.pil_steps(image) for image in images]))
    assert batch.shape == (len(images), 3, 64, 64) and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch, np.stack([prep(image) for image in images]))
    theirs = torch.stack([preprocess(image) for image in images]).numpy()
    assert float(np.abs(batch - theirs).max()) <= 1e-5


def test_spec_format_and_json_round_trip(transforms: dict[str, T.Compose]) -> None:
    assert describe_preprocess(transforms["tiny"]) == {
        "steps": [{"op": "resize", "size": 64, "interpolation": "bicubic", "max_size": None,
                   "antialias": True},
                  {"op": "center_crop", "size": [64, 64]},
                  {"op": "convert", "mode": "RGB"}],
        "mean": list(MEAN), "std": list(STD), "image_size": 64,
    }
    image = scenes.render(scenes.generate(1, seed=2)[0], 150)
    for preprocess in transforms.values():
        spec = describe_preprocess(preprocess)
        loaded = json.loads(json.dumps(spec))
        assert loaded == spec
        np.testing.assert_array_equal(ImagePrep(loaded)(image), ImagePrep(spec)(image))


class _OwnResize(T.Resize):
    """A subclass may change what Resize does, so it is not described."""


def _refused() -> dict[str, Any]:
    norm = T.Normalize(MEAN, STD)
    return {
        "random crop": T.Compose([T.RandomCrop(64), *TAIL]),
        "train transform": open_clip.image_transform(64, is_train=True),
        "lambda": T.Compose([T.Resize(64), T.CenterCrop(64), T.Lambda(lambda im: im), *TAIL]),
        "bare function": T.Compose([lambda im: im.convert("RGB"), T.ToTensor(), norm]),
        "not a compose": lambda im: im,
        "subclass": T.Compose([_OwnResize(64), T.CenterCrop(64), *TAIL]),
        "size varies": T.Compose([T.Resize(64), *TAIL]),
        "keep ratio, no crop": T.Compose([ResizeKeepRatio(64), *TAIL]),
        "non-square": open_clip.image_transform((224, 192), is_train=False),
        "random scale": T.Compose([ResizeKeepRatio(64, longest=1, random_scale_prob=0.5),
                                   CenterCropOrPad(64), *TAIL]),
        "no convert": T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), norm]),
        "convert to L": T.Compose([T.Resize(64), T.CenterCrop(64), MaybeConvertMode("L"),
                                   T.ToTensor(), norm]),
        "no normalize": T.Compose([T.Resize(64), T.CenterCrop(64), MaybeConvertMode(),
                                   T.ToTensor()]),
        "two-channel normalize": T.Compose([T.Resize(64), T.CenterCrop(64), *TAIL[:2],
                                            T.Normalize([0.5, 0.5], [0.5, 0.5])]),
        "zero std": T.Compose([T.Resize(64), T.CenterCrop(64), *TAIL[:2],
                               T.Normalize(MEAN, [0.5, 0.0, 0.5])]),
        "bad fill": T.Compose([T.Resize(64), CenterCropOrPad(64, fill="red"), *TAIL]),
    }


@pytest.mark.parametrize("name", list(_refused()))
def test_unknown_steps_are_refused(name: str) -> None:
    assert describe_preprocess(_refused()[name]) is None


def test_refused_under_float64_default(transforms: dict[str, T.Compose]) -> None:
    """ToTensor makes torch's default float dtype, ImagePrep float32."""
    torch.set_default_dtype(torch.float64)
    try:
        assert describe_preprocess(transforms["tiny"]) is None
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("change", [
    {"steps": [{"op": "random_crop", "size": [64, 64]}, {"op": "convert", "mode": "RGB"}]},
    {"steps": [{"op": "center_crop", "size": [64]}, {"op": "convert", "mode": "RGB"}]},
    {"steps": [{"op": "resize", "size": 64}, {"op": "center_crop", "size": [64, 64]},
               {"op": "convert", "mode": "RGB"}]},
    {"steps": [{"op": "center_crop", "size": [64, 64]}]},
    {"image_size": 224},
    {"mean": [0.5, 0.5]},
    {"std": [0.5, 0, 0.5]},
    {"steps": None},
], ids=lambda change: json.dumps(change)[:40])
def test_bad_specs_raise(transforms: dict[str, T.Compose], change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ImagePrep({**describe_preprocess(transforms["tiny"]), **change})


@pytest.mark.parametrize(("name", "make", "error"), [
    ("tiny", lambda: Image.new("La", (70, 64)), ValueError),  # Pillow: no La -> RGB
    ("tiny", lambda: np.zeros((64, 64, 3), np.uint8), TypeError),  # not a PIL image
    ("longest", lambda: Image.new("RGB", (4000, 1)), ValueError),  # resized to 224×0
    ("max_size", lambda: Image.new("RGB", (4000, 10)), ValueError),  # resized to 60×0
])
def test_fails_where_torch_fails(transforms: dict[str, T.Compose], name: str,
                                 make: Callable[[], Any], error: type[Exception]) -> None:
    preprocess = transforms[name]
    with pytest.raises(error):
        preprocess(make())
    with pytest.raises(error):
        ImagePrep(describe_preprocess(preprocess))(make())


def test_import_leaves_torch_out() -> None:
    code = ("import sys, index.image_prep; "
            "print(sorted({'torch', 'torchvision', 'open_clip'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
