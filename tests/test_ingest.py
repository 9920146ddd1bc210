"""Incremental ingestion and caption files on the real pipeline (SQLite, FAISS, the tiny model).

Nothing here depends on how good the tiny model is: tests look at counts, ids, stored bytes and
the saved FAISS files, never at scores or rankings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from sqlalchemy import select

import cli
from index import Library, ModelMismatch
from index.captions import parse_caption_file
from index.errors import CaptionFileError
from index.store import VECTOR_DTYPE, CaptionRow, ImageRow, ImageVectorRow
from index.synthetic.scenes import generate, render, write_scenes

MODEL = TEST_MODEL  # the `test` embedder: these tests look at storage, not meaning
REPORT_KEYS = {"new", "changed", "unchanged", "moved", "removed", "failed", "seconds"}


pytestmark = pytest.mark.usefixtures("one_model_load")


# --- helpers --------------------------------------------------------------------------------

def photos(root: Path, count: int, *, seed: int = 0) -> Path:
    write_scenes(root, count, seed=seed, size=64)
    return root


def index(home: Path, *paths: Path, **options):
    with Library.open(home) as library:
        return library.index(list(paths), model=MODEL, **options)


def rows(home: Path) -> dict[str, tuple[int, bytes]]:
    """path -> (id, vector bytes) for every image row in the store."""
    with Library.open(home) as library, library.store.session() as s:
        return {r.path: (r.id, r.vector) for r in s.execute(
            select(ImageRow.path, ImageRow.id, ImageVectorRow.vector)
            .join(ImageVectorRow, ImageVectorRow.id == ImageRow.id))}


def saved_index(home: Path, kind: str = "image") -> faiss.Index:
    files = sorted((home / "vectors").glob(f"{kind}-*.faiss"))
    assert len(files) == 1, files  # one file per kind: older generations are cleaned up
    return faiss.read_index(str(files[0]))


def stored_bits(blob: bytes) -> np.ndarray:
    """A stored vector's float16 values as they are (not scaled to unit length): what the
    library's float16 index must hold for it (tests/test_crash.py uses it too)."""
    return np.frombuffer(blob, VECTOR_DTYPE).astype(np.float32)


def index_ids(index: faiss.Index) -> list[int]:
    return sorted(faiss.vector_to_array(index.id_map).tolist())


def assert_index_matches_store(home: Path) -> None:
    """The saved image index holds exactly the store's ids, each with the store's vector."""
    stored = rows(home)
    saved = saved_index(home)
    assert saved.ntotal == len(stored)
    assert index_ids(saved) == sorted(i for i, _ in stored.values())
    for row_id, blob in stored.values():  # float16 codes: the stored bits themselves
        np.testing.assert_array_equal(saved.reconstruct(row_id), stored_bits(blob))
    with Library.open(home) as library:
        live = library.vector_index("image")
        assert index_ids(live.index) == sorted(i for i, _ in stored.values())


def touch_later(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def invoke(*args: str):
    result = CliRunner().invoke(cli.main, list(args), catch_exceptions=False)
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# --- incremental behaviour ------------------------------------------------------------------

def test_first_run_indexes_everything_and_rerun_embeds_nothing(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 12)
    first = index(tmp_path / "home", src)
    assert (first.new, first.changed, first.unchanged, first.failed) == (12, 0, 0, 0)
    assert_index_matches_store(tmp_path / "home")
    before = rows(tmp_path / "home")
    generation = Library.open(tmp_path / "home").store.generation("image")

    again = index(tmp_path / "home", src)
    assert (again.new, again.changed, again.unchanged, again.moved, again.removed) == \
        (0, 0, 12, 0, 0)
    assert rows(tmp_path / "home") == before
    assert Library.open(tmp_path / "home").store.generation("image") == generation


def test_modified_file_is_reembedded_under_a_new_id(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 8)
    home = tmp_path / "home"
    index(home, src)
    before = rows(home)
    # the newest row (highest id) is the one a reused rowid would silently keep
    newest = max(before, key=lambda p: before[p][0])
    other = render(next(iter(generate(1, seed=99))), 64)
    other.save(newest, format="PNG" if newest.endswith(".png") else "JPEG")
    touch_later(Path(newest))

    report = index(home, src)
    assert (report.new, report.changed, report.unchanged) == (0, 1, 7)
    after = rows(home)
    assert after[newest][0] != before[newest][0]
    assert after[newest][1] != before[newest][1]
    assert before[newest][0] not in {i for i, _ in after.values()}
    assert_index_matches_store(home)


def test_rename_and_move_keep_the_vector(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 6)
    home = tmp_path / "home"
    index(home, src)
    before = rows(home)
    renamed_from, moved_from = str(src / "scene_00001.jpg"), str(src / "scene_00002.png")
    renamed_to, moved_to = str(src / "renamed.jpg"), str(src / "sub" / "moved.png")
    os.rename(renamed_from, renamed_to)
    os.makedirs(src / "sub")
    os.rename(moved_from, moved_to)

    report = index(home, src)
    assert (report.new, report.changed, report.moved, report.removed) == (0, 0, 2, 0)
    after = rows(home)
    assert renamed_from not in after and moved_from not in after
    assert after[renamed_to] == before[renamed_from]  # same id, same vector bytes
    assert after[moved_to] == before[moved_from]
    assert_index_matches_store(home)


def test_identical_files_moved_together_are_both_moves(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 3)
    shutil.copy(src / "scene_00000.jpg", src / "twin.jpg")
    home = tmp_path / "home"
    index(home, src)
    os.makedirs(src / "sub")
    for name in ("scene_00000.jpg", "twin.jpg"):
        os.rename(src / name, src / "sub" / name)
    report = index(home, src)
    assert (report.new, report.moved, report.removed) == (0, 2, 0)
    assert_index_matches_store(home)


def test_deleted_files_leave_store_and_index(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 8)
    home = tmp_path / "home"
    index(home, src)
    before = rows(home)
    gone = [str(src / "scene_00003.jpg"), str(src / "scene_00007.jpg")]
    for path in gone:
        os.remove(path)

    report = index(home, src)
    assert (report.removed, report.unchanged, report.new) == (2, 6, 0)
    after = rows(home)
    assert set(after) == set(before) - set(gone)
    saved = saved_index(home)
    assert saved.ntotal == 6
    assert not {before[p][0] for p in gone} & set(index_ids(saved))
    assert_index_matches_store(home)


def test_deleted_then_added_never_reuses_an_id(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 5)
    home = tmp_path / "home"
    index(home, src)
    before = rows(home)
    newest = max(before, key=lambda p: before[p][0])
    os.remove(newest)
    index(home, src)
    render(next(iter(generate(1, seed=5))), 64).save(src / "fresh.png")
    index(home, src)
    assert rows(home)[str(src / "fresh.png")][0] > before[newest][0]
    assert_index_matches_store(home)


def test_hidden_folders_and_files_need_include_hidden(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 3)
    photos(src / ".cache", 2, seed=1)
    shutil.copy(src / "scene_00000.jpg", src / ".dotfile.jpg")

    default = index(tmp_path / "home", src)
    assert default.new == 3
    assert not any("/." in p for p in rows(tmp_path / "home"))
    hidden = index(tmp_path / "home-hidden", src, include_hidden=True)
    assert hidden.new == 6
    assert sum("/." in p for p in rows(tmp_path / "home-hidden")) == 3


def test_exclude_globs_match_names_folders_and_paths(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 6)  # scene_00002 and scene_00005 are PNGs
    photos(src / "drafts", 2, seed=1)
    photos(src / "keep" / "raw", 2, seed=2)
    result = invoke("--home", str(tmp_path / "home"), "index", str(src), "--model", MODEL,
                    "--exclude", "*.png", "--exclude", "drafts", "--exclude", "keep/raw/",
                    "--json")
    assert result.exit_code == 0, result.output
    indexed = set(rows(tmp_path / "home"))
    assert json.loads(result.stdout)["new"] == len(indexed) == 4
    assert not any(p.endswith(".png") or "/drafts/" in p or "/raw/" in p for p in indexed)


def test_symlinked_folder_indexed_once_and_loop_terminates(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos" / "real", 3)
    outside = photos(tmp_path / "elsewhere", 2, seed=3)
    (tmp_path / "photos" / "alias").symlink_to(src, target_is_directory=True)
    (tmp_path / "photos" / "outside").symlink_to(outside, target_is_directory=True)
    (src / "loop").symlink_to("..", target_is_directory=True)
    (src / "self").symlink_to(".", target_is_directory=True)

    report = index(tmp_path / "home", tmp_path / "photos")
    assert (report.new, report.failed) == (5, 0)
    stored = rows(tmp_path / "home")
    assert len(stored) == 5
    assert len({os.path.realpath(p) for p in stored}) == 5  # no file reached twice
    assert sum("/outside/" in p for p in stored) == 2


def test_two_roots_and_overlapping_roots(tmp_path: Path) -> None:
    a = photos(tmp_path / "a", 3)
    b = photos(tmp_path / "b", 4, seed=1)
    home = tmp_path / "home"
    both = index(home, a, b)
    assert both.new == 7
    only_a = index(home, a)  # b's images are not under this run's roots: kept, not removed
    assert (only_a.unchanged, only_a.removed) == (3, 0)
    assert len(rows(home)) == 7

    nested = index(tmp_path / "home-nested", b, b / "..", b)
    assert nested.new == 7
    assert len(rows(tmp_path / "home-nested")) == 7


def test_model_is_fixed_at_first_use(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 2)
    home = tmp_path / "home"
    index(home, src)
    with Library.open(home) as library, pytest.raises(ModelMismatch, match=MODEL):
        library.index([src], model="ViT-B-32:random")

    result = invoke("--home", str(home), "index", str(src), "--model", "ViT-B-32:random")
    line = one_line_error(result)
    assert f"'{MODEL}'" in line and "ViT-B-32:random" in line
    captions = invoke("--home", str(home), "captions", "add", str(src / "captions.csv"),
                      "--model", "ViT-B-32:random")
    one_line_error(captions)
    again = invoke("--home", str(home), "index", str(src), "--json")  # no --model: the recorded
    assert again.exit_code == 0 and json.loads(again.stdout)["unchanged"] == 2


def test_cli_json_shapes_and_exit_status(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 4)
    home = str(tmp_path / "home")
    result = invoke("--home", home, "index", str(src), "--model", MODEL, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert REPORT_KEYS <= set(report)
    assert all(isinstance(report[k], int) for k in REPORT_KEYS - {"seconds"})
    assert report["new"] == 4 and isinstance(report["seconds"], float)

    (src / "broken.jpg").write_text("not really a jpeg")
    partial = invoke("--home", home, "index", str(src), "--json")
    assert partial.exit_code == 3
    assert json.loads(partial.stdout)["failed"] == 1

    stats = json.loads(invoke("--home", home, "stats", "--json").stdout)
    assert {"images", "captions", "failed", "model", "dim", "index", "bytes"} <= set(stats)
    assert (stats["images"], stats["captions"], stats["failed"]) == (4, 0, 1)
    assert stats["model"] == MODEL and stats["dim"] > 0 and stats["bytes"] > 0
    assert stats["index"]["images"]["vectors"] == 4

    failures = json.loads(invoke("--home", home, "failures", "--json").stdout)
    reason = "not an image Pillow can read (unknown or corrupt format)"
    assert failures == {"failures": [{"path": str(src / "broken.jpg"), "reason": reason}]}
    with Library.open(home) as library:  # the JSON is the store's failure row
        assert [(f.path, f.reason) for f in library.failures()] == \
            [(str(src / "broken.jpg"), reason)]

    (src / "broken.jpg").unlink()
    clean = invoke("--home", home, "index", str(src), "--json")
    assert clean.exit_code == 0
    assert json.loads(invoke("--home", home, "failures", "--json").stdout) == {"failures": []}


# --- captions -------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def coco(path: Path, items: list[tuple[str, str]]) -> Path:
    names = sorted({name for name, _ in items})
    data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": k, "image_id": names.index(n), "caption": c}
                            for k, (n, c) in enumerate(items)]}
    return write(path, json.dumps(data))


def test_caption_formats_parse(tmp_path: Path) -> None:
    expected = [("a.jpg", "a red circle"), ("b.jpg", "two blue squares, large")]
    files = {
        "csv": write(tmp_path / "c.csv", 'path,caption\na.jpg,a red circle\n'
                                          'b.jpg,"two blue squares, large"\n'),
        "tsv": write(tmp_path / "c.tsv", "file_name\ttext\na.jpg\ta red circle\n"
                                          "b.jpg\ttwo blue squares, large\n"),
        "jsonl": write(tmp_path / "c.jsonl", "".join(
            json.dumps({"path": p, "caption": c}) + "\n" for p, c in expected)),
        "coco": coco(tmp_path / "c.json", expected),
    }
    for fmt, path in files.items():
        parsed, problems = parse_caption_file(path)
        assert [(c.ref, c.text) for c in parsed] == expected, fmt
        assert problems == [], fmt
    # a caption-only CSV (no image column) is fine too
    parsed, _ = parse_caption_file(write(tmp_path / "only.csv", "caption\njust words\n"))
    assert [(c.ref, c.text) for c in parsed] == [(None, "just words")]


def test_malformed_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    table = write(tmp_path / "bad.csv", "path,caption\na.jpg,fine\nb.jpg,x,extra\n"
                                        "c.jpg,\nd.jpg\n" + "e.jpg," + "w" * 200_000 + "\n"
                                        "f.jpg,also fine\n")
    parsed, problems = parse_caption_file(table)
    assert [c.text for c in parsed] == ["fine", "also fine"]
    assert [p.split(": ")[0] for p in problems] == [f"{table}:{n}" for n in (3, 4, 5, 6)]

    lines = write(tmp_path / "bad.jsonl", '{"caption": "ok"}\n{not json\n[1, 2]\n'
                                          '{"path": "x.jpg"}\n\n{"text": "also ok"}\n')
    parsed, problems = parse_caption_file(lines)
    assert [(c.text, c.line) for c in parsed] == [("ok", 1), ("also ok", 6)]
    assert [p.split(": ")[0] for p in problems] == [f"{lines}:{n}" for n in (2, 3, 4)]

    result = invoke("--home", str(tmp_path / "home"), "captions", "add", str(table),
                    "--model", MODEL, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["added"], report["skipped"]) == (2, 4)


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", "empty"),
    ("blank.csv", b"\n\n", "empty"),
    ("nocaption.csv", b"path,label\na.jpg,cat\n", "no caption column"),
    ("captions.txt", b"path,caption\na.jpg,x\n", "--format"),
    ("broken.json", b'{"images": [', "not valid JSON"),
    ("notcoco.json", b'{"foo": 1}', "COCO"),
    ("latin1.csv", b"path,caption\na.jpg,caf\xe9\n", "UTF-8"),
])
def test_bad_caption_files_are_one_line_errors(tmp_path: Path, name: str, content: bytes,
                                               message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke("--home", str(tmp_path / "home"), "captions", "add", str(path),
                    "--model", MODEL)
    assert message in one_line_error(result)
    with pytest.raises(CaptionFileError):
        parse_caption_file(path)


def test_pure_caption_corpus_and_adding_twice(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.jsonl", "".join(
        json.dumps({"caption": f"caption number {n}"}) + "\n" for n in range(20)))
    home = str(tmp_path / "home")
    first = invoke("--home", home, "captions", "add", str(corpus), "--model", MODEL, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) | {"seconds": 0} == {
        "added": 20, "duplicates": 0, "linked": 0, "skipped": 0, "problems": [], "seconds": 0,
            "truncated": 0, "nul_stripped": 0, "max_chars": 4096}
    second = json.loads(invoke("--home", home, "captions", "add", str(corpus), "--json").stdout)
    assert (second["added"], second["duplicates"]) == (0, 20)

    stats = json.loads(invoke("--home", home, "stats", "--json").stdout)
    assert (stats["images"], stats["captions"], stats["model"]) == (0, 20, MODEL)
    assert stats["index"]["captions"]["vectors"] == 20
    from retrieval import Searcher

    searcher = Searcher.open(home)
    try:
        hits = searcher.search("caption number 3", target="captions", k=5).hits
    finally:
        searcher.close()
    assert len(hits) == 5 and all(h.kind == "caption" and h.path is None for h in hits)


def linked(home: Path) -> dict[str, str | None]:
    """caption text -> path of the linked image (None when unlinked)."""
    with Library.open(home) as library, library.store.session() as s:
        return dict(s.execute(select(CaptionRow.text, ImageRow.path)
                              .outerjoin(ImageRow, ImageRow.id == CaptionRow.image_id)).all())


def test_captions_link_by_path_and_by_unique_name(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 3)
    photos(tmp_path / "photos" / "copy", 1)  # a second scene_00000.jpg: that name is ambiguous
    home = tmp_path / "home"
    index(home, src)
    captions = write(tmp_path / "notes" / "c.csv", "path,caption\n"
                     "../photos/scene_00001.jpg,by relative path\n"
                     f"{src / 'scene_00002.png'},by absolute path\n"
                     "somewhere/scene_00001.jpg,by unique name\n"
                     "scene_00000.jpg,ambiguous name\n"
                     "missing.jpg,no such image\n")
    with Library.open(home) as library:
        report = library.add_captions(captions)
    assert (report.added, report.linked) == (5, 3)
    assert linked(home) == {
        "by relative path": str(src / "scene_00001.jpg"),
        "by absolute path": str(src / "scene_00002.png"),
        "by unique name": str(src / "scene_00001.jpg"),
        "ambiguous name": None,
        "no such image": None,
    }


def test_captions_added_before_their_images_are_linked_after_index(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 4)
    home = tmp_path / "home"
    by_path = src / "captions.jsonl"  # written by write_scenes: paths relative to the file
    by_name = coco(tmp_path / "annotations" / "coco.json",
                   [("scene_00003.jpg", "a coco caption"), ("scene_00001.jpg", "another")])
    with Library.open(home) as library:
        assert library.add_captions(by_path, model=MODEL).linked == 0
        assert library.add_captions(by_name).linked == 0
    index(home, src)
    links = linked(home)
    assert all(links.values()), links
    assert links["a coco caption"] == str(src / "scene_00003.jpg")

    with Library.open(home) as library:  # the same files again: nothing new, links or not
        for path in (by_path, by_name):
            again = library.add_captions(path)
            assert (again.added, again.duplicates) == (0, len(parse_caption_file(path)[0]))


def test_modified_image_keeps_its_captions(tmp_path: Path) -> None:
    src = photos(tmp_path / "photos", 2)
    home = tmp_path / "home"
    index(home, src)
    with Library.open(home) as library:
        library.add_captions(src / "captions.csv")
    render(next(iter(generate(1, seed=42))), 64).save(src / "scene_00000.jpg")
    touch_later(src / "scene_00000.jpg")
    assert index(home, src).changed == 1
    assert all(linked(home).values())


# --- decoders and the model take turns on a CPU ------------------------------------------------

def _parked(thread) -> bool:
    """Whether `thread` is blocked in a threading wait (a Condition's or an Event's)."""
    import sys
    import threading

    frame = sys._current_frames().get(thread.ident)
    return (frame is not None and frame.f_code.co_filename == threading.__file__
            and frame.f_code.co_name in ("wait", "wait_for"))


def _until(predicate, what: str) -> None:
    """Poll until `predicate()` holds; fail (not pass) if it never does."""
    import time

    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.001)


def test_turns_model_waits_for_running_decodes_and_holds_new_ones() -> None:
    """The order is proved, not timed: each claim is checked while the other thread is seen
    parked in a wait (so a lock that let it through would have logged its start already)."""
    import threading

    from index.ingest import _Turns

    turns, log = _Turns(), []
    decoding, release_decode = threading.Event(), threading.Event()
    in_model, release_model = threading.Event(), threading.Event()

    def decode(name: str, hold: threading.Event | None = None) -> None:
        with turns.decode():
            log.append(f"{name} start")
            if hold is not None:
                decoding.set()
                assert hold.wait(30)
            log.append(f"{name} end")

    def model() -> None:
        with turns.model():
            log.append("model start")
            in_model.set()
            assert release_model.wait(30)
            log.append("model end")

    first = threading.Thread(target=decode, args=("d1", release_decode), daemon=True)
    first.start()
    assert decoding.wait(30)
    runner = threading.Thread(target=model, daemon=True)
    runner.start()
    _until(lambda: _parked(runner), "the model thread waits")
    assert log == ["d1 start"]  # a decode is running: the model waits for it
    release_decode.set()
    assert in_model.wait(30)
    assert log == ["d1 start", "d1 end", "model start"]
    second = threading.Thread(target=decode, args=("d2",), daemon=True)
    second.start()
    _until(lambda: _parked(second) or len(log) > 3, "the second decode waits or starts")
    assert log == ["d1 start", "d1 end", "model start"]  # no decode starts while the model runs
    release_model.set()
    for t in (first, runner, second):
        t.join(30)
        assert not t.is_alive()
    assert log == ["d1 start", "d1 end", "model start", "model end", "d2 start", "d2 end"]


def test_turns_model_stops_waiting_for_a_stale_decode() -> None:
    """A decode running longer than `stale_after` no longer holds the model back."""
    import threading
    import time

    from index.ingest import _Turns

    stale_after = 0.05
    turns, log, started = _Turns(stale_after=stale_after), [], {}
    decoding, release_decode, in_model = threading.Event(), threading.Event(), threading.Event()

    def hung_decode() -> None:
        with turns.decode():
            started["decode"] = time.monotonic()
            log.append("decode start")
            decoding.set()
            assert release_decode.wait(30)
            log.append("decode end")

    def model() -> None:
        with turns.model():
            started["model"] = time.monotonic()
            log.append("model start")
            in_model.set()

    hung = threading.Thread(target=hung_decode, daemon=True)
    hung.start()
    assert decoding.wait(30)
    runner = threading.Thread(target=model, daemon=True)
    runner.start()
    try:
        assert in_model.wait(30), "the model waited for a stale decode"
        assert log == ["decode start", "model start"]  # the hung decode is still running
        # ...and the model did wait while the decode was fresh
        assert started["model"] - started["decode"] >= stale_after
    finally:
        release_decode.set()
    for t in (hung, runner):
        t.join(30)
        assert not t.is_alive()
    assert log == ["decode start", "model start", "decode end"]


def test_ctrl_c_while_the_model_waits_its_turn_lets_decoders_go_on() -> None:
    """A KeyboardInterrupt while the model waits for running decodes must give the turn back:
    otherwise every decoder waits for a model that never comes, and the decode pool's shutdown
    waits for them (`clipdex index` hung after Ctrl-C under load)."""
    import threading

    from index.ingest import _Turns

    turns = _Turns()

    def interrupted() -> bool:
        raise KeyboardInterrupt

    turns._decodes_done = interrupted  # what a SIGINT inside the wait raises
    with pytest.raises(KeyboardInterrupt):
        with turns.model():
            pass
    decoded = threading.Event()

    def decode() -> None:
        with turns.decode():
            decoded.set()

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    assert decoded.wait(5), "a decoder waits for ever after an interrupted model turn"
