"""The server's hardening: only still-indexed regular image files are served, the Host and
Origin rules, the memory limits on uploads and thumbnails, and HEAD.

Real parts throughout: a small library indexed with the shipped tiny model, files swapped
under it for symbolic links, FIFOs and look-alikes, FastAPI's test client, and a subprocess
that measures its own peak memory.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi", reason="the server extra is not installed")
from clipdex_test_embedder import NAME as TEST_MODEL  # noqa: E402
from clipdex_test_embedder import SUBPROCESS_ENV  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import cli  # noqa: E402
from index import Library  # noqa: E402
from index.synthetic.scenes import write_scenes  # noqa: E402
from retrieval import Searcher  # noqa: E402
from retrieval.server import create_app  # noqa: E402
from retrieval.server.app import LOOPBACK  # noqa: E402
from retrieval.server.models import MAX_TOP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECRET = b"TOP-SECRET-do-not-serve\n" * 40
LOCAL = "http://127.0.0.1"


# --- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def library_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(scenes folder, library home): 18 scenes indexed with tiny. Tests swap files under it
    and put them back."""
    root = tmp_path_factory.mktemp("security-lib")
    write_scenes(root / "scenes", 18, seed=21)
    with Library.open(root / "home") as lib:
        lib.index([root / "scenes"], model="tiny")
    return root / "scenes", root / "home"


@pytest.fixture(scope="module")
def ids(client: TestClient) -> dict[Path, int]:
    """Indexed file → its id."""
    hits = client.get("/api/search", params={"text": "a shape", "top": MAX_TOP}).json()["hits"]
    return {Path(h["path"]): h["id"] for h in hits}


def _files(ids: dict[Path, int], suffix: str) -> list[Path]:
    return sorted(p for p in ids if p.suffix == suffix)


def _assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


@contextmanager
def _swapped(path: Path, make: Callable[[Path], None]) -> Iterator[None]:
    """Replace an indexed file by what `make` puts at its path (no reindex), then restore it."""
    saved = path.with_name(path.name + ".saved")
    os.rename(path, saved)  # a rename keeps the size and mtime the store recorded
    try:
        make(path)
        yield
    finally:
        if path.is_symlink() or path.exists():
            path.unlink()
        os.rename(saved, path)


def _routes(image_id: int) -> list[str]:
    return [f"/api/images/{image_id}", f"/api/images/{image_id}/thumbnail"]


def _png_header(width: int, height: int) -> bytes:
    """A tiny file declaring a huge image: what a decompression bomb looks like."""
    return _png(width, height, [zlib.compress(b"\x00" * 64)])


def _solid_png(width: int, height: int) -> bytes:
    """A real, complete solid-grey RGB PNG, compressed row by row (no full image in memory)."""
    packer = zlib.compressobj(1)  # fast; still ~0.5 MB for 36 MP
    row = b"\x00" + b"\x80" * (3 * width)
    parts = [packer.compress(row) for _ in range(height)]
    return _png(width, height, [b"".join(parts) + packer.flush()])


def _png(width: int, height: int, idat: list[bytes]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + b"".join(chunk(b"IDAT", d) for d in idat) + chunk(b"IEND", b""))


# --- 1. only the regular, still-indexed image file is ever served ----------------------------
def test_swapped_symlink_to_a_secret_is_404(client: TestClient, ids: dict[Path, int],
                                           tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    for victim in (_files(ids, ".jpg")[0], _files(ids, ".png")[0]):
        with _swapped(victim, lambda p: p.symlink_to(secret)):
            for route in _routes(ids[victim]):
                response = client.get(route)
                _assert_json_error(response, 404)
                assert b"TOP-SECRET" not in response.content


def test_swapped_symlink_to_another_image_is_404(client: TestClient,
                                                 ids: dict[Path, int]) -> None:
    victim, other = _files(ids, ".jpg")[1], _files(ids, ".png")[1]
    with _swapped(victim, lambda p: p.symlink_to(other)):
        for route in _routes(ids[victim]):
            response = client.get(route)
            _assert_json_error(response, 404)
            assert other.read_bytes() not in response.content
        assert client.get(f"/api/images/{ids[other]}").content == other.read_bytes()


def test_a_look_alike_with_the_same_size_and_mtime_is_404(client: TestClient,
                                                         ids: dict[Path, int],
                                                         tmp_path: Path) -> None:
    """Size and mtime can be forged; a non-image is still refused (Pillow reads its header)."""
    victim = _files(ids, ".jpg")[2]
    st = victim.stat()
    look_alike = tmp_path / "look-alike"
    look_alike.write_bytes((SECRET * (st.st_size // len(SECRET) + 1))[:st.st_size])
    os.utime(look_alike, ns=(st.st_atime_ns, st.st_mtime_ns))
    with _swapped(victim, lambda p: p.symlink_to(look_alike)):
        for route in _routes(ids[victim]):
            response = client.get(route)
            _assert_json_error(response, 404)
            assert b"TOP-SECRET" not in response.content


def test_a_fifo_swapped_in_is_404_without_blocking(client: TestClient,
                                                   ids: dict[Path, int]) -> None:
    victim = _files(ids, ".png")[2]
    with _swapped(victim, os.mkfifo):
        for route in _routes(ids[victim]):
            started = time.monotonic()
            _assert_json_error(client.get(route), 404)
            assert time.monotonic() - started < 10


def test_a_file_changed_since_indexing_is_404_until_it_matches_again(
        client: TestClient, ids: dict[Path, int]) -> None:
    victim = _files(ids, ".jpg")[3]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        for route in _routes(ids[victim]):
            _assert_json_error(client.get(route), 404)
    finally:
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert client.get(f"/api/images/{ids[victim]}").content == victim.read_bytes()


def test_untouched_files_still_serve_whole(client: TestClient, ids: dict[Path, int]) -> None:
    for path in (*_files(ids, ".jpg")[4:6], *_files(ids, ".png")[3:5]):
        response = client.get(f"/api/images/{ids[path]}")
        assert response.status_code == 200 and response.content == path.read_bytes()
        assert response.headers["content-type"] == Image.MIME[
            "PNG" if path.suffix == ".png" else "JPEG"]
        assert response.headers["content-length"] == str(path.stat().st_size)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"
        thumb = client.get(f"/api/images/{ids[path]}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_images_reached_through_symbolic_links_still_serve(tmp_path: Path) -> None:
    """The scan follows links: an image in a linked folder, or a link to an image, is legit."""
    write_scenes(tmp_path / "real", 4, seed=2)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "linked-folder").symlink_to(tmp_path / "real")
    outside = sorted((tmp_path / "real").glob("*.jpg"))[0]
    (tmp_path / "photos" / "link.jpg").symlink_to(outside)
    with Library.open(tmp_path / "home") as lib:
        lib.index([tmp_path / "photos"], model="tiny")
    linked = Searcher.open(tmp_path / "home")
    try:
        client = TestClient(create_app(linked), base_url=LOCAL)
        hits = client.get("/api/search", params={"text": "x", "top": 50}).json()["hits"]
        assert any("linked-folder" in h["path"] for h in hits)
        assert any(h["path"].endswith("link.jpg") for h in hits)
        for hit in hits:
            original = client.get(f"/api/images/{hit['id']}")
            assert original.status_code == 200, (hit["path"], original.text)
            assert original.content == Path(hit["path"]).read_bytes()
            assert client.get(f"/api/images/{hit['id']}/thumbnail").status_code == 200
    finally:
        linked.close()


# --- 2. the Host rule (DNS rebinding) and the Origin rule (cross-site POSTs) ----------------
FOREIGN_HOST_REQUESTS = [("GET", "/", None), ("GET", "/api/search?text=x", None),
                         ("GET", "/api/health", None),
                         ("POST", "/knn-service", json.dumps({"text": "x", "num_images": 2}))]


@pytest.mark.parametrize(("method", "path", "body"), FOREIGN_HOST_REQUESTS)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", ""])
def test_a_foreign_host_is_refused(client: TestClient, method: str, path: str,
                                   body: str | None, host: str) -> None:
    response = client.request(method, path, content=body, headers={"host": host})
    assert "--allow-host" in _assert_json_error(response, 400)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8765", "localhost", "LocalHost:80",
                                  "localhost.", "[::1]", "[::1]:8765"])
def test_the_loopback_names_are_allowed(client: TestClient, host: str) -> None:
    for method, path, body in FOREIGN_HOST_REQUESTS:
        response = client.request(method, path, content=body, headers={"host": host})
        assert response.status_code == 200, (host, path, response.text)


def test_allowed_hosts_add_names(searcher: Searcher) -> None:
    app = create_app(searcher, allowed_hosts=[*LOOPBACK, "photos.lan", "[fd00::5]"])
    client = TestClient(app, base_url="http://photos.lan:8765")
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health", headers={"host": "[fd00::5]:8765"}).status_code == 200
    assert client.get("/api/health", headers={"host": "127.0.0.1"}).status_code == 200
    _assert_json_error(client.get("/api/health", headers={"host": "evil.example"}), 400)
    only = TestClient(create_app(searcher, allowed_hosts=["photos.lan"]), base_url=LOCAL)
    _assert_json_error(only.get("/api/health"), 400)


def test_knn_and_metadata_urls_use_the_allowed_host(client: TestClient) -> None:
    body = json.dumps({"text": "a star", "num_images": 2, "indice_name": "images"})
    for host in ("localhost:8765", "[::1]:9000"):
        results = client.post("/knn-service", content=body, headers={"host": host}).json()
        assert results and all(r["url"].startswith(f"http://{host}/api/images/")
                               for r in results)
        meta = client.post("/metadata", content=json.dumps({"ids": [results[0]["id"]]}),
                           headers={"host": host}).json()
        assert meta[0]["metadata"]["url"] == results[0]["url"]


def test_serve_has_allow_host() -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--help"])
    assert result.exit_code == 0 and "--allow-host" in result.output


KNN = json.dumps({"text": "a ring", "num_images": 2})


@pytest.mark.parametrize("path", ["/knn-service", "/metadata", "/api/search"])
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example",
                                    "http://127.0.0.1:9999", "http://["])
def test_a_foreign_origin_is_refused(client: TestClient, path: str, origin: str) -> None:
    body = KNN if path != "/metadata" else json.dumps({"ids": [1]})
    response = client.post(path, content=body, headers={"content-type": "text/plain",
                                                         "origin": origin})
    assert "--cors" in _assert_json_error(response, 403)


def test_the_own_origin_and_no_origin_are_served(client: TestClient) -> None:
    for headers in ({}, {"origin": LOCAL}, {"origin": "http://localhost:8765",
                                           "host": "localhost:8765"}):
        response = client.post("/knn-service", content=KNN,
                               headers={"content-type": "text/plain", **headers})
        assert response.status_code == 200, (headers, response.text)


def test_cors_origins_are_served_and_others_refused(searcher: Searcher) -> None:
    client = TestClient(create_app(searcher, cors_origins=["http://front.example"]),
                        base_url=LOCAL)
    front = {"origin": "http://front.example"}
    response = client.post("/knn-service", content=KNN, headers=front)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://front.example"
    preflight = client.options("/knn-service", headers={
        **front, "access-control-request-method": "POST"})
    assert preflight.status_code == 200
    _assert_json_error(client.post("/knn-service", content=KNN,
                                   headers={"origin": "http://evil.example"}), 403)


# --- 3. memory: pixels per request, concurrent decodes, thumbnail sizes and cache bytes -----
def test_pixels_per_request_are_bounded(client: TestClient) -> None:
    bombs = [("image", (f"{i}.png", _png_header(7000, 7000), "image/png")) for i in range(6)]
    started = time.monotonic()
    response = client.post("/api/search/upload", files=bombs)
    assert "pixels" in _assert_json_error(response, 413)
    assert time.monotonic() - started < 5  # refused from the headers: nothing was decoded


def test_the_request_pixel_limit_is_honoured(searcher: Searcher, ids: dict[Path, int]) -> None:
    from retrieval.server.media import Limits

    scenes = _files(ids, ".png")[:3]
    total = 0
    for scene in scenes:
        with Image.open(scene) as im:
            total += im.width * im.height
    files = [("image", (s.name, s.read_bytes(), "image/png")) for s in scenes]
    exact = TestClient(create_app(searcher, limits=Limits(max_request_pixels=total)),
                       base_url=LOCAL)
    assert exact.post("/api/search/upload", files=files).status_code == 200
    under = TestClient(create_app(searcher, limits=Limits(max_request_pixels=total - 1)),
                       base_url=LOCAL)
    _assert_json_error(under.post("/api/search/upload", files=files), 413)


def _max_concurrency(monkeypatch: pytest.MonkeyPatch, module, name: str) -> Callable[[], int]:
    """Wrap module.name so that it lingers a little and counts how many run at once."""
    original = getattr(module, name)
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def counted(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.05)
            return original(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1
    monkeypatch.setattr(module, name, counted)
    return lambda: state["max"]


def _in_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


@pytest.mark.parametrize("bound", [1, 2])
def test_concurrent_decodes_are_bounded(searcher: Searcher, ids: dict[Path, int],
                                        monkeypatch: pytest.MonkeyPatch, bound: int) -> None:
    import retrieval.server.media as media
    from retrieval.server.media import Limits
    from retrieval.server.service import SearchParams, Service

    service = Service(searcher, Limits(max_concurrent_decodes=bound))
    images = [p.read_bytes() for p in _files(ids, ".jpg")[:6]]
    uploads = _max_concurrency(monkeypatch, media, "decode_image")
    _in_threads(6, lambda i: service.search(SearchParams(images=[images[i]], top=2)))
    assert uploads() == bound
    thumbnails = _max_concurrency(monkeypatch, media, "render_thumbnail")
    paths = list(ids)
    _in_threads(6, lambda i: service.thumbnail(ids[paths[i]], size=128))
    assert 1 <= thumbnails() <= bound


def test_thumbnail_sizes_are_rounded_up_to_a_few(client: TestClient,
                                                 ids: dict[Path, int]) -> None:
    from retrieval.server.media import THUMBNAIL_SIZES

    thumbnails = client.app.state.service.thumbnails
    image_id = ids[_files(ids, ".jpg")[6]]
    before = len(thumbnails)
    by_size = {size: client.get(f"/api/images/{image_id}/thumbnail?size={size}").content
               for size in (129, 200, 256)}
    assert len(set(by_size.values())) == 1 and len(thumbnails) == before + 1
    with Image.open(io.BytesIO(by_size[200])) as im:
        assert max(im.size) == 224  # the scene's own size: never upscaled, never under 200
    small = {client.get(f"/api/images/{image_id}/thumbnail?size={size}").content
             for size in (16, 100, 128)}
    assert len(small) == 1 and len(thumbnails) == before + 2
    for size in (300, 700, 1024):  # over the image's own size: the same 224 px thumbnail
        assert client.get(f"/api/images/{image_id}/thumbnail?size={size}").content == \
            by_size[200]
    assert len(thumbnails) == before + 2
    assert THUMBNAIL_SIZES == tuple(sorted(THUMBNAIL_SIZES)) and THUMBNAIL_SIZES[-1] == 1024


def test_the_thumbnail_cache_is_bounded_by_bytes(searcher: Searcher,
                                                 ids: dict[Path, int]) -> None:
    from retrieval.server.media import Limits

    bound = 12_000  # a few of the scenes' ~3-5 kB thumbnails
    client = TestClient(create_app(searcher, limits=Limits(thumbnail_cache_bytes=bound)),
                        base_url=LOCAL)
    thumbnails = client.app.state.service.thumbnails
    served = 0
    for image_id in ids.values():
        response = client.get(f"/api/images/{image_id}/thumbnail?size=256")
        assert response.status_code == 200
        served += len(response.content)
        assert 0 < thumbnails.cached_bytes <= bound
    assert served > 2 * bound and len(thumbnails) < len(ids)


MEMORY_PROBE = r"""
import json, sys
from fastapi.testclient import TestClient
from retrieval import Searcher
from retrieval.server import create_app

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

home, png_file, small_file, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
png, small = open(png_file, "rb").read(), open(small_file, "rb").read()
searcher = Searcher.open(home)
client = TestClient(create_app(searcher), base_url="http://127.0.0.1")
warm = client.post("/api/search/upload", files=[("image", ("s.png", small, "image/png"))])
assert warm.status_code == 200, warm.text  # the model and indexes are loaded now
try:  # reset the peak to the current size (Linux >= 4.0), else measure from the start
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
before = peak_kb()
files = [("image", (f"{i}.png", png, "image/png")) for i in range(count)]
response = client.post("/api/search/upload", files=files, data={"top": "3"})
print(json.dumps({"status": response.status_code, "text": response.text[:300],
                  "increase_mb": (peak_kb() - before) / 1024}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_one_upload_of_large_images_stays_small(tmp_path: Path) -> None:
    """7 solid 36 MP PNGs (252 MP, 0.5 MB each) in one upload took the server's peak memory
    up by ~1.1 GB; decoded one at a time and reduced at once, by ~150 MB. The subprocess's
    library uses the torch-free `test` embedder: what is measured is the decoding."""
    write_scenes(tmp_path / "photos", 4, seed=2, size=64)
    with Library.open(tmp_path / "home") as lib:
        lib.index([tmp_path / "photos"], model=TEST_MODEL)
    png, small = tmp_path / "large.png", tmp_path / "small.png"
    png.write_bytes(_solid_png(6000, 6000))
    small.write_bytes(_solid_png(64, 64))
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "home"), str(png),
                          str(small), "7"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **SUBPROCESS_ENV})
    assert run.returncode == 0, run.stderr[-3000:]
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe["status"] == 200, probe
    assert probe["increase_mb"] < 450, probe


# --- 4. HEAD is GET without the body --------------------------------------------------------
def test_head_answers_like_get(client: TestClient, ids: dict[Path, int]) -> None:
    image_id = ids[_files(ids, ".png")[5]]
    for path in ("/api/health", "/api/stats", f"/api/images/{image_id}",
                 f"/api/images/{image_id}/thumbnail?size=128", "/api/search?text=a+ring",
                 "/indices-list", "/", "/static/app.js"):
        got, head = client.get(path), client.head(path)
        assert got.status_code == head.status_code == 200, (path, head.status_code)
        assert got.content and head.content == b"", path
        assert dict(head.headers) == dict(got.headers), path


def test_head_errors_keep_their_status(client: TestClient) -> None:
    assert client.head("/api/images/999999").status_code == 404
    assert client.head("/api/search").status_code == 400
    assert client.head("/knn-service").status_code == 405
    assert client.head("/api/health", headers={"host": "evil.example"}).status_code == 400
