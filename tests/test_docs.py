"""The documentation runs: page examples, docstring examples, example scripts, API coverage.

* Every ```` ```python ```` block of ``docs/*.md`` is executed, in page order, in one
  namespace per page (like a notebook), from the repository root. A block with ``>>>``
  prompts is a doctest (its printed output is checked, with ``ELLIPSIS`` and
  ``NORMALIZE_WHITESPACE``); any other Python block is run as a script (its ``assert``
  statements are the checks). A block whose imports name a module that is not installed
  (POT, GeomLoss, OTT-JAX: ``pip install -e ".[test,docs]"`` installs them) is skipped,
  with the module in the reason; such blocks are self-contained.
* The examples in the docstrings of every ``sinkhorn_ot`` module (what
  ``pytest --doctest-modules sinkhorn_ot`` would run).
* ``examples/quickstart.py``, shown on the getting-started page.
* Every public name has a docstring and appears in the API reference (``docs/api.md``).

Building the site itself is ``sphinx-build -W -b html docs OUT`` (``.ci/run``).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import runpy
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import sinkhorn_ot
from sinkhorn_ot import native

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# A fenced block: an opening fence of 3+ backticks or tildes with an info string, the
# body, and a closing fence of the same characters (at least as many).
_FENCE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[`~]*[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_PYTHON = {"python", "py", "pycon", "python3"}


@dataclass
class Block:
    page: str
    line: int
    source: str
    doctest: bool
    modules: set[str] = field(default_factory=set)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _imported_modules(code: str) -> set[str]:
    """Top-level modules imported by a block (doctest prompts stripped)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def page_blocks(path: Path) -> list[Block]:
    """The Python blocks of one Markdown page, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        info = match["info"].strip()
        lang = info.split()[0] if info else ""
        if lang.startswith("{"):  # a MyST directive: ```{code-block} python
            lang = (
                info.split()[1]
                if lang in ("{code-block}", "{code}") and len(info.split()) > 1
                else ""
            )
        if lang not in _PYTHON:
            continue
        body = match["body"]
        line = text.count("\n", 0, match.start()) + 2  # first line of the body, 1-based
        is_doctest = any(s.lstrip().startswith(">>>") for s in body.splitlines())
        if is_doctest:
            examples = doctest.DocTestParser().get_examples(body)
            code = "\n".join(e.source for e in examples)
        else:
            code = body
        rel = path.relative_to(ROOT).as_posix()
        blocks.append(Block(rel, line, body, is_doctest, _imported_modules(code)))
    return blocks


def _all_blocks() -> list[Block]:
    return [b for page in sorted(DOCS.rglob("*.md")) for b in page_blocks(page)]


def _missing(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if importlib.util.find_spec(m) is None)


class _PageRun:
    """One namespace per page; blocks run in page order (earlier ones first, if a block
    is selected on its own with ``-k``)."""

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks
        self.globs: dict = {"__name__": "__docs__"}
        self.next = 0
        self.failed: str | None = None

    def run_until(self, target: Block) -> None:
        while self.next <= self.blocks.index(target):
            block = self.blocks[self.next]
            self.next += 1
            missing = _missing(block.modules)
            if block is not target:
                if not missing and self.failed is None:
                    try:
                        _run_block(block, self.globs)
                    except Exception:
                        self.failed = block.id
                continue
            if missing:
                pytest.skip(f"needs {', '.join(missing)} (not installed)")
            if self.failed is not None:
                pytest.fail(f"an earlier block of the page failed: {self.failed}", pytrace=False)
            try:
                _run_block(block, self.globs)
            except BaseException:
                self.failed = block.id
                raise


def _run_block(block: Block, globs: dict) -> None:
    if not block.doctest:
        exec(compile(block.source, block.id, "exec"), globs)
        return
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.source, globs, block.id, block.page, block.line - 1)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test, out=out.write, clear_globs=False)
    globs.update(test.globs)  # DocTest works on a copy of the namespace
    if runner.failures:
        pytest.fail(f"doctest failed in {block.id}:\n{out.getvalue()}", pytrace=False)


_BLOCKS = _all_blocks()
_RUNS: dict[str, _PageRun] = {}


@pytest.fixture
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)


@pytest.mark.parametrize("block", _BLOCKS, ids=[b.id for b in _BLOCKS])
def test_docs_page_example(block: Block, in_repo_root):
    """Each Python block of each page runs and prints what the page says."""
    run = _RUNS.setdefault(block.page, _PageRun([b for b in _BLOCKS if b.page == block.page]))
    if run.next > run.blocks.index(block):  # run on its own (-k), start the page again
        run = _RUNS[block.page] = _PageRun(run.blocks)
    run.run_until(block)


def test_every_page_has_been_found():
    pages = {b.page for b in _BLOCKS}
    for name in ("getting_started", "conventions", "choosing", "migrating"):
        assert f"docs/{name}.md" in pages, f"docs/{name}.md has no Python example"


def _modules() -> list[str]:
    names = ["sinkhorn_ot"]
    for info in pkgutil.walk_packages(sinkhorn_ot.__path__, "sinkhorn_ot."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples(module_name: str):
    """``pytest --doctest-modules sinkhorn_ot``, one test per module."""
    module = importlib.import_module(module_name)
    if module_name in (  # they build it
        "sinkhorn_ot.native",
        "sinkhorn_ot.__main__",
        "sinkhorn_ot._build",
        "sinkhorn_ot.ops",
    ):
        ok, reason = native.availability(torch.device("cpu"), torch.float64)
        if not ok and os.environ.get("SINKHORN_OT_REQUIRE_NATIVE") != "1":
            pytest.skip(f"native-cpu unavailable: {reason}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    tests = finder.find(module, module_name)
    for test in sorted(tests, key=lambda t: t.name):
        runner.run(test, out=out.write)
    if runner.failures:
        pytest.fail(
            f"{runner.failures} docstring example(s) failed:\n{out.getvalue()}", pytrace=False
        )


def test_quickstart_script(in_repo_root):
    """``python examples/quickstart.py`` runs (shown on the getting-started page)."""
    pytest.importorskip("ot")
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert "dvalue/dC equals the plan: True" in out.getvalue(), out.getvalue()


def _public_names() -> dict[str, object]:
    names = {f"sinkhorn_ot.{n}": getattr(sinkhorn_ot, n) for n in sinkhorn_ot.__all__}
    for module_name in ("sinkhorn_ot.costs", "sinkhorn_ot.native", "sinkhorn_ot.testing"):
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module_name
        ]
        names.update({f"{module_name}.{n}": getattr(module, n) for n in public})
    from sinkhorn_ot import __main__ as cli

    names["sinkhorn_ot.__main__.main"] = cli.main
    return names


def test_every_public_name_is_in_the_api_reference():
    """Each public name has a docstring and an autodoc entry in ``docs/api.md``
    (``.. autofunction::`` and the like, or ``.. automodule::`` with ``:members:``)."""
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    explicit = set(re.findall(r"^\.\. auto(?:function|class|exception|data):: (\S+)", api, re.M))
    automodules = set(
        re.findall(r"^\.\. automodule:: (\S+)\n(?:[ \t]+:[\w-]+:.*\n)*?[ \t]+:members:", api, re.M)
    )
    problems = []
    for name, obj in _public_names().items():
        if not inspect.getdoc(obj):
            problems.append(f"{name}: no docstring")
        module, _, short = name.rpartition(".")
        defined_in = getattr(obj, "__module__", module)
        documented = (
            name in explicit
            or module in automodules
            or f"{defined_in}.{short}" in explicit
            or (module == "sinkhorn_ot" and defined_in in automodules)
        )
        if not documented:
            problems.append(f"{name}: not in docs/api.md")
    assert not problems, "\n".join(problems)


# The docstring standard (Google style): every public function documents the shapes of
# its tensors, like ``(B, N, M)``, and has an ``Example:``/``Examples:`` section with
# doctest lines; every public class that is not an exception or a warning has an example.
_SHAPE = re.compile(r"``(?:[A-Za-z_]\w* )?\([^`]*\)``")
_EXAMPLE = re.compile(r"^Examples?:[ \t]*\n(?:[ \t]*\n)*[ \t]+>>> ", re.MULTILINE)

#: Gaps against that standard that are known and still to fix. The test below fails on a
#: new gap, and on an entry here that is fixed (or gone): remove it then.
KNOWN_GAPS: dict[str, set[str]] = {}


def docstring_gaps() -> dict[str, set[str]]:
    """What each public name's docstring lacks, by the name where it is defined."""
    gaps = {}
    for obj in _public_names().values():
        name = f"{obj.__module__}.{obj.__qualname__}"
        doc = inspect.getdoc(obj) or ""
        missing = set()
        if not doc:
            missing.add("docstring")
        if inspect.isclass(obj):
            if not issubclass(obj, BaseException) and not _EXAMPLE.search(doc):
                missing.add("example")
        else:
            if not _EXAMPLE.search(doc):
                missing.add("example")
            if "Tensor" in str(inspect.signature(obj)) and not _SHAPE.search(doc):
                missing.add("shapes")
        if missing:
            gaps[name] = missing
    return gaps


def test_public_docstrings_have_shapes_and_examples():
    gaps = docstring_gaps()
    new = {n: sorted(m - KNOWN_GAPS.get(n, set())) for n, m in gaps.items()}
    new = {n: m for n, m in new.items() if m}
    fixed = {n: sorted(m - gaps.get(n, set())) for n, m in KNOWN_GAPS.items()}
    fixed = {n: m for n, m in fixed.items() if m}
    assert not new, f"public docstrings lacking shapes or an example: {new}"
    assert not fixed, f"fixed (or removed): delete these from KNOWN_GAPS in {__file__}: {fixed}"


def _conf():
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optional_include_expands_to_what_exists(tmp_path):
    conf = _conf()
    (tmp_path / "results").mkdir()
    page = (
        "# T\n\n```{optional-include} results/*.md\n:heading-offset: 2\nNothing yet.\n```\n\n"
        "```{optional-include} results/*.png\nNo plot.\n```\n"
    )
    assert conf.expand_optional_includes(page, tmp_path) == "# T\n\nNothing yet.\n\n\nNo plot.\n\n"
    (tmp_path / "results" / "b.md").write_text("# b\n")
    (tmp_path / "results" / "a.md").write_text("# a\n")
    (tmp_path / "results" / "a.png").write_bytes(b"")
    out = conf.expand_optional_includes(page, tmp_path)
    assert (
        "```{include} results/a.md\n:heading-offset: 2\n```\n\n```{include} results/b.md\n" in out
    )
    assert "```{image} results/a.png\n:alt: a.png\n```" in out
    assert "Nothing yet" not in out and "No plot" not in out


def test_relative_links_of_included_files_are_rewritten():
    conf = _conf()
    source = ROOT / "examples" / "elim" / "README.md"
    shown = {(ROOT / "examples" / "elim" / "RESULTS.md").resolve(): "elim"}
    text = (
        "See [RESULTS.md](RESULTS.md), [the rules](../../docs/conventions.md#stopping-rule), "
        "[train](train.py), [web](https://example.org/x.md), [here](#top) and "
        "![plot](figures/a.png).\n\n```\n[RESULTS.md](RESULTS.md)\n```\n"
    )
    out = conf.rewrite_relative_links(text, source, shown)
    assert "[RESULTS.md](/elim.md)" in out
    assert "[the rules](/conventions.md#stopping-rule)" in out
    assert "train (`examples/elim/train.py`)" in out
    assert "[web](https://example.org/x.md)" in out and "[here](#top)" in out
    assert "![plot](figures/a.png)" in out  # images: MyST's :relative-images:
    assert out.endswith("```\n[RESULTS.md](RESULTS.md)\n```\n")  # code is left alone
    out = conf.rewrite_relative_links("[RESULTS.md](RESULTS.md)", source, {})
    assert out == "`examples/elim/RESULTS.md`"
