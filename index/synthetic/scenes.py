"""Deterministic generator of captioned synthetic scenes.

The same generator trains the shipped tiny CLIP, feeds the demo and the tests, and measures
retrieval quality (with attribute combinations held out of training). Only Pillow and numpy.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from datetime import datetime

__all__ = [
    "BACKGROUND_KINDS",
    "COLOURS",
    "HOLDOUT",
    "SHAPES",
    "Scene",
    "SceneMeta",
    "scene_meta",
    "caption_for",
    "render",
    "short_caption",
    "sample_scene",
    "write_scenes",
]

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "grey": (128, 128, 128),
    "pink": (245, 160, 190),
    "brown": (120, 75, 40),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "stripes", "noise")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Combinations never drawn for training; the quality check measures generalisation on them.
HOLDOUT: frozenset[tuple[str, str]] = frozenset(
    {("green", "star"), ("blue", "triangle"), ("yellow", "hexagon"), ("red", "cross")}
)


# Photo metadata the generator writes into its JPEGs' EXIF (PNGs carry none), so that every
# search filter has something to find: capture times over several years, a handful of cameras
# (as their makers write them, normalised by index.photo_meta), GPS points in real cities.
SCENE_CAMERAS: tuple[tuple[str, str, str], ...] = (
    ("Canon", "Canon EOS R5", "RF24-105mm F4 L IS USM"),
    ("NIKON CORPORATION", "NIKON D750", "24.0-120.0 mm f/4.0"),
    ("SONY", "ILCE-7M3", "FE 28-70mm F3.5-5.6 OSS"),
    ("Apple", "iPhone 13", "iPhone 13 back dual wide camera 5.1mm f/1.6"),
    ("FUJIFILM", "X-T4", "XF18-55mmF2.8-4 R LM OIS"),
)
SCENE_CITIES: tuple[tuple[str, float, float, str], ...] = (  # name, lat, lon, UTC offset
    ("Lisbon", 38.7223, -9.1393, "+01:00"),
    ("Paris", 48.8566, 2.3522, "+02:00"),
    ("Tokyo", 35.6762, 139.6503, "+09:00"),
    ("New York City", 40.7128, -74.0060, "-04:00"),
    ("Sydney", -33.8688, 151.2093, "+10:00"),
    ("Reykjavík", 64.1466, -21.9426, "+00:00"),
)
SCENE_YEARS = (2019, 2020, 2021, 2022, 2023, 2024)


@dataclass(frozen=True)
class SceneMeta:
    """The EXIF written into one generated JPEG (fields None where none is written)."""

    taken: "datetime | None"  # DateTimeOriginal, the camera's clock
    offset: str | None  # OffsetTimeOriginal
    make: str | None
    model: str | None
    lens: str | None
    city: str | None
    lat: float | None
    lon: float | None


def scene_meta(number: int, seed: int = 0) -> SceneMeta | None:
    """The metadata of scene `number` of `write_scenes(seed=seed)`, None for a PNG or one of
    the JPEGs written without EXIF (every seventh). Independent of the scene's own drawing, so
    images and captions are those of a generator without metadata."""
    from datetime import datetime, timedelta

    if number % 3 == 2 or number % 7 == 3:
        return None
    rng = random.Random(f"scene-exif-{seed}-{number}")
    taken = datetime(rng.choice(SCENE_YEARS), 1, 1) + timedelta(
        days=rng.randrange(365), seconds=rng.randrange(6 * 3600, 22 * 3600))
    make, model, lens = rng.choice(SCENE_CAMERAS)
    if number % 5 == 4:  # a camera without GPS, and no offset either
        return SceneMeta(taken, None, make, model, lens, None, None, None)
    city, lat, lon, offset = rng.choice(SCENE_CITIES)
    lat += rng.uniform(-0.01, 0.01)
    lon += rng.uniform(-0.01, 0.01)
    return SceneMeta(taken, offset, make, model, lens, city, round(lat, 6), round(lon, 6))


def _exif_for(meta: SceneMeta):
    from PIL.TiffImagePlugin import IFDRational

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = meta.make, meta.model
    details = exif.get_ifd(0x8769)
    details[0x9003] = details[0x9004] = meta.taken.strftime("%Y:%m:%d %H:%M:%S")
    details[0xA434] = meta.lens
    if meta.offset:
        details[0x9011] = meta.offset
    if meta.lat is not None and meta.lon is not None:
        gps = exif.get_ifd(0x8825)

        def dms(value: float) -> tuple:
            value = abs(value)
            degrees, rest = int(value), (abs(value) - int(value)) * 60
            return (IFDRational(degrees, 1), IFDRational(int(rest), 1),
                    IFDRational(round((rest - int(rest)) * 60 * 10_000), 10_000))

        gps[1], gps[2] = ("N" if meta.lat >= 0 else "S"), dms(meta.lat)
        gps[3], gps[4] = ("E" if meta.lon >= 0 else "W"), dms(meta.lon)
        gps[5], gps[6] = b"\x00", IFDRational(42, 1)
    return exif


@dataclass(frozen=True)
class Scene:
    """The attributes of one scene; everything needed to render and caption it."""

    shape: str
    colour: str
    count: int
    size: str
    position: str  # where a single object sits; "" for several objects
    background: str  # one of BACKGROUND_KINDS
    background_colour: str
    seed: int  # drives jitter, placement and noise
    offsets: tuple[tuple[float, float], ...] = field(default=(), compare=False)


def sample_scene(
    rng: random.Random,
    *,
    shape: str | None = None,
    colour: str | None = None,
    exclude: Iterable[tuple[str, str]] = (),
) -> Scene:
    """Draw random scene attributes; `exclude` lists (colour, shape) pairs never drawn."""
    excluded = set(exclude)
    while True:
        pick_shape = shape or rng.choice(SHAPES)
        pick_colour = colour or rng.choice(list(COLOURS))
        if (pick_colour, pick_shape) not in excluded:
            break
        if shape and colour:
            raise ValueError(f"{colour} {shape} is excluded")
    count = rng.choice((1, 1, 2, 3))
    size = rng.choice(SIZES) if count == 1 else "small"
    position = rng.choice(list(POSITIONS)) if count == 1 else ""
    background_colour = rng.choice([c for c in BACKGROUND_COLOURS if c != pick_colour])
    return Scene(
        shape=pick_shape,
        colour=pick_colour,
        count=count,
        size=size,
        position=position,
        background=rng.choice(BACKGROUND_KINDS),
        background_colour=background_colour,
        seed=rng.randrange(2**31),
    )


def _plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")  # crosses


def caption_for(scene: Scene, variant: int = 0) -> str:
    """One of several phrasings of the scene's caption; `variant` picks the phrasing."""
    noun = _plural(scene.shape, scene.count)
    article = "a" if scene.count == 1 else COUNT_WORDS[scene.count]
    # variant picks the template (variant % 5) and, independently, whether the size is said
    says_size = (variant // 5) % 3 != 2 if scene.count == 1 else bool(variant % 2)
    size = f"{scene.size} " if says_size else ""
    obj = f"{article} {size}{scene.colour} {noun}"
    bg = f"{scene.background_colour} background"
    where = f" at the {scene.position}" if scene.position else ""
    if scene.background == "plain":
        bg_long = f"a plain {bg}"
    elif scene.background == "gradient":
        bg_long = f"a {scene.background_colour} gradient background"
    elif scene.background == "stripes":
        bg_long = f"a striped {bg}"
    else:
        bg_long = f"a noisy {bg}"
    templates = (
        f"a photo of {obj}{where} on {bg_long}",
        f"{obj}{where} on a {bg}",
        f"{obj} on {bg_long}",
        f"an image of {obj}{where}",
        f"{scene.background_colour} background with {obj}{where}",
    )
    return templates[variant % len(templates)]


def short_caption(scene: Scene, variant: int = 0) -> str:
    """The few words a person types into a search box: "red circle", "two blue stars".

    Variants 0-2 name the count; variant 3 is the bare singular a person types whatever the
    count ("red circle" for a picture of three red circles).
    """
    noun = _plural(scene.shape, scene.count)
    if variant % 4 == 3:
        return f"{scene.colour} {scene.shape}"
    if variant % 4 == 0:
        return f"{scene.colour} {noun}"
    if variant % 4 == 1:
        return f"{'a' if scene.count == 1 else COUNT_WORDS[scene.count]} {scene.colour} {noun}"
    return f"{scene.colour} {noun} on {scene.background_colour}"


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.42
        angle = rot + math.pi * i / 5 - math.pi / 2
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    rot: float,
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        width = max(1, int(r * 0.38))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=width)
    elif shape == "square":
        draw.polygon(_regular(cx, cy, r * 1.2, 4, math.pi / 4 + rot * 0.15), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.15), (cx + r * 0.75, cy), (cx, cy + r * 1.15),
                      (cx - r * 0.75, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular(cx, cy + r * 0.2, r * 1.2, 3, -math.pi / 2 + rot * 0.15), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular(cx, cy, r * 1.05, 6, rot * 0.3), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.25, rot * 0.2), fill=fill)
    elif shape == "cross":
        arm = r * 0.36
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    base = np.array(_jitter(BACKGROUND_COLOURS[scene.background_colour], rng, 12), np.float32)
    if scene.background == "plain":
        pixels = np.broadcast_to(base, (size, size, 3)).copy()
    elif scene.background == "gradient":
        ramp = np.linspace(0.55, 1.15, size, dtype=np.float32)
        if rng.random() < 0.5:
            pixels = base * ramp[:, None, None] * np.ones((1, size, 1), np.float32)
        else:
            pixels = base * ramp[None, :, None] * np.ones((size, 1, 1), np.float32)
    elif scene.background == "stripes":
        period = max(4, size // rng.choice((6, 8, 10)))
        axis = np.arange(size)
        band = ((axis // (period // 2)) % 2).astype(np.float32) * 0.3 + 0.8
        pixels = base * (band[:, None, None] if rng.random() < 0.5 else band[None, :, None])
        pixels = np.broadcast_to(pixels, (size, size, 3)).copy()
    else:
        noise = np.random.default_rng(scene.seed).normal(0, 28, (size, size, 1)).astype(np.float32)
        pixels = base + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _centres(scene: Scene, rng: random.Random) -> list[tuple[float, float]]:
    if scene.count == 1:
        x, y = POSITIONS[scene.position]
        return [(x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04))]
    centres: list[tuple[float, float]] = []
    while len(centres) < scene.count:
        c = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
        if all(math.dist(c, o) > 0.3 for o in centres):
            centres.append(c)
    return centres


def render(scene: Scene, size: int = 224) -> Image.Image:
    """Draw the scene as an RGB image of `size` × `size` pixels (deterministic)."""
    rng = random.Random(scene.seed)
    image = _background(scene, size, rng)
    draw = ImageDraw.Draw(image)
    fill = _jitter(COLOURS[scene.colour], rng, 15)
    base_r = 0.22 if scene.size == "large" else 0.12
    for cx, cy in _centres(scene, rng):
        r = size * base_r * rng.uniform(0.9, 1.1)
        _draw_shape(draw, scene.shape, cx * size, cy * size, r, fill, rng.uniform(-1, 1))
    return image


def generate(
    count: int, *, seed: int = 0, exclude: Iterable[tuple[str, str]] = ()
) -> list[Scene]:
    """`count` random scenes from `seed`; the same arguments give the same scenes."""
    rng = random.Random(seed)
    excluded = tuple(exclude)
    return [sample_scene(rng, exclude=excluded) for _ in range(count)]


def write_scenes(
    directory: Path,
    count: int,
    *,
    seed: int = 0,
    size: int = 224,
    exclude: Iterable[tuple[str, str]] = (),
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, str]]:
    """Write `count` scenes as images plus captions.jsonl and captions.csv into `directory`.

    Every third image is a PNG, the rest JPEGs; most JPEGs carry EXIF (`scene_meta`).
    Returns the (relative path, caption) pairs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    for number, scene in enumerate(generate(count, seed=seed, exclude=exclude)):
        suffix = "png" if number % 3 == 2 else "jpg"
        name = f"scene_{number:05d}.{suffix}"
        image = render(scene, size)
        if suffix == "jpg":
            meta = scene_meta(number, seed)
            extra = {"exif": _exif_for(meta)} if meta else {}
            image.save(directory / name, quality=92, **extra)
        else:
            image.save(directory / name)
        rows.append((name, caption_for(scene, number)))
        if progress:
            progress(1)
    _write_captions(directory, rows)
    return rows


def _write_captions(directory: Path, rows: Sequence[tuple[str, str]]) -> None:
    with open(directory / "captions.jsonl", "w", encoding="utf-8") as fh:
        for path, caption in rows:
            fh.write(json.dumps({"path": path, "caption": caption}) + "\n")
    with open(directory / "captions.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
