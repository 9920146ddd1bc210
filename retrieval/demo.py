"""`clipdex demo`: an offline tour of every query direction on generated scenes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from index import Library
from index.synthetic.scenes import write_scenes

from .search import Searcher

__all__ = ["run_demo"]


def _show(echo: Callable[[str], None], title: str, result) -> None:
    echo(f"\n{title}")
    for rank, hit in enumerate(result.hits, 1):
        shown = hit.text if hit.kind == "caption" else Path(hit.path).name
        echo(f"  {rank}. {hit.score:.3f}  {shown}")


def run_demo(directory: Path, *, home: Path, db: str | None = None, count: int = 300,
             echo: Callable[[str], None] = print, progress: bool = False) -> None:
    """Write `count` scenes to `directory`, index them into `home` with `tiny`, query them."""
    images_dir = directory / "scenes"
    if not (images_dir / "captions.jsonl").exists():
        echo(f"generating {count} captioned scenes in {images_dir} …")
        write_scenes(images_dir, count, seed=7)
    library = Library.open(home, db=db)
    try:
        echo(f"indexing them into the library at {home} with the offline `tiny` model …")
        report = library.index([images_dir], model="tiny")
        echo(f"  {report.new} new, {report.unchanged} unchanged, {report.failed} failed "
             f"in {report.seconds:.1f}s")
        caps = library.add_captions(images_dir / "captions.jsonl")
        echo(f"  {caps.added} captions added ({caps.linked} linked to their images)")
        searcher = Searcher(library)
        _show(echo, 'text → image: "a red circle"', searcher.search("a red circle", k=5))
        example = sorted(images_dir.glob("scene_*.jpg"))[0]
        _show(echo, f"image → image: {example.name}", searcher.search(image=example, k=5))
        _show(echo, f"image → caption: {example.name}", searcher.caption(example, k=3))
        _show(echo, 'text → caption: "three stars"',
              searcher.search("three stars", target="captions", k=3))
        _show(echo, 'mixture: "a large circle" not "red"',
              searcher.search("a large circle", negatives=["red"], k=5))
    finally:
        library.close()
    echo(f"\nTry your own queries:\n  clipdex --home {home} search \"two blue squares\"\n"
         f"  clipdex --home {home} caption {example}\n"
         f"  clipdex --home {home} stats")
