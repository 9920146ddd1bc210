"""`clipdex demo`: an offline tour of every query direction on generated scenes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from index import Library
from index.synthetic.scenes import write_scenes

from .search import Searcher

__all__ = ["DEMO_COUNT", "DEMO_SEED", "EXAMPLE_FILTERS", "EXAMPLE_IMAGE", "EXAMPLE_TEXTS",
           "run_demo"]

DEMO_COUNT, DEMO_SEED = 300, 7
# Examples the tiny model gets right on the demo's scenes (tests/test_first_hour.py holds them):
# every hit shown is the asked-for shape and colour (the mixture: a large circle, not red).
# "three stars" (before 2026-11-28) returned crosses, squares and diamonds: the text tower
# matches captions less well than images, so text → caption uses a phrase it ranks right.
EXAMPLE_TEXTS = {"image": "a yellow triangle", "caption": "two orange stars",
                 "mixture": ("a large circle", "red")}
EXAMPLE_IMAGE = "scene_00007.jpg"  # a large yellow triangle; among the first 10 scenes


# Photo metadata: the scenes' JPEGs carry EXIF (index.synthetic.scenes.scene_meta)
EXAMPLE_FILTERS = {"text": "a yellow triangle", "camera": "canon", "place": "Lisbon"}


def _show(echo: Callable[[str], None], title: str, result, *, meta: bool = False) -> None:
    echo(f"\n{title}")
    for rank, hit in enumerate(result.hits, 1):
        shown = hit.text if hit.kind == "caption" else Path(hit.path).name
        score = f"{hit.score:.3f}" if hit.score is not None else "    -"
        about = ""
        if meta and hit.meta:
            taken = (hit.meta["taken_at"] or "")[:10]
            about = "  " + "  ".join(p for p in (taken, hit.meta["camera"], hit.meta["place"])
                                     if p)
        echo(f"  {rank}. {score}  {shown}{about}")


def run_demo(directory: Path, *, home: Path, db: str | None = None, count: int = DEMO_COUNT,
             echo: Callable[[str], None] = print, progress: bool = False,
             command: str = "clipdex") -> None:
    """Write `count` scenes to `directory`, index them into `home` with `tiny`, query them.

    `command` is how the closing suggestions spell the clipdex command (a path when `clipdex`
    is not on PATH)."""
    images_dir = directory / "scenes"
    if not (images_dir / "captions.jsonl").exists():
        echo(f"generating {count} captioned scenes in {images_dir} …")
        write_scenes(images_dir, count, seed=DEMO_SEED)
    library = Library.open(home, db=db)
    try:
        echo(f"indexing them into the library at {home} with the offline `tiny` model …")
        report = library.index([images_dir], model="tiny")
        echo(f"  {report.new} new, {report.unchanged} unchanged, {report.failed} failed "
             f"in {report.total_seconds:.1f}s (model load {report.model_load_seconds:.1f}s)")
        caps = library.add_captions(images_dir / "captions.jsonl")
        echo(f"  {caps.added} captions added ({caps.linked} linked to their images)")
        example = _example_image(images_dir)
        _tour(echo, Searcher(library), example)
    finally:
        library.close()
    echo(f"\nTry your own queries:\n"
         f"  {command} --home {home} search \"three red squares\"\n"
         f"  {command} --home {home} search \"a blue star\" --after 2022 --place Tokyo\n"
         f"  {command} --home {home} search --camera iphone --year 2021\n"
         f"  {command} --home {home} caption {example}\n"
         f"  {command} --home {home} stats\n"
         f"  {command} --home {home} serve      # the web page, on http://127.0.0.1:8765/")


def _example_image(images_dir: Path) -> Path:
    chosen = images_dir / EXAMPLE_IMAGE
    return chosen if chosen.is_file() else sorted(images_dir.glob("scene_*.jpg"))[0]


def _tour(echo: Callable[[str], None], searcher: Searcher, example: Path) -> None:
    to_image, to_caption = EXAMPLE_TEXTS["image"], EXAMPLE_TEXTS["caption"]
    positive, negative = EXAMPLE_TEXTS["mixture"]
    _show(echo, f'text → image: "{to_image}"', searcher.search(to_image, k=5))
    _show(echo, f"image → image: {example.name}", searcher.search(image=example, k=5))
    _show(echo, f"image → caption: {example.name}", searcher.caption(example, k=3))
    _show(echo, f'text → caption: "{to_caption}"',
          searcher.search(to_caption, target="captions", k=3))
    _show(echo, f'mixture: "{positive}" not "{negative}"',
          searcher.search(positive, negatives=[negative], k=5))
    text, camera, place = (EXAMPLE_FILTERS[k] for k in ("text", "camera", "place"))
    _show(echo, f'filtered: "{text}" --camera {camera} --sort date (oldest first)',
          searcher.search(text, camera=camera, sort="date", k=5), meta=True)
    _show(echo, f"filters alone: --place {place} (newest first)",
          searcher.search(place=place, k=5), meta=True)
