"""The torch-free query runtime: a library's model as ONNX files run by ONNX Runtime.

A query process (`clipdex search`, `clipdex caption`, `Searcher`, `clipdex serve`) must not pay
torch's ~5 s import to encode one text. `index.onnx_export` writes each tower of the library's
model to ONNX (checked against torch on a probe) with the tokenizer's vocabulary and the image
transform beside them, in `HOME/onnx/<key>/`; this module loads them with onnxruntime, numpy,
PIL and `index.clip_tokenizer` only. Each tower's session is created on its first use, so a text
query never loads the image tower.

A tower that was not exported (the tokenizer or transform cannot be reproduced without torch, or
the export failed its probe) is encoded by the torch embedder, loaded only when that tower is
used: vectors are never silently different.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from .embedder import Embedder

__all__ = ["EXPORT_FORMAT", "MANIFEST", "TEXT_TABLE", "ExportUnusable", "OnnxEmbedder",
           "discard_prefetched", "export_folder", "pick_file", "prefetch", "read_manifest",
           "share_export", "shared_folder", "shared_root", "text_inputs", "weights_stamp"]

# Bump when what index.onnx_export writes changes shape: older exports are then redone.
EXPORT_FORMAT = 2  # 2: the text tower's token-embedding table in its own mapped file
MANIFEST = "manifest.json"  # written last: a folder without it is an unfinished export
TEXT_TABLE = "text.embedding.npy"  # the token-embedding table, read by row (np.load mmap)


class ExportUnusable(Exception):
    """An export that is missing, unfinished, from another model, or damaged (the reason)."""


@dataclass(frozen=True)
class _Device:
    type: str = "cpu"


def weights_stamp(spec: str) -> list | None:
    """What tells two versions of a model's weights on disk apart, without reading them: the
    size and mtime of each weight file for `tiny`, `local-dir:` and `ARCH:/path` specs. None
    for downloaded weights (named by their pretrained tag) and random ones."""
    from .clip import TINY_DIR

    spec = spec.strip()
    if spec == "tiny":
        folder: Path | None = TINY_DIR
    elif spec.startswith("local-dir:"):
        folder = Path(spec.removeprefix("local-dir:"))
    elif os.path.isdir(spec):
        folder = Path(spec)
    else:
        folder = None
    if folder is not None:
        files = sorted(p for p in folder.glob("*") if p.is_file())
    else:
        tag = spec.partition(":")[2]
        files = [Path(tag)] if tag and os.path.isfile(tag) else []
    stamp: list = []
    if spec.endswith(":random"):  # random weights are torch's seeded init: the versions count
        from importlib.metadata import PackageNotFoundError, version

        for package in ("torch", "open_clip_torch"):
            try:
                stamp.append([package, version(package)])
            except PackageNotFoundError:
                pass
    for path in files:
        st = path.stat()
        stamp.append([path.name, st.st_size, st.st_mtime_ns])
    return stamp or None


def export_folder(home: Path, spec: str, dim: int) -> Path:
    """Where the export of model `spec` (of dimension `dim`) lives in a library home."""
    key = json.dumps([EXPORT_FORMAT, spec, int(dim), weights_stamp(spec)])
    return home / "onnx" / hashlib.sha256(key.encode()).hexdigest()[:16]


def read_manifest(folder: Path, spec: str, dim: int) -> dict:
    """The finished export's manifest; ExportUnusable says why there is none to use."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportUnusable("not exported yet") from None
    except (OSError, ValueError) as exc:
        raise ExportUnusable(f"its manifest cannot be read ({exc})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT
            or manifest.get("spec") != spec or manifest.get("dim") != int(dim)
            or manifest.get("weights") != weights_stamp(spec)):
        raise ExportUnusable("it was made for another model or by another clipdex")
    return manifest


def text_inputs(table: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The exported text tower's inputs: the tokens' embedding rows, and the tokens (whose
    largest id, end-of-text, marks the position it pools)."""
    return {"embedded": np.ascontiguousarray(table[tokens], np.float32), "tokens": tokens}


def shared_root() -> Path:
    """The per-user cache's folder of exports (one subfolder per export key)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipdex", appauthor=False)) / "onnx"


def shared_folder(folder: Path) -> Path:
    """The per-user cache's copy of an export folder (same key): a second library of the same
    model links it instead of exporting again."""
    return shared_root() / folder.name


def share_export(source: Path, target: Path, spec: str, dim: int) -> dict | None:
    """Put the finished export in `source` into `target` (hard links where the file system
    allows, else copies; the manifest last); its manifest, or None when `source` holds no
    usable export or the copy failed. Torch-free: a query can take a shared export."""
    import shutil

    from .atomic import atomic_write

    try:
        manifest = read_manifest(source, spec, dim)
    except ExportUnusable:
        return None
    names = [manifest["tokenizer"]["vocab"]] if manifest.get("tokenizer") else []
    for info in manifest.get("towers", {}).values():
        entries = [*(info.get("files") or {}).values(), *([info["table"]] if "table" in info
                                                           else [])]
        for entry in entries:
            if (source / entry["name"]).stat().st_size != entry["size"]:
                return None
            names.append(entry["name"])
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in [*names, MANIFEST]:
            final = target / name
            final.unlink(missing_ok=True)
            try:
                os.link(source / name, final)
            except OSError:
                atomic_write(final, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
    except OSError:
        return None
    return manifest


class OnnxEmbedder:
    """The Embedder protocol over ONNX Runtime sessions of an exported model.

    Args:
        folder: the export folder (see `export_folder`); manifest: its manifest.
        precision: "auto" (per tower what the export chose: int8 where it passed the probe and
            ran faster, else fp32), "fp32", or "int8" (where an int8 file exists).
        fallback: loads the torch embedder, for a tower the export does not cover.
        notify: told why, when a tower the export does not cover is first used.
        damaged: told (with the reason) when an exported file turns out missing or damaged;
            that tower then runs on `fallback`.
        threads: ONNX Runtime intra-op threads (None: its default, one per core).
    """

    def __init__(self, folder: Path, manifest: dict, *, precision: str = "auto",
                 fallback: Callable[[], "Embedder"] | None = None,
                 notify: Callable[[str], None] | None = None,
                 damaged: Callable[[str], None] | None = None,
                 threads: int | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.spec: str = manifest["spec"]
        self.dim: int = int(manifest["dim"])
        self.image_size: int = int(manifest["image_size"])
        self.device = _Device()
        self._fallback = fallback
        self._notify = notify
        self._damaged = damaged
        self._threads = threads
        self._towers: dict[str, dict] = manifest.get("towers", {})
        self._choice = {tower: self._pick(tower, precision) for tower in ("text", "image")}
        self.precision = "onnx-" + "/".join(
            f"{t}:{c or 'torch'}" for t, c in self._choice.items())
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._torch: "Embedder | None" = None
        self._tokenizer = None
        self._prep = None
        self._table: np.ndarray | None = None

    def _pick(self, tower: str, precision: str) -> str | None:
        """Which file of `tower` to run ("fp32", "int8"), or None for torch."""
        return pick_file(self._towers.get(tower) or {}, precision)

    def runs_on_onnx(self, tower: str) -> bool:
        return self._choice.get(tower) is not None

    def open_tower(self, tower: str) -> bool:
        """Open `tower`'s session now (ingestion does, before it prepares photos for it);
        whether the tower runs on ONNX Runtime (False: torch, said through `damaged`)."""
        return self.runs_on_onnx(tower) and self._session(tower) is not None

    def fingerprint(self) -> dict[str, Any]:
        return dict(self.manifest["fingerprint"])

    # --- sessions ---------------------------------------------------------------------------
    def _session(self, tower: str):
        """The tower's session, opened on first use; None when its file turned out unusable
        (the tower then runs on torch from here on)."""
        with self._lock:
            if tower not in self._sessions:
                try:
                    self._sessions[tower] = self._open(tower)
                except ExportUnusable as exc:
                    if self._damaged is None:
                        raise
                    self._choice[tower] = None
                    self._damaged(str(exc))
                    return None
            return self._sessions[tower]

    def _open(self, tower: str):
        entry = self._towers[tower]["files"][self._choice[tower]]
        path = self.folder / entry["name"]
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ExportUnusable(f"{path.name} is missing ({exc.strerror})") from None
        if size != entry["size"]:
            raise ExportUnusable(f"{path.name} is damaged ({size} bytes, "
                                 f"{entry['size']} expected)")
        if tower == "text":  # the embedding table first: a damaged one is found here too
            self._table = self._mapped_table()
        prefetched = _take_prefetched(path, self._threads)
        if prefetched is not None:
            return prefetched
        try:
            return _new_session(path, self._threads)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ExportUnusable(f"{path.name} cannot be loaded "
                                 f"({str(exc).strip().splitlines()[0][:200]})") from None

    def _open_quietly(self, tower: str) -> None:
        """Open a tower's session in a background thread. A failure is left for the caller's
        own `_session` call to meet again and handle (it may remove the export, which the
        thread must not do while the caller reads the tokenizer from it)."""
        try:
            session = self._open(tower)
        except ExportUnusable:
            return
        with self._lock:
            self._sessions.setdefault(tower, session)

    def _mapped_table(self) -> np.ndarray:
        entry = self._towers["text"].get("table") or {}
        path = self.folder / entry.get("name", TEXT_TABLE)
        try:
            if path.stat().st_size != entry.get("size"):
                raise ExportUnusable(f"{path.name} is damaged ({path.stat().st_size} bytes, "
                                     f"{entry.get('size')} expected)")
            table = np.load(path, mmap_mode="r")
        except OSError as exc:
            raise ExportUnusable(f"{path.name} is missing ({exc.strerror})") from None
        except ValueError as exc:
            raise ExportUnusable(f"{path.name} cannot be read ({exc})") from None
        if table.ndim != 2 or table.dtype != np.float32:
            raise ExportUnusable(f"{path.name} is not a float32 table")
        return table

    def _torch_embedder(self, tower: str | None = None) -> "Embedder":
        """The torch embedder, for `tower` when the export does not cover it (said once)."""
        error = (self._towers.get(tower) or {}).get("error") if tower else None
        if error and self._notify:
            self._notify(f"{tower} queries use torch (a slower start): {error}")
        if self._torch is None:
            if self._fallback is None:
                raise ExportUnusable("a tower is not exported and no torch fallback is set")
            self._torch = self._fallback()
        return self._torch

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .clip_tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer.from_config(self.manifest["tokenizer"], self.folder)
        return self._tokenizer

    @property
    def image_prep(self):
        if self._prep is None:
            from .image_prep import ImagePrep

            self._prep = ImagePrep(self.manifest["preprocess"])
        return self._prep

    # --- the Embedder protocol --------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Strings → N×dim unit vectors; each batch runs up to its last end-of-text token."""
        if not self.runs_on_onnx("text"):
            return self._torch_embedder("text").encode_texts(texts)
        if not len(texts):
            return np.empty((0, self.dim), np.float32)
        if self._tokenizer is None and "text" not in self._sessions:
            # the first query: the session loads (in C++, off the GIL) while the tokenizer's
            # vocabulary is parsed (Python) — ~50 ms of a cold ViT-B-32 query
            opening = threading.Thread(target=self._open_quietly, args=("text",), daemon=True)
            opening.start()
            self.tokenizer  # noqa: B018 - built here, beside the session
            opening.join()
        tokens = self.tokenizer(list(texts)).astype(np.int64, copy=False)
        ends = tokens.argmax(axis=-1)  # the end-of-text id is the vocabulary's largest
        order = np.argsort(ends, kind="stable")
        session = self._session("text")
        if session is None:
            return self._torch_embedder().encode_texts(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            length = int(ends[rows].max()) + 1
            out[rows] = session.run(None, text_inputs(self._table, tokens[rows, :length]))[0]
        return _unit(out)

    def prepare(self, image: "Image.Image") -> np.ndarray:
        if not self.runs_on_onnx("image"):
            return self._torch_embedder("image").prepare(image)
        return self.image_prep.pil_steps(image)

    def collate(self, items: Sequence[Any]) -> Any:
        if not self.runs_on_onnx("image"):
            return self._torch_embedder("image").collate(items)
        return self.image_prep.finish(np.stack(items))

    def encode_image_tensors(self, batch: Any) -> np.ndarray:
        if not self.runs_on_onnx("image"):
            return self._torch_embedder("image").encode_image_tensors(batch)
        session = self._session("image")
        if session is None:  # the batch was prepared for ONNX: torch takes the same tensor
            import torch

            return self._torch_embedder().encode_image_tensors(torch.from_numpy(batch))
        pixels = np.ascontiguousarray(batch, np.float32)
        return _unit(session.run(None, {"pixels": pixels})[0])

    def encode_images(self, images: Sequence["Image.Image"], *, batch_size: int = 64) -> np.ndarray:
        """PIL images (any mode) → N×dim unit vectors."""
        if not self.runs_on_onnx("image"):
            return self._torch_embedder("image").encode_images(images)
        out = [np.empty((0, self.dim), np.float32)]
        for start in range(0, len(images), batch_size):
            chunk = [self.prepare(im.convert("RGB")) for im in images[start:start + batch_size]]
            out.append(self.encode_image_tensors(self.collate(chunk)))
        return np.concatenate(out)


def pick_file(info: dict, precision: str) -> str | None:
    """Which file of a tower (its manifest entry) runs at `precision`: "fp32", "int8", or
    None for torch."""
    files = info.get("files") or {}
    if precision == "fp32":  # asked for: never int8 instead (torch has fp32)
        return "fp32" if "fp32" in files else None
    if precision == "int8" and "int8" in files:
        return "int8"
    use = info.get("use")
    return use if use in files else next(iter(files), None)


# Sessions being opened ahead of the query that needs them (`prefetch`), by file path.
_PREFETCHED: dict[str, tuple[threading.Thread, dict]] = {}


def prefetch(home: Path, tower: str, precision: str = "auto") -> bool:
    """Start opening `tower`'s session of the library's export in a background thread, before
    the library itself is opened: ONNX Runtime builds it in C++ without the GIL (~0.35 s for
    ViT-B-32's text tower) while the query imports SQLAlchemy and FAISS and reads the store
    (~0.4 s of Python). Only a head start: the session is used only if the embedder later
    opens the same file unchanged, with the same options; anything unusual (no export, more
    than one, a damaged file) is left for that embedder to meet and report. Whether a thread
    was started."""
    try:
        manifests = list((home / "onnx").glob("*/" + MANIFEST))
        if len(manifests) != 1:
            return False
        manifest = json.loads(manifests[0].read_text(encoding="utf-8"))
        if manifest.get("format") != EXPORT_FORMAT:
            return False
        choice = pick_file(manifest.get("towers", {}).get(tower) or {}, precision)
        if choice is None:
            return False
        path = manifests[0].parent / manifest["towers"][tower]["files"][choice]["name"]
        stat = path.stat()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    key = str(path)
    if key in _PREFETCHED:
        return False
    result: dict = {"stat": (stat.st_size, stat.st_mtime_ns)}

    def run() -> None:
        try:
            result["session"] = _new_session(path, None)
        except Exception:  # noqa: BLE001 - the embedder's own open reports it
            pass

    thread = threading.Thread(target=run, name="clipdex-prefetch", daemon=True)
    _PREFETCHED[key] = (thread, result)
    thread.start()
    return True


def discard_prefetched() -> None:
    """Forget the sessions `prefetch` opened that no embedder took (the command that asked for
    them is done: a process that goes on, as a test runner does, must not keep them)."""
    _PREFETCHED.clear()


def _take_prefetched(path: Path, threads: int | None):
    """The session `prefetch` opened for `path`, if it did and the file is unchanged."""
    entry = _PREFETCHED.pop(str(path), None)
    if entry is None or threads:
        return None
    thread, result = entry
    thread.join()
    try:
        stat = path.stat()
    except OSError:
        return None
    if result["stat"] != (stat.st_size, stat.st_mtime_ns):
        return None
    return result.get("session")


def _new_session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
