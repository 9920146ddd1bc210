"""The derived FAISS indexes past the Flat/IVF threshold, and memory-mapped readers.

The threshold is lowered for these tests (the real one is set in index/vectors.py from
bench/index_choice.py), so a few hundred small vectors exercise the IVF path for real.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from clipdex_test_embedder import DIM as TEST_DIM
from clipdex_test_embedder import NAME as TEST_MODEL
from sqlalchemy import delete, insert, select

from index import vectors
from index.store import ImageRow, Store
from index.vectors import VectorIndex

DIM = 16


@pytest.fixture()
def small_threshold(monkeypatch):
    monkeypatch.setattr(vectors, "FLAT_MAX_COMPONENTS", 100 * DIM)  # Flat up to 100


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((8, DIM))
    x = centres[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _add(store: Store, vecs: np.ndarray, first: int) -> None:
    rows = [{"path": f"/p/{first + i}.jpg", "size": 1, "mtime_ns": 1,
             "content_hash": f"{first + i:x}", "width": 1, "height": 1,
             "added_at": time.time()}
            for i, v in enumerate(vecs)]
    with store.session() as s, s.begin():
        s.execute(insert(ImageRow), rows)
        ids = dict(s.execute(select(ImageRow.path, ImageRow.id)).all())
        store.add_vectors(s, "image", [ids[r["path"]] for r in rows], vecs)
        store.bump_generation(s, "image")


def _store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'library.db'}")
    store.claim_model("test", DIM, "none")
    return store


def test_large_library_without_an_index_file_gets_a_trained_ivf(tmp_path, small_threshold):
    store = _store(tmp_path)
    data = _clustered(400, seed=1)
    _add(store, data, 0)
    vi = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert vi.factory.startswith("IVF") and vi.index.is_trained and vi.size == 400
    assert not vi.exact
    ids = np.sort(store.ids("image"))
    queries = _clustered(20, seed=2)
    _, found = vi.search(queries, 10)
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10] + ids[0]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall
    assert list((tmp_path / "vectors").glob("image-*.faiss"))  # saved once, at the end


def test_crossing_the_threshold_rebuilds_once_and_readers_do_not(tmp_path, small_threshold):
    store = _store(tmp_path)
    _add(store, _clustered(60, seed=3), 0)
    first = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert first.factory == "IDMap2,SQfp16"
    _add(store, _clustered(300, seed=4), 60)
    writer = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert writer.factory.startswith("IVF") and writer.size == 360
    reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", mmap=True)
    assert reader.factory == writer.factory and reader.generation == writer.generation
    assert reader.mapped_from is not None  # memory-mapped, nothing rebuilt or copied
    loaded = VectorIndex.open(store, "image", DIM, tmp_path / "vectors")  # the default: loaded
    assert loaded.mapped_from is None and loaded.generation == writer.generation


def test_a_memory_mapped_reader_catches_up_after_changes(tmp_path, small_threshold):
    store = _store(tmp_path)
    _add(store, _clustered(300, seed=5), 0)
    VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", mmap=True)
    assert reader.mapped_from is not None
    gone = store.ids("image")[:25]
    with store.session() as s, s.begin():
        s.execute(delete(ImageRow).where(ImageRow.id.in_([int(i) for i in gone])))
        store.bump_generation(s, "image")
    _add(store, _clustered(30, seed=6), 1000)
    # a writer saves a newer file meanwhile and deletes the one the reader maps
    writer = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert not (tmp_path / "vectors" / reader.mapped_from.name).exists()
    _add(store, _clustered(5, seed=8), 2000)
    assert reader.catch_up(store)  # a mapped index is read-only: a copy is loaded first
    assert writer.generation < reader.generation == store.generation("image")
    assert reader.mapped_from is None
    assert set(vectors._index_ids(reader.index)) == set(store.ids("image"))
    _, found = reader.search(_clustered(5, seed=7), 10)
    assert not set(found.ravel()) & set(gone)


def test_index_run_that_crosses_the_threshold_rebuilds_with_progress(tmp_path, monkeypatch):
    from index import Library
    from index.synthetic import scenes

    monkeypatch.setattr(vectors, "FLAT_MAX_COMPONENTS", 10 * TEST_DIM)  # Flat ≤ 10
    scenes.write_scenes(tmp_path / "photos", 40, size=64)
    events = []
    with Library.open(tmp_path / "home") as lib:
        report = lib.index([tmp_path / "photos"], model=TEST_MODEL, progress=events.append)
        assert report.new == 40 and report.index["images"]["type"].startswith("IVF")
        notes = [e.counts["index"] for e in events if e.phase == "index"]
        assert notes and "training IVF" in notes[0]
        events.clear()
        lib.index([tmp_path / "photos"], model=TEST_MODEL, progress=events.append)  # nothing new
        assert not [e for e in events if e.phase == "index"]  # no second rebuild


def test_above_the_compressed_threshold_the_index_keeps_pq_codes(tmp_path, monkeypatch):
    from index.vectors import compressed_nlist, rerank_depth

    monkeypatch.setattr(vectors, "FLAT_MAX_COMPONENTS", 100 * DIM)  # Flat up to 100
    monkeypatch.setattr(vectors, "COMPRESSED_MIN_BYTES", 1000 * DIM * 4)  # codes above 1000
    store = _store(tmp_path)
    _add(store, _clustered(600, seed=20), 0)
    mid = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert mid.factory.startswith("IVF") and mid.factory.endswith(",SQfp16")  # in between
    assert mid.keeps_vectors and not mid.exact_scores
    _add(store, _clustered(2400, seed=21), 600)
    vi = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert vi.factory == f"IVF{compressed_nlist(3000)},PQ{DIM}x4fs", vi.factory
    assert not vi.keeps_vectors and vi.size == 3000
    with pytest.raises(RuntimeError, match="lossy codes"):
        vi.vectors(store.ids("image")[:2])  # never approximate vectors as if exact
    reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", mmap=True)
    assert reader.factory == vi.factory and reader.mapped_from is not None  # the file says so

    # catch-up keeps working on codes: removals and additions
    gone = store.ids("image")[:50]
    with store.session() as s, s.begin():
        s.execute(delete(ImageRow).where(ImageRow.id.in_([int(i) for i in gone])))
        store.bump_generation(s, "image")
    _add(store, _clustered(40, seed=22), 5000)
    assert reader.catch_up(store) and reader.size == 2990
    assert set(vectors._index_ids(reader.index)) == set(store.ids("image"))

    # the codes alone are approximate; re-scoring candidates from the store recovers the
    # exact order (all of it when every vector is a candidate)
    ids = np.sort(store.ids("image"))
    stored = np.concatenate([v for _, v in store.iter_vectors("image")])
    queries = _clustered(30, seed=23)
    truth = ids[np.argsort(-(queries @ stored.T), axis=1)[:, :10]]

    def recall(depth: int | None) -> float:
        found = []
        for q, t in zip(queries, truth):
            _, cand = reader.search(q[None, :], depth or 10)
            cand = cand[0][cand[0] >= 0]
            if depth:
                got = store.vectors_for("image", cand)
                exact = np.stack([got[int(i)] for i in cand]) @ q
                cand = cand[np.argsort(-exact)]
            found.append(len(set(cand[:10]) & set(t)) / 10)
        return float(np.mean(found))

    subset = ids[::7]  # an id selector works on fast-scan codes too
    _, kept = reader.search(queries[:5], 20, among=subset)
    assert set(kept[kept >= 0].tolist()) <= set(subset.tolist()) and (kept >= 0).sum() == 100
    codes, reranked = recall(None), recall(rerank_depth(10, reader.size))
    everything = recall(reader.size)
    assert codes < 0.8 and reranked >= codes + 0.15 and reranked >= 0.85, (codes, reranked)
    assert everything == 1.0


# --- faults: a damaged index file, a full disk, a reader during a rebuild ----------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 3])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # a readable index of another dimension
        import faiss

        faiss.write_index(faiss.index_factory(DIM * 2, "IDMap2,Flat"), str(path))


@pytest.mark.parametrize("how", ["truncated", "garbage", "other-dimension"])
def test_a_damaged_index_file_is_rebuilt_from_the_store_with_a_notice(tmp_path, small_threshold,
                                                                       how):
    import faiss

    store = _store(tmp_path)
    data = _clustered(300, seed=30)
    _add(store, data, 0)
    writer = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    (path,) = (tmp_path / "vectors").glob("image-*.faiss")
    _damage(path, how)
    notices: list[str] = []
    for mmap in (True, False):
        reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", mmap=mmap,
                                  notice=notices.append)
        assert reader.size == 300 and reader.factory == writer.factory
        _, found = reader.search(data[:20], 1)
        assert found[:, 0].tolist() == np.sort(store.ids("image"))[:20].tolist()  # itself
        if notices:
            break
    assert len(notices) == 1 and f"the image index {path} cannot be used" in notices[0]
    assert "rebuilding it from the store" in notices[0]
    assert faiss.read_index(str(path)).ntotal == 300  # the rebuilt index replaced it
    assert VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True,
                            notice=notices.append).size == 300
    assert len(notices) == 1  # and it is read from then on


def test_clipdex_stats_and_search_survive_a_damaged_index_file(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cli
    from index.synthetic import scenes

    scenes.write_scenes(tmp_path / "photos", 6, size=48)
    home = str(tmp_path / "home")
    run = CliRunner().invoke
    assert run(cli.main, ["--home", home, "index", str(tmp_path / "photos"), "--model",
                          TEST_MODEL]).exit_code == 0
    (path,) = (tmp_path / "home" / "vectors").glob("image-*.faiss")
    path.write_bytes(path.read_bytes()[:40])
    stats = run(cli.main, ["--home", home, "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    result = run(cli.main, ["--home", home, "search", "a red circle", "--json"])
    assert result.exit_code == 0, result.output
    assert "cannot be used" in result.stderr and "rebuilding it from the store" in result.stderr
    assert '"hits"' in result.stdout and result.stdout.count('"path"') == 6


def test_a_full_disk_during_a_rebuild_keeps_the_old_index_and_readers_use_it(
        tmp_path, small_threshold, monkeypatch):
    import faiss

    from index.errors import IndexWriteFailed

    store = _store(tmp_path)
    small = _clustered(60, seed=31)
    _add(store, small, 0)
    first = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert first.factory == "IDMap2,SQfp16"
    before = sorted(p.name for p in (tmp_path / "vectors").iterdir())
    _add(store, _clustered(300, seed=32), 60)  # crosses into IVF: the writer rebuilds

    real = faiss.write_index

    def full_disk(index, name):  # what FAISS raises when the disk fills mid-write
        Path(name).write_bytes(b"\0" * 100)
        raise RuntimeError("Error in faiss::FileIOWriter::operator() ... : write error "
                           "(No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    with pytest.raises(IndexWriteFailed, match="No space left on device.*previous index file "
                                                "is kept"):
        VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert sorted(p.name for p in (tmp_path / "vectors").iterdir()) == before  # no temp left
    monkeypatch.setattr(faiss, "write_index", real)

    # a reader meanwhile answers from the old index, caught up in memory, not rebuilt
    reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors")
    assert reader.factory == "IDMap2,SQfp16" and reader.size == 360
    _, found = reader.search(small[:5], 1)
    assert found[:, 0].tolist() == np.sort(store.ids("image"))[:5].tolist()

    writer = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert writer.factory.startswith("IVF")
    _add(store, _clustered(5, seed=33), 1000)
    assert reader.catch_up(store)  # the rebuilt file is there now: the reader takes it
    assert reader.factory == writer.factory and reader.size == 365


def test_the_size_rule_names_each_tier():
    from index.vectors import flat_max_vectors, index_type_for, pq_codes, rerank_depth

    assert index_type_for(flat_max_vectors(512), 512) == "IDMap2,SQfp16"
    assert index_type_for(400_000, 512) == "IVF2048,SQfp16"  # 0.8 GB of float32: not PQ yet
    assert index_type_for(1_000_000, 512) == "IVF1024,PQ256x4fs"
    assert index_type_for(7_000_000, 512) == "IVF2048,PQ256x4fs"
    assert index_type_for(10_000_000, 512) == "IVF4096,PQ64x8"  # on disk
    assert index_type_for(1_000_000, 128) == "IVF4096,SQfp16"  # 0.5 GB
    assert index_type_for(3_000_000, 128) == "IVF2048,PQ128x4fs"
    assert (pq_codes(768), pq_codes(640), pq_codes(16)) == (256, 160, 16)
    assert rerank_depth(10, 500_000) == rerank_depth(10, 1_000_000) == 200
    assert rerank_depth(10, 10_000_000) == 633 and rerank_depth(100, 1_000_000) == 400


@pytest.mark.parametrize("count", [60, 400])  # Flat, then IVF (the threshold is lowered)
def test_float16_codes_are_the_stored_vectors_at_half_the_bytes(tmp_path, small_threshold,
                                                                count):
    store = _store(tmp_path)
    _add(store, _clustered(count, seed=40), 0)
    vi = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", save=True)
    assert vi.factory.endswith(",SQfp16") and vi.keeps_vectors and not vi.exact_scores
    ids = store.ids("image")
    stored = store.vectors_for("image", ids.tolist())
    assert np.array_equal(vi.vectors(ids), np.stack([stored[int(i)] for i in ids]))
    reader = VectorIndex.open(store, "image", DIM, tmp_path / "vectors", mmap=True)
    assert reader.factory == vi.factory and reader.mapped_from is not None
    assert np.array_equal(reader.vectors(ids[:7]), vi.vectors(ids[:7]))  # the file says it too

    float32 = VectorIndex.empty("image", DIM, tmp_path / "f32",
                                vi.factory.replace("SQfp16", "Flat"))
    if not float32.index.is_trained:
        float32.index.train(np.stack(list(stored.values())))
    float32.index.add_with_ids(np.stack([stored[int(i)] for i in ids]), ids)
    float32.generation = vi.generation
    half = vi.save().stat().st_size
    full = float32.save().stat().st_size
    assert full - half >= 0.95 * count * DIM * 2, (half, full)  # 2 B saved per component


def test_an_old_float32_index_is_read_as_it_is_and_a_writer_rewrites_it_as_float16(
        tmp_path, small_threshold):
    """Libraries written before float16 codes keep their IDMap2,Flat or IVF-Flat file: readers
    use it (exact scores, nothing written), the next writer rebuilds it once."""
    import faiss

    store = _store(tmp_path)
    _add(store, _clustered(400, seed=41), 0)
    directory = tmp_path / "vectors"
    old = VectorIndex.empty("image", DIM, directory, "IVF64,Flat")
    sample = np.concatenate([v for _, v in store.iter_vectors("image")])
    old.index.train(sample)
    for ids, vecs in store.iter_vectors("image"):
        old.index.add_with_ids(vecs, ids)
    old.generation = store.generation("image")
    path = old.save()
    before = path.read_bytes()

    reader = VectorIndex.open(store, "image", DIM, directory, mmap=True)
    assert reader.factory == "IVF64,Flat" and reader.exact_scores
    assert sorted(p.name for p in directory.iterdir()) == [path.name]
    assert path.read_bytes() == before
    scores, found = reader.search(sample[:3], 1)
    assert found[:, 0].tolist() == np.sort(store.ids("image"))[:3].tolist()

    writer = VectorIndex.open(store, "image", DIM, directory, save=True)
    assert writer.factory.endswith(",SQfp16"), writer.factory
    saved, _ = VectorIndex.newest_file(directory, "image")
    assert len(before) - saved.stat().st_size >= 0.95 * 400 * DIM * 2
    assert faiss.read_index(str(saved)).ntotal == 400
    again = VectorIndex.open(store, "image", DIM, directory, save=True)
    assert again.factory == writer.factory and VectorIndex.newest_file(directory, "image")[0] \
        == saved and saved.stat().st_mtime_ns == again.directory.joinpath(saved.name).stat(
        ).st_mtime_ns  # once only
