"""Is the book ready to publish? `make book` runs this and warns (it never fails the build).

    .venv/bin/python tools/publishing.py --warn

While ``repository.url`` in _config.yml is the placeholder, every launch button,
the repository button and every notebook's install cell lead nowhere; while
``html.baseurl`` is empty, the learners' notebooks cannot link to the site. The
README's "Publishing" section says what to change and what to regenerate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER_URL = "https://github.com/kqv-book/kqv"


def problems() -> list[str]:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    found = []
    url = str(config.get("repository", {}).get("url", "")).rstrip("/")
    if url == PLACEHOLDER_URL:
        found.append(f"repository.url in _config.yml is still the placeholder {PLACEHOLDER_URL}: the launch "
                     "buttons and the notebooks' install cells lead nowhere")
    if not str((config.get("html") or {}).get("baseurl") or "").strip():
        found.append("html.baseurl in _config.yml is empty: the notebooks cannot link to the site's pages")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warn", action="store_true", help="print warnings, exit 0")
    args = parser.parse_args(argv)
    found = problems()
    for problem in found:
        print(f"WARNING (not published yet): {problem}. See README.md, 'Publishing'.", file=sys.stderr)
    return 0 if args.warn or not found else 1


if __name__ == "__main__":
    sys.exit(main())
