"""The built site in a real browser: Debian's chromium, headless, driven by Playwright.

`make test-browser` builds the site, installs chromium if needed and runs this.
The site is served on 127.0.0.1 by a server started here. On every page:

- no console errors and no uncaught exceptions;
- no failed request (network error or HTTP status >= 400);
- no request leaves 127.0.0.1 (such requests are blocked and reported);
- the maths is typeset by the site's own MathJax, with no MathJax errors;
- every image has loaded;
- stored widgets render (the site's own widget manager draws each view);
- a kernel-free ``to_jshtml`` slider answers a click on "Next frame".

Set BOOK_SCREENSHOTS=some/folder to also save a full-page screenshot of each page.
Playwright drives /usr/bin/chromium (never `playwright install`, which downloads a browser).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.book



def test_site_is_built():
    # Collected by `make test-kqv` too (and deselected there), so a missing site must not
    # break collection: the pages below are simply empty, and this test says why.
    assert (SITE / "index.html").is_file(), f"no built site in {SITE}: run `make book` (or `make test-browser`)"


PAGES = sorted(
    p.relative_to(SITE).as_posix()
    for p in SITE.rglob("*.html")
    if not p.relative_to(SITE).parts[0].startswith("_")
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture(scope="module")
def base_url():
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs Debian's package", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class PageRecord:
    """What happened while a page loaded."""

    def __init__(self) -> None:
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.outside: list[str] = []


def _open(browser, base_url: str, path: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    record = PageRecord()

    def route(route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1":
            route.continue_()
        else:
            record.outside.append(url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda m: record.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: record.console_errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: record.failed.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: record.failed.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)
    page.goto(f"{base_url}/{path}", wait_until="load")
    if 'http-equiv="Refresh"' in (SITE / path).read_text(encoding="utf-8"):  # index.html forwards to the preface
        page.wait_for_url(lambda url: not url.endswith("/" + path))
        page.wait_for_load_state("load")
    return context, page, record


def _check_maths(page) -> None:
    has_maths = page.evaluate("() => document.querySelectorAll('.math').length > 0")
    if not has_maths:
        return
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    page.evaluate("() => MathJax.startup.promise")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.math')).every(e => e.querySelector('mjx-container'))"
    )
    errors = page.evaluate(
        "() => Array.from(document.querySelectorAll('mjx-merror, [data-mjx-error]'))"
        ".map(e => e.getAttribute('data-mjx-error') || e.textContent)"
    )
    assert not errors, f"MathJax errors: {errors}"


def _check_widgets(page) -> None:
    views = page.evaluate(
        "() => document.querySelectorAll('script[type=\"application/vnd.jupyter.widget-view+json\"]').length"
    )
    if not views:
        return
    page.wait_for_function(
        f"() => document.querySelectorAll('.widget-subarea .jupyter-widgets').length >= {views}"
    )
    # Each stored view drew something: controls, and the first drawing in its output area.
    empty = page.evaluate(
        "() => Array.from(document.querySelectorAll('.widget-subarea'))"
        ".filter(e => e.getBoundingClientRect().height < 10).length"
    )
    assert empty == 0, f"{empty} of {views} widget views rendered empty"


def _check_images(page) -> None:
    page.evaluate("() => document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
    broken = page.evaluate(
        "() => Array.from(document.images).filter(i => !i.naturalWidth).map(i => (i.src || '').slice(0, 80))"
    )
    assert not broken, f"images that did not load: {broken}"


def _check_jshtml_sliders(page) -> int:
    animations = page.locator("div.animation")
    for i in range(animations.count()):
        animation = animations.nth(i)
        animation.scroll_into_view_if_needed()
        image, slider = animation.locator("img").first, animation.locator("input.anim-slider")
        page.wait_for_function("img => img.src.startsWith('data:')", arg=image.element_handle())
        before_src, before_value = image.get_attribute("src"), slider.input_value()
        animation.locator("button[title='Next frame']").click()
        after_value = slider.input_value()
        assert int(after_value) == int(before_value) + 1, f"slider {i}: frame {before_value} -> {after_value}"
        assert image.get_attribute("src") != before_src, f"slider {i}: the picture did not change"
    return animations.count()


@pytest.mark.parametrize("path", PAGES)
def test_page_in_a_real_browser(browser, base_url, path):
    context, page, record = _open(browser, base_url, path)
    try:
        _check_maths(page)
        _check_widgets(page)
        _check_images(page)
        _check_jshtml_sliders(page)
        page.wait_for_load_state("networkidle")
        if os.environ.get("BOOK_SCREENSHOTS"):
            folder = Path(os.environ["BOOK_SCREENSHOTS"])
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(folder / (path.replace("/", "__") + ".png")), full_page=True)
    finally:
        context.close()
    assert not record.outside, f"requests that left 127.0.0.1: {record.outside}"
    assert not record.failed, f"failed requests: {record.failed}"
    assert not record.console_errors, f"console errors: {record.console_errors}"


def test_the_book_has_a_kernel_free_slider_and_widgets(browser, base_url):
    """At least one page carries each kind of interactive figure, so the checks above ran."""
    pages = [p for p in PAGES if "/chapters/" in p]
    found_slider = found_widget = False
    for path in pages:
        text = (SITE / path).read_text(encoding="utf-8")
        found_slider |= 'class="animation"' in text
        found_widget |= "application/vnd.jupyter.widget-view+json" in text
    assert found_slider, "no to_jshtml slider on any chapter page"
    assert found_widget, "no stored widget on any chapter page"
