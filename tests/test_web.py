"""The web page end to end, in Debian's headless Chromium driven by Playwright.

Playwright's own browser downloads are never used: the test drives /usr/bin/chromium (CI
installs it, see .ci/run) and is skipped with a reason where it is missing.
"""

from __future__ import annotations

import json
import os
import socket
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

from index import Library  # noqa: E402
from index.synthetic.scenes import write_scenes  # noqa: E402
from retrieval import Searcher  # noqa: E402
from retrieval.server import create_app  # noqa: E402

SCREENSHOTS = Path(os.environ.get("CLIPDEX_SCREENSHOTS", "")) if os.environ.get(
    "CLIPDEX_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory):
    """A real uvicorn server on 127.0.0.1 (random port) over 24 indexed, captioned scenes."""
    import uvicorn

    root = tmp_path_factory.mktemp("web")
    write_scenes(root / "scenes", 24, seed=11)
    with Library.open(root / "home") as lib:
        lib.index([root / "scenes"], model="tiny")
        lib.add_captions(root / "scenes" / "captions.jsonl")
    searcher = Searcher.open(root / "home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", root / "scenes"
    server.should_exit = True
    thread.join(timeout=10)
    searcher.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    playwright_api.expect.set_options(timeout=WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server_url[0] + "/")
    yield page
    context.close()
    assert not errors, errors  # no JavaScript exceptions on the page


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


def test_the_page_at_phone_width(browser, server_url) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True,
                                  has_touch=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
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
