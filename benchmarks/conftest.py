"""pytest wiring of the benchmark suite.

* ``--benchmark`` turns the suite on; without it every test here is skipped, so a plain
  ``pytest benchmarks/`` costs nothing (and exits 0).
* ``--bench-device`` (``auto``/``cpu``/``cuda``), ``--bench-threads`` (CPU threads for
  every implementation, default 2), ``--bench-budget`` (seconds of timed rounds per
  measurement) and ``--bench-out`` (results folder) tune a run.
* At the end of the session the report (Markdown table + PNG plot) is written to
  ``<out>/<device>.md`` and ``<out>/<device>.png``, with pytest-benchmark's JSON as
  ``<out>/<device>.json`` (unless ``--benchmark-json`` says otherwise), and the table is
  printed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from . import registry, report, suite

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("sinkhorn_ot benchmarks")
    group.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the sinkhorn_ot benchmark suite (skipped otherwise)",
    )
    group.addoption(
        "--bench-device",
        default="auto",
        help="device of the suite: auto (cuda if available), cpu or cuda",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=2,
        help="torch CPU threads for every implementation (default 2)",
    )
    group.addoption(
        "--bench-budget",
        type=float,
        default=None,
        help="seconds of timed rounds per measurement (default 0.4 cpu, 1 cuda)",
    )
    group.addoption(
        "--bench-out", default=str(RESULTS), help="folder of the Markdown/PNG/JSON results"
    )


def _enabled(config) -> bool:
    return bool(config.getoption("--benchmark", default=False))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not _enabled(config):
        return
    device = suite.resolve_device(config.getoption("--bench-device"))
    threads = config.getoption("--bench-threads")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the memory-probe subprocesses
    reg = registry.reset()
    reg.meta.update(suite.environment(device, threads))
    reg.meta["loadavg_start"] = _loadavg()
    out = Path(config.getoption("--bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    config._sinkhorn_bench = {
        "device": device,
        "threads": threads,
        "out": out,
        "t0": time.perf_counter(),
    }
    # pytest-benchmark reads this option in its own pytest_configure (which runs after
    # this tryfirst hook): save its JSON beside our Markdown unless told otherwise.
    if config.getoption("benchmark_json", default=None) is None:
        config.option.benchmark_json = out / f"{reg.meta['device_name']}.json"


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


#: Run order of the test modules: the agreement check gates all timing, the forward
#: tables matter most (a run cut short by Ctrl-C or a timeout still reports them).
MODULE_ORDER = [
    "test_agreement",
    "test_throughput",
    "test_forward",
    "test_backward",
    "test_memory",
    "test_point_clouds",
]


def _module_rank(item) -> int:
    stem = Path(str(item.fspath)).stem
    return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if HERE in Path(str(i.fspath)).resolve().parents]
    if not _enabled(config):
        skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
        for item in ours:
            item.add_marker(skip)
        return
    # Stable sort: the order inside a module (parametrisation order) is kept.
    rank = {id(i): _module_rank(i) for i in ours}
    items.sort(key=lambda i: rank.get(id(i), -1))


def pytest_generate_tests(metafunc):
    """Parametrise the tests from what exists on this device (see :mod:`.suite`).

    Without ``--benchmark`` nothing is probed (the probe may build the native
    extension): the tests get one placeholder parameter and are skipped.
    """
    names = {"forward_point", "backward_point", "memory_point", "case_name"}
    wanted = names & set(metafunc.fixturenames)
    if not wanted:
        return
    (name,) = wanted
    config = metafunc.config
    if not _enabled(config):
        metafunc.parametrize(name, [None], ids=["skipped"])
        return
    device = config._sinkhorn_bench["device"]
    if name == "forward_point":
        points = suite.forward_points(device)
    elif name == "backward_point":
        points = suite.backward_points(device)
    elif name == "memory_point":
        points = suite.memory_points(device)
    else:
        points = [spec.name for spec in suite.forward_specs(device)]
    ids = [
        "-".join(str(p) for p in point) if isinstance(point, tuple) else point for point in points
    ]
    metafunc.parametrize(name, points, ids=ids)


@pytest.fixture(scope="session")
def bench(request):
    """Run settings: ``device``, ``threads``, ``budget`` (seconds per measurement)."""
    cfg = request.config._sinkhorn_bench
    budget = request.config.getoption("--bench-budget")
    if budget is None:
        budget = 1.0 if cfg["device"].type == "cuda" else 0.4
    return {**cfg, "budget": budget, "caps": suite.detect(str(cfg["device"]))}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Put our structured records (cases, modes, ratios' inputs) into the JSON too."""
    if _enabled(config):
        output_json["sinkhorn_ot"] = registry.get().to_json()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not _enabled(config) or not hasattr(config, "_sinkhorn_bench"):
        return
    cfg = config._sinkhorn_bench
    reg = registry.get()
    reg.meta["loadavg_end"] = _loadavg()
    reg.meta["wall_s"] = time.perf_counter() - cfg["t0"]
    reg.meta["exitstatus"] = int(exitstatus)
    caps = suite.detect(str(cfg["device"])) if reg.records else None
    if caps is not None:
        reg.meta["missing"] = caps.missing
        reg.meta["backends"] = caps.backends
        reg.meta["grad_modes"] = caps.grad_modes
    if not reg.records:
        return
    texts = []
    # A run of only the point-cloud section (-k point_cloud) must not overwrite the
    # committed dense-cost report with an empty one, and vice versa.
    if any(not r.section.startswith(("pc-", "ub-")) for r in reg.records):
        texts.append(report.write(reg, cfg["out"] / reg.meta["device_name"]))
    if any(r.section.startswith("ub-") for r in reg.records):
        from . import unbalanced

        text = unbalanced.render(reg.records)
        (cfg["out"] / f"{reg.meta['device_name']}-unbalanced.md").write_text(text)
        texts.append(text)
    if any(r.section.startswith("pc-") for r in reg.records):
        path = cfg["out"] / f"{cfg['device'].type}-point-clouds.md"
        texts.append(report.write_point_clouds(reg, path))
    config._sinkhorn_report = "\n\n".join(texts)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    text = getattr(config, "_sinkhorn_report", None)
    if text:
        terminalreporter.section("sinkhorn_ot benchmark report")
        terminalreporter.write(text + "\n")
