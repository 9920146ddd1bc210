"""The web page end to end, in Debian's headless Chromium driven by Playwright.

Playwright's own browser downloads are never used: the test drives /usr/bin/chromium (CI
installs it, see .ci/run) and is skipped with a reason where it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000  # generous: the machine running the tests may be busy
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"{CHROMIUM} is missing: apt-get install chromium")
pytest.importorskip("fastapi", reason="the server extra is not installed")
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

from conftest import free_port  # noqa: E402

from index import Library  # noqa: E402
from index.synthetic.scenes import write_scenes  # noqa: E402
from retrieval import Searcher  # noqa: E402
from retrieval.server import create_app  # noqa: E402

SCREENSHOTS = Path(os.environ.get("CLIPDEX_SCREENSHOTS", "")) if os.environ.get(
    "CLIPDEX_SCREENSHOTS") else None


@contextlib.contextmanager
def _serving(home: Path):
    """A real uvicorn server on 127.0.0.1 (random port) over the library at `home`."""
    import uvicorn

    searcher = Searcher.open(home)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        searcher.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory):
    """A real uvicorn server on 127.0.0.1 (random port) over 24 indexed, captioned scenes
    (no tags; no near-duplicates at the default threshold)."""
    root = tmp_path_factory.mktemp("web")
    write_scenes(root / "scenes", 24, seed=11)
    with Library.open(root / "home") as lib:
        lib.index([root / "scenes"], model="tiny")
        lib.add_captions(root / "scenes" / "captions.jsonl")
    with _serving(root / "home") as url:
        yield url, root / "scenes"


# the tagged library's copies of its own scenes: (copy, original, how)
COPIES = (("copy_exact.jpg", "scene_00000.jpg", "copy"),
          ("copy_half.jpg", "scene_00001.jpg", "half"),
          ("copy_recompressed.jpg", "scene_00002.png", "jpeg60"))


@pytest.fixture(scope="module")
def tagged_url(tmp_path_factory: pytest.TempPathFactory):
    """A server over 12 scenes and three copies of three of them (an exact copy, one resized
    to half, one recompressed), tagged zero-shot with the built-in scene vocabulary."""
    from PIL import Image

    root = tmp_path_factory.mktemp("web-tagged")
    scenes = root / "scenes"
    write_scenes(scenes, 12, seed=5)
    for copy, original, how in COPIES:
        if how == "copy":
            shutil.copy2(scenes / original, scenes / copy)
            continue
        with Image.open(scenes / original) as image:
            if how == "half":
                image = image.resize((image.width // 2, image.height // 2))
            image.convert("RGB").save(scenes / copy, quality=85 if how == "half" else 60)
    with Library.open(root / "home") as lib:
        lib.index([scenes], model="tiny")
        lib.tag()  # what `clipdex tag` does: the built-in vocabulary for `tiny`
    with _serving(root / "home") as url:
        yield url, scenes


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _open_page(browser, url: str, **options):
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **options})
    context.set_default_timeout(WAIT_MS)
    playwright_api.expect.set_options(timeout=WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    yield page
    context.close()
    assert not errors, errors  # no JavaScript exceptions on the page


@pytest.fixture
def page(browser, server_url):
    yield from _open_page(browser, server_url[0] + "/")


@pytest.fixture
def tagged_page(browser, tagged_url):
    yield from _open_page(browser, tagged_url[0] + "/")


def _loaded_thumbnails(page) -> int:
    return page.evaluate("""() => [...document.querySelectorAll('#results img.thumb')]
                             .filter(img => img.complete && img.naturalWidth > 0).length""")


def _wait_for_thumbnails(page, count: int) -> None:
    page.wait_for_function(
        """n => [...document.querySelectorAll('#results img.thumb')]
               .filter(img => img.complete && img.naturalWidth > 0).length >= n""",
        arg=count, timeout=WAIT_MS)


def test_text_query_shows_thumbnails_then_captions(page) -> None:
    expect = playwright_api.expect
    expect(page.locator("#stats")).to_contain_text("24 images")
    page.fill("#q", "a red circle")
    page.keyboard.press("Enter")
    expect(page.locator("#results article.hit.image")).to_have_count(24, timeout=WAIT_MS)
    _wait_for_thumbnails(page, 4)
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    first_link = page.locator("#results a.thumb-link").first.get_attribute("href")
    assert first_link.startswith("/api/images/")
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "images.png"))

    page.click("label[for=target-captions]")
    expect(page.locator("#results article.hit.caption").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#results article.hit.image")).to_have_count(0)
    texts = page.locator("#results .hit.caption .text").all_inner_texts()
    assert texts and all(t.strip() for t in texts)
    expect(page.locator("#status")).to_contain_text("caption")
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "captions.png"))


def test_click_through_opens_the_original(page, server_url) -> None:
    page.fill("#q", "two blue stars")
    page.keyboard.press("Enter")
    link = page.locator("#results a.thumb-link").first
    link.wait_for(timeout=WAIT_MS)
    with page.context.expect_page() as opened:
        link.click()
    original = opened.value
    original.wait_for_load_state()
    assert "/api/images/" in original.url
    size = original.evaluate("() => document.images[0] && document.images[0].naturalWidth")
    assert size and size > 0


def test_image_query_by_file_picker(page, server_url) -> None:
    scene = sorted(server_url[1].glob("*.png"))[0]
    page.set_input_files("#file", str(scene))
    playwright_api.expect(page.locator("#chosen-name")).to_have_text(scene.name)
    playwright_api.expect(page.locator("#results article.hit").first).to_be_visible(
        timeout=WAIT_MS)
    _wait_for_thumbnails(page, 2)
    assert _loaded_thumbnails(page) >= 2


def test_similar_shows_the_file_name(page) -> None:
    expect = playwright_api.expect
    page.fill("#q", "a green triangle")
    page.keyboard.press("Enter")
    first = page.locator("#results article.hit.image").first
    first.wait_for(timeout=WAIT_MS)
    path = first.locator(".name").get_attribute("title")
    first.locator("button.similar").click()
    expect(page.locator("#chosen-name")).to_have_text(Path(path).name)
    expect(page.locator("#chosen-name")).to_have_attribute("title", path)
    expect(page.locator("#results article.hit.image").first).to_be_visible(timeout=WAIT_MS)


def test_example_queries_from_the_captions(page, server_url) -> None:
    expect = playwright_api.expect
    chips = page.locator("#examples button.example")
    expect(chips.first).to_be_visible(timeout=WAIT_MS)
    texts = chips.all_inner_texts()
    captions = {json.loads(line)["caption"] for line in
                (server_url[1] / "captions.jsonl").read_text().splitlines()}
    assert 1 <= len(texts) <= 5 and set(texts) <= captions
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "landing.png"))
    chips.first.click()
    expect(page.locator("#q")).to_have_value(texts[0])
    expect(page.locator("#results article.hit").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#examples")).to_be_hidden()


def test_the_page_has_an_icon(page, server_url) -> None:
    href = page.locator('link[rel="icon"]').get_attribute("href")
    for path in (href, "/favicon.ico"):
        response = page.request.get(server_url[0] + path)
        assert response.ok and response.headers["content-type"].startswith("image/svg+xml")


@pytest.mark.parametrize(("path", "rendered"), [
    ("/docs", ".opblock-summary-path[data-path='/api/search']"),
    ("/redoc", "h1:has-text('clipdex')"),
])
def test_api_docs_render_offline(browser, server_url, path: str, rendered: str) -> None:
    """Swagger UI and ReDoc render with every request to another host refused.

    The pages' Content-Security-Policy stops what they would still ask of another host (ReDoc's
    Redocly logo) before it is a request; a CDN script would be stopped too, and not render.
    """
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    refused: list[str] = []
    errors: list[str] = []

    def only_this_server(route) -> None:
        url = route.request.url
        if url.startswith(server_url[0] + "/") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()
    page.route("**/*", only_this_server)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server_url[0] + path)
        playwright_api.expect(page.locator(rendered).first).to_be_visible(timeout=WAIT_MS)
        if path == "/redoc":  # and an operation, not only the title
            playwright_api.expect(page.get_by_text("Search by text (query string)").first
                                  ).to_be_attached(timeout=WAIT_MS)
        if SCREENSHOTS:
            page.screenshot(path=str(SCREENSHOTS / f"{path.strip('/')}.png"))
    finally:
        context.close()
    assert not refused, refused  # nothing was needed from another host
    assert not errors, errors


def _phone(browser):
    """A browser context and page the size of a phone (375 × 740, touch)."""
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True,
                                  has_touch=True)
    context.set_default_timeout(WAIT_MS)
    return context, context.new_page()


def test_the_page_at_phone_width(browser, server_url) -> None:
    context, page = _phone(browser)
    try:
        page.goto(server_url[0] + "/")
        expect = playwright_api.expect
        expect(page.locator("#examples button.example").first).to_be_visible(timeout=WAIT_MS)
        page.fill("#q", "a red circle")
        page.keyboard.press("Enter")
        expect(page.locator("#results article.hit.image").first).to_be_visible(timeout=WAIT_MS)
        _wait_for_thumbnails(page, 2)
        wide = page.evaluate("() => document.documentElement.scrollWidth")
        assert wide <= 375, f"the page is {wide}px wide on a 375px screen"
        if SCREENSHOTS:
            page.screenshot(path=str(SCREENSHOTS / "phone.png"))
    finally:
        context.close()


def test_errors_are_shown_on_the_page(page) -> None:
    expect = playwright_api.expect
    page.fill("#q", "   ")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Type a query")
    page.fill("#q", "x" * 2500)  # over the server's text limit: a JSON 422 with a message
    page.keyboard.press("Enter")
    expect(page.locator("#status.error")).to_contain_text("at most 2000", timeout=WAIT_MS)
    page.fill("#q", "a ring")
    page.keyboard.press("Enter")
    expect(page.locator("#results article.hit").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#status")).not_to_have_class("error")


# --- the filter bar: photo metadata (EXIF time, camera, GPS place, format) -------------------
# write_scenes(seed=11) gives its JPEGs EXIF (index.synthetic.scenes.scene_meta); PNGs and every
# seventh JPEG have none and are dated by their file time. Reykjavík has five photos, all Canon
# or iPhone, 2019-2022; 2021 has four, the last on 2021-12-06 (16:29, New York).

def _api_search(page, server_url, body: dict) -> list[dict]:
    response = page.request.post(server_url[0] + "/api/search", data=body)
    assert response.ok, response.text()
    return response.json()["hits"]


def _shown_dates(page) -> list[str]:
    """The capture times under the thumbnails as shown ("2021-06-01 14:03"), "~" dropped."""
    return [t.lstrip("~") for t in page.locator("#results .hit time.taken").all_inner_texts()]


def _hits(page):
    return page.locator("#results article.hit")


def test_the_filter_bar_is_filled_from_the_library(page, server_url) -> None:
    expect = playwright_api.expect
    offered = page.request.get(server_url[0] + "/api/filters").json()
    assert "Canon EOS R5" in offered["cameras"] and "Reykjavík" in offered["places"]
    expect(page.locator("#cameras option")).to_have_count(len(offered["cameras"]))
    cameras = page.eval_on_selector_all("#cameras option", "os => os.map(o => o.value)")
    places = page.eval_on_selector_all("#places option", "os => os.map(o => o.value)")
    types = page.eval_on_selector_all("#type option", "os => os.map(o => o.value)")
    assert cameras == offered["cameras"] and places == offered["places"]
    assert types == ["", *offered["types"]] and {"jpeg", "png"} <= set(types)
    assert page.locator("#type option").first.inner_text() == "any"
    for control in ("#from", "#to", "#camera", "#place", "#type", "#sort"):
        expect(page.locator(control)).to_be_visible()
    expect(page.locator("#camera")).to_have_attribute("list", "cameras")
    assert "including" in page.locator("label:has(#to)").get_attribute("title")
    assert page.eval_on_selector_all("#sort option", "os => os.map(o => o.value)") == [
        "relevance", "-date", "date"]
    expect(page.locator("#clear-filters")).to_be_hidden()  # nothing to clear yet


def test_camera_and_place_are_hidden_without_such_photos(page, server_url) -> None:
    expect = playwright_api.expect
    page.route("**/api/filters", lambda route: route.fulfill(json={
        "cameras": [], "places": [], "types": ["png"], "taken": None, "with_gps": 0}))
    page.reload()
    expect(page.locator("#type option")).to_have_count(2)  # "any" and PNG: the answer was read
    expect(page.locator("#camera")).to_be_hidden()
    expect(page.locator("#place")).to_be_hidden()
    expect(page.locator("#tag")).to_be_hidden()  # no "tags" in the answer: none
    expect(page.locator("#from")).to_be_visible()
    expect(page.locator("#sort")).to_be_visible()


def test_a_camera_filter_with_a_text_query(page, server_url) -> None:
    expect = playwright_api.expect
    wanted = _api_search(page, server_url, {"text": "a red circle", "camera": "canon", "top": 24})
    assert 2 <= len(wanted) < 24  # the filter takes some and leaves some
    page.fill("#q", "a red circle")
    page.fill("#camera", "canon")
    page.keyboard.press("Enter")
    expect(_hits(page)).to_have_count(len(wanted))
    expect(page.locator("#status")).to_contain_text("canon")
    cameras = page.locator("#results .hit .camera").all_inner_texts()
    assert len(cameras) == len(wanted) and all("canon" in c.lower() for c in cameras), cameras
    names = page.locator("#results .hit .name").all_inner_texts()
    assert names == [Path(h["path"]).name for h in wanted]
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and len(scores) == len(wanted)

    page.click("#clear-filters")  # the same query again, unfiltered
    expect(_hits(page)).to_have_count(24)
    expect(page.locator("#camera")).to_have_value("")
    expect(page.locator("#clear-filters")).to_be_hidden()


def test_browse_photos_of_a_place_newest_first(page, server_url) -> None:
    expect = playwright_api.expect
    wanted = _api_search(page, server_url, {"place": "Reykjavik", "top": 24})
    assert len(wanted) == 5 and all(h["score"] is None for h in wanted)
    page.fill("#place", "Reykjavik")  # no accent, no Enter: typing is enough
    expect(_hits(page)).to_have_count(5)
    status = page.locator("#status")
    expect(status).to_contain_text("5 photos taken in Reykjavik")
    expect(status).to_contain_text("newest first")
    assert set(page.locator("#results .hit .place").all_inner_texts()) == {"Reykjavík"}
    dates = _shown_dates(page)
    assert len(dates) == 5 and dates == sorted(dates, reverse=True), dates
    assert dates == [f"{h['meta']['taken_at'][:10]} {h['meta']['taken_at'][11:16]}"
                     for h in wanted]
    text = page.locator("#results").inner_text()
    assert "null" not in text and "NaN" not in text and "undefined" not in text
    expect(page.locator("#results .score")).to_have_count(0)  # listed, not scored
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "browse.png"))

    page.click("#clear-filters")  # no query and no filter: back to the empty page
    expect(_hits(page)).to_have_count(0)
    expect(status).to_contain_text("Type a query")
    expect(page.locator("#place")).to_have_value("")


def test_sort_oldest_first_reruns_a_text_query(page) -> None:
    expect = playwright_api.expect
    page.fill("#q", "a red circle")
    page.keyboard.press("Enter")
    expect(_hits(page)).to_have_count(24)
    by_relevance = _shown_dates(page)
    assert by_relevance != sorted(by_relevance)  # so the sort below is what orders them
    page.select_option("#sort", "date")  # changing the sort re-runs the search by itself
    expect(page.locator("#status")).to_contain_text("oldest first")
    expect(_hits(page)).to_have_count(24)
    dates = _shown_dates(page)
    assert len(dates) == 24 and dates == sorted(dates), dates
    assert sorted(dates) == sorted(by_relevance)  # the same hits, in date order
    page.select_option("#sort", "-date")
    expect(page.locator("#status")).to_contain_text("newest first")
    page.wait_for_function("""() => {
        const t = [...document.querySelectorAll('#results time.taken')].map(e => e.dateTime);
        return t.length === 24 && t[0] > t[23]; }""")
    newest = _shown_dates(page)
    assert newest == sorted(dates, reverse=True)


def test_the_date_range_includes_its_last_day(page, server_url) -> None:
    expect = playwright_api.expect
    # "to" 2021-12-06 is sent as before=2021-12-07: the photo of 2021-12-06 16:29 is in
    wanted = _api_search(page, server_url, {"after": "2021-01-01", "before": "2021-12-07",
                                            "top": 24})
    assert len(wanted) == 4 and wanted[0]["meta"]["taken_at"].startswith("2021-12-06")
    page.fill("#from", "2021-01-01")
    page.fill("#to", "2021-12-06")
    expect(_hits(page)).to_have_count(4)
    expect(page.locator("#status")).to_contain_text("from 2021-01-01 to 2021-12-06")
    dates = _shown_dates(page)
    assert all("2021-01-01" <= d[:10] <= "2021-12-06" for d in dates), dates
    assert dates[0].startswith("2021-12-06")  # the last day itself, inclusive

    text_wanted = _api_search(page, server_url, {"text": "a ring", "after": "2021-01-01",
                                                 "before": "2021-12-07", "top": 24})
    page.fill("#q", "a ring")  # the range holds for a text query too
    page.keyboard.press("Enter")
    expect(page.locator("#results .score")).to_have_count(len(text_wanted))
    dates = _shown_dates(page)
    assert len(dates) == len(text_wanted) and all("2021-01-01" <= d[:10] <= "2021-12-06"
                                                  for d in dates), dates

    page.fill("#from", "2022-01-01")  # after "to": said so, nothing asked of the server
    expect(page.locator("#status.error")).to_contain_text("date range is empty")


def test_filters_hold_for_image_and_caption_queries(page, server_url) -> None:
    expect = playwright_api.expect
    page.select_option("#type", "jpeg")
    page.fill("#place", "Paris")
    expect(_hits(page)).to_have_count(3)  # browsing meanwhile: the three Paris photos
    scene = sorted(server_url[1].glob("*.png"))[0]
    page.set_input_files("#file", str(scene))
    expect(page.locator("#chosen-name")).to_have_text(scene.name)
    expect(page.locator("#results .score")).to_have_count(3)  # an image query, filtered
    assert set(page.locator("#results .hit .place").all_inner_texts()) == {"Paris"}
    first = page.locator("#results article.hit.image").first
    like = int(first.locator("a.thumb-link").get_attribute("href").rsplit("/", 1)[1])
    wanted = _api_search(page, server_url, {"image_id": like, "type": "jpeg", "place": "Paris",
                                            "top": 24})
    assert wanted and like not in [h["id"] for h in wanted]  # the image itself is left out
    first.locator("button.similar").click()  # "similar": filtered as well
    expect(page.locator("#chosen-name")).not_to_have_text(scene.name)
    expect(page.locator(f"#results a.thumb-link[href='/api/images/{like}']")).to_have_count(0)
    expect(page.locator("#results .score")).to_have_count(len(wanted))  # its answer, shown
    assert set(page.locator("#results .hit .place").all_inner_texts()) == {"Paris"}

    page.click("#clear-image")
    page.fill("#place", "")
    page.fill("#q", "a red circle")
    page.fill("#camera", "canon")
    page.click("label[for=target-captions]")
    wanted = _api_search(page, server_url, {"text": "a red circle", "camera": "canon",
                                            "type": "jpeg", "target": "captions", "top": 24})
    expect(page.locator("#results article.hit.caption")).to_have_count(len(wanted))
    cameras = page.locator("#results .hit.caption .camera").all_inner_texts()
    assert len(cameras) == len(wanted) and all("Canon" in c for c in cameras)
    expect(page.locator("#status")).to_contain_text("captions of photos shot with “canon”")


def test_dates_cameras_and_places_under_the_thumbnails(page, server_url) -> None:
    expect = playwright_api.expect
    page.fill("#q", "a red circle")
    page.keyboard.press("Enter")
    expect(_hits(page)).to_have_count(24)
    taken = page.locator("#results .hit.image time.taken")
    expect(taken).to_have_count(24)  # every photo has a date: EXIF, or else its file time
    for i in range(24):
        expect(taken.nth(i)).to_be_visible()
    card = page.locator("#results article.hit.image", has=page.locator(
        ".name", has_text="scene_00022.jpg"))
    expect(card.locator("time.taken")).to_have_text("2019-03-02 07:52")
    expect(card.locator(".camera")).to_have_text("Canon EOS R5")
    expect(card.locator(".place")).to_have_text("Reykjavík")
    expect(card.locator(".place")).to_have_attribute("title", "Reykjavík, Capital Region, Iceland")
    png = page.locator("#results article.hit.image", has=page.locator(
        ".name", has_text="scene_00002.png"))
    expect(png.locator("time.taken")).to_have_text(re.compile(r"^~\d{4}-\d\d-\d\d \d\d:\d\d$"))
    expect(png.locator("time.taken")).to_have_attribute("title", re.compile("file time, no camera"))
    expect(png.locator(".camera")).to_have_count(0)
    box = card.locator("time.taken").bounding_box()
    thumb = card.locator("img.thumb").bounding_box()
    assert box["y"] >= thumb["y"] + thumb["height"] - 1  # under the thumbnail, inside the card
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "dates.png"))


def test_filter_errors_are_shown_on_the_page(page) -> None:
    expect = playwright_api.expect
    page.fill("#q", "a ring")
    page.fill("#camera", "x" * 2500)  # over the server's limit: its 422 names the field
    page.keyboard.press("Enter")
    expect(page.locator("#status.error")).to_contain_text("camera")
    expect(_hits(page)).to_have_count(0)
    page.fill("#camera", "Nikon")
    page.keyboard.press("Enter")
    expect(page.locator("#results article.hit").first).to_be_visible()
    expect(page.locator("#status")).not_to_have_class("error")


# --- tags (zero-shot, `clipdex tag`) ----------------------------------------------------------
# tagged_url: 12 scenes (seed=5) and three copies, tagged with the built-in scene vocabulary
# (a shape and a colour per image, best first); server_url's library has no tags.

def _shown_tags(card) -> list[str]:
    return card.locator(".tags button.tag").all_inner_texts()


def _best_labels(hit: dict, most: int = 3) -> list[str]:
    """The labels the page shows for a hit: best score first, at most `most`."""
    return [t["label"] for t in sorted(hit["meta"]["tags"], key=lambda t: -t["score"])][:most]


def test_the_tag_filter_is_hidden_without_tags(page, server_url) -> None:
    expect = playwright_api.expect
    offered = page.request.get(server_url[0] + "/api/filters").json()
    assert offered["tags"] == []
    expect(page.locator("#type option")).to_have_count(1 + len(offered["types"]))  # loaded
    expect(page.locator("#tag")).to_be_hidden()
    expect(page.locator("#camera")).to_be_visible()
    page.fill("#q", "a red circle")
    page.keyboard.press("Enter")
    expect(_hits(page)).to_have_count(24)
    expect(page.locator("#results .hit .tags")).to_have_count(0)


def test_the_tag_filter_is_filled_and_filters(tagged_page, tagged_url) -> None:
    expect = playwright_api.expect
    page = tagged_page
    offered = page.request.get(tagged_url[0] + "/api/filters").json()
    assert len(offered["tags"]) >= 4
    expect(page.locator("#tag option")).to_have_count(1 + len(offered["tags"]))
    expect(page.locator("#tag")).to_be_visible()
    values = page.eval_on_selector_all("#tag option", "os => os.map(o => o.value)")
    assert values == ["", *offered["tags"]]
    assert page.locator("#tag option").first.inner_text() == "any"

    # the most common tag whose photos are of both formats, so that a type filter takes some
    listed = {t: _api_search(page, tagged_url, {"tag": t, "top": 24}) for t in offered["tags"]}
    tag = next(t for t, hits in listed.items()
               if {h["meta"]["format"] for h in hits} == {"jpeg", "png"})
    wanted = listed[tag]
    assert 2 <= len(wanted) < 15  # some images, not all
    assert all(tag in [t["label"] for t in h["meta"]["tags"]] for h in wanted)
    page.select_option("#tag", tag)  # no query: the photos with that tag are listed
    expect(_hits(page)).to_have_count(len(wanted))
    expect(page.locator("#status")).to_contain_text(f"tagged “{tag}”")
    names = page.locator("#results .hit .name").all_inner_texts()
    assert names == [Path(h["path"]).name for h in wanted]
    expect(page.locator("#clear-filters")).to_be_visible()

    wanted = _api_search(page, tagged_url, {"text": "a red circle", "tag": tag, "top": 24})
    page.fill("#q", "a red circle")  # with a text query: the same images, ranked
    page.keyboard.press("Enter")
    expect(page.locator("#results .score")).to_have_count(len(wanted))
    names = page.locator("#results .hit .name").all_inner_texts()
    assert names == [Path(h["path"]).name for h in wanted]

    wanted = _api_search(page, tagged_url, {"text": "a red circle", "tag": tag, "type": "png",
                                            "top": 24})
    assert 1 <= len(wanted) < len(names)  # combined with another filter: both hold
    page.select_option("#type", "png")
    expect(page.locator("#results .score")).to_have_count(len(wanted))
    names = page.locator("#results .hit .name").all_inner_texts()
    assert names == [Path(h["path"]).name for h in wanted]

    page.click("#clear-filters")
    expect(page.locator("#tag")).to_have_value("")
    expect(_hits(page)).to_have_count(15)


def test_tags_under_the_thumbnails(tagged_page, tagged_url) -> None:
    expect = playwright_api.expect
    page = tagged_page
    wanted = _api_search(page, tagged_url, {"text": "a blue star", "top": 24})
    assert len(wanted) == 15 and all(h["meta"]["tags"] for h in wanted)
    page.fill("#q", "a blue star")
    page.keyboard.press("Enter")
    cards = page.locator("#results article.hit.image")
    expect(cards).to_have_count(15)
    expect(page.locator("#results .hit .tags")).to_have_count(15)
    for i, hit in enumerate(wanted):
        card = cards.nth(i)
        expect(card.locator(".name")).to_have_text(Path(hit["path"]).name)
        assert _shown_tags(card) == _best_labels(hit), (hit["path"], hit["meta"]["tags"])
    first = cards.first
    box = first.locator(".tags").bounding_box()
    thumb = first.locator("img.thumb").bounding_box()
    assert box["y"] >= thumb["y"] + thumb["height"] - 1  # under the thumbnail, inside the card
    expect(first.locator("time.taken")).to_be_visible()  # with the date line, as before
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "tags.png"))

    label = _shown_tags(first)[0]  # a click on a tag filters by it
    first.locator(".tags button.tag").first.click()
    expect(page.locator("#tag")).to_have_value(label)
    wanted = _api_search(page, tagged_url, {"text": "a blue star", "tag": label, "top": 24})
    expect(page.locator("#status")).to_contain_text(f"tagged “{label}”")
    expect(page.locator("#results .score")).to_have_count(len(wanted))
    names = page.locator("#results .hit .name").all_inner_texts()
    assert names == [Path(h["path"]).name for h in wanted]


# --- the duplicates view (GET /api/duplicates) ------------------------------------------------

def _api_duplicates(page, url: str, threshold: float | None = None) -> list[dict]:
    query = "" if threshold is None else f"?threshold={threshold}"
    response = page.request.get(url + "/api/duplicates" + query)
    assert response.ok, response.text()
    return response.json()["groups"]


def _shown_groups(page):
    return page.locator("#groups > li.group")


def _check_groups(page, wanted: list[dict]) -> None:
    """The page's groups are the API's: same groups, same copies, best first, cosines."""
    expect = playwright_api.expect
    groups = _shown_groups(page)
    expect(groups).to_have_count(len(wanted))
    for i, group in enumerate(wanted):
        row = groups.nth(i)
        copies = [group["best"], *group["others"]]
        expect(row.locator("li.copy")).to_have_count(len(copies))
        names = row.locator("li.copy .name").all_inner_texts()
        assert names == [Path(c["path"]).name for c in copies]
        paths = row.locator("li.copy .name").evaluate_all("ns => ns.map(n => n.title)")
        assert paths == [c["path"] for c in copies]
        best = row.locator("li.copy").first
        expect(best).to_have_class(re.compile(r"\bbest\b"))
        expect(best.locator(".mark")).to_have_text("best")
        expect(row.locator("li.copy.best")).to_have_count(1)
        marks = row.locator("li.copy .mark.cosine").all_inner_texts()
        assert len(marks) == len(group["others"])
        for shown, copy in zip(marks, group["others"]):
            assert abs(float(shown) - copy["cosine"]) <= 0.0006, (shown, copy)
        sizes = row.locator("li.copy .size").all_inner_texts()
        assert sizes == [f"{c['width']}×{c['height']}" for c in copies]


def test_the_duplicates_view_lists_the_groups(tagged_page, tagged_url) -> None:
    expect = playwright_api.expect
    page = tagged_page
    url = tagged_url[0]
    wanted = _api_duplicates(page, url)
    assert len(wanted) == 3  # the three copies, each with its original
    expect(page.locator("#dupes")).to_be_hidden()  # the search view is the default
    page.get_by_role("link", name="Duplicates").click()
    expect(page.locator("#dupes")).to_be_visible()
    expect(page.locator("#search")).to_be_hidden()
    expect(page.locator("#view-duplicates")).to_have_attribute("aria-current", "page")
    expect(page.locator("#threshold")).to_have_value("0.96")  # the API's default, shown
    _check_groups(page, wanted)
    expect(page.locator("#status")).to_contain_text("3 groups")
    expect(page.locator("#status")).not_to_have_class("error")
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('#groups img.thumb')];
        return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")
    expect(page.locator("#copy-others")).to_be_visible()
    expect(page.get_by_label("Threshold")).to_be_visible()  # the input has its label
    assert page.url.endswith("#duplicates")
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "duplicates.png"))

    counts = [len(wanted)]
    for threshold in ("0.995", "1"):  # stricter: fewer groups, as the API says
        wanted = _api_duplicates(page, url, float(threshold))
        page.fill("#threshold", threshold)
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_contain_text(f"cosine ≥ {float(threshold):g}")
        _check_groups(page, wanted)
        counts.append(len(wanted))
    assert counts[0] > counts[-1] >= 1, counts  # the exact copy is still a copy at 1.0

    page.get_by_role("link", name="Search").click()  # back: the search view as it was
    expect(page.locator("#search")).to_be_visible()
    expect(page.locator("#dupes")).to_be_hidden()
    expect(_shown_groups(page).first).to_be_hidden()
    page.fill("#q", "a red circle")
    page.keyboard.press("Enter")
    expect(_hits(page)).to_have_count(15)


def test_duplicates_threshold_errors_are_shown(tagged_page, tagged_url) -> None:
    expect = playwright_api.expect
    page = tagged_page
    url = tagged_url[0]
    page.goto(url + "/#duplicates")
    expect(_shown_groups(page)).to_have_count(3)
    for bad in ("1.5", "0", "-0.2"):
        assert page.request.get(url + f"/api/duplicates?threshold={bad}").status == 422
        page.fill("#threshold", bad)
        page.keyboard.press("Enter")
        expect(page.locator("#status.error")).to_contain_text("threshold")
        expect(_shown_groups(page)).to_have_count(0)
        expect(page.locator("#copy-others")).to_be_hidden()
    page.fill("#threshold", "0.96")
    page.click("#find-dupes")
    expect(_shown_groups(page)).to_have_count(3)
    expect(page.locator("#status")).not_to_have_class("error")

    empty = tagged_url[1] / "empty"  # a folder with no images: no groups below it
    empty.mkdir(exist_ok=True)
    page.fill("#dupes-under", str(empty))
    page.keyboard.press("Enter")
    expect(page.locator("#no-dupes")).to_contain_text(f"below {empty}")
    expect(_shown_groups(page)).to_have_count(0)
    page.fill("#dupes-under", str(empty / "missing"))  # no such folder: the API says so
    page.keyboard.press("Enter")
    expect(page.locator("#status.error")).to_contain_text("no such folder")
    expect(page.locator("#no-dupes")).to_be_hidden()
    page.fill("#dupes-under", str(tagged_url[1]))
    page.keyboard.press("Enter")
    expect(_shown_groups(page)).to_have_count(3)

    page.get_by_role("link", name="Search").click()  # a search error stays in its own view
    page.fill("#q", "x" * 2500)
    page.keyboard.press("Enter")
    expect(page.locator("#status.error")).to_contain_text("at most 2000")
    page.get_by_role("link", name="Duplicates").click()
    expect(_shown_groups(page)).to_have_count(3)
    expect(page.locator("#status")).not_to_have_class("error")


def test_no_duplicates_says_so(page, server_url) -> None:
    expect = playwright_api.expect
    assert _api_duplicates(page, server_url[0]) == []  # 24 distinct scenes
    page.get_by_role("link", name="Duplicates").click()
    expect(page.locator("#no-dupes")).to_be_visible()
    expect(page.locator("#no-dupes")).to_contain_text("No near-duplicate images")
    expect(page.locator("#status")).to_contain_text("No duplicates at cosine ≥ 0.96")
    expect(page.locator("#status")).not_to_have_class("error")
    expect(_shown_groups(page)).to_have_count(0)
    expect(page.locator("#copy-others")).to_be_hidden()
    text = page.locator("body").inner_text()
    assert "undefined" not in text and "NaN" not in text and "null" not in text


def test_copy_paths_of_the_other_copies(tagged_page, tagged_url) -> None:
    expect = playwright_api.expect
    page = tagged_page
    page.goto(tagged_url[0] + "/#duplicates")
    # the clipboard as the page sees it, kept where the test can read it
    page.evaluate("""() => Object.defineProperty(navigator, "clipboard", { value: {
        writeText: async (text) => { window.copiedText = text; } } })""")
    expect(_shown_groups(page)).to_have_count(3)
    page.get_by_role("button", name="copy paths of the other copies").click()
    expect(page.locator("#status")).to_contain_text("Copied the paths of 3 copies")
    wanted = _api_duplicates(page, tagged_url[0])
    copied = page.evaluate("() => window.copiedText")
    assert copied.splitlines() == [c["path"] for g in wanted for c in g["others"]]
    assert all(g["best"]["path"] not in copied.splitlines() for g in wanted)


def test_duplicates_at_phone_width(browser, tagged_url) -> None:
    context, page = _phone(browser)
    try:
        page.goto(tagged_url[0] + "/#duplicates")  # the view has an address of its own
        expect = playwright_api.expect
        expect(page.locator("#view-duplicates")).to_have_attribute("aria-current", "page")
        expect(_shown_groups(page)).to_have_count(3)
        page.wait_for_function("""() => [...document.querySelectorAll('#groups img.thumb')]
                                  .filter(i => i.complete && i.naturalWidth > 0).length >= 2""")
        expect(page.locator("#threshold")).to_be_visible()
        wide = page.evaluate("() => document.documentElement.scrollWidth")
        assert wide <= 375, f"the duplicates view is {wide}px wide on a 375px screen"
        if SCREENSHOTS:
            page.screenshot(path=str(SCREENSHOTS / "duplicates-phone.png"), full_page=True)
    finally:
        context.close()
