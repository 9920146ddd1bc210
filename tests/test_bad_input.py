"""A corpus of awkward and broken files, generated here, through the real `clipdex index`."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from PIL import Image
from sqlalchemy import select

import cli
import index.ingest
from index import Library
from index.scan import decode_file
from index.store import ImageRow
from index.synthetic.scenes import generate, render

MODEL = TEST_MODEL  # the `test` embedder: these tests look at storage, not meaning
SPACED, UNICODE = "with space s.jpg", "café ünïcödé 日本.png"
# bad file -> words its recorded reason must contain
BAD = {
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "text.jpg": "not an image",
    "bomb.png": "too large",
    "bomb_warn.png": "too large",
    "self_loop.jpg": "symbolic link",
    "dangling.jpg": "symbolic link",
}
VANISHED = "doomed.jpg"  # deleted between the scan and its decoding: a removal, not a failure
GOOD = ["scene_0.jpg", "scene_1.png", "cmyk.jpg", "gray16.png", "palette_alpha.png",
        "animated.gif", "exif6.jpg", "exif6_upright.png", SPACED, UNICODE]


pytestmark = pytest.mark.usefixtures("one_model_load")


def scene_image(seed: int, size: int = 64) -> Image.Image:
    return render(next(iter(generate(1, seed=seed))), size)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring a huge RGB image, with a few bytes of IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def make_corpus(root: Path) -> None:
    root.mkdir()
    scene_image(0).save(root / "scene_0.jpg", quality=90)
    scene_image(1).save(root / "scene_1.png")
    jpeg = io.BytesIO()
    scene_image(2).save(jpeg, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # > 2x Pillow's limit
    (root / "bomb_warn.png").write_bytes(png_header_only(15_000, 15_000))  # Pillow only warns
    scene_image(3).convert("CMYK").save(root / "cmyk.jpg")
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(root / "gray16.png")
    palette = scene_image(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "palette_alpha.png", transparency=0)
    frames = [scene_image(5), scene_image(6)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
    sideways = scene_image(7).crop((0, 8, 64, 56))  # 64×48, not square
    sideways.save(root / "exif6.jpg", quality=95, exif=exif)
    with Image.open(root / "exif6.jpg") as stored:  # the same pixels, physically upright
        stored.transpose(Image.Transpose.ROTATE_270).save(root / "exif6_upright.png")
    scene_image(8).save(root / SPACED, quality=90)
    scene_image(9).save(root / UNICODE)
    scene_image(10).save(root / "doomed.jpg", quality=90)
    (root / "self_loop.jpg").symlink_to("self_loop.jpg")
    (root / "dangling.jpg").symlink_to("no_such_target.jpg")
    (root / "folder_loop").symlink_to(".", target_is_directory=True)
    # the formats are what this test claims they are
    with Image.open(root / "gray16.png") as im:
        assert im.mode == "I;16"
    with Image.open(root / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(root / "palette_alpha.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(root / "animated.gif") as im:
        assert im.n_frames == 2


def run_index(home: Path, root: Path):
    result = CliRunner().invoke(cli.main, ["--home", str(home), "index", str(root), "--model",
                                           MODEL, "--json"], catch_exceptions=False)
    return result, json.loads(result.stdout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory):
    """The corpus indexed once; doomed.jpg is deleted between the scan and its decoding."""
    base = tmp_path_factory.mktemp("bad-input")
    root, home = base / "corpus", base / "home"
    make_corpus(root)
    real_decode = index.ingest.decode_file

    def delete_first(path: str, **options):
        if path.endswith("doomed.jpg"):
            os.remove(path)
        return real_decode(path, **options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(index.ingest, "decode_file", delete_first)
        result, report = run_index(home, root)
    return root, home, result, report


def stored_images(home: Path) -> dict:
    """path -> the image's row, its stored vector as `vector` (float32)."""
    with Library.open(home) as library, library.store.session() as s:
        rows = {r.path: r for r in s.scalars(select(ImageRow))}
        vectors = library.store.vectors_for("image", [r.id for r in rows.values()])
    return {path: SimpleNamespace(**{c: getattr(r, c) for c in ("id", "width", "height")},
                                  vector=vectors[r.id]) for path, r in rows.items()}


def test_every_bad_file_is_reported_with_its_reason(first_run) -> None:
    root, _, result, report = first_run
    reasons = {os.path.basename(f["path"]): f["reason"] for f in report["failures"]}
    assert set(reasons) == set(BAD) and VANISHED not in reasons
    for name, words in BAD.items():
        assert words in reasons[name], (name, reasons[name])
    assert report["failed"] == len(BAD)
    assert result.exit_code == 3


def test_every_good_file_is_indexed(first_run) -> None:
    root, home, _, report = first_run
    stored = stored_images(home)
    assert sorted(os.path.basename(p) for p in stored) == sorted(GOOD)
    assert report["new"] == len(GOOD)
    assert str(root / UNICODE) in stored and str(root / SPACED) in stored
    with Library.open(home) as library:
        dim = library.store.model_fingerprint()[1]
    assert all(row.vector.shape == (dim,) for row in stored.values())
    assert stored[str(root / "gray16.png")].width == 64


def test_exif_rotation_is_applied(first_run) -> None:
    root, home, _, _ = first_run
    stored = stored_images(home)
    rotated, upright = stored[str(root / "exif6.jpg")], stored[str(root / "exif6_upright.png")]
    assert (rotated.width, rotated.height) == (48, 64)  # 64×48 on disk, upright as 48×64
    assert (upright.width, upright.height) == (48, 64)
    decoded = np.asarray(decode_file(str(root / "exif6.jpg"), min_side=128).image)
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(root / "exif6_upright.png")))
    a, b = rotated.vector, upright.vector
    assert float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_failures_are_listed_by_the_cli(first_run) -> None:
    root, home, _, report = first_run
    result = CliRunner().invoke(cli.main, ["--home", str(home), "failures", "--json"])
    assert result.exit_code == 0
    listed = {f["path"]: f["reason"] for f in json.loads(result.stdout)["failures"]}
    assert listed == {f["path"]: f["reason"] for f in report["failures"]}
    text = CliRunner().invoke(cli.main, ["--home", str(home), "failures"]).output
    assert f"{root / 'truncated.jpg'}: " in text


def test_rerun_skips_unchanged_failures_and_retries_replaced_ones(tmp_path: Path) -> None:
    root, home = tmp_path / "corpus", tmp_path / "home"
    make_corpus(root)  # no deletion hook this time: doomed.jpg is a good image
    bad = set(BAD)
    first, report = run_index(home, root)
    assert first.exit_code == 3 and report["failed"] == len(bad)

    again, report = run_index(home, root)
    assert (report["new"], report["changed"], report["failed"]) == (0, 0, 0)
    assert report["skipped_failed"] == len(bad)
    assert report["unchanged"] == len(GOOD) + 1

    scene_image(11).save(root / "truncated.jpg", quality=90)
    os.utime(root / "truncated.jpg", ns=(0, 10**18))
    _, report = run_index(home, root)
    assert (report["new"], report["failed"], report["skipped_failed"]) == (1, 0, len(bad) - 1)
    assert str(root / "truncated.jpg") in stored_images(home)
    with Library.open(home) as library:
        remaining = {os.path.basename(f.path) for f in library.failures()}
    assert remaining == bad - {"truncated.jpg"}


def test_a_folder_that_cannot_be_listed_keeps_its_images(tmp_path: Path) -> None:
    root, home = tmp_path / "corpus", tmp_path / "home"
    for number, folder in enumerate(["", "locked", "locked/deeper"]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        scene_image(20 + number).save(root / folder / f"image_{number}.jpg", quality=90)
    assert run_index(home, root)[1]["new"] == 3

    # root can read any folder, so a permission error is simulated where os.walk lists folders
    real_scandir = os.scandir
    locked = str(root / "locked")

    def scandir(path=".", *rest):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir)
        result, report = run_index(home, root)
    assert result.exit_code == 3
    assert report["failures"] == [{"path": locked,
                                   "reason": "cannot list folder: Permission denied"}]
    assert (report["unchanged"], report["removed"]) == (1, 0)
    assert len(stored_images(home)) == 3

    result, report = run_index(home, root)
    assert (result.exit_code, report["unchanged"], report["failed"]) == (0, 3, 0)
