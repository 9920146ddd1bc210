"""Caption collections: parsing CSV/TSV/JSONL/COCO files and embedding them into the store."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .embedder import Embedder
from .errors import CaptionFileError
from .store import CaptionRow, ImageRow, Store

__all__ = ["CaptionReport", "FORMATS", "ParsedCaption", "add_captions", "link_captions",
           "parse_caption_file"]

FORMATS = ("csv", "tsv", "jsonl", "coco")
PATH_KEYS = ("path", "file_name", "filename", "file", "image", "image_path", "url")
TEXT_KEYS = ("caption", "text", "title", "description")
EMBED_BATCH = 256


@dataclass(frozen=True)
class ParsedCaption:
    text: str
    ref: str | None  # the image reference as written in the file
    line: int


@dataclass(frozen=True)
class CaptionReport:
    added: int
    duplicates: int
    linked: int
    skipped: int
    problems: tuple[str, ...] = ()
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"added": self.added, "duplicates": self.duplicates, "linked": self.linked,
                "skipped": self.skipped, "problems": list(self.problems),
                "seconds": round(self.seconds, 3)}


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl"):
        return suffix[1:]
    if suffix == ".ndjson":
        return "jsonl"
    if suffix == ".json":
        return "coco"
    raise CaptionFileError(
        f"{path}: cannot tell the format from the name; give --format "
        f"({', '.join(FORMATS)})")


def _pick(keys: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {k.lower().strip(): k for k in keys if k}
    return next((lowered[w] for w in wanted if w in lowered), None)


def _parse_table(path: Path, delimiter: str, problems: list[str]) -> list[ParsedCaption]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            raise CaptionFileError(f"{path}: empty file")
        text_key = _pick(reader.fieldnames, TEXT_KEYS)
        if text_key is None:
            raise CaptionFileError(
                f"{path}: no caption column in header {reader.fieldnames}; expected one of "
                f"{', '.join(TEXT_KEYS)}")
        path_key = _pick(reader.fieldnames, PATH_KEYS)
        out = []
        for line, row in _rows(reader, path, problems):
            if None in row or any(v is None for v in row.values()):
                problems.append(f"{path}:{line}: wrong number of fields")
                continue
            text = (row.get(text_key) or "").strip()
            if not text:
                problems.append(f"{path}:{line}: empty caption")
                continue
            ref = (row.get(path_key) or "").strip() if path_key else ""
            out.append(ParsedCaption(text, ref or None, line))
    return out


def _rows(reader: csv.DictReader, path: Path, problems: list[str]):
    """(line, row) pairs; a row the csv module rejects (e.g. a huge field) becomes a problem."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # DictReader's own line_num lags on errors; the inner reader's has read the row
            problems.append(f"{path}:{reader.reader.line_num}: {exc}")
            continue
        yield reader.line_num, row


def _parse_jsonl(path: Path, problems: list[str]) -> list[ParsedCaption]:
    out = []
    with open(path, encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{line_no}: not JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{line_no}: expected an object")
                continue
            text_key, path_key = _pick(obj, TEXT_KEYS), _pick(obj, PATH_KEYS)
            text = obj.get(text_key) if text_key else None
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{path}:{line_no}: no caption (keys {', '.join(TEXT_KEYS)})")
                continue
            ref = obj.get(path_key) if path_key else None
            out.append(ParsedCaption(text.strip(), str(ref).strip() if ref else None, line_no))
    return out


def _parse_coco(path: Path, problems: list[str]) -> list[ParsedCaption]:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CaptionFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionFileError(
            f"{path}: not a COCO captions file (needs 'annotations' with image_id and caption)")
    files = {img.get("id"): img.get("file_name") for img in data.get("images", [])
             if isinstance(img, dict)}
    out = []
    for number, ann in enumerate(data["annotations"], 1):
        text = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path}: annotation {number}: no caption")
            continue
        ref = files.get(ann.get("image_id"))
        out.append(ParsedCaption(text.strip(), ref, number))
    return out


def parse_caption_file(path: Path, fmt: str | None = None) -> tuple[list[ParsedCaption], list[str]]:
    """Parse a caption file; returns (captions, problems) where problems name file and line."""
    if not path.is_file():
        raise CaptionFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CaptionFileError(f"{path}: empty file")
    fmt = fmt or detect_format(path)
    problems: list[str] = []
    try:
        if fmt in ("csv", "tsv"):
            captions = _parse_table(path, "," if fmt == "csv" else "\t", problems)
        elif fmt == "jsonl":
            captions = _parse_jsonl(path, problems)
        elif fmt == "coco":
            captions = _parse_coco(path, problems)
        else:
            raise CaptionFileError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    except UnicodeDecodeError:
        raise CaptionFileError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CaptionFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not captions and not problems:
        raise CaptionFileError(f"{path}: no captions found")
    return captions, problems


class _ImageMatcher:
    """Match a caption's image reference to an indexed image: by path, else by unique name."""

    def __init__(self, store: Store) -> None:
        with store.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.path)).all()
        self.by_path = {p: i for i, p in rows}
        names: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for i, p in rows:
            names[os.path.basename(p)].append((i, p))
        self.by_name = names

    def match(self, ref: str | None) -> int | None:
        """The id of the image at `ref` (an absolute path), else of the one image so named."""
        if not ref:
            return None
        if ref in self.by_path:
            return self.by_path[ref]
        candidates = self.by_name.get(os.path.basename(ref), [])
        return candidates[0][0] if len(candidates) == 1 else None


def _absolute_ref(ref: str | None, base: str) -> str | None:
    """Where the caption file says the image is: relative references are to its folder."""
    return os.path.abspath(os.path.join(base, ref)) if ref else None


def _key(text: str, ref: str | None) -> str:
    # the reference as written (made absolute), not the image it matched: whether and how a
    # caption links depends on what is indexed, and adding a file twice must add nothing
    return hashlib.sha256(f"{text}\0{ref or ''}".encode()).hexdigest()


def link_captions(store: Store, session: Session) -> int:
    """Link unlinked captions to images now indexed: by path, else by a unique file name."""
    linked = store.link_captions(session)
    pending = session.execute(select(CaptionRow.id, CaptionRow.image_ref).where(
        CaptionRow.image_id.is_(None), CaptionRow.image_ref.is_not(None))).all()
    if not pending:
        return linked
    wanted = {os.path.basename(ref) for _, ref in pending}
    by_name: dict[str, list[int]] = defaultdict(list)
    for image_id, image_path in session.execute(select(ImageRow.id, ImageRow.path)
                                                .execution_options(yield_per=10_000)):
        if os.path.basename(image_path) in wanted:
            by_name[os.path.basename(image_path)].append(image_id)
    for caption_id, ref in pending:
        candidates = by_name.get(os.path.basename(ref), [])
        if len(candidates) == 1:
            session.execute(update(CaptionRow).where(CaptionRow.id == caption_id)
                            .values(image_id=candidates[0]))
            linked += 1
    return linked


def add_captions(store: Store, embedder: Embedder, path: Path, *, fmt: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> CaptionReport:
    """Embed a caption file's captions into the store; adding a file twice adds nothing."""
    import time

    started = time.perf_counter()
    parsed, problems = parse_caption_file(path, fmt)
    matcher = _ImageMatcher(store)
    base = os.path.dirname(os.path.abspath(path))  # as scan names files: links not resolved
    fresh: dict[str, tuple[ParsedCaption, int | None, str | None]] = {}
    duplicates = 0
    for caption in parsed:
        ref = _absolute_ref(caption.ref, base)
        key = _key(caption.text, ref)
        if key in fresh:
            duplicates += 1
            continue
        fresh[key] = (caption, matcher.match(ref), ref)
    with store.session() as s:
        keys = list(fresh)
        for start in range(0, len(keys), 900):
            for existing in s.scalars(select(CaptionRow.key).where(
                    CaptionRow.key.in_(keys[start:start + 900]))):
                fresh.pop(existing)
                duplicates += 1
    items = list(fresh.items())
    linked = 0
    for start in range(0, len(items), EMBED_BATCH):
        chunk = items[start:start + EMBED_BATCH]
        vectors = embedder.encode_texts([c.text for _, (c, _, _) in chunk])
        with store.session() as s, s.begin():
            for (key, (caption, image_id, ref)), vector in zip(chunk, vectors):
                s.add(CaptionRow(text=caption.text, key=key, image_ref=ref, image_id=image_id,
                                 source=os.path.abspath(path), vector=vector.tobytes()))
                linked += image_id is not None
            store.bump_generation(s, "caption")
        if progress:
            progress(min(start + EMBED_BATCH, len(items)), len(items))
    return CaptionReport(added=len(items), duplicates=duplicates, linked=linked,
                         skipped=len(problems), problems=tuple(problems),
                         seconds=time.perf_counter() - started)
