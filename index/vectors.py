"""FAISS vector indexes derived from the store: one per kind (images, captions).

Ids are the store's primary keys. A saved index file is named after the store generation it
reflects (`image-<generation>.faiss`) and written atomically, so a crash at any point leaves either
the old file or the new one. On open, an index that lags the store is caught up by diffing id
sets (add what is missing, remove what is gone); one of the wrong type for the library's size is
rebuilt.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import faults
from .store import Store

if TYPE_CHECKING:
    import faiss

__all__ = ["FLAT_MAX_VECTORS", "VectorIndex", "index_type_for"]

# Exact search while a library is small: Flat over 100k×512 costs ~15 ms/query on 2 cores, and
# no ANN index is worth its build time and recall loss below that. Tuned by bench (issue 5).
FLAT_MAX_VECTORS = 100_000
IVF_NPROBE = 16
_FILE = re.compile(r"^(?P<kind>image|caption)-(?P<gen>\d+)\.faiss$")

Progress = Callable[[str], None]


def index_type_for(count: int) -> str:
    """The index_factory string for a library holding `count` vectors."""
    if count <= FLAT_MAX_VECTORS:
        return "IDMap2,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(count))))
    return f"IVF{nlist},Flat"


def _faiss():
    import faiss

    return faiss


def _index_ids(index: "faiss.Index") -> np.ndarray:
    faiss = _faiss()
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
        for lst in range(ivf.nlist) if invlists.list_size(lst)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


class VectorIndex:
    """A FAISS index over one kind of vector, kept in step with the store."""

    def __init__(self, kind: str, dim: int, directory: Path, index: "faiss.Index",
                 generation: int, factory: str, mapped_from: Path | None = None) -> None:
        self.kind, self.dim, self.directory = kind, dim, directory
        self.index, self.generation, self.factory = index, generation, factory
        self.mapped_from = mapped_from  # the file a read-only, memory-mapped index maps

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, store: Store, kind: str, dim: int, directory: Path, *,
             save: bool = False) -> "VectorIndex":
        """Load the newest saved index for `kind` and catch it up with the store.

        With `save`, a caught-up or rebuilt index is written back (the write path does this;
        readers only catch up in memory). Readers memory-map the file (IO_FLAG_MMAP): a 1M-vector
        index costs page cache for the lists a query touches, not 2 GB of copied heap, and opens
        in milliseconds; it is copied into memory only if it has to be caught up.
        """
        faiss = _faiss()
        path, generation = cls._newest_file(directory, kind)
        if path is not None:
            flags = 0 if save else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
            index = faiss.read_index(str(path), flags)
            factory = getattr(index, "clipdex_factory", None) or _describe(index)
            vi = cls(kind, dim, directory, index, generation, factory,
                     mapped_from=None if save else path)
        else:
            vi = cls.empty(kind, dim, directory, index_type_for(store.count(kind)))
        changed = vi.catch_up(store)
        if save and (changed or path is None):
            vi.save()
        return vi

    @classmethod
    def empty(cls, kind: str, dim: int, directory: Path, factory: str) -> "VectorIndex":
        faiss = _faiss()
        return cls(kind, dim, directory,
                   faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT), -1, factory)

    @staticmethod
    def _newest_file(directory: Path, kind: str) -> tuple[Path | None, int]:
        best: tuple[Path | None, int] = (None, -1)
        if directory.is_dir():
            for entry in directory.iterdir():
                m = _FILE.match(entry.name)
                if m and m["kind"] == kind and int(m["gen"]) > best[1]:
                    best = (entry, int(m["gen"]))
        return best

    # --- keeping in step --------------------------------------------------------------------
    def catch_up(self, store: Store) -> bool:
        """Bring the index to the store's current generation; True when anything changed."""
        generation = store.generation(self.kind)
        if generation == self.generation and self.generation >= 0:
            return False
        store_ids = store.ids(self.kind)
        if not self.index.is_trained or _needs_rebuild(self.factory, len(store_ids)):
            self.rebuild(store, generation=generation)
            return True
        if self.mapped_from is not None:  # a mapped index is read-only: copy it in first
            self.index = _faiss().read_index(str(self.mapped_from))
            self.mapped_from = None
        have = _index_ids(self.index)
        missing = np.setdiff1d(store_ids, have, assume_unique=True)
        gone = np.setdiff1d(have, store_ids, assume_unique=True)
        if len(gone):
            self.index.remove_ids(_faiss().IDSelectorBatch(gone))
        for ids, vectors in store.iter_vectors(self.kind, missing.tolist()):
            self.index.add_with_ids(vectors, ids)
        self.generation = generation
        return True

    def rebuild(self, store: Store, *, generation: int | None = None,
                progress: Progress | None = None) -> None:
        """Build a fresh index of the type the library's size calls for, from the store."""
        generation = store.generation(self.kind) if generation is None else generation
        count = store.count(self.kind)
        factory = index_type_for(count)
        fresh = VectorIndex.empty(self.kind, self.dim, self.directory, factory)
        if not fresh.index.is_trained:
            if progress:
                progress(f"training {factory} on {count} {self.kind} vectors")
            fresh.index.train(_training_sample(store, self.kind, count))
            _faiss().extract_index_ivf(fresh.index).nprobe = IVF_NPROBE
        for ids, vectors in store.iter_vectors(self.kind):
            fresh.index.add_with_ids(vectors, ids)
        self.index, self.factory, self.generation = fresh.index, factory, generation
        self.mapped_from = None

    # --- searching --------------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        return self.factory.endswith(",Flat") and not self.factory.startswith("IVF")

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search; returns (scores, ids), ids -1 where fewer than k exist."""
        k = max(1, min(k, self.size)) if self.size else 1
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    # --- saving -----------------------------------------------------------------------------
    def save(self) -> Path:
        """Write atomically as `<kind>-<generation>.faiss`, then drop older files."""
        faiss = _faiss()
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{self.kind}-{self.generation}.faiss"
        tmp = self.directory / f".{final.name}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        faults.crash_test_hook("save")
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        for entry in self.directory.iterdir():
            m = _FILE.match(entry.name)
            stale_tmp = entry.name.startswith(f".{self.kind}-") and entry.name.endswith(".tmp")
            if (m and m["kind"] == self.kind and entry != final) or stale_tmp:
                entry.unlink(missing_ok=True)
        return final

    def describe(self) -> dict:
        return {"type": self.factory, "vectors": self.size, "exact": self.exact,
                "generation": self.generation, "memory_mapped": self.mapped_from is not None}


def _needs_rebuild(factory: str, count: int) -> bool:
    """A rebuild when the library crosses the Flat/IVF line or outgrows its IVF lists 4×."""
    wanted = index_type_for(count)
    if wanted.startswith("IVF") != factory.startswith("IVF"):
        return True
    if not wanted.startswith("IVF"):
        return False
    have_nlist = int(factory[3:].split(",")[0])
    want_nlist = int(wanted[3:].split(",")[0])
    return not (want_nlist / 4 <= have_nlist <= want_nlist * 4)


def _describe(index: "faiss.Index") -> str:
    faiss = _faiss()
    if hasattr(index, "id_map"):
        return "IDMap2,Flat"
    return f"IVF{faiss.extract_index_ivf(index).nlist},Flat"


def _nlist(count: int) -> int:
    factory = index_type_for(count)
    return int(factory[3:].split(",")[0]) if factory.startswith("IVF") else 1


def _training_sample(store: Store, kind: str, count: int) -> np.ndarray:
    ids = store.ids(kind)
    rng = np.random.default_rng(0)
    chosen = rng.choice(ids, size=min(len(ids), max(100_000, 40 * _nlist(count))), replace=False)
    return np.concatenate([v for _, v in store.iter_vectors(kind, np.sort(chosen).tolist())])


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
