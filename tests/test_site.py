"""Static checks on the built site (`make book` first; `make test-site` does both).

The pages must render with nothing from a third party: every script, style
sheet, font and image they load is served by the site itself. Links (to papers,
to Binder and Colab) are ordinary links and may point anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"

pytestmark = pytest.mark.book



def test_site_is_built():
    # Collected by `make test-kqv` too (and deselected there), so a missing site must not
    # break collection: the pages below are simply empty, and this test says why.
    assert (SITE / "index.html").is_file(), f"no built site in {SITE}: run `make book` (or `make test-site`)"


PAGES = sorted(p for p in SITE.rglob("*.html") if not p.relative_to(SITE).parts[0].startswith("_"))
CSS_FILES = sorted(SITE.rglob("*.css"))


def _toc_files(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("file", "root") and isinstance(v, str)] + [
            f for k, v in node.items() if k not in ("file", "root") for f in _toc_files(v)
        ]
    if isinstance(node, list):
        return [f for item in node for f in _toc_files(item)]
    return []


# The notebooks in the table of contents (tests/test_notebooks.py checks that every notebook is there).
NOTEBOOK_PAGES = sorted(
    SITE / f"{name}.html"
    for name in _toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    if (ROOT / f"{name}.ipynb").is_file()
)

# <link rel=...> values that name a relation to another page, not a resource the page loads.
NAVIGATION_RELS = {"index", "search", "next", "prev", "canonical", "author", "license", "help",
                   "alternate", "top", "up", "first", "last", "glossary", "copyright", "me"}
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")


def _id(path: Path) -> str:
    return str(path.relative_to(SITE))


def _is_third_party(url: str) -> bool:
    parts = urlsplit(url.strip())
    return url.strip().startswith("//") or parts.scheme in ("http", "https", "ftp", "ws", "wss")


def _resources(soup: BeautifulSoup) -> list[tuple[str, str]]:
    """(where, url) of everything the page itself loads."""
    found: list[tuple[str, str]] = []
    for tag in soup.find_all(True):
        name = tag.name
        if name == "link":
            rels = {r.lower() for r in (tag.get("rel") or [])}
            if rels and rels <= NAVIGATION_RELS:
                continue
            if tag.get("href"):
                found.append((f"<link rel={' '.join(sorted(rels))}>", tag["href"]))
        for attribute in ("src", "data", "poster"):
            if name in ("script", "img", "iframe", "embed", "source", "video", "audio", "track", "input", "object") \
                    and tag.get(attribute):
                found.append((f"<{name} {attribute}>", tag[attribute]))
        for attribute in ("srcset", "imagesrcset"):
            for candidate in (tag.get(attribute) or "").split(","):
                if candidate.strip():
                    found.append((f"<{name} {attribute}>", candidate.strip().split()[0]))
        if name in ("image", "use", "feimage"):  # inside inline SVG
            for attribute in ("href", "xlink:href"):
                if tag.get(attribute):
                    found.append((f"<{name} {attribute}>", tag[attribute]))
        if tag.get("style"):
            for match in CSS_URL.finditer(tag["style"]):
                found.append((f"<{name} style>", match.group(1) or match.group(2)))
        if name == "style" and tag.string:
            for match in CSS_URL.finditer(tag.string):
                found.append(("<style>", match.group(1) or match.group(2)))
    return found


def _local_target(page: Path, url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme or not parts.path:
        return None  # data:, blob:, or a fragment
    return (page.parent / unquote(parts.path)).resolve()


def test_site_has_pages():
    assert PAGES, "the site has no pages"
    assert NOTEBOOK_PAGES, "no notebook pages"
    for page in NOTEBOOK_PAGES:
        assert page.is_file(), f"{_id(page)} was not built"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_page_loads_nothing_from_third_parties(page):
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    offenders = [f"{where} {url}" for where, url in _resources(soup) if _is_third_party(url)]
    assert not offenders, f"{_id(page)} loads third-party resources:\n  " + "\n  ".join(offenders)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_page_resources_exist(page):
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    missing = []
    for where, url in _resources(soup):
        target = _local_target(page, url)
        if target is not None and not target.exists():
            missing.append(f"{where} {url}")
    assert not missing, f"{_id(page)} refers to files the site lacks:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("css", CSS_FILES, ids=_id)
def test_style_sheet_loads_nothing_from_third_parties(css):
    offenders = [m.group(1) or m.group(2) for m in CSS_URL.finditer(css.read_text(encoding="utf-8", errors="replace"))]
    offenders = [url for url in offenders if _is_third_party(url)]
    assert not offenders, f"{_id(css)} imports third-party files: {offenders}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_image_has_alt_text(page):
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    bare = [img.get("src", "")[:80] for img in soup.find_all("img") if not (img.get("alt") or "").strip()]
    assert not bare, f"{_id(page)} has images without alt text: {bare}"


@pytest.mark.parametrize("page", NOTEBOOK_PAGES, ids=_id)
def test_figures_have_alt_text(page):
    """Figures are inline SVG (tools/book_pages.py): each names what it shows, as an <img> would with alt."""
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    bare = [svg.get("data-kqv-figure") for svg in soup.select(".kqv-svg svg") if not (svg.get("aria-label") or "").strip()]
    assert not bare, f"{_id(page)} has figures without a description: {bare}"
    leftover = [img["src"][:80] for img in soup.find_all("img") if "_images/" in img.get("src", "") and img["src"].endswith(".svg")]
    assert not leftover, f"{_id(page)}: figures left as <img> (not inlined): {leftover}"


@pytest.mark.parametrize("page", NOTEBOOK_PAGES, ids=_id)
def test_notebook_page_launches_the_learners_notebook(page):
    """Binder and Colab open notebooks/NN_name.ipynb, and the download button serves that same notebook."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"].rstrip("/")
    branch = config["repository"]["branch"]
    owner_repo = urlsplit(url).path.strip("/")
    notebook = f"notebooks/{page.stem}.ipynb"
    assert (ROOT / notebook).is_file(), f"{notebook} is missing: run `make notebooks`"
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    links = {a.get("href", "") for a in soup.find_all("a")}
    binder = f"https://mybinder.org/v2/gh/{owner_repo}/{branch}?urlpath="
    colab = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{notebook}"
    assert any(link.startswith(binder) and link.endswith(notebook) for link in links), f"no Binder button to {notebook}"
    assert colab in links, f"no Colab button ({colab})"
    assert not any(link.endswith(page.relative_to(SITE).with_suffix(".ipynb").as_posix()) and link.startswith("http")
                   for link in links), "a launch button still opens the MyST source"
    downloads = [a["href"] for a in soup.find_all("a") if a.get("href", "").endswith(".ipynb") and "_sources" in a["href"]]
    assert downloads, "no download button for the notebook"
    for href in downloads:
        served = (page.parent / unquote(href)).resolve()
        assert served.read_bytes() == (ROOT / notebook).read_bytes(), f"the download button serves {href}, not {notebook}"


def test_vendored_assets_are_served():
    assert (SITE / "_static/vendor/mathjax/tex-chtml.js").is_file(), "MathJax is missing from the site"
    assert not (SITE / "_static/vendor/widgets").exists(), "the site should not serve the ipywidgets manager any more"
