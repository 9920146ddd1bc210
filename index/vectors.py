"""FAISS vector indexes derived from the store: one per kind (images, captions).

Ids are the store's primary keys. A saved index file is named after the store generation it
reflects (`image-<generation>.faiss`) and written atomically, so a crash at any point leaves either
the old file or the new one. On open, an index that lags the store is caught up by diffing id
sets (add what is missing, remove what is gone); one of the wrong type for the library's size is
rebuilt.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_write, fsync_path, remove_stale_temps, temp_path
from .errors import IndexWriteFailed
from .store import Store, unit_rows

if TYPE_CHECKING:
    import faiss

__all__ = ["FLAT_MAX_COMPONENTS", "FP16_EXTRA", "VectorIndex", "add_shard", "codes_of",
           "describe_index",
           "flat_max_vectors", "index_type_for", "is_on_disk", "merge_shards",
           "read_index_file", "rerank_depth"]

# Measured with bench/index_choice.py (512-d clustered unit vectors, 2 threads, 2026-11-27;
# bench/results/index_choice.json), p50 of one query:
#   Flat: 0.96 ms at 10k, 20 ms at 100k, 178 ms at 1M (cost ~ vectors × dim).
#   IVF{4·sqrt(n)},Flat nprobe 16: 0.06 ms at 10k, 0.37 ms at 100k, 1.1 ms at 1M, recall@10 1.0
#   on that mixture; on bench/query.py's harder one (2000 Zipf-sized clusters) 0.98 at 1M, so
#   nlist = 4·sqrt(n) was the fastest at nprobe 16: 1M 2048/4096/8192 lists 1.65/1.10/1.20 ms,
#   100k 512/1024/2048 0.53/0.37/0.38.
# That mixture (50-1000 equal clusters) flatters IVF. On bench/query.py's (2000 Zipf-sized
# clusters) a fixed nprobe 16 gave recall@10 0.98 at 1M but 0.83 at 100k, where IVF1024 needed
# nprobe 64 (0.95 at 128-d and 512-d, 0.5 / 2.0 ms): what keeps recall is scanning a similar
# *number of vectors* (~3-4k at both sizes for 0.95-0.98), not of lists. So nprobe scans about
# IVF_SCAN_VECTORS, never fewer than IVF_MIN_NPROBE lists (bench/nprobe_sweep.py).
#   HNSW: no faster at equal recall (100k: M32 efSearch 128 0.30 ms, recall 0.98) and FAISS
#   cannot remove ids from it, which every library needs.
# Exact search while Flat costs about 2 ms or less (vectors × dim ≤ 10M: 19.5k ViT-B-32 vectors,
# 78k of the tiny model's), where its exactness is worth more than a millisecond; IVF above.
FLAT_MAX_COMPONENTS = 10_000_000
# Flat and IVF keep float16 codes (SQfp16), not float32: the store's own float16 values, so a
# ViT-B-32 image costs 1 KB of index instead of 2 KB. Their scores are within ~5e-5 of the
# exact ones (the float16 vector is not scaled to unit length), so the Searcher fetches
# FP16_EXTRA more candidates than it needs and re-scores them from the vectors the index gives
# back (`vectors()`: bit for bit the store's).
# Measured (bench/query.py --model ViT-B-32:random --sizes 10k,100k, 2026-12-03, float32 from
# the commit before in the same hour; bench/results/query-vit-fp16.json), recall@10 / vector
# query search+hydrate / bytes per image, index + store:
#   10k  IDMap2,Flat   1.000 / 1.68 ms / 2,056 + 1,401 = 3,457
#        IDMap2,SQfp16 1.000 / 1.24 ms / 1,032 + 1,401 = 2,433
#   100k IVF1024,Flat   0.9745 / 2.84 ms / 2,077 + 1,371 = 3,448
#        IVF1024,SQfp16 0.9745 / 2.21 ms / 1,053 + 1,371 = 2,424
# and alone (/tmp, 200 queries, k 26, 2 threads): 19.5k × 512 Flat 2.73 ms, SQfp16 1.08 ms;
# 78k × 128 2.88 / 0.97 ms (both also memory-mapped); the best 10 by exact score were always
# within SQfp16's best 26. FAISS's SQfp16 scores err from the exact ones by |1 - 1/|v16||:
# ~1e-5 at 512-d, up to ~2e-4 at 16-d.
FP16_EXTRA = 16
IVF_SCAN_VECTORS = 8192
IVF_MIN_NPROBE = 16
# The largest libraries keep compressed codes, 4-bit fast-scan PQ, and re-rank the best
# candidates exactly from the store's float16 vectors (Searcher._rescore). bench/scale.py,
# 1M × 512-d of bench/query.py's Zipf mixture, 200 queries, 2 threads, re-ranking read from a
# real SQLite store (bench/results/scale.json), recall@10 / p50 including the re-ranking:
#   IVF4096,Flat (the IVF-Flat rule), nprobe 34: 0.9975 / 2.6 ms, 2,064 B per vector in RAM.
#   IVF1024,PQ128x4fs (64 B codes), nprobe 64: re-rank 200 0.902 / 2.8 ms, 400 0.941 / 4.2;
#     more lists (nprobe 128, 256) add nothing: the codes' order is what loses recall.
#   IVF1024,PQ256x4fs (128 B codes), nprobe 64: re-rank 200 0.976 / 4.0 ms, 400 0.992 / 5.6.
#   IVF1024,PQ64 (8-bit, 64 B): re-rank 200 0.964 / 7.6 ms, 400 0.984 / 8.6; slower to scan
#     and 180 s to train on 100k vectors.
#   At 100k, OPQ128 in front of PQ128x4fsr, and residual codes (x4fsr), moved recall < 0.01.
#   OPQ240_480,IVF1024,PQ240x4fs (120 B codes, to fit 128 B with the id): 0.971 / 3.5 ms at
#   1M, but 133 B per vector in the file (fast-scan pads lists to blocks of 32) and 260 s to
#   train (OPQ) against 15 s.
# Why the earlier try (bench/index_choice.py) saw recall 0.07-0.5: a configuration, not a
# bug. Codes alone rank that badly on such data (PQ128x4fs nprobe 16: 0.46 at 100k, where
# IVF-Flat gets 0.76); its codes were coarse (PQ32/PQ64x4fs, 16-32 B) and it re-ranked 10·k
# candidates at nprobe 16-32. Its re-ranking (faiss.IndexRefineFlat, inner product) returns
# exactly what re-scoring the same candidates by hand does (100k, PQ64x4fs: 0.662 / 0.851 /
# 0.894 both ways at nprobe 16 ×10, 64 ×10, 64 ×20).
# At 10M (IVF4096,PQ256x4fs, built by VectorIndex.open in 361 s) the codes blur further:
#   re-rank 200: 0.898 (nprobe 27) / 0.900 (nprobe 64); nprobe 32 with 600: 0.9585 / 8.4 ms,
#   800: 0.966 / 9.3 ms, 1000: 0.9725 / 12.2 ms; query RSS 1.4 GB.
# At 1M × 128-d: PQ64x4fs (32 B) re-rank 200 0.912 / 1.8 ms, 400 0.956, 800 0.975 / 5.2 ms;
#   PQ128x4fs (64 B, one code per component) 200: 0.985 / 2.0 ms; IVF4096,Flat 0.993 / 0.3 ms.
# So: PQ{min(dim, 256)}x4fs (128 B at 512-d, 64 B at 128-d) once IVF-Flat's float32
# vectors would pass COMPRESSED_MIN_BYTES (1 GiB: 524k ViT-B-32 vectors, 2.1M tiny), about
# COMPRESSED_SCAN_VECTORS codes scanned (nprobe 64 of 1024 lists at 1M, 27 of 4096 at 10M),
# and RERANK_CANDIDATES re-scored exactly at 1M, times sqrt(n / 1M) above (633 at 10M).
COMPRESSED_MIN_BYTES = 1 << 30
PQ_MAX_CODES = 256  # 4-bit codes per vector at most: 128 B
COMPRESSED_SCAN_VECTORS = 65_536
ONDISK_SCAN_VECTORS = 32_768  # 8-bit codes scan ~3.5× slower than fast scan, rank better
RERANK_CANDIDATES = 200  # re-scored exactly from the store, or RERANK_FACTOR · k if more
RERANK_AT = 1_000_000  # ... at this size, growing as sqrt(size) above it
RERANK_FACTOR = 4
ADD_PROGRESS_EVERY = 100_000  # a rebuild reports every 10% of its vectors, at most this often
# Bigger than RAM: past ONDISK_MIN_BYTES of codes and ids, the inverted lists live in a file
# of their own (FAISS OnDiskInvertedLists, memory-mapped: the page cache holds what queries
# touch), built shard by shard against one trained index and merged with
# faiss.contrib.ondisk.merge_ondisk. FAISS cannot keep fast-scan codes on disk (their lists
# are packed in blocks of 32; merge_ondisk asserts il->code_size == code_size), so the
# on-disk lists hold 8-bit PQ codes: PQ{m/2}x8 where fast scan has PQ{m}x4, at most
# ONDISK_MAX_CODES bytes (PQ64x8 at 512-d, 128-d and 768-d alike).
# The line is 1 GiB of fast-scan codes and ids: 7.9M 512-d vectors (136 B each), 14.9M at 128-d
# (72 B). bench/scale.py, 10M × 512-d, library knobs (nprobe 16, 633 re-ranked), 2026-12-03:
#   IVF4096,PQ256x4fs in RAM: recall@10 0.957, p50 7.9 ms, query RSS 1,435 MB, 138 B/vector
#   IVF4096,PQ64x8 on disk:  recall@10 0.962, p50 15.6 ms, query RSS 784 MB, 73 B/vector
#     (nprobe 32, 1000 re-ranked: 0.9785 / 23.8 ms). 8-bit codes rank better per byte (64 B of
#     them beat 128 B of 4-bit ones) and scan slower; half the RAM per image for 2× the time,
#     still inside 20 ms. At 1M × 512 the old on-disk PQ128x8 gave 0.985 / 12.4 ms.
# At 128-d the fast-scan codes are 64 B already (10M: 0.990 / 5.3 ms, 807 MB), so 10M stays in
# RAM there.
ONDISK_MIN_BYTES = 1 << 30
ONDISK_MAX_CODES = 64  # 8-bit codes per vector on disk at most: 64 B, 72 B with the id
ONDISK_SHARD_VECTORS = 2_000_000  # one shard's codes in RAM while it is filled: 144 MB
_FILE = re.compile(r"^(?P<kind>image|caption)-(?P<gen>\d+)\.faiss$")
_DATA = re.compile(r"^(?P<kind>image|caption)-(?P<gen>\d+)-[0-9a-f]{8}\.ivfdata$")

Progress = Callable[[str], None]


def flat_max_vectors(dim: int) -> int:
    """The most `dim`-sized vectors searched exactly (Flat) before an IVF index takes over."""
    return FLAT_MAX_COMPONENTS // max(1, dim)


def index_type_for(count: int, dim: int) -> str:
    """The index_factory string for a library holding `count` vectors of `dim` floats."""
    if count <= flat_max_vectors(dim):
        return "IDMap2,SQfp16"
    if count * dim * 4 > COMPRESSED_MIN_BYTES:
        fast_scan = pq_codes(dim)
        if count * (fast_scan // 2 + 8) > ONDISK_MIN_BYTES:  # 8-bit codes, at most 64 B
            on_disk = pq_codes(dim, min(fast_scan // 2, ONDISK_MAX_CODES))
            return f"IVF{compressed_nlist(count)},PQ{on_disk}x8"
        return f"IVF{compressed_nlist(count)},PQ{fast_scan}x4fs"
    return f"IVF{_nlist(count)},SQfp16"


def codes_of(factory: str) -> str:
    """What an index keeps per vector: "Flat" (float32), "SQfp16" (the store's float16
    values), or lossy codes ("PQ256x4fs", "PQ128x8")."""
    return factory.rsplit(",", 1)[-1]


def is_on_disk(factory: str) -> bool:
    """Whether an index of this type keeps its inverted lists in a file of their own."""
    return bool(re.search(r",PQ\d+x8$", factory))


def pq_codes(dim: int, most: int = PQ_MAX_CODES) -> int:
    """4-bit codes per vector: one per component up to PQ_MAX_CODES (the most that divides
    dim), so 128-d keeps 128 codes (64 B) and 512-d 256 (128 B)."""
    return max(m for m in range(1, max(1, min(dim, most)) + 1) if dim % m == 0)


def compressed_nlist(count: int) -> int:
    """Lists of a compressed index, about sqrt(count): fewer than IVF-Flat's (scanning codes
    is cheap, and k-means over 4096 centroids trains in minutes at 10M on 2 cores)."""
    return 1 << int(round(math.log2(math.sqrt(max(1, count)))))


def training_size(factory: str, count: int) -> int:
    """How many vectors train an index: 40 per list (FAISS warns below 39), at least 100k."""
    m = re.search(r"IVF(\d+)", factory)
    return min(count, max(100_000, 40 * int(m[1]) if m else 0))


def rerank_depth(k: int, count: int) -> int:
    """How many candidates a compressed index of `count` vectors returns for exact
    re-scoring, for k hits: RERANK_CANDIDATES at 1M, growing as sqrt(count) (the codes' order
    blurs as the library grows denser), at least RERANK_FACTOR · k."""
    scale = math.sqrt(max(1.0, count / RERANK_AT))
    return max(math.ceil(RERANK_CANDIDATES * scale), RERANK_FACTOR * k)


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
        # writers rebuild an index of the wrong type for the library's size; readers keep
        # adding to theirs until the writer's rebuilt file is there, then load it
        self.rebuilds = True
        self.notice: Progress = notice_on_stderr
        self._lag_seen = -1  # the store generation a read-only on-disk index last lagged at

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, store: Store, kind: str, dim: int, directory: Path, *,
             save: bool = False, mmap: bool = False, hold: bool = False,
             progress: Progress | None = None,
             notice: Progress | None = None) -> "VectorIndex":
        """Load the newest saved index for `kind` and catch it up with the store.

        With `save`, a caught-up or rebuilt index is written back (the write path does this;
        readers only catch up in memory). With `mmap` (readers only) the file is memory-mapped
        (IO_FLAG_MMAP): a 1M×512 index opens in milliseconds instead of ~3 s and costs page cache
        rather than 2 GB of heap, but each IVF query is slower (1M×128, nprobe 34: 3.8-4.9 ms
        mapped vs 0.6-0.7 ms loaded; 0.73 s to load). The one-shot CLI maps; the server and the
        Python API load. A mapped index is copied into memory only if it must be caught up.
        With `hold` nothing is written at all: the caller keeps the index and saves it later.
        A file that cannot be read (truncated, corrupt, another dimension) is rebuilt from the
        store, said to `notice` (else `progress`, else stderr); the rebuilt index replaces it.
        """
        faiss = _faiss()
        path, generation = cls.newest_file(directory, kind)
        index = None
        if path is not None:
            mapped = mmap and not save
            try:
                index = read_index_file(path, faiss.IO_FLAG_MMAP if mapped else 0, dim)
            except UnreadableIndex as exc:  # derived data: the store rebuilds it
                (notice or progress or notice_on_stderr)(
                    f"the {kind} index {path} cannot be used ({exc}); rebuilding it from the "
                    f"store")
                generation = -1
        if index is not None:
            _set_search_knobs(index)
            factory = getattr(index, "clipdex_factory", None) or describe_index(index)
            vi = cls(kind, dim, directory, index, generation, factory,
                     mapped_from=path if mapped else None)
        else:
            vi = cls.empty(kind, dim, directory, index_type_for(store.count(kind), dim))
        vi.rebuilds = save or hold
        vi.notice = notice or progress or notice_on_stderr
        changed = vi.catch_up(store, progress=progress)
        if hold:
            return vi
        if save and (changed or path is None):
            vi.save()
        elif changed and vi.generation > generation and \
                not _needs_rebuild(vi.factory, vi.size, dim):  # the writer's to rebuild
            vi.save_quietly()  # e.g. after an interrupted `captions add`: catch up once only
        return vi

    @classmethod
    def empty(cls, kind: str, dim: int, directory: Path, factory: str) -> "VectorIndex":
        return cls(kind, dim, directory, new_index(dim, factory), -1, factory)

    @staticmethod
    def newest_file(directory: Path, kind: str) -> tuple[Path | None, int]:
        """The newest saved index file of `kind` in `directory`, and its generation."""
        best: tuple[Path | None, int] = (None, -1)
        if directory.is_dir():
            for entry in directory.iterdir():
                m = _FILE.match(entry.name)
                if m and m["kind"] == kind and int(m["gen"]) > best[1]:
                    best = (entry, int(m["gen"]))
        return best

    # --- keeping in step --------------------------------------------------------------------
    def catch_up(self, store: Store, *, progress: Progress | None = None) -> bool:
        """Bring the index to the store's current generation; True when anything changed."""
        generation = store.generation(self.kind)
        if generation == self.generation and self.generation >= 0 and not (
                self.rebuilds and _needs_rebuild(self.factory, self.size, self.dim)):
            return False
        if self.on_disk and not self.rebuilds:  # before reading every id of the store
            if self.newest_file(self.directory, self.kind)[1] > self.generation:
                self._load_in_memory()  # a writer's newer header: map the lists it names
                if self.generation == generation:
                    return True
            elif generation == self._lag_seen:
                return False  # still lagging, already said
        if self.mapped_from is not None:  # a mapped index is read-only: load a copy first
            self._load_in_memory()
        store_ids = store.ids(self.kind)
        wrong_type = _needs_rebuild(self.factory, len(store_ids), self.dim)
        if wrong_type and not self.rebuilds and self.index.is_trained and \
                self.newest_file(self.directory, self.kind)[1] >= self.generation:
            self._load_in_memory()  # a writer's rebuilt index: take it, then catch it up
            wrong_type = _needs_rebuild(self.factory, len(store_ids), self.dim)
        if not self.index.is_trained or (wrong_type and self.rebuilds):
            self.rebuild(store, generation=generation, progress=progress)
            return True
        have = _index_ids(self.index)
        missing = np.setdiff1d(store_ids, have, assume_unique=True)
        gone = np.setdiff1d(have, store_ids, assume_unique=True)
        if self.on_disk and (len(missing) or len(gone)):
            if not self.rebuilds:  # the lists are shared files: only a writer changes them
                self._lag_seen = generation
                self.notice(
                    f"the on-disk {self.kind} index lags the store ({len(missing)} new, "
                    f"{len(gone)} removed): answering without the new ones until `clipdex "
                    f"index` brings it up to date")
                return False
            self._copy_on_write(generation)
        if len(gone):
            self.index.remove_ids(_faiss().IDSelectorBatch(gone))
        for ids, vectors in store.iter_vectors(self.kind, missing.tolist(),
                                               unit=not self.keeps_float16):
            self.index.add_with_ids(vectors, ids)
        _set_search_knobs(self.index)  # nprobe follows the size
        self.generation = generation
        return True

    def _load_in_memory(self) -> None:
        """Swap a memory-mapped index for an in-memory copy of the newest saved file.

        Not the mapped file itself: a writer may have saved a newer one and deleted it since.
        """
        for _ in range(3):
            path, generation = self.newest_file(self.directory, self.kind)
            if path is None:
                break
            try:
                index = read_index_file(path, 0, self.dim)
            except UnreadableIndex:  # replaced between listing and reading: look again
                continue
            _set_search_knobs(index)
            self.index, self.generation, self.mapped_from = index, generation, None
            self.factory = getattr(index, "clipdex_factory", None) or describe_index(index)
            return
        # nothing readable: start empty, and catch_up adds (or rebuilds) from the store
        self.index = VectorIndex.empty(self.kind, self.dim, self.directory, self.factory).index
        self.generation, self.mapped_from = -1, None

    def rebuild(self, store: Store, *, generation: int | None = None,
                progress: Progress | None = None) -> None:
        """Build a fresh index of the type the library's size calls for, from the store."""
        generation = store.generation(self.kind) if generation is None else generation
        count = store.count(self.kind)
        factory = index_type_for(count, self.dim)
        if is_on_disk(factory):
            self._build_on_disk(store, factory, count, generation, progress)
            return
        fresh = VectorIndex.empty(self.kind, self.dim, self.directory, factory)
        if not fresh.index.is_trained:
            if progress:
                progress(f"training {factory} on {count} {self.kind} vectors")
            fresh.index.train(_training_sample(store, self.kind, factory, count))
            _set_search_knobs(fresh.index, count)
        if progress:
            progress(f"adding {count} {self.kind} vectors to {factory}")
        added, step = 0, max(ADD_PROGRESS_EVERY, count // 10)
        for ids, vectors in store.iter_vectors(  # streamed, never loaded whole
                self.kind, unit=not fresh.keeps_float16):
            fresh.index.add_with_ids(vectors, ids)
            added += len(ids)
            if progress and added // step > (added - len(ids)) // step and added < count:
                progress(f"added {added}/{count} {self.kind} vectors to {factory}")
        self.index, self.factory, self.generation = fresh.index, factory, generation
        self.mapped_from = None

    def _build_on_disk(self, store: Store, factory: str, count: int, generation: int,
                       progress: Progress | None) -> None:
        """Train once on a sample, fill shards of ONDISK_SHARD_VECTORS (one in RAM at a time,
        each written to a file), merge them into one list file with merge_ondisk. All of it
        in a temp folder: a crash or a full disk leaves the previous index as it was."""
        faiss = _faiss()
        say = progress or (lambda _message: None)
        self.directory.mkdir(parents=True, exist_ok=True)
        work = temp_path(self.directory / f"{self.kind}-{generation}.build")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
            # the factory turns on polysemous training for 8-bit PQ: a reordering of the codes
            # for Hamming pre-filtering, which clipdex never uses, at 12× the training time
            # (9k × 16-d: 24.5 s against 2.1 s)
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
            say(f"training {factory} on {count} {self.kind} vectors")
            index.train(_training_sample(store, self.kind, factory, count))
            trained = work / "trained.faiss"
            faiss.write_index(index, str(trained))
            del index
            say(f"adding {count} {self.kind} vectors to {factory}, in shards of "
                f"{ONDISK_SHARD_VECTORS}")
            shards: list[Path] = []
            source = store.iter_vectors(self.kind)  # streamed, never whole
            added, step, exhausted = 0, max(ADD_PROGRESS_EVERY, count // 10), False

            def shard_batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                """The next shard's batches, handed to FAISS as they are read: only the
                shard's codes stay in memory, not its vectors (2M × 512 float32 is 4 GB)."""
                nonlocal added, exhausted
                filled = 0
                while filled < ONDISK_SHARD_VECTORS:
                    batch = next(source, None)
                    if batch is None:
                        exhausted = True
                        return
                    filled += len(batch[0])
                    added += len(batch[0])
                    if added // step > (added - len(batch[0])) // step and added < count:
                        say(f"added {added}/{count} {self.kind} vectors to {factory}")
                    yield batch

            while not exhausted:
                before = added
                shard = add_shard(trained, shard_batches(), work / f"shard-{len(shards)}")
                if shards and added == before:  # the last shard came out empty
                    shard.unlink()
                    break
                shards.append(shard)
            say(f"merging {len(shards)} shard(s) into one on-disk index")
            name = f"{self.kind}-{generation}-{secrets.token_hex(4)}.ivfdata"
            index = merge_shards(trained, shards, work / name)
            for shard in shards:
                shard.unlink()
            final = self.directory / name
            os.replace(work / name, final)
            _lists(index).filename = str(final)
        except (OSError, RuntimeError) as exc:  # a full disk: shards, merge, list file
            raise self._write_failed(work, exc) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _set_search_knobs(index)
        self.index, self.factory, self.generation = index, factory, generation
        self.mapped_from = None

    def _copy_on_write(self, generation: int) -> None:
        """Make the on-disk lists private before changing them: copy the list file to a new
        name, and map the copy read-write. Readers keep the old file (and a crash leaves it
        whole); the saved header of the new generation names the copy."""
        faiss = _faiss()
        source = Path(_lists(self.index).filename)
        work = temp_path(self.directory / f"{self.kind}-{generation}.copy")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            shutil.copyfile(source, work / source.name)  # under its old name: SAME_DIR maps it
            faiss.write_index(self.index, str(work / "header.faiss"))
            with _quiet_stdout():
                index = faiss.read_index(str(work / "header.faiss"),
                                         faiss.IO_FLAG_ONDISK_SAME_DIR)
            final = self.directory / f"{self.kind}-{generation}-{secrets.token_hex(4)}.ivfdata"
            os.replace(work / source.name, final)
            _lists(index).filename = str(final)
        except (OSError, RuntimeError) as exc:  # no room for the copy
            raise self._write_failed(work, exc) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _set_search_knobs(index)
        self.index, self.mapped_from = index, None

    # --- searching --------------------------------------------------------------------------
    @property
    def on_disk(self) -> bool:
        """Whether the inverted lists are a memory-mapped file of their own (the largest
        libraries): shared with every reader, changed only by a writer, on a copy."""
        return _lists(self.index) is not None

    @property
    def exact(self) -> bool:
        """Whether every vector is compared with the query (Flat or SQfp16 without IVF lists):
        with re-scoring (below) the hits are those of exact search over the store."""
        return not self.factory.startswith("IVF")

    @property
    def exact_scores(self) -> bool:
        """Whether the index keeps float32 vectors, so the scores it returns need no
        re-scoring (libraries written before SQfp16)."""
        return codes_of(self.factory) == "Flat"

    @property
    def keeps_vectors(self) -> bool:
        """Whether `vectors()` can give back the stored vectors exactly: float32 (Flat), or
        the store's own float16 values (SQfp16, scaled to unit length as the store does)."""
        return codes_of(self.factory) in ("Flat", "SQfp16")

    def rescore_depth(self, k: int) -> int:
        """How many candidates to fetch so that re-scoring them exactly finds the best k:
        k on float32, k + FP16_EXTRA on float16 (scores within ~5e-5 of exact), rerank_depth
        on lossy codes."""
        if self.exact_scores:
            return k
        if self.keeps_vectors:
            return k + FP16_EXTRA
        return rerank_depth(k, self.size)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int,
               among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product search; returns (scores, ids), ids -1 where fewer than k exist.

        `among`: only these ids are candidates (a FAISS IDSelectorBatch inside the search, not
        a filter after it). On IVF the lists visited grow as the share of ids kept shrinks
        (nprobe / share, at most every list), so as many candidates are scanned as unfiltered.
        """
        k = max(1, min(k, self.size)) if self.size else 1
        queries = np.ascontiguousarray(queries, np.float32)
        if among is None:
            return self.index.search(queries, k)
        faiss = _faiss()
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(among, np.int64))
        if hasattr(self.index, "id_map"):
            params = faiss.SearchParameters(sel=selector)
        else:
            ivf = faiss.extract_index_ivf(self.index)
            share = max(len(among) / max(1, self.size), 1e-9)
            params = faiss.SearchParametersIVF(
                sel=selector, nprobe=min(ivf.nlist, math.ceil(ivf.nprobe / min(1.0, share))))
        return self.index.search(queries, k, params=params)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (all must be in the index), from the index itself:
        Flat by its id map, IVF by a hash-table direct map made on first use."""
        faiss = _faiss()
        if not self.keeps_vectors:
            raise RuntimeError(f"{self.factory} keeps lossy codes: read vectors from the store")
        ids = np.ascontiguousarray(ids, np.int64)
        if not hasattr(self.index, "id_map"):
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        vectors = self.index.reconstruct_batch(ids)
        # the store's float16 values: scaled to unit length as the store scales them
        return unit_rows(vectors) if self.keeps_float16 else vectors

    @property
    def keeps_float16(self) -> bool:
        """Whether the codes are the store's float16 values, added as they are stored (not
        scaled to unit length: rounding the scaled vector again could move a value)."""
        return codes_of(self.factory) == "SQfp16"

    # --- saving -----------------------------------------------------------------------------
    def save(self) -> Path:
        """Write atomically as `<kind>-<generation>.faiss`, then drop older generations and
        the temp files of writers that were killed. A write that fails (a full disk) keeps the
        previous file and raises IndexWriteFailed."""
        final = self.directory / f"{self.kind}-{self.generation}.faiss"
        if not hasattr(self.index, "id_map"):  # `vectors()`'s id hash table: 16 B per vector
            ivf = _faiss().extract_index_ivf(self.index)  # on disk; remade in ms when used
            if ivf.direct_map.type != _faiss().DirectMap.NoMap:
                ivf.set_direct_map_type(_faiss().DirectMap.NoMap)
        lists = _lists(self.index)
        keep = Path(lists.filename).name if lists is not None else None
        try:
            if lists is not None:  # the list file first: the header must never name less
                fsync_path(Path(lists.filename))
            atomic_write(final, lambda tmp: _faiss().write_index(self.index, str(tmp)),
                         crash_point="save")
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(final, exc) from None
        for entry in self.directory.iterdir():
            m = _FILE.match(entry.name)
            # newer files are another process's (a writer, or a reader that caught up)
            if m and m["kind"] == self.kind and int(m["gen"]) < self.generation:
                entry.unlink(missing_ok=True)
            d = _DATA.match(entry.name)  # list files of older headers (readers may map them)
            if d and d["kind"] == self.kind and int(d["gen"]) <= self.generation and \
                    entry.name != keep:
                entry.unlink(missing_ok=True)
        remove_stale_temps(self.directory, prefix=f"{self.kind}-")
        return final

    def _write_failed(self, target: Path, exc: Exception) -> IndexWriteFailed:
        """What a failed index write (a full disk, most often) tells the user."""
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return IndexWriteFailed(
            f"could not write the {self.kind} index {target} ({reason}); the previous index "
            f"file is kept and the store holds every vector: free some space in "
            f"{self.directory} and run the command again")

    def save_quietly(self) -> bool:
        """Save if the folder is writable: readers may write index files (derived data), so
        the next reader need not catch up again; a read-only library simply is not helped."""
        try:
            self.save()
        except (OSError, IndexWriteFailed):
            return False
        return True

    def describe(self) -> dict:
        return {"type": self.factory, "vectors": self.size, "exact": self.exact,
                "generation": self.generation, "on_disk": self.on_disk,
                "memory_mapped": self.mapped_from is not None or self.on_disk}


class UnreadableIndex(Exception):
    """An index file FAISS cannot read, or one that does not fit the library."""


def read_index_file(path: Path, flags: int, dim: int) -> "faiss.Index":
    """Read an index file. On-disk lists are looked for beside it (IO_FLAG_ONDISK_SAME_DIR, so
    a library folder can move) and mapped read-only: changing them takes _copy_on_write."""
    faiss = _faiss()
    lists_beside = any(path.parent.glob("*.ivfdata"))
    if lists_beside:  # IO_FLAG_MMAP on a header of on-disk lists faults on the first search
        flags &= ~faiss.IO_FLAG_MMAP
    flags |= faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        with _quiet_stdout(lists_beside):
            index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:  # FAISS's own error: truncated, not an index, bad header
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise UnreadableIndex(lines[-1].strip().split("Error: ")[-1] if lines
                              else "unreadable") from None
    if index.d != dim:
        raise UnreadableIndex(f"it holds {index.d}-dimensional vectors, the library {dim}")
    lists = _lists(index)
    if lists is not None:  # a short list file would fault (SIGBUS) on the first query
        data = Path(lists.filename)
        if data.stat().st_size < lists.totsize:
            raise UnreadableIndex(f"its list file {data.name} is truncated "
                                  f"({data.stat().st_size} of {lists.totsize} bytes)")
    return index


def _lists(index: "faiss.Index"):
    """The list file (OnDiskInvertedLists) of an index, or None when it has none. Not the
    OnDiskInvertedLists FAISS makes for an IVF file read with IO_FLAG_MMAP: those map the
    index file itself and have no file name of their own."""
    faiss = _faiss()
    if hasattr(index, "id_map"):
        return None
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists) and lists.filename.endswith(".ivfdata"):
        return lists
    return None


def add_shard(trained: Path, batches, out: Path) -> Path:
    """Fill one shard: a copy of the trained index `trained` with these (ids, vectors)
    batches, written to `out`. Shards trained alike merge into one index (merge_shards);
    each can be filled by another process or machine."""
    faiss = _faiss()
    shard = faiss.read_index(str(trained))
    for ids, vectors in batches:
        shard.add_with_ids(np.ascontiguousarray(vectors, np.float32),
                           np.ascontiguousarray(ids, np.int64))
    faiss.write_index(shard, str(out))
    return out


def merge_shards(trained: Path, shards: list[Path], data: Path) -> "faiss.Index":
    """Merge shard files into an index whose inverted lists are the file `data`
    (faiss.contrib.ondisk.merge_ondisk: the shards are mapped, never loaded whole)."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    index = faiss.read_index(str(trained))
    with _quiet_stdout():
        merge_ondisk(index, [str(s) for s in shards], str(data))
    # FAISS 1.15's merge places the lists itself but leaves the whole file on its free list,
    # so the next add_with_ids would write over merged lists (ids came back as garbage):
    # claim that space, as if the merge had allocated it
    lists, size = _lists(index), _lists(index).totsize
    if size and (lists.allocate_slot(size) != 0 or lists.totsize != size):
        raise RuntimeError(f"merging shards into {data}: FAISS's free list was not what "
                           f"clipdex expects ({lists.totsize} of {size} bytes)")
    return index


@contextlib.contextmanager
def _quiet_stdout(active: bool = True) -> Iterator[None]:
    """Keep what FAISS's on-disk lists print (with printf, on file descriptor 1) off stdout,
    where `--json` output goes."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def notice_on_stderr(message: str) -> None:
    """The default for a notice no caller asked to hear: one line on stderr."""
    import sys

    print(f"clipdex: {message}", file=sys.stderr, flush=True)


def _needs_rebuild(factory: str, count: int, dim: int) -> bool:
    """A rebuild when the library crosses the Flat/IVF line or outgrows its IVF lists 4×."""
    wanted = index_type_for(count, dim)
    if wanted.startswith("IVF") != factory.startswith("IVF"):
        return True
    if _code_family(wanted) != _code_family(factory):  # float32 to float16, into or out of PQ
        return True
    if not wanted.startswith("IVF"):
        return False
    if is_on_disk(wanted) != is_on_disk(factory):  # lists into or out of their own file
        return True
    have_nlist = int(factory[3:].split(",")[0])
    want_nlist = int(wanted[3:].split(",")[0])
    return not (want_nlist / 4 <= have_nlist <= want_nlist * 4)


def _code_family(factory: str) -> str:
    codes = codes_of(factory)
    return "PQ" if codes.startswith("PQ") else codes


def new_index(dim: int, factory: str) -> "faiss.Index":
    """An empty index of this factory string, inner product. IVF SQfp16 keeps the vectors
    themselves, not their residuals from the list centroid: so the codes are the store's
    float16 values exactly, and `vectors()` gives the store's vectors back bit for bit."""
    faiss = _faiss()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("IVF") and codes_of(factory) == "SQfp16":
        faiss.downcast_index(faiss.extract_index_ivf(index)).by_residual = False
    return index


def ivf_nprobe(nlist: int, count: int, scan: int = IVF_SCAN_VECTORS) -> int:
    """Lists to visit: about `scan` vectors, at least IVF_MIN_NPROBE lists."""
    return min(nlist, max(IVF_MIN_NPROBE, math.ceil(scan * nlist / max(1, count))))


def _set_search_knobs(index: "faiss.Index", count: int | None = None) -> None:
    """Search-time settings come from the constants above, not from what a file was saved with.

    `count` is the library's size when the index is still empty (a rebuild sets it first).
    """
    if not hasattr(index, "id_map"):
        faiss = _faiss()
        ivf = faiss.extract_index_ivf(index)
        codes = faiss.downcast_index(ivf)
        scan = IVF_SCAN_VECTORS if type(codes) in (faiss.IndexIVFFlat,
                                                   faiss.IndexIVFScalarQuantizer) else \
            ONDISK_SCAN_VECTORS if type(codes) is faiss.IndexIVFPQ else COMPRESSED_SCAN_VECTORS
        ivf.nprobe = ivf_nprobe(ivf.nlist, count if count is not None else int(index.ntotal),
                                scan)


def describe_index(index: "faiss.Index") -> str:
    """A factory-style name for a loaded index: what it was built as, lossy codes included
    (a name ending in ",Flat" promises exact scores)."""
    faiss = _faiss()
    if hasattr(index, "id_map"):
        inner = faiss.downcast_index(index.index)
        return "IDMap2," + ("Flat" if isinstance(inner, faiss.IndexFlat) else
                            "SQfp16" if _is_fp16(inner) else type(inner).__name__)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if type(ivf) is faiss.IndexIVFFlat:
        codes = "Flat"
    elif isinstance(ivf, faiss.IndexIVFScalarQuantizer) and _is_fp16(ivf) and \
            not ivf.by_residual:
        codes = "SQfp16"
    elif isinstance(ivf, faiss.IndexIVFPQFastScan):
        codes = f"PQ{ivf.pq.M}x{ivf.pq.nbits}fs"
    elif isinstance(ivf, faiss.IndexIVFPQ):
        codes = f"PQ{ivf.pq.M}x{ivf.pq.nbits}"
    else:
        codes = type(ivf).__name__
    return f"IVF{ivf.nlist},{codes}"


def _is_fp16(index) -> bool:
    faiss = _faiss()
    return isinstance(index, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)) and \
        index.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def _nlist(count: int) -> int:
    return 1 << int(round(math.log2(4 * math.sqrt(max(1, count)))))


def _training_sample(store: Store, kind: str, factory: str, count: int) -> np.ndarray:
    ids = store.ids(kind)
    rng = np.random.default_rng(0)
    chosen = rng.choice(ids, size=min(len(ids), training_size(factory, count)), replace=False)
    return np.concatenate([v for _, v in store.iter_vectors(kind, np.sort(chosen).tolist())])
