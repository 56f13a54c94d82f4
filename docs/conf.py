"""Sphinx configuration of the sinkhorn_ot documentation.

Build: ``sphinx-build -W -b html docs OUT`` (``pip install -e ".[docs]"`` installs what it
needs). The examples on the pages are run by ``tests/test_docs.py``, not by Sphinx.

Pages show the files other parts of the repository own (``benchmarks/README.md``, the
committed benchmark reports, the ELIM example's README and results) by including them,
so the site never holds a stale copy. Files that may or may not be committed yet are
included through the ``optional-include`` block, expanded here before MyST parses the
page::

    ```{optional-include} ../benchmarks/results/*.md
    :heading-offset: 1
    Text shown while no file matches the pattern.
    ```

Every file matching the glob (relative to the page, sorted) becomes a MyST ``{include}``
(``.md``: the block's options are passed on) or an ``{image}`` (``.png``, ``.svg``,
``.jpg``); with no match, the block's text is shown instead. Pages holding such a block
are re-read on every build, so a newly committed file appears without a clean build.

Relative links inside included Markdown files (written for reading the file on its own,
e.g. ``[RESULTS.md](RESULTS.md)`` in ``examples/elim/README.md``) are rewritten as they
are read: to the docs page that shows the target, or else to the target's repository
path as inline code, since the site holds no copy of it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# autodoc imports the checkout itself, installed or not. Importing sinkhorn_ot never
# builds the native extensions (they are built lazily, on first use).
sys.path.insert(0, str(ROOT))

import sinkhorn_ot  # noqa: E402

project = "sinkhorn_ot"
author = "sinkhorn_ot developers"
copyright = "sinkhorn_ot developers, MIT licence"
release = version = sinkhorn_ot.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: $...$ / $$...$$ maths (also rendered by GitHub), anchors for ## and ### headings
# so that links such as conventions.md#stopping-rule resolve.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc + napoleon: Google-style docstrings; signatures keep their annotations.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"sinkhorn_ot {release}"
html_static_path: list[str] = []

_OPTIONAL_INCLUDE = re.compile(
    r"^```\{optional-include\}[ \t]+(?P<pattern>\S+)[ \t]*\n"
    r"(?P<options>(?:[ \t]*:[\w-]+:[^\n]*\n)*)"
    r"(?P<fallback>.*?)"
    r"^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif"}


def expand_optional_includes(text: str, page_dir: Path) -> str:
    """Replace each ``optional-include`` block of a page's Markdown (see the module doc)."""

    def expand(match: re.Match) -> str:
        pattern = match["pattern"]
        found = sorted(page_dir.glob(pattern))
        if not found:
            return match["fallback"].strip() + "\n"
        blocks = []
        for path in found:
            rel = Path(os.path.relpath(path, page_dir)).as_posix()
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                blocks.append(f"```{{image}} {rel}\n:alt: {path.name}\n```\n")
            else:
                blocks.append(f"```{{include}} {rel}\n{match['options']}```\n")
        return "\n".join(blocks)

    return _OPTIONAL_INCLUDE.sub(expand, text)


_INCLUDE_ARG = re.compile(r"^```\{(?:optional-)?include\}[ \t]+(\S+)", re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s]+)\)")
_FENCED = re.compile(r"^(`{3,}|~{3,}).*?^\1[`~]*[ \t]*$", re.MULTILINE | re.DOTALL)


def included_files() -> dict[Path, str]:
    """Files shown by an ``include`` or ``optional-include`` of a page -> that page."""
    shown = {}
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts:
            continue
        docname = page.relative_to(DOCS).with_suffix("").as_posix()
        for pattern in _INCLUDE_ARG.findall(page.read_text(encoding="utf-8")):
            for path in page.parent.glob(pattern):
                shown.setdefault(path.resolve(), docname)
    return shown


def rewrite_relative_links(text: str, source: Path, shown: dict[Path, str]) -> str:
    """Point the relative links of an included Markdown file at what the site has."""

    def fix(match: re.Match) -> str:
        label, target = match["text"], match["target"]
        if re.match(r"[A-Za-z][\w+.-]*:", target) or target.startswith(("#", "/")):
            return match[0]  # a URL, an anchor or a path from the docs root
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve()
        if dest.suffix == ".md" and dest.is_relative_to(DOCS):
            suffix = f"#{anchor}" if anchor else ""
            return f"[{label}](/{dest.relative_to(DOCS).as_posix()}{suffix})"
        if dest in shown:
            return f"[{label}](/{shown[dest]}.md)"
        where = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else path
        if label.strip("`") in (path, Path(path).name):
            return f"`{where}`"
        return f"{label} (`{where}`)"

    parts, last = [], 0
    for block in _FENCED.finditer(text):  # leave code blocks alone
        parts += [_LINK.sub(fix, text[last : block.start()]), block[0]]
        last = block.end()
    parts.append(_LINK.sub(fix, text[last:]))
    return "".join(parts)


def _on_include_read(app, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    source = (Path(app.srcdir) / relative_path).resolve()
    if source.suffix == ".md":
        content[0] = rewrite_relative_links(content[0], source, included_files())


def _on_source_read(app, docname: str, source: list[str]) -> None:
    if "{optional-include}" not in source[0]:
        return
    page_dir = (Path(app.srcdir) / docname).parent
    source[0] = expand_optional_includes(source[0], page_dir)
    app.env.sinkhorn_ot_optional_pages = {
        *getattr(app.env, "sinkhorn_ot_optional_pages", ()),
        docname,
    }


def _reread_optional_pages(app, env, added, changed, removed) -> list[str]:
    pages = getattr(env, "sinkhorn_ot_optional_pages", set())
    return sorted(p for p in pages if p in env.found_docs and p not in changed)


def setup(app):
    app.connect("source-read", _on_source_read)
    app.connect("include-read", _on_include_read)
    app.connect("env-get-outdated", _reread_optional_pages)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
