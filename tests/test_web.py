"""The web page end to end, in Debian's headless Chromium driven by Playwright.

Playwright's own browser downloads are never used: the test drives /usr/bin/chromium (CI
installs it, see .ci/run) and is skipped with a reason where it is missing.
"""

from __future__ import annotations

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
