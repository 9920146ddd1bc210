"""Near-duplicate photos: exact copies, resized or recompressed versions, small crops.

Pairs come from the image index itself (a FAISS range search: every vector's neighbours above
the threshold cosine), groups are the connected components of those pairs (union-find), and
each group is ordered best copy first: the most pixels, then the earliest capture time, then
the shortest path. Nothing is ever deleted here; the CLI prints the other copies for a user to
review or pipe to a trash tool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from index.errors import EmptyLibrary, UsageProblem
from index.photo_meta import iso_time
from index.vectors import VectorIndex, is_on_disk

from .search import Searcher

__all__ = ["DUPLICATE_COSINE", "Copy", "DuplicateGroup", "duplicate_pairs", "find_duplicates",
           "group_pairs"]

# The default threshold: measured on generated scenes with `tiny` (bench/duplicates.py):
# resized, recompressed, cropped and EXIF-stripped copies against distinct scenes that share
# colour and shape.
DUPLICATE_COSINE = 0.96
CHUNK = 2048  # query vectors per range search
# On compressed codes (the largest libraries) the range search runs this far below the
# threshold and pairs are then checked on the stored vectors. Fast-scan PQ scores against
# exact ones, bench/scale.py's 1M data, 200 queries × their 200 best candidates: 512-d
# PQ256x4fs |error| median 0.037, p99 0.074, max 0.104 (0.091 among pairs above 0.9);
# 128-d PQ128x4fs 0.006 / 0.029 / 0.057.
CODE_SLACK = 0.12
# The on-disk tier's 8-bit codes (PQ64x8 at 512-d: 8 components per byte) err further:
# `bench/code_error.py` on bench/scale.py's 10M × 512 IVF4096,PQ64x8, 200 queries × their 200
# best candidates: |error| median 0.012, p99 0.155, max 0.195 (0.097 / 0.182 among pairs above
# 0.9), 2026-12-03.
ONDISK_CODE_SLACK = 0.22
# On float16 codes (SQfp16: the store's values, not scaled to unit length) scores err by at
# most ~2e-4 (measured beside FP16_EXTRA in index/vectors.py); the pairs are checked the same way.
FP16_SLACK = 1e-3
# On IVF the range search visits this many lists per vector, not the query's nprobe (84 at
# 100k vectors): a copy at cosine ≥ 0.96 sits in its original's list or a neighbour's, and
# 84 lists made 100k vectors take 95 s (bench/duplicates.py).
DUPLICATE_NPROBE = 8


@dataclass(frozen=True)
class Copy:
    id: int
    path: str
    cosine: float  # to the group's best copy (1.0 for the best itself)
    width: int
    height: int
    bytes: int
    taken_at: str | None

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "cosine": round(self.cosine, 6),
                "width": self.width, "height": self.height, "bytes": self.bytes,
                "taken_at": self.taken_at}


@dataclass(frozen=True)
class DuplicateGroup:
    copies: tuple[Copy, ...]  # best first

    @property
    def best(self) -> Copy:
        return self.copies[0]

    @property
    def others(self) -> tuple[Copy, ...]:
        return self.copies[1:]

    def as_dict(self) -> dict:
        return {"best": self.best.as_dict(), "others": [c.as_dict() for c in self.others]}


def duplicate_pairs(vi: VectorIndex, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                    threshold: float,
                    progress: Callable[[int], None] | None = None,
                    store=None) -> np.ndarray:
    """(a, b) id pairs, a < b, whose vectors' cosine exceeds `threshold`, by range search of
    each chunk of (ids, vectors) against the index (on IVF: DUPLICATE_NPROBE lists each).

    An index of float16 or compressed codes is searched FP16_SLACK, CODE_SLACK or
    ONDISK_CODE_SLACK below the threshold and each pair found is then checked on the stored
    vectors (`store`), so pairs are exact there too."""
    import faiss

    lossy = not vi.exact_scores
    if lossy and store is None:
        raise ValueError("a compressed index needs the store to check its pairs")
    slack = 0.0 if not lossy else FP16_SLACK if vi.keeps_vectors else \
        ONDISK_CODE_SLACK if is_on_disk(vi.factory) else CODE_SLACK
    radius = float(threshold) - slack
    params = None
    if not hasattr(vi.index, "id_map"):
        ivf = faiss.extract_index_ivf(vi.index)
        params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, DUPLICATE_NPROBE))
    found: list[np.ndarray] = []
    for ids, vectors in chunks:
        lims, _, neighbours = vi.index.range_search(np.ascontiguousarray(vectors, np.float32),
                                                    radius, params=params)
        counts = np.diff(lims).astype(np.int64)
        sources = np.repeat(ids, counts)
        keep = sources < neighbours  # each pair once; a vector is its own neighbour
        if lossy and keep.any():
            rows = np.repeat(np.arange(len(ids)), counts)[keep]
            theirs = store.vectors_for(vi.kind, np.unique(neighbours[keep]).tolist())
            # FAISS's own kernel, as on float32 codes: an exact copy's cosine of 1 stays at 1
            exact = np.array([_inner(vectors[r], theirs[int(n)]) if int(n) in theirs else -1.0
                              for r, n in zip(rows, neighbours[keep])])
            keep[np.flatnonzero(keep)[exact <= threshold]] = False
        if keep.any():
            found.append(np.stack([sources[keep], neighbours[keep]], axis=1))
        if progress:
            progress(len(ids))
    if not found:
        return np.empty((0, 2), np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def _inner(a: np.ndarray, b: np.ndarray) -> float:
    import faiss

    return float(faiss.fvec_inner_product(faiss.swig_ptr(np.ascontiguousarray(a, np.float32)),
                                          faiss.swig_ptr(np.ascontiguousarray(b, np.float32)),
                                          len(a)))


def group_pairs(pairs: np.ndarray) -> list[list[int]]:
    """Connected components (union-find with path halving) of the pairs' ids, ascending."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def find_duplicates(searcher: Searcher, *, threshold: float = DUPLICATE_COSINE,
                    under: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[DuplicateGroup]:
    """Groups of near-duplicate images in the library, largest first, each best copy first.

    `threshold`: the cosine above which two images are copies of each other, in (0, 1].
    `under`: only images below this folder (pairs within it).
    `progress(done, total)` is called as vectors are searched.
    """
    if not 0 < threshold <= 1:
        raise UsageProblem(f"--threshold must be in (0, 1], not {threshold}")
    store = searcher.library.store
    vi = searcher.index_for("images")
    if vi.size == 0:
        raise EmptyLibrary("no images in this library yet: index a folder with "
                           "`clipdex index PATH`")
    total, done = vi.size, 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    # a cosine of exactly 1 is kept too (range search keeps scores above the radius)
    radius = np.nextafter(np.float32(threshold), np.float32(-1))
    pairs = duplicate_pairs(vi, store.iter_vectors("image", chunk=CHUNK), radius, step,
                            store=store)
    groups = group_pairs(pairs)
    if under is not None:
        from .search import _folder_prefixes, _under_folder

        prefixes = _folder_prefixes(_under_folder(under))
        paths = store.image_paths([i for g in groups for i in g])
        groups = [kept for g in groups
                  if len(kept := [i for i in g if paths.get(i, "").startswith(prefixes)]) > 1]
    return sorted((_ordered(store, g) for g in groups),
                  key=lambda g: (-len(g.copies), g.best.path))


def _ordered(store, ids: list[int]) -> DuplicateGroup:
    meta = store.image_meta(ids)
    paths = store.image_paths(ids)
    vectors = store.vectors_for("image", ids)

    def rank(i: int) -> tuple:
        m = meta[i]
        taken = m.get("taken_at")
        return (-(m["width"] * m["height"]), taken is None, taken or 0.0, len(paths[i]),
                paths[i], i)

    order = sorted((i for i in ids if i in paths and i in meta), key=rank)
    best = vectors[order[0]]
    return DuplicateGroup(tuple(
        Copy(i, paths[i], float(vectors[i] @ best), meta[i]["width"], meta[i]["height"],
             meta[i]["bytes"], iso_time(meta[i].get("taken_at"), meta[i].get("taken_offset")))
        for i in order))
