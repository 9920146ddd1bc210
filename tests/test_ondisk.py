"""The largest libraries' index: inverted lists in a memory-mapped file of their own, built
from shards merged with merge_ondisk, changed only by a writer and only on a copy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete
from test_vectors import DIM, _add, _clustered, _store

from index import vectors
from index.errors import IndexWriteFailed
from index.store import ImageRow
from index.vectors import VectorIndex

N = 9000  # three shards of ONDISK_SHARD_VECTORS below (the store yields 4096 at a time)


@pytest.fixture()
def on_disk_line(monkeypatch):
    monkeypatch.setattr(vectors, "FLAT_MAX_COMPONENTS", 100 * DIM)  # Flat up to 100
    monkeypatch.setattr(vectors, "COMPRESSED_MIN_BYTES", 1000 * DIM * 4)  # codes above 1000
    monkeypatch.setattr(vectors, "ONDISK_MIN_BYTES", 5000 * (DIM // 2 + 8))  # on disk > 5000
    monkeypatch.setattr(vectors, "ONDISK_SHARD_VECTORS", 4000)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _search(vi: VectorIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return vi.search(queries, 50)


def test_past_the_line_the_lists_are_a_file_merged_from_shards(tmp_path, on_disk_line,
                                                               monkeypatch, capfd):
    store = _store(tmp_path)
    _add(store, _clustered(N, seed=40), 0)
    steps: list[str] = []
    vi = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True,
                          progress=steps.append)
    assert vi.factory == f"IVF{vectors.compressed_nlist(N)},PQ{DIM // 2}x8" and vi.on_disk
    assert vi.size == N and not vi.exact_scores and vi.describe()["on_disk"]
    assert "merging 3 shard(s) into one on-disk index" in steps
    names = _files(tmp_path / "vectors")  # the header and its lists; no shard or temp left
    assert len(names) == 2 and {Path(n).suffix for n in names} == {".faiss", ".ivfdata"}

    # one shard or three: the same index (the distributed build merges shards the same way)
    monkeypatch.setattr(vectors, "ONDISK_SHARD_VECTORS", 10 * N)
    single = VectorIndex.open(store, "image", DIM, tmp_path / "single", save=True,
                              progress=steps.append)
    assert steps[-1] == "merging 1 shard(s) into one on-disk index"
    queries = _clustered(20, seed=41)
    (s3, i3), (s1, i1) = _search(vi, queries), _search(single, queries)
    assert np.array_equal(i3, i1) and np.array_equal(s3, s1)

    # a reader maps the same lists read-only and finds the same; re-ranking from the store
    # recovers the exact order
    reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", mmap=True)
    assert reader.on_disk and np.array_equal(_search(reader, queries)[1], i3)
    ids = np.sort(store.ids("image"))
    stored = np.concatenate([v for _, v in store.iter_vectors("image")])
    truth = ids[np.argsort(-(queries @ stored.T), axis=1)[:, :10]]
    found = []
    for q, t in zip(queries, truth):
        _, cand = reader.search(q[None, :], vectors.rerank_depth(10, N))
        cand = cand[0][cand[0] >= 0]
        got = store.vectors_for("image", cand)
        cand = cand[np.argsort(-(np.stack([got[int(i)] for i in cand]) @ q))]
        found.append(len(set(cand[:10]) & set(t)) / 10)
    assert np.mean(found) >= 0.9, np.mean(found)
    subset = ids[::7]  # an id selector works on on-disk lists too
    _, kept = reader.search(queries[:5], 20, among=subset)
    assert set(kept[kept >= 0].tolist()) <= set(subset.tolist()) and (kept >= 0).sum() == 100
    # what FAISS prints about on-disk lists (merging, reading) is kept off stdout (--json)
    assert capfd.readouterr().out == ""


def _on_disk_library(tmp_path: Path, seed: int):
    """A store of N vectors and its on-disk index, saved: (store, vectors, folder, lists)."""
    store = _store(tmp_path)
    data = _clustered(N, seed=seed)
    _add(store, data, 0)
    folder = tmp_path / "vectors"
    VectorIndex.open(store, "image", DIM, folder, save=True)
    (lists,) = folder.glob("*.ivfdata")
    return store, data, folder, lists


def test_a_writer_changes_a_copy_and_readers_keep_answering(tmp_path, on_disk_line):
    store, data, folder, old_lists = _on_disk_library(tmp_path, seed=42)
    reader = VectorIndex.open(store, "image", DIM, folder, mmap=True)
    before = _search(reader, data[:10])

    gone = [int(i) for i in store.ids("image")[:50]]
    with store.session() as s, s.begin():
        s.execute(delete(ImageRow).where(ImageRow.id.in_(gone)))
        store.bump_generation(s, "image")
    _add(store, _clustered(40, seed=43), 20_000)
    writer = VectorIndex.open(store, "image", DIM, folder, save=True)
    assert writer.on_disk and writer.size == N - 50 + 40
    assert set(vectors._index_ids(writer.index)) == set(store.ids("image"))
    (new_lists,) = folder.glob("*.ivfdata")  # the copy; the old file is unlinked ...
    assert new_lists != old_lists and not old_lists.exists()
    after = _search(reader, data[:10])  # ... but still mapped by the reader, unchanged
    assert np.array_equal(after[1], before[1]) and np.array_equal(after[0], before[0])
    assert reader.catch_up(store) and reader.size == writer.size  # it maps the new one
    assert set(vectors._index_ids(reader.index)) == set(store.ids("image"))

    # a store change no writer has indexed yet (an interrupted run): readers never write
    # the shared lists; they answer without the new images and say so, once
    _add(store, _clustered(5, seed=44), 30_000)
    listing = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    notices: list[str] = []
    lagging = VectorIndex.open(store, "image", DIM, folder, notice=notices.append)
    assert lagging.size == writer.size and lagging.catch_up(store) is False
    assert len(notices) == 1 and "lags the store (5 new, 0 removed)" in notices[0]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == listing
    assert VectorIndex.open(store, "image", DIM, folder, save=True).size == writer.size + 5


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_damaged_list_file_is_rebuilt_from_the_store_with_a_notice(tmp_path, on_disk_line,
                                                                     how):
    store, data, folder, lists = _on_disk_library(tmp_path, seed=45)
    if how == "truncated":
        os.truncate(lists, lists.stat().st_size // 2)
    else:
        lists.unlink()
    notices: list[str] = []
    vi = VectorIndex.open(store, "image", DIM, folder, save=True, notice=notices.append)
    reason = "is truncated" if how == "truncated" else "No such file or directory"
    assert len(notices) == 1 and "cannot be used" in notices[0] and reason in notices[0]
    assert vi.on_disk and vi.size == N
    _, found = vi.search(data[:5], 50)
    assert all(i in row for i, row in zip(np.sort(store.ids("image"))[:5], found))
    assert len(list(folder.glob("*.ivfdata"))) == 1


def test_a_build_that_fails_in_the_merge_leaves_the_previous_index(tmp_path, on_disk_line,
                                                                  monkeypatch):
    store = _store(tmp_path)
    _add(store, _clustered(3000, seed=46), 0)
    folder = tmp_path / "vectors"
    first = VectorIndex.open(store, "image", DIM, folder, save=True)
    assert first.factory.endswith("x4fs")  # the fast-scan tier, in RAM
    before = _files(folder)
    _add(store, _clustered(N - 3000, seed=47), 10_000)  # past the on-disk line

    def full_disk(trained, shards, data):
        Path(data).write_bytes(b"\0" * 1000)
        raise RuntimeError("Error in OnDiskInvertedLists: No space left on device")

    real_merge = vectors.merge_shards
    monkeypatch.setattr(vectors, "merge_shards", full_disk)
    with pytest.raises(IndexWriteFailed, match="No space left on device.*previous index file "
                                               "is kept"):
        VectorIndex.open(store, "image", DIM, folder, save=True)
    assert _files(folder) == before  # no shard, temp folder or half list file left
    reader = VectorIndex.open(store, "image", DIM, folder)  # answers from the old file
    assert reader.factory == first.factory and reader.size == N
    monkeypatch.setattr(vectors, "merge_shards", real_merge)
    (folder / f".image-7.build.{2**22 + 12345}.tmp").mkdir()  # a killed build's folder
    writer = VectorIndex.open(store, "image", DIM, folder, save=True)
    assert writer.on_disk and writer.size == N
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_the_size_rule_puts_the_largest_libraries_on_disk():
    from index.vectors import index_type_for, is_on_disk

    assert index_type_for(7_800_000, 512) == "IVF2048,PQ256x4fs"  # 1.06 GB of codes and ids
    assert index_type_for(10_000_000, 512) == "IVF4096,PQ64x8"  # 72 B per vector, on disk
    assert index_type_for(100_000_000, 512) == "IVF8192,PQ64x8"
    assert index_type_for(10_000_000, 128) == "IVF4096,PQ128x4fs"  # 72 B in RAM already
    assert index_type_for(20_000_000, 128) == "IVF4096,PQ64x8"
    assert is_on_disk("IVF8192,PQ64x8") and not is_on_disk("IVF4096,PQ256x4fs")


def test_clipdex_index_stats_and_search_on_an_on_disk_library(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner
    from clipdex_test_embedder import DIM as TEST_DIM
    from clipdex_test_embedder import NAME as TEST_MODEL

    import cli
    from index.synthetic import scenes

    monkeypatch.setattr(vectors, "FLAT_MAX_COMPONENTS", 10 * TEST_DIM)
    monkeypatch.setattr(vectors, "COMPRESSED_MIN_BYTES", 10 * TEST_DIM * 4)
    monkeypatch.setattr(vectors, "ONDISK_MIN_BYTES", 1)  # on disk from the first IVF size
    monkeypatch.setattr(vectors, "ONDISK_SHARD_VECTORS", 100)
    photos, home = tmp_path / "photos", tmp_path / "home"
    scenes.write_scenes(photos, 300, seed=8, size=32)  # 8-bit PQ trains on ≥ 256 vectors

    def run(*args: str):
        result = CliRunner().invoke(cli.main, ["--home", str(home), *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout) if "--json" in args else result

    assert run("index", str(photos), "--model", TEST_MODEL, "--json")["new"] == 300
    stats = run("stats", "--json")  # stdout is JSON alone: FAISS's printf kept off it
    assert stats["index"]["images"]["type"].endswith("x8")
    assert stats["index"]["images"]["vectors"] == 300
    hits = run("search", "a red circle", "--json", "--top", "5")["hits"]
    assert len(hits) == 5 and all(Path(h["path"]).parent == photos for h in hits)
    assert hits == sorted(hits, key=lambda h: -h["score"])  # re-ranked: exact scores

    gone = sorted(photos.glob("*.jpg"))[:20]
    for path in gone:
        path.unlink()
    assert run("index", str(photos), "--json")["removed"] == 20  # caught up on a copy
    assert run("stats", "--json")["index"]["images"]["vectors"] == 280
    (lists,) = (home / "vectors").glob("image-*.ivfdata")
    top = run("search", "a red circle", "--json", "--top", "280")["hits"]
    assert len(top) == 280 and not {h["path"] for h in top} & {str(p) for p in gone}


def test_an_on_disk_build_hands_vectors_to_faiss_as_it_reads_them(tmp_path, on_disk_line,
                                                                   monkeypatch):
    """Only a shard's codes are held while it fills, never its vectors: the store is read one
    batch ahead of FAISS at most (holding 2M vectors of 512-d per shard took 5.5 GB at 10M)."""
    store = _store(tmp_path)
    _add(store, _clustered(N, seed=42), 0)
    read = {"batches": 0}
    real_iter, real_add = store.iter_vectors, vectors.add_shard

    def counting(kind, ids=None, *args, **kwargs):
        for batch in real_iter(kind, ids, *args, **kwargs):
            read["batches"] += ids is None  # the build's pass over every vector
            yield batch

    consumed = {"batches": 0, "ahead": 0}

    def add_shard(trained, batches, out):
        def watched():
            for batch in batches:
                consumed["batches"] += 1
                consumed["ahead"] = max(consumed["ahead"], read["batches"] - consumed["batches"])
                yield batch
        return real_add(trained, watched(), out)

    monkeypatch.setattr(store, "iter_vectors", counting)
    monkeypatch.setattr(vectors, "add_shard", add_shard)
    monkeypatch.setattr(vectors, "ONDISK_SHARD_VECTORS", 4096 * 2)  # a multiple of the batch
    vi = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert vi.on_disk and vi.size == N
    assert consumed["batches"] == read["batches"] == 3 and consumed["ahead"] == 0
    assert not [p for p in (tmp_path / "vectors").iterdir() if "shard" in p.name]
