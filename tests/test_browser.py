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
import re
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


def _open(browser, base_url: str, path: str, *, width: int = 1280, mode: str | None = None):
    context = browser.new_context(viewport={"width": width, "height": 900}, color_scheme=mode or "light")
    if mode:
        context.add_init_script(f"localStorage.setItem('mode', '{mode}'); localStorage.setItem('theme', '{mode}');")
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


def _check_explorers(page) -> int:
    """Every explorer (kqv.explore) came to life, and every one of its controls changes its picture."""
    roots = page.locator(".kqv-explorer")
    for i in range(roots.count()):
        root = roots.nth(i)
        root.scroll_into_view_if_needed()
        page.wait_for_function("r => r.dataset.kqvMounted === '1'", arg=root.element_handle())
        if root.get_attribute("data-kqv") != "frames":
            continue  # components that compute in the page have their own tests below
        controls = root.locator(".kqv-controls input, .kqv-controls select")
        assert controls.count(), f"explorer {i} has no controls"
        for k in range(controls.count()):
            control = controls.nth(k)
            before = root.get_attribute("data-frame")
            kind = control.evaluate("e => e.tagName + ':' + (e.type || '')")
            if kind == "INPUT:checkbox":
                control.click()
            elif kind == "INPUT:range":
                top = int(control.get_attribute("max"))
                value = int(control.input_value())
                control.fill(str(top if value != top else 0))
            else:  # a drop-down
                options = control.locator("option")
                value = control.input_value()
                other = next(options.nth(o).get_attribute("value") for o in range(options.count())
                             if options.nth(o).get_attribute("value") != value)
                control.select_option(other)
            after = root.get_attribute("data-frame")
            assert after != before, f"explorer {i}: control {k} ({kind}) did not change the picture"
        assert root.locator(".kqv-figure svg").count() == 1, f"explorer {i} shows no picture"
    return roots.count()


def _check_images(page) -> None:
    page.evaluate("() => document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
    broken = page.evaluate(
        "() => Array.from(document.images).filter(i => !i.naturalWidth).map(i => (i.src || '').slice(0, 80))"
    )
    assert not broken, f"images that did not load: {broken}"


@pytest.mark.parametrize("path", PAGES)
def test_page_in_a_real_browser(browser, base_url, path):
    context, page, record = _open(browser, base_url, path)
    try:
        _check_maths(page)
        _check_images(page)
        _check_explorers(page)
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


def test_the_book_has_explorers_that_work_in_the_page():
    """At least one page carries an explorer, so the checks above ran."""
    pages = [p for p in PAGES if "/chapters/" in p]
    assert any('class="kqv-explorer"' in (SITE / p).read_text(encoding="utf-8") for p in pages), \
        "no explorer (kqv.explore) on any chapter page"


# --- the site as a reader sees it, on any screen ---------------------------------------------------

CHAPTER_PAGES = [p for p in PAGES if p.startswith("book/chapters/")]
WIDTHS = (390, 820, 1024, 1400)
PHONE, DESKTOP = 390, 1400


def _sidebar_shown(page) -> bool:
    return page.evaluate(
        """() => { const s = document.querySelector('#pst-primary-sidebar, .bd-sidebar-primary');
                   const r = s.getBoundingClientRect();
                   return getComputedStyle(s).visibility !== 'hidden' && r.width > 50 && r.right > 50 && r.left >= -1; }"""
    )


def _toc_shown(page) -> bool:
    return page.evaluate(
        """() => { const s = document.querySelector('.bd-sidebar-secondary');
                   if (!s) return false;
                   const r = s.getBoundingClientRect();
                   return getComputedStyle(s).visibility !== 'hidden' && getComputedStyle(s).display !== 'none'
                          && r.width > 50 && r.left < window.innerWidth && r.right > 0; }"""
    )


@pytest.mark.parametrize("mode", ["light", "dark"])
@pytest.mark.parametrize("width", WIDTHS)
def test_navigation_buttons_work_at_every_width(browser, base_url, width, mode):
    """The visible menu and contents buttons open and close the chapter list and the page's contents."""
    context, page, record = _open(browser, base_url, "book/chapters/04_kv_cache.html", width=width, mode=mode)
    try:
        search = page.locator(".search-button-field:visible, .search-button:visible")
        assert search.count() == 1, f"{search.count()} search boxes at {width} px"
        menu = page.locator(".primary-toggle:visible")
        assert menu.count() == 1, f"{menu.count()} visible menu buttons at {width} px"
        before = _sidebar_shown(page)
        menu.click()
        page.wait_for_timeout(600)
        assert _sidebar_shown(page) != before, f"the menu button did nothing at {width} px"
        if _sidebar_shown(page) and not before:  # a drawer over the page: close it again
            page.keyboard.press("Escape")
            page.mouse.click(width - 5, 450)
            page.wait_for_timeout(600)
            assert not _sidebar_shown(page), f"the chapter list does not close at {width} px"
        contents = page.locator(".secondary-toggle:visible")
        if contents.count():
            page.reload(wait_until="load")
            before = _toc_shown(page)
            page.locator(".secondary-toggle:visible").first.click()
            page.wait_for_timeout(600)
            assert _toc_shown(page) != before, f"the contents button did nothing at {width} px"
        else:
            assert width >= 1200 and _toc_shown(page), f"no way to see the page's contents at {width} px"
    finally:
        context.close()
    assert not record.console_errors, record.console_errors


def _small_text_px(page) -> float:
    """The page's small print (<small> in the article), the least any figure's text may show."""
    return page.evaluate(
        """() => { const s = document.createElement('small'); s.textContent = 'x';
                   document.querySelector('article').appendChild(s);
                   const px = parseFloat(getComputedStyle(s).fontSize); s.remove(); return px; }"""
    )


FIGURE_TEXT = """() => Array.from(document.querySelectorAll('.kqv-svg svg, .kqv-explorer .kqv-figure svg'))
  .filter(svg => svg.getBoundingClientRect().width > 0)
  .map(svg => {
    const box = svg.viewBox.baseVal, scale = svg.getBoundingClientRect().width / box.width;
    const sizes = Array.from(svg.querySelectorAll('text, tspan'))
      .filter(t => !(t.getAttribute('style') || '').includes('STIXSize'))
      .map(t => parseFloat(getComputedStyle(t).fontSize)).filter(x => x > 0);
    return {label: svg.getAttribute('aria-label') || '', smallest: Math.min(...sizes) * scale};
  })"""


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
@pytest.mark.parametrize("path", CHAPTER_PAGES)
def test_figures_are_sharp_and_legible(browser, base_url, path, width):
    """Figures are SVG (or raster at 1.5x their displayed width) and their text, as shown, is no smaller
    than the page's small print; nothing makes the page wider than the screen."""
    context, page, _ = _open(browser, base_url, path, width=width)
    try:
        page.evaluate("() => document.querySelectorAll('.kqv-explorer').forEach(e => e.scrollIntoView())")
        page.wait_for_timeout(300)
        small = _small_text_px(page)
        for figure in page.evaluate(FIGURE_TEXT):
            assert figure["smallest"] >= small - 0.05, (
                f"{path} at {width} px: text of {figure['smallest']:.1f} px (small print is {small:.1f} px) "
                f"in the figure '{figure['label'][:80]}'"
            )
        blurry = page.evaluate(
            """() => Array.from(document.querySelectorAll('article img'))
                 .filter(i => i.getBoundingClientRect().width > 40 && !/\\.svg|image\\/svg/.test(i.src)
                              && i.naturalWidth < 1.5 * i.getBoundingClientRect().width)
                 .map(i => i.src.slice(0, 80))"""
        )
        assert not blurry, f"{path}: raster images below 1.5x their displayed width: {blurry}"
        wide = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 1, f"{path} at {width} px: the page is {wide} px wider than the screen"
    finally:
        context.close()


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
@pytest.mark.parametrize("path", CHAPTER_PAGES)
def test_dark_mode_figures_follow_the_theme(browser, base_url, path, width):
    """In dark mode, on a phone and a desktop: figure text is light and unfiltered, explorers sit on a dark
    background, every explorer's control still changes its picture, and nothing is wider than the screen."""
    context, page, record = _open(browser, base_url, path, width=width, mode="dark")
    try:
        assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
        colours = page.evaluate(
            """() => Array.from(document.querySelectorAll('.kqv-svg svg text')).slice(0, 40)
                 .filter(t => !(t.getAttribute('style') || '').includes('fill:'))
                 .map(t => getComputedStyle(t).fill)"""
        )
        assert colours, f"{path}: no figure text found"
        for colour in colours:
            r, g, b = (int(x) for x in re.findall(r"\d+", colour)[:3])
            assert 0.2126 * r + 0.7152 * g + 0.0722 * b > 140, f"{path}: dark figure text {colour} on a dark page"
        filters = page.evaluate("() => Array.from(document.querySelectorAll('.kqv-svg svg')).map(s => getComputedStyle(s).filter)")
        assert set(filters) <= {"none"}, f"{path}: figures are filtered in dark mode: {set(filters)}"
        # An explorer draws its figure text in the page's (light) text colour: nothing behind it may be light.
        panels = page.evaluate(
            """() => Array.from(document.querySelectorAll('.kqv-explorer')).map(e => {
                 const backgrounds = [];
                 for (let n = e; n && n !== document.body; n = n.parentElement) {
                   backgrounds.push(getComputedStyle(n).backgroundColor);
                 }
                 return backgrounds;
               })"""
        )
        for backgrounds in panels:
            for colour in backgrounds:
                channels = [float(x) for x in re.findall(r"[\d.]+", colour)]
                r, g, b = channels[:3]
                alpha = channels[3] if len(channels) > 3 else 1.0
                assert alpha == 0 or 0.2126 * r + 0.7152 * g + 0.0722 * b < 100, (
                    f"{path}: an explorer sits on a light background {colour} in dark mode: its text is unreadable"
                )
        _check_explorers(page)
        wide = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 1, f"{path} at {width} px in dark mode: the page is {wide} px wider than the screen"
    finally:
        context.close()
    assert not record.console_errors, record.console_errors


def test_first_click_on_the_theme_button_changes_the_page(browser, base_url):
    context, page, _ = _open(browser, base_url, "book/chapters/01_attention_as_search.html")
    try:
        before = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        page.locator(".theme-switch-button:visible").first.click()
        page.wait_for_timeout(300)
        after = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert after != before, "the first click on the theme button did not change the page"
    finally:
        context.close()


@pytest.mark.parametrize("path", CHAPTER_PAGES)
def test_each_solution_unfolds_with_one_click(browser, base_url, path):
    context, page, record = _open(browser, base_url, path)
    try:
        solutions = page.locator(".solution.dropdown")
        assert solutions.count() >= 3, f"{path}: {solutions.count()} solutions"
        for i in range(solutions.count()):
            solution = solutions.nth(i)
            body = solution.locator(".section, .solution-content, p:not(.admonition-title)").first
            solution.scroll_into_view_if_needed()
            assert not body.is_visible(), f"{path}: solution {i} is not folded"
            solution.locator(".toggle-button").click()
            page.wait_for_timeout(150)
            assert body.is_visible(), f"{path}: solution {i} did not unfold"
            code = solution.locator("div.cell")
            if code.count():
                assert code.first.is_visible(), f"{path}: solution {i}'s code stays folded after one click"
    finally:
        context.close()
    assert not record.console_errors, record.console_errors
