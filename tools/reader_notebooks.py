"""The notebooks learners open: plain Jupyter notebooks generated from the book's chapters.

    make notebooks                         # runs the chapters, then writes notebooks/ (this step)
    .venv/bin/python tools/reader_notebooks.py           # write notebooks/ from the stored chapters
    .venv/bin/python tools/reader_notebooks.py --check   # fail if notebooks/ is stale

One source per chapter: ``book/chapters/NN_name.ipynb`` is written in MyST (roles,
directives, glue) for the site, and its executed outputs are the truth that nbval
checks. Colab, JupyterLab and VS Code render none of MyST, and show no glued
figure. This step turns each executed chapter into ``notebooks/NN_name.ipynb``,
the notebook the launch buttons, the download button and learners open, as QuantEcon
does for its lectures:

- every ``{glue:text}`` becomes its number, every ``{numref}`` its "Fig. N.k",
  every ``{cite:p}`` an author-year citation (the chapter's references are listed
  at its end), ``{term}``, ``{doc}``, ``{ref}`` and ``{py:...}`` plain text, code
  or a link; admonitions become block quotes; labels disappear;
- a glued figure becomes the visible output of the cell that draws it (re-running
  the cell draws it again), with its caption under it;
- an exercise's solution (its prose, code and outputs) is folded in one
  ``<details>`` element;
- cells the site removes (glue and the ``assert``s that guard the prose) are left
  out; the install cell stays, first; folded code stays folded (JupyterLab).

The output depends only on the stored chapters and the book's configuration, and
is written with sorted keys, so it is deterministic; ``--check`` (run by
``make test``) fails when a chapter changed and notebooks/ was not regenerated.
"""

from __future__ import annotations

import argparse
import ast
import base64
import copy
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
OUT = ROOT / "notebooks"
INSTALL_MARKER = "# Set-up for Colab and other fresh machines"
GLUE_PREFIX = "application/papermill.record/"
NARROW = "--narrow"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
ADMONITIONS = {"note", "tip", "warning", "important", "seealso", "hint", "caution", "attention", "danger", "error"}
FENCE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|:{3,})\{(?P<name>[\w:-]+)\}\s*(?P<arg>.*?)\s*$")
ROLE = re.compile(r"\{(?P<role>[\w:-]+)\}`(?P<body>[^`]+)`")
LABEL_LINE = re.compile(r"^\s*\((?P<label>[\w-]+)\)=\s*$")


class ConversionError(Exception):
    """A construct the generator cannot turn into plain Markdown (fix the chapter or teach the generator)."""


# --- what the whole book knows: chapter numbers, labels, figures, exercises, citations -------------


def toc_docs() -> list[tuple[str, bool]]:
    """(docname, numbered) for every document in _toc.yml, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    docs = [(toc["root"], False)]
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            docs.append((chapter["file"], bool(part.get("numbered"))))
    return docs


def _source_text(docname: str) -> list[str]:
    """The Markdown of a document (its Markdown cells, for a notebook)."""
    path = ROOT / f"{docname}.ipynb"
    if path.is_file():
        nb = nbformat.read(path, as_version=4)
        return [c.source for c in nb.cells if c.cell_type == "markdown"]
    return [(ROOT / f"{docname}.md").read_text(encoding="utf-8")]


def _directives(text: str):
    """(name, argument, options, body) of every fenced directive in text, outermost first, in order."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, end = m.group("fence"), None
        for j in range(i + 1, len(lines)):
            if lines[j].strip() == fence:
                end = j
                break
        if end is None:
            raise ConversionError(f"unclosed directive {{{m.group('name')}}}")
        options, body = _split_options(lines[i + 1 : end])
        yield m.group("name"), m.group("arg"), options, "\n".join(body)
        yield from _directives("\n".join(body))
        i = end + 1


def _split_options(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    k = 0
    while k < len(lines) and re.match(r"^\s*:[\w-]+:", lines[k]):
        key, _, value = lines[k].strip()[1:].partition(":")
        options[key.strip()] = value.strip()
        k += 1
    while k < len(lines) and not lines[k].strip():
        k += 1
    return options, lines[k:]


@dataclass
class Book:
    """Numbers and titles the prose refers to, gathered from every document in the table of contents."""

    chapter_number: dict[str, int] = field(default_factory=dict)
    doc_title: dict[str, str] = field(default_factory=dict)
    label_title: dict[str, str] = field(default_factory=dict)
    figure_number: dict[str, str] = field(default_factory=dict)
    exercise_number: dict[str, str] = field(default_factory=dict)
    bib: dict[str, dict] = field(default_factory=dict)
    site_url: str = ""

    @classmethod
    def load(cls) -> "Book":
        book = cls()
        config = yaml.safe_load((ROOT / "_config.yml").read_text())
        book.site_url = str((config.get("html") or {}).get("baseurl") or "").rstrip("/")
        number = 0
        for docname, numbered in toc_docs():
            texts = _source_text(docname)
            joined = "\n\n".join(texts)
            title = re.search(r"^#\s+(.+)$", joined, flags=re.M)
            book.doc_title[docname] = title.group(1).strip() if title else docname
            if numbered:
                number += 1
                book.chapter_number[docname] = number
            figures = exercises = 0
            lines = joined.splitlines()
            for k, line in enumerate(lines):
                m = LABEL_LINE.match(line)
                if m:
                    nxt = next((lines[j] for j in range(k + 1, len(lines)) if lines[j].strip()), "")
                    heading = re.match(r"^#+\s+(.+)$", nxt)
                    if heading:
                        book.label_title[m.group("label")] = heading.group(1).strip()
            for name, arg, options, _ in _directives(joined):
                prefix = f"{number}." if numbered else ""
                if name in ("glue:figure", "figure") and options.get("name"):
                    figures += 1
                    book.figure_number[options["name"]] = f"Fig. {prefix}{figures}"
                if name == "exercise":
                    exercises += 1
                    if options.get("label"):
                        book.exercise_number[options["label"]] = f"Exercise {prefix}{exercises}"
        book.bib = _bibliography()
        return book

    def chapter_of(self, path: Path) -> int | None:
        return self.chapter_number.get(path.relative_to(ROOT).with_suffix("").as_posix())


def _bibliography() -> dict[str, dict]:
    from pybtex.database import parse_file

    data = parse_file(str(BOOK / "references.bib"))
    entries = {}
    for key, entry in data.entries.items():
        people = entry.persons.get("author", [])
        last = [_latex_to_text(" ".join(p.last_names)) for p in people]
        if not last:
            short = "?"
        elif len(last) == 1:
            short = last[0]
        elif len(last) == 2:
            short = f"{last[0]} and {last[1]}"
        else:
            short = f"{last[0]} et al."
        fields = entry.fields
        full_names = ", ".join(
            _latex_to_text(" ".join(p.first_names + p.middle_names + p.prelast_names + p.last_names)) for p in people
        )
        venue = fields.get("booktitle") or fields.get("journal") or fields.get("publisher") or fields.get("howpublished") or ""
        entries[key] = {
            "short": short,
            "year": fields.get("year", "n.d."),
            "title": _latex_to_text(fields.get("title", "")),
            "authors": full_names,
            "venue": _latex_to_text(venue),
            "url": fields.get("url") or (f"https://doi.org/{fields['doi']}" if fields.get("doi") else ""),
        }
    return entries


_ACCENTS = {r"{\L}": "Ł", r"\L": "Ł", r"{\'o}": "ó", r"\'o": "ó", r"{\'e}": "é", r"\'e": "é",
            r'{\"o}': "ö", r'\"o': "ö", r'{\"u}': "ü", r'\"u': "ü", r"{\'a}": "á", r"\'a": "á",
            r"{\'i}": "í", r"{\~n}": "ñ", r"--": "–"}


def _latex_to_text(text: str) -> str:
    """The few LaTeX accents and braces of references.bib, as plain text."""
    for latex, char in _ACCENTS.items():
        text = text.replace(latex, char)
    return re.sub(r"[{}]", "", text)


# --- Markdown: MyST to what every front end renders ------------------------------------------------


@dataclass
class Chapter:
    """One chapter being converted: its glued values and what its prose cites."""

    book: Book
    number: int | None
    glue: dict[str, dict]
    cited: list[str] = field(default_factory=list)

    def glue_text(self, name: str, spec: str) -> str:
        if name not in self.glue:
            raise ConversionError(f"{{glue:text}} refers to {name!r}, which no cell glued")
        text = self.glue[name].get("text/plain")
        if text is None:
            raise ConversionError(f"glued value {name!r} has no text")
        if not spec:
            return text
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as error:
            raise ConversionError(f"glued value {name!r} = {text!r} cannot take the format {spec!r}") from error
        return format(value, spec)


def convert_roles(text: str, ch: Chapter) -> str:
    def replace(m: re.Match) -> str:
        role, body = m.group("role"), m.group("body")
        shown, target = _title_target(body)
        if role in ("glue:text", "glue"):
            name, _, spec = body.partition(":")
            return ch.glue_text(name.strip(), spec.strip())
        if role == "numref":
            if target not in ch.book.figure_number:
                raise ConversionError(f"{{numref}} to unknown figure {target!r}")
            number = ch.book.figure_number[target]
            if shown:
                return shown.replace("%s", number.split(" ", 1)[1]).replace("{number}", number.split(" ", 1)[1])
            return number
        if role == "term":
            return shown or target
        if role in ("cite:p", "cite:t", "cite", "cite:ps", "cite:ts"):
            keys = [k.strip() for k in body.split(",")]
            parts = []
            for key in keys:
                if key not in ch.book.bib:
                    raise ConversionError(f"citation {key!r} is not in references.bib")
                if key not in ch.cited:
                    ch.cited.append(key)
                e = ch.book.bib[key]
                parts.append(f"{e['short']} ({e['year']})" if role.startswith("cite:t") else f"{e['short']}, {e['year']}")
            return "; ".join(parts) if role.startswith("cite:t") else "(" + "; ".join(parts) + ")"
        if role == "doc":
            docname = _resolve_doc(target, ch)
            title = shown or ch.book.doc_title.get(docname, target)
            if docname in ch.book.chapter_number:
                return f"[{title}]({Path(docname).name}.ipynb)"
            if ch.book.site_url:
                return f"[{title}]({ch.book.site_url}/{docname}.html)"
            return f"*{title}*"
        if role == "ref":
            if shown:
                return shown
            if target in ch.book.exercise_number:
                return ch.book.exercise_number[target]
            if target in ch.book.figure_number:
                return ch.book.figure_number[target]
            if target not in ch.book.label_title:
                raise ConversionError(f"{{ref}} to unknown label {target!r}")
            return f"*{ch.book.label_title[target]}*"
        if role.startswith("py:"):
            name = target.lstrip("~")
            short = name.rsplit(".", 1)[-1] if target.startswith("~") else name
            if role in ("py:func", "py:meth"):
                short += "()"
            return f"`{shown or short}`"
        if role == "math":
            return f"${body}$"
        if role in ("sub", "sup"):
            return f"<{role}>{body}</{role}>"
        raise ConversionError(f"unknown role {{{role}}}")

    return ROLE.sub(replace, text)


def _title_target(body: str) -> tuple[str, str]:
    """`text <target>` -> (text, target); `target` -> ("", target)."""
    m = re.fullmatch(r"\s*(.*?)\s*<([^<>]+)>\s*", body, flags=re.S)
    if m and m.group(1):
        return m.group(1), m.group(2).strip()
    return "", body.strip()


def _resolve_doc(target: str, ch: Chapter) -> str:
    """A {doc} target as written in a chapter (relative to book/chapters/) -> docname."""
    candidates = [f"book/chapters/{target}", str(Path("book/chapters") / target), f"book/{Path(target).name}", target]
    for candidate in candidates:
        normal = str(Path(candidate)).replace("\\", "/")
        normal = re.sub(r"[^/]+/\.\./", "", normal)
        if normal in ch.book.doc_title:
            return normal
    raise ConversionError(f"{{doc}} to unknown document {target!r}")


def convert_markdown(text: str, ch: Chapter, figures: dict[str, "Figure"] | None = None) -> str:
    """MyST Markdown -> CommonMark with HTML and $maths$."""
    out: list[str] = []
    plain: list[str] = []  # prose lines, converted together: a role may span two lines

    def flush() -> None:
        if plain:
            block = convert_roles("\n".join(plain), ch)
            out.extend(re.sub(r"(\$\$)\s*\([\w-]+\)\s*$", r"\1", line) for line in block.split("\n"))
            plain.clear()

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if LABEL_LINE.match(line) or re.match(r"^\s*%", line):
            i += 1
            continue
        m = FENCE_OPEN.match(line)
        if not m:
            plain.append(line)
            i += 1
            continue
        flush()
        fence, name, arg = m.group("fence"), m.group("name"), m.group("arg")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ConversionError(f"unclosed directive {{{name}}}")
        options, body = _split_options(lines[i + 1 : end])
        out.extend(_directive(name, arg, options, "\n".join(body), ch, figures).splitlines())
        i = end + 1
    flush()
    return "\n".join(out).strip("\n")


def _quote(text: str) -> str:
    return "\n".join(">" if not line.strip() else f"> {line}" for line in text.splitlines())


def _directive(name: str, arg: str, options: dict, body: str, ch: Chapter, figures) -> str:
    inner = convert_markdown(body, ch, figures)
    if name == "admonition" or name in ADMONITIONS:
        title = convert_roles(arg, ch) if name == "admonition" else name.capitalize()
        if "dropdown" in options.get("class", ""):
            return f"<details>\n<summary>{html.escape(title)}</summary>\n\n{inner}\n\n</details>"
        return _quote(f"**{title}**\n\n{inner}")
    if name == "glue:figure":
        figure_name = options.get("name") or arg
        number = ch.book.figure_number.get(options.get("name", ""), "")
        caption = f"**{number}.** {inner}" if number else inner
        figure = (figures or {}).get(arg)
        if figure is None:
            raise ConversionError(f"{{glue:figure}} {arg!r}: no cell glued a figure of that name")
        figure.alt = options.get("alt", "")
        if figure.shown_by_cell:
            return f"<a id=\"{figure_name}\"></a>\n\n{caption}"
        return f"<figure>\n{figure.img()}\n</figure>\n\n{caption}"
    if name == "exercise":
        label = options.get("label", "")
        number = ch.book.exercise_number.get(label, "Exercise")
        title = f" ({convert_roles(arg, ch)})" if arg else ""
        return f"**{number}{title}.** {inner}" if inner and not inner.startswith(("-", "*", "1.")) else f"**{number}{title}.**\n\n{inner}"
    if name in ("math",):
        return f"$$\n{body.strip()}\n$$"
    if name in ("code-block", "code", "code-cell"):
        return f"```{arg}\n{body}\n```"
    if name in ("solution-start", "solution-end"):
        raise ConversionError("a solution must start and end at the beginning of a Markdown cell's lines")
    raise ConversionError(f"unknown directive {{{name}}}")


# --- cells ------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """A glued figure: its picture, and whether the cell that draws it shows it right before its caption."""

    name: str
    bundle: dict
    cell: int
    shown_by_cell: bool = False
    alt: str = ""

    def output(self) -> dict:
        """The figure as a cell shows it: SVG (with its alt text as its title), or PNG.

        With alt text, also as HTML, an image with that alt text: JupyterLab, Colab and
        nbconvert prefer HTML to an image, and show an image output with no alt at all.
        """
        bundle = ({"image/svg+xml": self.svg()} if "image/svg+xml" in self.bundle
                  else {"image/png": self.bundle["image/png"]})
        if self.alt:
            bundle["text/html"] = self.img()
        return {**bundle, "text/plain": "<Figure>"}

    def svg(self) -> str:
        svg = self.bundle["image/svg+xml"]
        if self.alt:
            svg = re.sub(r"(<svg\b[^>]*>)", lambda m: m.group(1) + f"<title>{html.escape(self.alt)}</title>", svg, count=1)
        return svg

    def img(self) -> str:
        alt = html.escape(self.alt, quote=True)
        if "image/svg+xml" not in self.bundle:
            return f'<img src="data:image/png;base64,{self.bundle["image/png"]}" alt="{alt}">'
        data = base64.b64encode(self.svg().encode("utf-8")).decode("ascii")
        return f'<img src="data:image/svg+xml;base64,{data}" alt="{alt}">'


def _glued(cell) -> dict[str, dict]:
    """name -> MIME bundle (prefix removed) of every value a code cell glued."""
    found = {}
    for output in cell.get("outputs", []):
        name = output.get("metadata", {}).get("scrapbook", {}).get("name")
        if name and output.get("output_type") in ("display_data", "execute_result"):
            found[name] = {k[len(GLUE_PREFIX):]: v for k, v in output["data"].items() if k.startswith(GLUE_PREFIX)}
    return found


def _plumbing_only(source: str) -> bool:
    """Does a cell only glue values and assert facts (nothing a later cell could need)?"""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assert):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func
            dotted = ast.unparse(func)
            if dotted.startswith(("plots.glue_", "kqv.plots.glue_", "glue")):
                continue
        if isinstance(node, (ast.For,)) and all(
            isinstance(n, (ast.Assert, ast.Expr)) for n in node.body
        ):
            continue
        return False
    return True


def _visible_outputs(cell, figures: dict[str, Figure]) -> list:
    outputs = []
    for output in cell.get("outputs", []):
        name = output.get("metadata", {}).get("scrapbook", {}).get("name")
        if name is None:
            data = output.get("data", {})
            if WIDGET_VIEW in data and "text/html" in data:
                # A stored widget view shows nothing without its kernel: keep the explorer drawn in
                # advance (re-running the cell brings the live widgets back).
                output = copy.deepcopy(output)
                del output["data"][WIDGET_VIEW]
            outputs.append(output)
            continue
        if name.endswith(NARROW) or name not in figures:
            continue  # a number for the prose, or a phone's rendition: nothing to show here
        outputs.append(nbformat.v4.new_output("display_data", data=figures[name].output()))
    return outputs


def _output_as_markdown(output, figures: dict[str, Figure]) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return "```text\n" + output["text"].rstrip("\n") + "\n```"
    if kind in ("display_data", "execute_result"):
        name = output.get("metadata", {}).get("scrapbook", {}).get("name")
        if name is not None:
            if name in figures and not name.endswith(NARROW):
                return figures[name].img()
            return ""
        data = output.get("data", {})
        if "image/svg+xml" in data:
            svg = data["image/svg+xml"]
            return f'<img src="data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()}" alt="">'
        if "image/png" in data:
            return f'<img src="data:image/png;base64,{data["image/png"]}" alt="">'
        if "text/html" in data:
            return data["text/html"]
        if "text/plain" in data:
            return "```text\n" + data["text/plain"].rstrip("\n") + "\n```"
    if kind == "error":
        raise ConversionError("a stored output is an error")
    return ""


SOLUTION_START = re.compile(r"^(`{3,}|:{3,})\{solution-start\}\s*(?P<label>[\w-]+)\s*\n(?P<opts>(?:\s*:[\w-]+:.*\n)*)\1\s*$", re.M)
SOLUTION_END = re.compile(r"^(`{3,}|:{3,})\{solution-end\}\s*\n\1\s*$", re.M)


def convert(path: Path, book: Book) -> nbformat.NotebookNode:
    """The reader's notebook for one executed chapter."""
    src = nbformat.read(path, as_version=4)
    number = book.chapter_of(path)
    glue: dict[str, dict] = {}
    figures: dict[str, Figure] = {}
    for index, cell in enumerate(src.cells):
        if cell.cell_type != "code":
            continue
        if cell.execution_count is None:
            raise ConversionError(f"{path.name}: code cell {index} was never executed; run `make notebooks`")
        for name, bundle in _glued(cell).items():
            glue[name] = bundle
            if ("image/svg+xml" in bundle or "image/png" in bundle) and not name.endswith(NARROW):
                figures[name] = Figure(name, bundle, index)
    ch = Chapter(book, number, glue)
    for cell in src.cells:  # each figure's alt text, before any cell shows it
        if cell.cell_type == "markdown":
            for name, arg, options, _ in _directives(cell.source):
                if name == "glue:figure" and arg in figures:
                    figures[arg].alt = options.get("alt", "")

    # Which figures does the very next Markdown cell place, right after the cell that draws them?
    kept = [i for i, c in enumerate(src.cells) if not _dropped(c)]
    for position, index in enumerate(kept[:-1]):
        cell, following = src.cells[index], src.cells[kept[position + 1]]
        if cell.cell_type == "code" and following.cell_type == "markdown":
            m = re.match(r"^\s*(`{3,}|:{3,})\{glue:figure\}\s*(\S+)", following.source)
            if m and m.group(2) in figures and figures[m.group(2)].cell == index:
                figures[m.group(2)].shown_by_cell = True

    cells: list = []
    solution: list[str] | None = None
    solution_label = ""

    def emit_markdown(text: str) -> None:
        text = text.strip("\n")
        if not text.strip():
            return
        if solution is not None:
            solution.append(convert_markdown(text, ch, figures))
        else:
            cells.append(nbformat.v4.new_markdown_cell(convert_markdown(text, ch, figures)))

    for index, cell in enumerate(src.cells):
        if cell.cell_type == "markdown":
            text = cell.source
            while text:
                start = SOLUTION_START.search(text) if solution is None else None
                end = SOLUTION_END.search(text) if solution is not None else None
                if start:
                    emit_markdown(text[: start.start()])
                    solution, solution_label = [], start.group("label")
                    text = text[start.end():]
                elif end:
                    emit_markdown(text[: end.start()])
                    number_text = book.exercise_number.get(solution_label, "the exercise")
                    body = "\n\n".join(part for part in solution if part.strip())
                    cells.append(nbformat.v4.new_markdown_cell(
                        f"<details>\n<summary>Solution to {number_text}</summary>\n\n{body}\n\n</details>"))
                    solution = None
                    text = text[end.end():]
                else:
                    emit_markdown(text)
                    text = ""
            continue
        if cell.cell_type != "code":
            continue
        tags = set(cell.metadata.get("tags", []))
        if _dropped(cell):
            continue
        if solution is not None:
            shown = [f"```python\n{cell.source.rstrip()}\n```"]
            shown += [m for m in (_output_as_markdown(o, figures) for o in cell.outputs) if m]
            solution.append("\n\n".join(shown))
            continue
        new = nbformat.v4.new_code_cell(cell.source)
        new.execution_count = cell.execution_count
        new.outputs = _visible_outputs(cell, figures)
        if "hide-input" in tags or "remove-input" in tags:
            new.metadata["jupyter"] = {"source_hidden": True}
        if "hide-output" in tags:
            new.metadata.setdefault("jupyter", {})["outputs_hidden"] = True
        if "nbval-ignore-output" in tags:  # a timing: tools/test_fresh.py does not compare its text
            new.metadata["tags"] = ["nbval-ignore-output"]
        cells.append(new)
    if solution is not None:
        raise ConversionError(f"{path.name}: solution {solution_label!r} has no {{solution-end}}")

    cells.insert(1, nbformat.v4.new_markdown_cell(_banner(book, number)))
    if ch.cited:
        refs = ["## References", ""]
        for key in ch.cited:
            e = book.bib[key]
            venue = f" *{e['venue']}*." if e["venue"] else ""
            link = f" <{e['url']}>" if e["url"] else ""
            refs.append(f"- {e['authors']} ({e['year']}). {e['title']}.{venue}{link}")
        cells.append(nbformat.v4.new_markdown_cell("\n".join(refs)))

    nb = nbformat.v4.new_notebook()
    nb.metadata = copy.deepcopy(src.metadata)
    nb.metadata.pop("widgets", None)  # no stored widget views are left
    nb.cells = cells
    count = 0
    for cell in nb.cells:  # execution counts 1, 2, 3, ... as if the learner had run it
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for output in cell.outputs:
                if output.get("output_type") == "execute_result":
                    output["execution_count"] = count
    for k, cell in enumerate(nb.cells):  # ids from position and kind: the same every run
        cell["id"] = f"{cell.cell_type[:2]}{k:03d}"
    return nb


def _dropped(cell) -> bool:
    """Cells the site removes and the notebook leaves out: plumbing, never the install cell."""
    if cell.cell_type != "code" or "remove-cell" not in cell.metadata.get("tags", []):
        return False
    if cell.source.startswith(INSTALL_MARKER):
        return False
    if not _plumbing_only(cell.source):
        raise ConversionError(
            "a remove-cell cell may only glue values and assert facts (a later cell might need what it "
            f"computes):\n{cell.source[:300]}"
        )
    return True


def _banner(book: Book, number: int | None) -> str:
    pins = (ROOT / "requirements.txt").read_text()
    torch = re.search(r"^torch==(\S+)", pins, flags=re.M)
    where = f"the book's site ({book.site_url})" if book.site_url else "the book's site"
    chapter = f"Chapter {number} of " if number else ""
    return (
        f"> {chapter}*K, Q, V: attention from search to latent caches*. This notebook is generated from "
        f"the chapter you can also read on {where}. Run the cells from the top: the first one installs what "
        "is missing. The numbers in the text were computed when the book was built (on a CPU, two threads, "
        f"torch {torch.group(1) if torch else ''}); each cell prints what your own run computes."
    )


def chapters() -> list[Path]:
    return [ROOT / f"{doc}.ipynb" for doc, _ in toc_docs() if (ROOT / f"{doc}.ipynb").is_file()]


def render(nb: nbformat.NotebookNode) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if notebooks/ differs from what would be written")
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapters to convert (default: all)")
    args = parser.parse_args(argv)
    book = Book.load()
    paths = [p.resolve() for p in args.notebooks] or chapters()
    stale = []
    OUT.mkdir(exist_ok=True)
    for path in paths:
        try:
            nb = convert(path, book)
        except ConversionError as error:
            print(f"{path.relative_to(ROOT)}: {error}", file=sys.stderr)
            return 1
        nbformat.validate(nb)
        target = OUT / path.name
        text = render(nb)
        if args.check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target.relative_to(ROOT).as_posix())
        elif not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
    if not args.check:
        expected = {p.name for p in chapters()}
        for extra in sorted(OUT.glob("*.ipynb")):
            if extra.name not in expected:
                extra.unlink()
                print(f"removed {extra.relative_to(ROOT)} (no such chapter)")
    if stale:
        print("stale: " + ", ".join(stale) + "; run `make notebooks` (or tools/reader_notebooks.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
