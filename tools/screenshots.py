"""Screenshots of the built site, as readers see it: widths and light/dark mode.

    .venv/bin/python tools/screenshots.py [PAGE ...] [--out DIR] [--widths 1400,390]
        [--modes light,dark] [--full] [--clip Y0:Y1]

PAGE is a path under _build/html (default: every chapter page), for example
``book/chapters/04_kv_cache.html``. Each screenshot is written to
DIR/<page>__<width>__<mode>.png (default DIR: _build/screenshots). ``--full``
takes the whole page; otherwise the first screen. Run `make book` first.
Playwright drives Debian's /usr/bin/chromium (never `playwright install`).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401
        pass


def serve() -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--widths", default="1400,390")
    parser.add_argument("--modes", default="light,dark")
    parser.add_argument("--full", action="store_true", help="the whole page, not the first screen")
    parser.add_argument("--clip", help="Y0:Y1, a band of the full page in CSS pixels")
    parser.add_argument("--scale", type=float, default=1.0, help="device pixel ratio")
    args = parser.parse_args(argv)
    if not (SITE / "index.html").is_file():
        parser.error("no built site: run `make book`")
    pages = args.pages or sorted(p.relative_to(SITE).as_posix() for p in (SITE / "book" / "chapters").glob("*.html"))
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    server, base = serve()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            for page_path in pages:
                for width in (int(w) for w in args.widths.split(",")):
                    for mode in args.modes.split(","):
                        context = browser.new_context(viewport={"width": width, "height": 900},
                                                      color_scheme=mode, device_scale_factor=args.scale)
                        context.add_init_script(f"localStorage.setItem('mode', '{mode}'); localStorage.setItem('theme', '{mode}');")
                        page = context.new_page()
                        page.goto(f"{base}/{page_path}", wait_until="load")
                        page.wait_for_timeout(1500)
                        name = page_path.replace("/", "__").removesuffix(".html")
                        target = args.out / f"{name}__{width}__{mode}.png"
                        if args.clip:
                            y0, y1 = (float(v) for v in args.clip.split(":"))
                            page.screenshot(path=str(target), full_page=True,
                                            clip={"x": 0, "y": y0, "width": width, "height": y1 - y0})
                        else:
                            page.screenshot(path=str(target), full_page=args.full)
                        print(target)
                        context.close()
            browser.close()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
