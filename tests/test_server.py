"""The HTTP server: every endpoint, every error path, clip-retrieval compatibility, a real
uvicorn server started by `clipdex serve`, concurrent indexing, and a schema fuzz.

One small library (40 generated scenes, the shipped tiny model) is built per module. The tiny
model is retrained from time to time: nothing here depends on exact scores or rankings.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi", reason="the server extra is not installed")
from clipdex_test_embedder import NAME as TEST_MODEL  # noqa: E402
from clipdex_test_embedder import SUBPROCESS_ENV  # noqa: E402
from conftest import free_port  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import cli  # noqa: E402
from index import Library  # noqa: E402
from index.scan import decode_image  # noqa: E402
from index.synthetic.scenes import write_scenes  # noqa: E402
from retrieval import Searcher  # noqa: E402
from retrieval.server import create_app  # noqa: E402
from retrieval.server.media import THUMBNAIL_SIZES, Limits  # noqa: E402
from retrieval.server.models import MAX_RESULT_IDS, MAX_TERMS, MAX_TOP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCAL = "http://127.0.0.1"  # the server answers only to its own names (the Host rule)
HIT_KEYS = {"id", "score", "kind", "path", "text", "image_id", "meta"}


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(scenes folder, library home): 40 scenes indexed with tiny, their captions added."""
    root = tmp_path_factory.mktemp("server-lib")
    scenes, home = root / "scenes", root / "home"
    write_scenes(scenes, 40, seed=3)
    with Library.open(home) as lib:
        lib.index([scenes], model="tiny")
        lib.add_captions(scenes / "captions.jsonl")
    return scenes, home


@pytest.fixture(scope="module")
def captions_by_file(library_dirs: tuple[Path, Path]) -> dict[str, str]:
    lines = (library_dirs[0] / "captions.jsonl").read_text().splitlines()
    return {json.loads(line)["path"]: json.loads(line)["caption"] for line in lines}


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _scene(library_dirs: tuple[Path, Path], suffix: str = ".jpg") -> Path:
    return sorted(library_dirs[0].glob(f"*{suffix}"))[0]


def _image_id(client: TestClient, path: Path) -> int:
    hits = client.get("/api/search", params={"text": "a shape", "top": MAX_TOP}).json()["hits"]
    return next(h["id"] for h in hits if h["path"] == str(path))


def _assert_search_result(data: dict, *, kind: str, top: int) -> None:
    assert set(data) == {"query", "hits"}
    assert data["query"]["top"] == top and data["query"]["target"] == kind + "s"
    assert 0 < len(data["hits"]) <= top
    for hit in data["hits"]:
        assert set(hit) == HIT_KEYS and hit["kind"] == kind
        assert -1.0001 <= hit["score"] <= 1.0001
    scores = [h["score"] for h in data["hits"]]
    assert scores == sorted(scores, reverse=True)


def _assert_json_error(response: httpx.Response, status: int | tuple[int, ...]) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message and "Traceback" not in message
    return message


def _png_header(width: int, height: int) -> bytes:
    """A tiny file declaring a huge image: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# --- search ---------------------------------------------------------------------------------
def test_search_by_text_get_and_post(client: TestClient) -> None:
    got = client.get("/api/search", params={"text": "a red circle", "top": 5})
    posted = client.post("/api/search", json={"text": "a red circle", "top": 5})
    assert got.status_code == posted.status_code == 200
    _assert_search_result(got.json(), kind="image", top=5)
    assert got.json() == posted.json()
    assert got.json()["query"]["terms"] == [{"kind": "text", "value": "a red circle",
                                             "weight": 1.0}]


def test_search_response_is_clipdex_search_json(client: TestClient,
                                                library_dirs: tuple[Path, Path]) -> None:
    result = CliRunner().invoke(cli.main, ["--home", str(library_dirs[1]), "search",
                                           "two blue stars", "--top", "7", "--json"])
    assert result.exit_code == 0, result.output
    from_cli = json.loads(result.output)
    from_api = client.post("/api/search", json={"text": "two blue stars", "top": 7}).json()
    assert from_api["query"] == from_cli["query"]
    assert [h["id"] for h in from_api["hits"]] == [h["id"] for h in from_cli["hits"]]
    np.testing.assert_allclose([h["score"] for h in from_api["hits"]],
                               [h["score"] for h in from_cli["hits"]], atol=1e-4)


def test_search_options(client: TestClient, library_dirs: tuple[Path, Path]) -> None:
    def search(**body) -> dict:
        response = client.post("/api/search", json={"text": "a green square", **body})
        assert response.status_code == 200, response.text
        return response.json()

    everything = search(top=20)["hits"]
    page = search(top=5, offset=5)["hits"]
    assert [h["id"] for h in page] == [h["id"] for h in everything[5:10]]
    cut = everything[4]["score"]
    assert all(h["score"] >= cut for h in search(top=20, threshold=cut)["hits"])
    assert search(top=5, under=str(library_dirs[0]))["hits"]
    assert search(top=5, under=str(library_dirs[0] / "elsewhere"))["hits"] == []
    deduped = search(top=10, dedup=True)
    assert deduped["query"]["dedup"] is True and deduped["hits"]
    negative = search(top=3, negatives=["0.7:a red circle"])["query"]["terms"][-1]
    assert negative == {"kind": "text", "value": "a red circle", "weight": -0.7}
    weighted = search(text=["2:a green square", "stripes"], top=3)["query"]["terms"]
    assert [t["weight"] for t in weighted] == [2.0, 1.0]


def test_search_captions_target(client: TestClient) -> None:
    data = client.get("/api/search", params={"text": "a red circle", "target": "captions",
                                              "top": 6}).json()
    _assert_search_result(data, kind="caption", top=6)
    assert all(h["text"] and h["image_id"] is not None and h["path"] for h in data["hits"])


def test_search_by_base64_image_excludes_itself(client: TestClient,
                                                library_dirs: tuple[Path, Path]) -> None:
    scene = _scene(library_dirs)
    own_id = _image_id(client, scene)
    for image in (_b64(scene), "data:image/jpeg;base64," + _b64(scene)):
        data = client.post("/api/search", json={"image": image, "top": 39}).json()
        _assert_search_result(data, kind="image", top=39)
        assert own_id not in [h["id"] for h in data["hits"]]
        assert data["query"]["terms"][0]["value"].startswith("upload:")


def test_search_text_and_image_mixed(client: TestClient, library_dirs: tuple[Path, Path]) -> None:
    scene = _scene(library_dirs, ".png")
    data = client.post("/api/search", json={"text": ["a blue star"], "image": [_b64(scene)],
                                            "negatives": ["noise"], "top": 4}).json()
    _assert_search_result(data, kind="image", top=4)
    assert [t["kind"] for t in data["query"]["terms"]] == ["text", "image", "text"]


def test_search_multipart_upload(client: TestClient, library_dirs: tuple[Path, Path]) -> None:
    scene = _scene(library_dirs)
    response = client.post("/api/search/upload",
                           files=[("image", (scene.name, scene.read_bytes(), "image/jpeg"))],
                           data={"text": ["a small shape"], "target": "captions", "top": "3",
                                 "dedup": "true"})
    assert response.status_code == 200, response.text
    _assert_search_result(response.json(), kind="caption", top=3)
    text_only = client.post("/api/search/upload", data={"text": "a ring", "top": "2"})
    _assert_search_result(text_only.json(), kind="image", top=2)


def test_search_like_an_indexed_image(client: TestClient, library_dirs: tuple[Path, Path]) -> None:
    own_id = _image_id(client, _scene(library_dirs))
    data = client.post("/api/search", json={"image_id": own_id, "top": 5}).json()
    _assert_search_result(data, kind="image", top=5)
    assert own_id not in [h["id"] for h in data["hits"]]
    _assert_json_error(client.post("/api/search", json={"image_id": 10**9}), 404)


def test_caption_lookup_json_and_upload(client: TestClient, library_dirs: tuple[Path, Path],
                                        captions_by_file: dict[str, str]) -> None:
    scene = _scene(library_dirs)
    by_json = client.post("/api/caption", json={"image": _b64(scene), "top": 5})
    by_file = client.post("/api/caption/upload",
                          files={"image": (scene.name, scene.read_bytes(), "image/jpeg")},
                          data={"top": "5"})
    assert by_json.status_code == by_file.status_code == 200
    _assert_search_result(by_json.json(), kind="caption", top=5)
    assert by_json.json()["hits"] == by_file.json()["hits"]


def test_uploaded_bytes_embed_like_the_indexed_file(client: TestClient,
                                                   library_dirs: tuple[Path, Path]) -> None:
    # Model-independent (the tiny model is retrained now and then): an uploaded image must be
    # decoded and embedded exactly as `clipdex index` did it, so its caption neighbours equal
    # those of its stored vector.
    for scene in sorted(library_dirs[0].glob("*.*g"))[:6]:
        by_upload = client.post("/api/caption", json={"image": _b64(scene), "top": 8}).json()
        by_id = client.post("/api/search", json={"image_id": _image_id(client, scene),
                                                 "target": "captions", "top": 12}).json()
        stored = {h["id"]: h["score"] for h in by_id["hits"]}  # 12: room for near-ties
        for hit in by_upload["hits"]:
            assert hit["id"] in stored and abs(hit["score"] - stored[hit["id"]]) < 2e-3


RAW_NAME = b"bad_\xff.png"  # a file name that is not UTF-8 (the store keeps it losslessly)
BIG_SIDE = 1024  # over 4× the tiny model's input: decoding reduces it


@pytest.fixture(scope="module")
def odd_library(tmp_path_factory: pytest.TempPathFactory):
    """(folder, searcher, client) over a few scenes, one named `bad_\\xff.png`, and a large
    striped PNG with a copy of the same pixels in other bytes (a text chunk)."""
    root = tmp_path_factory.mktemp("odd-lib")
    folder = root / "files"
    write_scenes(folder, 3, seed=11)
    first = sorted(folder.glob("*.png"))[0]
    with open(os.fsencode(folder) + b"/" + RAW_NAME, "wb") as fh:
        fh.write(first.read_bytes())
    first.unlink()
    stripes = (np.arange(BIG_SIDE) // 5 % 2 * 255).astype(np.uint8)  # 5 px: resampling shows
    big = Image.fromarray(np.broadcast_to(stripes, (BIG_SIDE, BIG_SIDE))).convert("RGB")
    big.save(folder / "stripes.png")
    from PIL.PngImagePlugin import PngInfo

    note = PngInfo()
    note.add_text("Comment", "the same pixels in other bytes")
    big.save(folder / "stripes_copy.png", pnginfo=note)
    with Library.open(root / "home") as lib:
        lib.index([folder], model="tiny")
    searcher = Searcher.open(root / "home")
    yield folder, searcher, TestClient(create_app(searcher), base_url=LOCAL,
                                       raise_server_exceptions=False)
    searcher.close()


def test_file_names_that_are_not_utf8_are_answered(odd_library) -> None:
    folder, searcher, client = odd_library
    raw_path = os.fsencode(folder) + b"/" + RAW_NAME
    response = client.get("/api/search", params={"text": "a shape", "top": 10})
    assert response.status_code == 200, response.text
    assert b'bad_\\udcff.png"' in response.content  # escaped: the body is valid UTF-8
    response.content.decode("utf-8")
    hit = next(h for h in response.json()["hits"] if os.fsencode(h["path"]) == raw_path)
    original = client.get(f"/api/images/{hit['id']}")
    assert original.status_code == 200 and original.content == Path(os.fsdecode(raw_path)) \
        .read_bytes()
    assert client.get(f"/api/images/{hit['id']}/thumbnail").status_code == 200
    knn = client.post("/knn-service", json={"text": "a shape", "num_images": 10,
                                            "indice_name": "images"})
    assert knn.status_code == 200, knn.text
    found = next(r for r in knn.json() if r["id"] == hit["id"])
    assert os.fsencode(found["image_path"]) == raw_path
    meta = client.post("/metadata", json={"ids": [hit["id"]], "indice_name": "images"})
    assert meta.status_code == 200, meta.text
    assert os.fsencode(meta.json()[0]["metadata"]["image_path"]) == raw_path
    assert client.get("/api/stats").status_code == 200


def test_a_large_png_upload_embeds_like_the_indexed_file(odd_library) -> None:
    # Decoding reduces a large image (of any format) before the model sees it: an upload must
    # be reduced exactly as `clipdex index` reduced the same file, or its vector drifts.
    folder, searcher, client = odd_library
    assert BIG_SIDE >= 4 * searcher.embedder.image_size
    with open(folder / "stripes.png", "rb") as fh:
        image, width, _ = decode_image(fh, 2 * searcher.embedder.image_size)
    assert width == BIG_SIDE and image.width < BIG_SIDE // 2  # reduced, as indexed
    by_path = {h["path"]: h["id"] for h in client.get(
        "/api/search", params={"text": "stripes", "top": 10}).json()["hits"]}
    ids = [by_path[str(folder / name)] for name in ("stripes.png", "stripes_copy.png")]
    stored = searcher.library.store.vectors_for("image", ids)
    assert float(stored[ids[0]] @ stored[ids[1]]) >= 0.99999  # same pixels, same vector
    upload = ("image", ("stripes.png", (folder / "stripes.png").read_bytes(), "image/png"))
    response = client.post("/api/search/upload", files=[upload], data={"top": "1"})
    assert response.status_code == 200, response.text
    # the upload's own indexed copy (same bytes) is excluded; the same pixels in other bytes
    # are not, and score as the stored vectors do: the upload's vector is the indexed vector
    (hit,) = response.json()["hits"]
    assert hit["id"] == ids[1] and hit["score"] >= 0.9999


# --- images by id ---------------------------------------------------------------------------
def test_original_and_thumbnail_by_id(client: TestClient, library_dirs: tuple[Path, Path]) -> None:
    scene = _scene(library_dirs, ".png")
    image_id = _image_id(client, scene)
    original = client.get(f"/api/images/{image_id}")
    assert original.status_code == 200 and original.content == scene.read_bytes()
    assert original.headers["content-type"] == "image/png"
    assert original.headers["x-content-type-options"] == "nosniff"
    for size in (16, 64, 1024):  # rounded up to one of THUMBNAIL_SIZES
        thumb = client.get(f"/api/images/{image_id}/thumbnail", params={"size": size})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumb.content)) as im:
            assert im.format == "JPEG"
            assert max(im.size) <= next(s for s in THUMBNAIL_SIZES if s >= size)
    again = client.get(f"/api/images/{image_id}/thumbnail", params={"size": 64})
    assert again.content == client.get(f"/api/images/{image_id}/thumbnail?size=64").content
    for size in (0, 15, 1025, "big"):
        _assert_json_error(client.get(f"/api/images/{image_id}/thumbnail?size={size}"), 422)
    for missing in ("999999", "-1", str(2**64), "1.5", "abc"):
        _assert_json_error(client.get(f"/api/images/{missing}"), (404, 422))
        _assert_json_error(client.get(f"/api/images/{missing}/thumbnail"), (404, 422))


@pytest.mark.parametrize("path", [
    "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/images/%2Fetc%2Fpasswd",
    "/api/images/%252e%252e%252fetc%252fpasswd",
    "/api/images/1%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
    "/api/images/..%5C..%5Cwindows%5Cwin.ini",
    "/static/..%2F..%2Fpyproject.toml",
    "/static/%2e%2e/server.py",
    "/static/..%252Fserver.py",
])
def test_url_encoded_path_traversal_is_refused(client: TestClient, path: str) -> None:
    response = client.get(path)
    _assert_json_error(response, (404, 422))
    assert b"root:" not in response.content and b"[project]" not in response.content


def test_static_page_and_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="q"' in page.text and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


# --- stats, health, docs --------------------------------------------------------------------
def test_stats_health_and_docs(client: TestClient) -> None:
    stats = client.get("/api/stats").json()
    assert {"images", "captions", "failed", "model", "dim", "index", "bytes"} <= set(stats)
    assert stats["images"] == 40 and stats["captions"] == 40 and stats["model"] == "tiny"
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] == 40
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/knn-service", "/metadata", "/indices-list"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def _referenced_urls(html: str) -> list[str]:
    """Every src/href/url/spec-url attribute of a page, and any absolute URL in its text."""
    named = re.findall(r"""(?:src|href|url|spec-url)\s*[=:]\s*["']([^"']+)["']""", html)
    return named + re.findall(r"https?://[^\s\"'<>)]+", html)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_reference_only_this_server(client: TestClient, path: str) -> None:
    """Swagger UI and ReDoc come from this server (fastapi-offline), so /docs works offline."""
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = _referenced_urls(page.text)
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts and "/openapi.json" in urls, urls  # the UI's script and the schema it reads
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{path} loads {url}"
        assert client.get(url).status_code == 200, url
    assert client.head(scripts[0]).status_code == 200
    policy = page.headers["content-security-policy"]  # and the browser asks no other host
    assert "default-src 'self'" in policy and "img-src 'self' data: blob:;" in policy


def test_favicon(client: TestClient) -> None:
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.lstrip().startswith(b"<svg")
    page = client.get("/").text
    assert 'rel="icon"' in page and client.get("/static/favicon.svg").content == icon.content


def test_examples_are_short_captions_of_the_library(client: TestClient,
                                                    captions_by_file: dict[str, str]) -> None:
    examples = client.get("/api/examples").json()["examples"]
    assert 1 <= len(examples) <= 5 and len(set(examples)) == len(examples)
    assert set(examples) <= set(captions_by_file.values())
    assert all(len(e) <= 60 for e in examples)
    assert client.get("/api/examples").json()["examples"] == examples  # stable between calls


def test_examples_follow_the_captions(tmp_path: Path) -> None:
    write_scenes(tmp_path / "scenes", 6, seed=9)
    with Library.open(tmp_path / "home") as lib:
        lib.index([tmp_path / "scenes"], model=TEST_MODEL)
    searcher = Searcher.open(tmp_path / "home")
    try:
        client = TestClient(create_app(searcher), base_url=LOCAL)
        assert client.get("/api/examples").json() == {"examples": []}  # no captions: none
        with Library.open(tmp_path / "home") as lib:
            lib.add_captions(tmp_path / "scenes" / "captions.jsonl")
        examples = client.get("/api/examples").json()["examples"]
        captions = [json.loads(line)["caption"] for line in
                    (tmp_path / "scenes" / "captions.jsonl").read_text().splitlines()]
        assert examples and set(examples) <= set(captions)
    finally:
        searcher.close()


def test_pick_examples_keeps_short_distinct_texts() -> None:
    from retrieval.server.service import pick_examples

    texts = ["a red  circle", "A red circle", "x" * 61, "  ", "two stars", "a ring", "b", "c"]
    assert pick_examples(texts) == ["a red circle", "two stars", "a ring", "b", "c"]
    assert pick_examples(texts, count=2, max_chars=9) == ["two stars", "a ring"]


# --- errors speak of request fields, not CLI flags ------------------------------------------
def test_errors_name_request_fields_not_cli_flags(client: TestClient) -> None:
    empty = _assert_json_error(client.get("/api/search"), 400)
    assert empty == ("empty query: give a text, an image, or a filter (after, before, camera, "
                     "place, near, type, tag) to list photos by date")
    only_negatives = _assert_json_error(client.post("/api/search", json={"negatives": ["x"]}),
                                        400)
    assert "negatives" in only_negatives and "--" not in only_negatives


def test_flag_names_become_field_names() -> None:
    from retrieval.server.service import in_request_terms

    assert in_request_terms("--top must be at least 1 (got 0)") == "top must be at least 1 (got 0)"
    assert in_request_terms("--offset cannot be negative") == "offset cannot be negative"
    assert (in_request_terms("a query needs at least one positive term, not only --not terms")
            == "a query needs at least one positive term, not only negatives")
    # flags no request can set stay, and so do look-alikes of a known flag
    assert in_request_terms("--expand-samples needs --expand") == "--expand-samples needs --expand"
    assert in_request_terms("--images or --top-k") == "--images or --top-k"


# --- clip-retrieval compatibility -----------------------------------------------------------
def _knn(client: TestClient, body: dict, content_type: str | None = "text/plain") -> list:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/knn-service", content=json.dumps(body), headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_indices_list(client: TestClient) -> None:
    assert client.get("/indices-list").json() == ["images", "captions"]


def test_knn_text_like_clip_front(client: TestClient) -> None:
    # clip-front posts JSON.stringify(...) with no Content-Type: browsers send text/plain
    results = _knn(client, {"text": "a red circle", "image": None, "image_url": None,
                            "modality": "image", "num_images": 3, "indice_name": "images",
                            "num_result_ids": 8, "use_mclip": False, "deduplicate": True,
                            "use_safety_model": True})
    assert 0 < len(results) <= 8
    similarities = [r["similarity"] for r in results]
    assert similarities == sorted(similarities, reverse=True)
    for r in results[:3]:
        assert {"id", "similarity", "caption", "image_path", "url"} <= set(r)
        assert r["url"].endswith(f"/api/images/{r['id']}")
        assert client.get(r["url"]).status_code == 200
    assert all(set(r) == {"id", "similarity"} for r in results[3:])


def test_knn_like_clip_client(client: TestClient, library_dirs: tuple[Path, Path]) -> None:
    """ClipClient's exact payload: json.dumps body, no Content-Type, string-free flags."""
    body = {"text": None, "image": _b64(_scene(library_dirs)), "image_url": None,
            "embedding_input": None, "deduplicate": True, "use_safety_model": True,
            "use_violence_detector": True, "indice_name": "captions", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image",
            "num_images": 5, "num_result_ids": 5, "verbose": False}
    results = _knn(client, body, content_type=None)
    assert len(results) == 5 and all(r["caption"] for r in results)


def test_knn_flags_as_strings_and_defaults(client: TestClient) -> None:
    body = {"text": "two stars", "modality": "IMAGE", "num_images": "4",
            "indice_name": "images", "deduplicate": "False", "use_safety_model": "true",
            "use_violence_detector": "", "use_mclip": "0", "aesthetic_score": "",
            "aesthetic_weight": "", "unknown_field": 1}
    results = _knn(client, body, content_type="application/x-www-form-urlencoded")
    assert len(results) == 4  # num_result_ids defaults to num_images
    assert all("url" in r for r in results)
    with_strings = _knn(client, {**body, "aesthetic_score": "9", "aesthetic_weight": "0.5"})
    assert [r["id"] for r in with_strings] == [r["id"] for r in results]


def test_knn_modality_and_indice_name(client: TestClient) -> None:
    by_modality = _knn(client, {"text": "a blue star", "modality": "text", "num_images": 3})
    by_indice = _knn(client, {"text": "a blue star", "modality": "image",
                              "indice_name": "captions", "num_images": 3})
    assert by_modality == by_indice
    meta = client.post("/metadata", json={"ids": [r["id"] for r in by_indice],
                                          "indice_name": "captions"}).json()
    assert [m["metadata"]["caption"] for m in meta] == [r["caption"] for r in by_indice]


def test_knn_embedding_input(client: TestClient, searcher: Searcher) -> None:
    vector = searcher.embedder.encode_texts(["a purple hexagon"])[0]
    by_vector = _knn(client, {"embedding_input": vector.tolist(), "modality": "image",
                              "num_images": 5, "indice_name": "images"})
    by_text = _knn(client, {"text": "a purple hexagon", "num_images": 5, "indice_name": "images"})
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]
    wrong = client.post("/knn-service", json={"embedding_input": [0.5, 0.5]})
    assert "embedding_input" in _assert_json_error(wrong, 400)
    for bad in ([0.0] * len(vector), [1e39] * len(vector)):  # no direction; not float32
        _assert_json_error(client.post("/knn-service", json={"embedding_input": bad}), 400)
    huge = client.post("/knn-service", json={"embedding_input": [1e30] * len(vector)})
    assert huge.status_code == 200 and len(huge.json()) == 40  # a direction, however long


@pytest.mark.parametrize(("body", "status"), [
    ({"image_url": "http://example.com/cat.jpg"}, 400),
    ({"modality": "image", "num_images": 3}, 400),
    ({"text": "x", "indice_name": "laion5B-L-14"}, 404),
    ({"text": "x", "num_images": MAX_TOP + 1}, 422),
    ({"text": "x", "num_images": 0}, 422),
    ({"text": "x", "num_result_ids": MAX_RESULT_IDS + 1}, 422),
    ({"text": "x", "deduplicate": "perhaps"}, 422),
    ({"text": "x", "modality": "audio"}, 422),
    ({"text": "x", "aesthetic_score": "high"}, 422),
    ({"image": "not base64!"}, 400),
    ({"image": base64.b64encode(b"not an image").decode()}, 400),
    ({"text": "   "}, 400),
])
def test_knn_errors(client: TestClient, body: dict, status: int) -> None:
    _assert_json_error(client.post("/knn-service", content=json.dumps(body)), status)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"", b"\xff\xfe\x00", b"[" * 100000])
def test_knn_and_metadata_refuse_non_json(client: TestClient, raw: bytes) -> None:
    for path in ("/knn-service", "/metadata"):
        _assert_json_error(client.post(path, content=raw), 400)


def test_metadata(client: TestClient) -> None:
    results = _knn(client, {"text": "a square", "num_images": 2, "num_result_ids": 6,
                            "indice_name": "images"})
    ids = [r["id"] for r in results] + [987654]
    response = client.post("/metadata", content=json.dumps({"ids": ids, "indice_name": "images"}),
                           headers={"content-type": "text/plain;charset=UTF-8"})
    meta = response.json()
    assert [m["id"] for m in meta] == ids
    for m, r in zip(meta, results[:2]):
        assert m["metadata"] == {k: r[k] for k in ("caption", "image_path", "url")}
    assert all(m["metadata"]["url"].endswith(f"/api/images/{m['id']}") for m in meta[:-1])
    assert meta[-1]["metadata"] == {}
    assert client.post("/metadata", json={"ids": [], "indice_name": "images"}).json() == []
    _assert_json_error(client.post("/metadata", json={"ids": [1], "indice_name": "x"}), 404)
    _assert_json_error(client.post("/metadata", json={"ids": ["a"]}), 422)
    _assert_json_error(client.post("/metadata", json={"ids": [0] * (MAX_RESULT_IDS + 1)}), 422)


# --- error paths ----------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("get", "/api/search", {}, 400),
    ("get", "/api/search", {"params": {"text": "x", "top": 0}}, 422),
    ("get", "/api/search", {"params": {"text": "x", "top": MAX_TOP + 1}}, 422),
    ("get", "/api/search", {"params": {"text": "x", "target": "videos"}}, 422),
    ("get", "/api/search", {"params": {"text": "x", "threshold": 2}}, 422),
    ("get", "/api/search", {"params": {"text": ["x"] * (MAX_TERMS + 1)}}, 422),
    ("get", "/api/search", {"params": {"text": "x" * 5000}}, 413),
    ("post", "/api/search", {"json": {}}, 400),
    ("post", "/api/search", {"json": {"text": ""}}, 400),
    ("post", "/api/search", {"json": {"negatives": ["x"]}}, 400),
    ("post", "/api/search", {"json": {"text": "1:a", "negatives": ["1:a"]}}, 400),
    ("post", "/api/search", {"json": {"text": "x", "offset": -1}}, 422),
    ("post", "/api/search", {"json": {"text": "x", "bogus": 1}}, 422),
    ("post", "/api/search", {"json": {"text": "x" * 3000}}, 422),
    ("post", "/api/search", {"json": {"text": ["x"] * MAX_TERMS, "negatives": ["y"]}}, 413),
    ("post", "/api/search", {"json": {"image": "%%%"}}, 400),
    ("post", "/api/search", {"json": {"image": ""}}, 400),
    ("post", "/api/search", {"content": b"{bad json", "headers": {
        "content-type": "application/json"}}, 422),
    ("post", "/api/search", {"json": {"text": "x", "image_id": 2**64}}, 422),
    ("post", "/api/search/upload", {"files": {"image": ("x.jpg", b"", "image/jpeg")}}, 400),
    ("post", "/api/search/upload", {"files": {"image": ("x.txt", b"hello", "text/plain")}}, 400),
    ("post", "/api/caption", {"json": {"top": 3}}, 422),
    ("post", "/api/caption/upload", {"data": {"top": "3"}}, 422),
    ("get", "/api/no-such-thing", {}, 404),
    ("delete", "/api/search", {}, 405),
    ("put", "/knn-service", {}, 405),
])
def test_error_paths_are_json_4xx(client: TestClient, method: str, path: str, kwargs: dict,
                                  status: int) -> None:
    _assert_json_error(client.request(method, path, **kwargs), status)


def test_image_pixel_limit(client: TestClient) -> None:
    for width, height in ((10_000, 10_000), (30_000, 30_000)):  # over ours; over Pillow's too
        bomb = base64.b64encode(_png_header(width, height)).decode()
        message = _assert_json_error(client.post("/api/search", json={"image": bomb}), 413)
        assert "pixels" in message
        knn = client.post("/knn-service", json={"image": bomb, "num_images": 3})
        _assert_json_error(knn, 413)


def test_request_size_limit(searcher: Searcher, library_dirs: tuple[Path, Path]) -> None:
    small = TestClient(create_app(searcher, limits=Limits(max_request_bytes=4096)),
                       base_url=LOCAL)
    big = {"text": "x", "image": _b64(_scene(library_dirs))}  # a ~10 kB scene, as base64
    assert "too large" in _assert_json_error(small.post("/api/search", json=big), 413)

    def chunks():  # no Content-Length: the limit must still hold while streaming
        for _ in range(10):
            yield b"x" * 1000
    _assert_json_error(small.post("/knn-service", content=chunks()), 413)
    assert small.post("/api/search", json={"text": "a ring", "top": 2}).status_code == 200


def test_empty_library_is_a_clear_404(tmp_path: Path) -> None:
    Library.open(tmp_path / "empty-home").close()  # a library with nothing indexed yet
    empty = Searcher.open(tmp_path / "empty-home")
    try:
        client = TestClient(create_app(empty), base_url=LOCAL)
        message = _assert_json_error(client.get("/api/search", params={"text": "x"}), 404)
        assert "clipdex index" in message
        assert client.get("/api/health").json()["images"] == 0
        assert client.get("/api/examples").json() == {"examples": []}
        _assert_json_error(client.post("/knn-service", json={"text": "x"}), 404)
    finally:
        empty.close()


def test_cors_only_when_asked(searcher: Searcher) -> None:
    origin = {"origin": "http://front.example"}
    closed = TestClient(create_app(searcher), base_url=LOCAL).get("/indices-list",
                                                                  headers=origin)
    assert closed.status_code == 403 and "access-control-allow-origin" not in closed.headers
    opened = TestClient(create_app(searcher, cors_origins=["http://front.example"]),
                        base_url=LOCAL)
    response = opened.get("/indices-list", headers=origin)
    assert response.headers["access-control-allow-origin"] == "http://front.example"


def test_a_bug_is_a_json_500_without_traceback(searcher: Searcher,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.server.service import Service

    monkeypatch.setattr(Service, "health", lambda self: 1 / 0)
    response = TestClient(create_app(searcher), base_url=LOCAL,
                          raise_server_exceptions=False).get("/api/health")
    message = _assert_json_error(response, 500)
    assert "ZeroDivisionError" in message


# --- the CLI --------------------------------------------------------------------------------
def test_serve_help_and_missing_extra() -> None:
    code = (
        "import sys\n"
        "{block}"
        "import cli\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(cli.main, {args!r})\n"
        "print(r.exit_code, r.output, 'fastapi' in sys.modules)\n"
    )
    help_run = subprocess.run(
        [sys.executable, "-c", code.format(block="", args=["serve", "--help"])],
        cwd=REPO, capture_output=True, text=True)
    assert help_run.stdout.startswith("0 ") and "--port" in help_run.stdout
    assert help_run.stdout.strip().endswith("False"), "serve --help imported fastapi"
    blocked = "sys.modules['fastapi'] = None\n"  # as if the extra were not installed
    missing = subprocess.run(
        [sys.executable, "-c", code.format(block=blocked, args=["serve"])],
        cwd=REPO, capture_output=True, text=True)
    assert missing.stdout.startswith("1 ") and "pip install -e" in missing.stdout \
        and "[server]" in missing.stdout


# --- a real server: `clipdex serve` on 127.0.0.1 while `clipdex index` adds images -----------
LIVE = httpx.Client(timeout=120.0)  # generous: the machine running the tests may be busy


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """Send the request line exactly as given: no client-side path normalisation."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                  .encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    """`clipdex serve` in a subprocess over its own small library; yields (url, port, dirs).

    The library uses the torch-free `test` embedder: these tests are about the process (the
    loopback bind, the Host rule, raw paths, seeing a concurrent `index`), and the server
    starts in a second instead of importing torch (the TestClient tests above run on tiny)."""
    root = tmp_path_factory.mktemp("live")
    write_scenes(root / "first", 12, seed=5)
    with Library.open(root / "home") as lib:
        lib.index([root / "first"], model=TEST_MODEL)
    port = free_port()
    env = {**os.environ, **SUBPROCESS_ENV, "CLIPDEX_HOME": str(root / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port),
                             "--allow-host", "photos.example"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc)
        yield url, port, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_until_up(url: str, proc: subprocess.Popen) -> None:
    # about a second on an idle machine; minutes on a saturated one
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            if httpx.get(url + "/api/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise AssertionError("clipdex serve did not start within 300 s:\n"
                         + proc.communicate(timeout=30)[0].decode())


def test_live_server_answers_on_loopback(live_server) -> None:
    url, port, _ = live_server
    data = LIVE.get(url + "/api/search", params={"text": "a red circle", "top": 3}).json()
    _assert_search_result(data, kind="image", top=3)
    assert LIVE.get(url + "/").status_code == 200
    knn = LIVE.post(url + "/knn-service", content=json.dumps(
        {"text": "a star", "num_images": 2, "indice_name": "images"})).json()
    assert knn[0]["url"].startswith(url + "/api/images/")
    with socket.socket() as s:  # bound to loopback only, as the default says
        s.settimeout(1)
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            assert s.connect_ex((other, port)) != 0


def test_live_server_host_rule_and_allow_host(live_server) -> None:
    """`clipdex serve --allow-host photos.example`: that name and loopback, nothing else."""
    url, port, _ = live_server
    body = json.dumps({"text": "a star", "num_images": 2})
    for host in (f"photos.example:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert LIVE.get(url + "/api/health", headers={"host": host}).status_code == 200
        knn = LIVE.post(url + "/knn-service", content=body, headers={"host": host}).json()
        assert knn[0]["url"].startswith(f"http://{host}/api/images/")
    for host in (f"evil.example:{port}", "photos.example.evil.example"):
        refused = LIVE.get(url + "/", headers={"host": host})
        assert "--allow-host" in _assert_json_error(refused, 400)
    foreign = LIVE.post(url + "/knn-service", content=body,
                        headers={"origin": "http://evil.example", "content-type": "text/plain"})
    assert "--cors" in _assert_json_error(foreign, 403)
    head = LIVE.head(url + "/api/health")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0


@pytest.mark.parametrize("target", [
    "/api/images/../../../../etc/passwd",
    "/api/images/1/../../../../etc/passwd",
    "/api/images//etc/passwd",
    "/api/images/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../../../etc/passwd",
    "/static/../server.py",
    "/static//etc/passwd",
    "/static/%2e%2e/server.py",
    "/../../etc/passwd",
])
def test_live_server_refuses_raw_path_traversal(live_server, target: str) -> None:
    status, body = _raw_get(live_server[1], target)
    assert 400 <= status < 500 and b"root:" not in body and b"import" not in body


def test_live_server_sees_new_images_while_indexing(live_server) -> None:
    url, _, root = live_server
    before = LIVE.get(url + "/api/health").json()["images"]
    write_scenes(root / "second", 24, seed=6)
    errors: list[str] = []
    done = threading.Event()

    def index() -> None:  # what `clipdex index` does, against the same library
        try:
            with Library.open(root / "home") as lib:
                lib.index([root / "second"])
        except Exception as exc:  # noqa: BLE001 - report it to the test thread
            errors.append(repr(exc))
        finally:
            done.set()

    threading.Thread(target=index, daemon=True).start()
    answered = 0
    while not done.is_set() or answered < 3:
        response = LIVE.get(url + "/api/search", params={"text": "a shape", "top": 5})
        assert response.status_code == 200, response.text
        answered += 1
    assert not errors, errors
    hits = LIVE.get(url + "/api/search", params={"text": "a shape", "top": MAX_TOP}).json()
    assert len(hits["hits"]) == before + 24
    assert LIVE.get(url + "/api/health").json()["images"] == before + 24
    new_id = max(h["id"] for h in hits["hits"])
    assert LIVE.get(f"{url}/api/images/{new_id}/thumbnail").status_code == 200


def test_live_server_image_file_gone_is_404(live_server) -> None:
    url, _, root = live_server
    hits = LIVE.get(url + "/api/search", params={"text": "a shape", "top": MAX_TOP}).json()
    victim = next(h for h in hits["hits"] if h["path"].startswith(str(root / "first")))
    moved = Path(victim["path"]).with_suffix(".moved")
    shutil.move(victim["path"], moved)
    try:
        for path in (f"/api/images/{victim['id']}", f"/api/images/{victim['id']}/thumbnail"):
            _assert_json_error(LIVE.get(url + path), 404)
    finally:
        shutil.move(moved, victim["path"])


# --- a property-based fuzz of the OpenAPI schema --------------------------------------------
OPERATIONS = [("GET", "/api/search"), ("POST", "/api/search"), ("POST", "/api/search/upload"),
              ("POST", "/api/caption"), ("POST", "/api/caption/upload"),
              ("GET", "/api/images/{image_id}"), ("GET", "/api/images/{image_id}/thumbnail"),
              ("GET", "/api/examples"), ("GET", "/api/filters"), ("GET", "/api/stats"),
              ("GET", "/api/health"), ("GET", "/api/duplicates"),
              ("POST", "/knn-service"),
              ("GET", "/indices-list"), ("POST", "/metadata")]


@pytest.fixture(scope="module")
def api_schema(searcher: Searcher):
    schemathesis = pytest.importorskip("schemathesis")
    # schemathesis calls an ASGI app as http://testserver: allow that name, not any name
    return schemathesis.openapi.from_asgi("/openapi.json",
                                          create_app(searcher, allowed_hosts=["testserver"]))


def test_fuzzed_operations_are_all_the_operations(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert sorted((m.upper(), p) for p, ops in paths.items() for m in ops) == sorted(OPERATIONS)


NO_INPUT = {("GET", "/api/examples"), ("GET", "/api/filters"), ("GET", "/api/stats"),
            ("GET", "/api/health"),
            ("GET", "/indices-list")}
FUZZ_CASES = [(method, path, mode) for method, path in OPERATIONS
              for mode in ("positive", "negative")
              if mode == "positive" or (method, path) not in NO_INPUT]  # nothing to make invalid


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ_CASES)
def test_schema_fuzz_never_5xx(api_schema, method: str, path: str, mode: str) -> None:
    """Schemathesis-generated requests (valid, then invalid) never make the server fail."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    strategy = api_schema[path][method].as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def never_5xx(case) -> None:
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
        if response.status_code >= 400:
            assert "application/json" in str(response.headers.get("content-type"))

    never_5xx()
