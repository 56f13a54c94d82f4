"""Turn the session's records into the Markdown report and the log-log plot.

Ratios are always ``other time / our time``: above 1 means ours is faster. In the
forward tables "our time" is the fastest of our backends for the row's method (log
rows compare with log-domain peers, kernel rows with kernel-form peers).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

from .agreement import AGREE_TOL, PLAN_RTOL, REFERENCE_TOL
from .cases import TARGET_SHAPE, forward_specs
from .registry import Registry
from .suite import MEMORY_ITERS, PER_ITER, TOL

#: Peer columns in table order; a log row and a kernel row share a column where the
#: peer has both forms (POT solve_batch: log_sinkhorn / sinkhorn).
PEER_COLUMNS = ["POT solve_batch", "POT ot.sinkhorn loop", "GeomLoss", "torch loop"]
MODE_TITLES = {
    "per_iter": f"Forward, per-iteration ({PER_ITER} iterations, tol=None)",
    "to_tol": f"Forward, to tolerance (tol={TOL:g}, eps = 0.05 x median cost)",
}
TARGET_KEY = "x".join(map(str, TARGET_SHAPE))


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None or not math.isfinite(r) else f"{r:.2g}×" if r < 10 else f"{r:.0f}×"


def _check(r: float | None, target: float, higher_is_better: bool = True) -> str:
    if r is None:
        return "—"
    ok = r >= target if higher_is_better else r <= target
    return f"{fmt_ratio(r)} {'✓' if ok else '✗'}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


class _Forward:
    """Index of forward records: ``time(case, mode, label, family)``."""

    def __init__(self, reg: Registry):
        self.rec = {}
        for r in reg.select("forward"):
            self.rec[(r.case, r.info["mode"], r.impl, r.info["family"])] = r

    def get(self, case, mode, label, family):
        return self.rec.get((case, mode, label, family))

    def time(self, case, mode, label, family):
        r = self.get(case, mode, label, family)
        return r.value if r else None

    def best_ours(self, case, mode, family, labels):
        times = [t for lab in labels if (t := self.time(case, mode, lab, family)) is not None]
        return min(times) if times else None


def _header(reg: Registry) -> list[str]:
    m = reg.meta
    lines = [f"# sinkhorn_ot benchmarks — {m.get('device_name')}", ""]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("started", time.time())))
    lines.append(
        f"- Run: {when}, {m.get('wall_s', 0):.0f} s wall, exit status "
        f"{m.get('exitstatus')}; command `pytest benchmarks/ --benchmark`"
    )
    dev = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpu_count')} CPUs)"
    lines.append(f"- Device: {m.get('device')} — {dev}; torch threads: {m.get('threads')}")
    lines.append(
        f"- Versions: torch {m.get('torch')}, POT {m.get('ot')}, GeomLoss "
        f"{m.get('geomloss')}, sinkhorn_ot {m.get('sinkhorn_ot')}, numpy "
        f"{m.get('numpy')}, Python {m.get('python')}"
    )
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    busy = la0 and la1 and m.get("device") == "cpu" and max(la0[0], la1[0]) > m.get("cpu_count", 1)
    if busy:
        lines.append(
            "- **Warning: other processes shared this machine's cores during the run "
            "(load average above the core count). Absolute CPU times are inflated, "
            "small cases most; rerun on an idle machine before quoting numbers.**"
        )
    if la0 and la1:
        lines.append(
            f"- Load average (1 min) at start / end: {la0[0]:.2f} / {la1[0]:.2f} "
            "(above the thread count means other work shared the cores: times are "
            "then pessimistic, ratios less affected)"
        )
    lines.append(
        f"- Backends: {', '.join(m.get('backends', []))}; grad modes: "
        + (", ".join(f"{k} ({'/'.join(v)})" for k, v in m.get("grad_modes", {}).items()) or "none")
    )
    missing = m.get("missing", {})
    if missing:
        lines.append("- **Absent from this run** (rows/columns omitted):")
        lines += [f"  - {k}: {v}" for k, v in missing.items()]
    rate = reg.one("throughput", impl="torch.exp")
    if rate:
        lines.append(
            f"- torch.exp throughput (2^24 float32, contiguous): {rate.value / 1e9:.3g} "
            "G exp/s — the floor below is 2·B·N·M exps per iteration at this rate"
        )
    ours_rate = reg.one("throughput", impl="ours exp")
    if ours_rate:
        lines.append(
            f"- our kernels' vector exp (`exp_terms`, same tensor): {ours_rate.value / 1e9:.3g} "
            "G exp/s — the 'our exp floor' columns use this rate"
        )
    lines += [
        "",
        "Ratios are **peer time / our time** (> 1: ours is faster); times are the "
        "minimum over rounds. Per-iteration rows compare the cost of iterations; "
        "to-tolerance rows compare time to the same accuracy (each peer's stopping rule "
        "is translated so it reaches our tol, see `benchmarks/peers.py`).",
        "",
    ]
    return lines


def _forward_tables(reg: Registry, fw: _Forward, device) -> tuple[list[str], list[str]]:
    ours_labels = sorted(
        {r.impl for r in reg.select("forward") if r.info.get("ours")},
        key=lambda s: (s != "ours[torch]", s),
    )
    peer_labels = [p for p in PEER_COLUMNS if any(r.impl == p for r in reg.select("forward"))]
    cases = [s.name for s in forward_specs(device)]
    lines: list[str] = []
    for mode in ("per_iter", "to_tol"):
        lines += [f"## {MODE_TITLES[mode]}", ""]
        rows = []
        for case in cases:
            for family in ("log", "kernel", "stabilised"):
                best = fw.best_ours(case, mode, family, ours_labels)
                if best is None:
                    continue
                row = [case, family]
                for lab in ours_labels:
                    r = fw.get(case, mode, lab, family)
                    cell = fmt_time(r.value) if r else "—"
                    if r and mode == "to_tol" and "n_iter" in r.info:
                        cell += f" ({r.info['n_iter']} it)"
                    row.append(cell)
                for lab in peer_labels:
                    r = fw.get(case, mode, lab, family)
                    if r is None:
                        row.append("—")
                        continue
                    cell = f"{fmt_time(r.value)} ({fmt_ratio(r.value / best)})"
                    if mode == "to_tol" and r.info.get("calibrated"):
                        cell += f" [n={r.info['n_iter']}]"
                    row.append(cell)
                rows.append(row)
        lines += _table(["case", "method", *ours_labels, *peer_labels], rows)
    if any(r.info.get("calibrated") for r in reg.select("forward")):
        lines += [
            "[n=…]: GeomLoss iteration count found before timing (smallest that reaches "
            "tol in our metric, within 25 %).",
            "",
        ]
    return lines, ours_labels


def _targets(reg: Registry, fw: _Forward, device, ours_labels) -> list[str]:
    lines = ["## Native-kernel targets", ""]
    rate = reg.one("throughput", impl="torch.exp")
    grid = [
        s.name
        for s in forward_specs(device)
        if s.shape is not None and not s.name.startswith("elim")
    ]
    native = "ours[native]" in ours_labels
    if not native:
        lines += [
            "The native backend was not available in this run (see header), so its "
            "targets cannot be checked; the torch backend's numbers are shown for "
            "reference.",
            "",
        ]
    lab = "ours[native]" if native else "ours[torch]"
    header = [
        "case",
        f"POT log / {lab} log (≥ 5)",
        f"torch log / {lab} log (≥ 3)",
        f"{lab} log / exp floor",
        f"POT kernel / {lab} kernel (≥ 1)",
    ]
    rows = []
    for mode in ("per_iter", "to_tol"):
        for case in grid:
            t_log = fw.time(case, mode, lab, "log")
            t_ker = fw.time(case, mode, lab, "kernel")
            pot_log = fw.time(case, mode, "POT solve_batch", "log")
            pot_ker = fw.time(case, mode, "POT solve_batch", "kernel")
            torch_log = fw.time(case, mode, "ours[torch]", "log")
            r1 = pot_log / t_log if pot_log and t_log else None
            r2 = torch_log / t_log if torch_log and t_log and native else None
            floor = None
            if rate and t_log and mode == "per_iter":
                work = fw.get(case, mode, lab, "log").info["work"]
                floor = t_log / (2 * work * PER_ITER / rate.value)
            r4 = pot_ker / t_ker if pot_ker and t_ker else None
            rows.append(
                [
                    f"{case} ({mode.replace('_', '-')})",
                    _check(r1, 5),
                    _check(r2, 3),
                    fmt_ratio(floor) if floor else "—",
                    _check(r4, 1),
                ]
            )
    lines += _table(header, rows)
    lines += [
        "exp floor: per-iteration time / (2·B·N·M·iterations / torch.exp throughput); "
        "1× would mean a log-domain iteration costs no more than its exponentials.",
        "",
    ]
    return lines + _robust_targets(reg, fw, grid)


def _robust_targets(reg: Registry, fw: _Forward, grid: list[str]) -> list[str]:
    """The robust fast path (native ``method="stabilised"``, plain and stage-wise eps)
    against POT's and our torch log domain, and both exp floors."""
    labels = [
        lab
        for lab in ("ours[native]", "ours[native, stages]")
        if fw.rec and any(key[2] == lab and key[3] == "stabilised" for key in fw.rec)
    ]
    if not labels:
        return []
    rates = {
        name: r.value
        for name in ("torch.exp", "ours exp")
        if (r := reg.one("throughput", impl=name)) is not None
    }
    lines = ['## Robust fast path targets (method="stabilised", native CPU)', ""]
    header = [
        "case",
        "ours",
        "iterations",
        "POT log / ours (≥ 5)",
        "torch log / ours (≥ 3)",
        "native log / ours",
        "ours / torch.exp floor",
        "ours / our exp floor",
    ]
    rows = []
    for mode in ("per_iter", "to_tol"):
        for case in grid:
            pot_log = fw.time(case, mode, "POT solve_batch", "log")
            torch_log = fw.time(case, mode, "ours[torch]", "log")
            native_log = fw.time(case, mode, "ours[native]", "log")
            for lab in labels:
                r = fw.get(case, mode, lab, "stabilised")
                if r is None or (mode == "per_iter" and lab != "ours[native]"):
                    continue
                floors = [
                    fmt_ratio(r.value / (2 * r.info["work"] * PER_ITER / rates[name]))
                    if mode == "per_iter" and name in rates
                    else "—"
                    for name in ("torch.exp", "ours exp")
                ]
                rows.append(
                    [
                        f"{case} ({mode.replace('_', '-')})",
                        lab,
                        str(r.info.get("n_iter", PER_ITER)),
                        _check(pot_log / r.value if pot_log else None, 5),
                        _check(torch_log / r.value if torch_log else None, 3),
                        fmt_ratio(native_log / r.value) if native_log else "—",
                        *floors,
                    ]
                )
    lines += _table(header, rows)
    lines += [
        'ours: `ours[native]` is `method="stabilised"` with the default schedule; '
        "`ours[native, stages]` adds `eps_scaling=0.5, eps_stage_iters=3`. The exp floors "
        "are the time of 2·B·N·M exponentials per iteration at each rate: the stabilised "
        "form does not compute them (it multiplies by a kernel it rebuilds only on "
        "absorption), so it can run below 1×.",
        "",
    ]
    return lines


def _backward(reg: Registry, fw: _Forward) -> list[str]:
    recs = reg.select("backward")
    if not recs:
        return []
    lines = [f"## Backward ({PER_ITER} iterations, loss = value.sum(), gradient w.r.t. C)", ""]
    keys = []
    for r in recs:
        k = (r.case, r.info["grad"], r.info["backend"], r.info["method"])
        if k not in keys:
            keys.append(k)
    rows = []
    for case, grad, backend, method in keys:
        both = reg.one(
            "backward", case=case, grad=grad, backend=backend, method=method, what="fwd+bwd"
        )
        bwd = reg.one("backward", case=case, grad=grad, backend=backend, method=method, what="bwd")
        fwd = fw.time(case, "per_iter", f"ours[{backend}]", method)
        ratio = bwd.value / fwd if bwd and fwd else None
        rows.append(
            [
                case,
                grad,
                backend,
                method,
                fmt_time(fwd),
                fmt_time(both.value if both else None),
                fmt_time(bwd.value if bwd else None),
                fmt_ratio(ratio),
            ]
        )
    lines += _table(
        [
            "case",
            "grad",
            "backend",
            "method",
            "forward (grad=none)",
            "fwd+bwd",
            "bwd",
            "bwd / forward",
        ],
        rows,
    )
    return lines


def _memory(reg: Registry) -> list[str]:
    recs = reg.select("memory")
    if not recs:
        return []
    kind = recs[0].info.get("kind")
    what = (
        "peak RSS above the RSS before the solve"
        if kind == "rss"
        else "torch.cuda.max_memory_allocated above the memory allocated before the solve"
    )
    lines = [f"## Memory against iterations (forward + backward, method=log; {what}, MB)", ""]
    groups = defaultdict(dict)
    for r in recs:
        groups[(r.info["grad"], r.info["backend"], r.case)][r.info["iters"]] = r.value
    lo, hi = MEMORY_ITERS
    rows = []
    for (grad, backend, case), by_iter in groups.items():
        a, b = by_iter.get(lo), by_iter.get(hi)
        rows.append(
            [
                grad,
                backend,
                case,
                f"{a:.1f}" if a is not None else "—",
                f"{b:.1f}" if b is not None else "— (not run)",
                fmt_ratio(b / a) if a and b else "—",
            ]
        )
    lines += _table(["grad", "backend", "case", f"{lo} it", f"{hi} it", f"{hi} / {lo}"], rows)
    lines.append("")
    return lines


def _diff_targets(reg: Registry, fw: _Forward) -> list[str]:
    lines = ["## Differentiation targets (implicit)", ""]
    rows = []
    for backend in ("torch", "native"):
        bwd = reg.one(
            "backward", case=TARGET_KEY, grad="implicit", backend=backend, method="log", what="bwd"
        )
        fwd = fw.time(TARGET_KEY, "per_iter", f"ours[{backend}]", "log")
        mem = {
            r.info["iters"]: r.value
            for r in reg.select("memory", grad="implicit", backend=backend, shape_key="target")
        }
        if bwd is None and not mem:
            continue
        lo, hi = MEMORY_ITERS
        r_mem = mem[hi] / mem[lo] if lo in mem and hi in mem and mem[lo] > 0 else None
        r_time = bwd.value / fwd if bwd and fwd else None
        rows.append(
            [
                backend,
                _check(r_time, 1.0, higher_is_better=False),
                _check(r_mem, 1.2, higher_is_better=False),
            ]
        )
    if not rows:
        return [
            *lines,
            "No grad='implicit' measurements in this run (not available, or not selected; see header).",
            "",
        ]
    lines += _table(
        [
            "backend",
            f"implicit bwd / {PER_ITER}-it forward, {TARGET_KEY} log (≤ 1)",
            f"memory {MEMORY_ITERS[1]} it / {MEMORY_ITERS[0]} it, {TARGET_KEY} (≤ 1.2)",
        ],
        rows,
    )
    return lines


def _agreement(reg: Registry, device) -> list[str]:
    recs = reg.select("agreement")
    if not recs:
        return []
    cases = [s.name for s in forward_specs(device)]
    impls = []
    for r in recs:
        k = (r.impl, r.info["family"])
        if k not in impls:
            impls.append(k)
    lines = [
        "## Agreement check (before timing)",
        "",
        f"max |P − P_ref| / max P_ref of each implementation's to-tolerance plan (tol={AGREE_TOL:g}) "
        f"against ours[torch] log at tol={REFERENCE_TOL:g}; limit per case: max({PLAN_RTOL:g}, "
        "2 × our own torch log difference), see `benchmarks/agreement.py`.",
        "",
    ]
    rows = []
    for label, family in impls:
        row = [f"{label} {family}"]
        for case in cases:
            r = next(
                (
                    x
                    for x in recs
                    if x.case == case and x.impl == label and x.info["family"] == family
                ),
                None,
            )
            row.append(f"{r.value:.1e}" if r else "—")
        rows.append(row)
    limits = ["limit"]
    for case in cases:
        lim = [x.info["limit"] for x in recs if x.case == case]
        limits.append(f"{max(lim):.1e}" if lim else "—")
    rows.append(limits)
    lines += _table(["implementation", *cases], rows)
    worst = defaultdict(float)
    for r in reg.select("forward", mode="to_tol"):
        worst[(r.impl, r.info["family"])] = max(
            worst[(r.impl, r.info["family"])], r.info["marginal_error"]
        )
    if worst:
        lines += [
            f"Worst relative L1 marginal error reached by the to-tolerance runs "
            f"(tol={TOL:g}): " + ", ".join(f"{k[0]} {k[1]} {v:.1e}" for k, v in worst.items()),
            "",
        ]
    return lines


def plot(reg: Registry, path: Path, device) -> bool:
    """Log-log time against B·N·M over the grid cases, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grid = {s.name for s in forward_specs(device) if not s.name.startswith("elim")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, mode in zip(axes, ("per_iter", "to_tol")):
        lines = defaultdict(list)
        for r in reg.select("forward", mode=mode):
            if r.case in grid:
                lines[f"{r.impl} {r.info['family']}"].append((r.info["work"], r.value))
        for label, pts in sorted(lines.items()):
            pts.sort()
            style = "-" if label.startswith("ours") else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("problem size B·N·M")
        ax.set_title(MODE_TITLES[mode], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (s)")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"sinkhorn_ot forward — {reg.meta.get('device_name')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(reg: Registry) -> str:
    import torch

    device = torch.device(reg.meta.get("device", "cpu"))
    fw = _Forward(reg)
    lines = _header(reg)
    tables, ours_labels = _forward_tables(reg, fw, device)
    lines += tables
    lines += _targets(reg, fw, device, ours_labels)
    lines += _backward(reg, fw)
    lines += _memory(reg)
    lines += _diff_targets(reg, fw)
    lines += _agreement(reg, device)
    return "\n".join(lines)


def write(reg: Registry, stem: Path) -> str:
    """Write ``<stem>.md`` and ``<stem>.png``; return the Markdown."""
    import torch

    text = render(reg)
    png = stem.with_suffix(".png")
    if plot(reg, png, torch.device(reg.meta.get("device", "cpu"))):
        text += f"\n## Plot\n\n![time against problem size]({png.name})\n"
    text += f"\nRaw timings: pytest-benchmark JSON `{stem.with_suffix('.json').name}` (our records under the key `sinkhorn_ot`).\n"
    stem.with_suffix(".md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------
# Point clouds (test_point_clouds.py): <out>/cpu-point-clouds.md
# ---------------------------------------------------------------------------------------

#: Targets of the point-cloud section (benchmarks/README.md).
PC_TARGET_POT = 10.0  # POT solve_sample(lazy=True) / ours[native], per iteration
PC_TARGET_GEOMLOSS = 1.0  # GeomLoss tensorized / ours[native], where it fits
PC_TARGET_DENSE = 2.0  # ours[native] points / ours[dense native], at most
PC_TARGET_MEMORY_MB = 64.0  # native peak RSS growth at every size, at most


def _fmt_rate(r: float) -> str:
    return f"{r / 1e9:.3g} G/s" if r >= 1e8 else f"{r / 1e6:.3g} M/s"


def _versions() -> str:
    out = []
    for mod, name in (("ot", "POT"), ("geomloss", "GeomLoss"), ("jax", "jax"), ("ott", "ott-jax")):
        try:
            out.append(f"{name} {__import__(mod).__version__}")
        except Exception:
            out.append(f"{name} absent")
    return ", ".join(out)


def render_point_clouds(reg: Registry) -> str:
    from .point_clouds import PC_ITERS, PC_PLAN_RTOL, ROW_BUDGET_S

    m = reg.meta
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("started", time.time())))
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    lines = [
        "# sinkhorn_ot benchmarks — CPU point clouds",
        "",
        f"- Run: {when}, {m.get('wall_s', 0):.0f} s wall (whole session), exit status "
        f"{m.get('exitstatus')}; command `pytest benchmarks/ --benchmark -k point_cloud`",
        f"- Machine: {m.get('cpu')} ({m.get('cpu_count')} CPUs); torch threads: "
        f"{m.get('threads')} (JAX/XLA and NumPy use their own pools on the same cores)",
        f"- Versions: torch {m.get('torch')}, sinkhorn_ot {m.get('sinkhorn_ot')}, {_versions()}",
    ]
    if la0 and la1:
        lines.append(
            f"- Load average (1/5/15 min) at start: {' / '.join(f'{v:.2f}' for v in la0)}; "
            f"at end: {' / '.join(f'{v:.2f}' for v in la1)}"
        )
        if max(la0[0], la1[0]) > m.get("cpu_count", 1):
            lines.append(
                "- **Warning: the load average exceeded the core count: other processes "
                "shared the cores, times are inflated and noisy (ratios less so, since "
                "every row's implementations run interleaved).**"
            )
    for k, v in m.get("pc_missing", {}).items():
        lines.append(f"- Absent: {k}: {v}")
    iters = ", ".join(f"N={n}: T={t}, T0={t0}, {r} round(s)" for n, (t, t0, r) in PC_ITERS.items())
    lines += [
        "",
        "Problem: `C_ij = |x_i - y_j|^2`, N = M uniform points in [0, 1]^D, float32, B = 1, "
        "uniform weights, eps = 0.05 × median cost. **Time per iteration** = (t(T) − t(T0)) / "
        "(T − T0), each the minimum over interleaved rounds (every implementation of a row in "
        f"turn, same inputs), which removes per-call work ({iters}). Ours: the loop that "
        "`sinkhorn(PointCloud(x, y), backend=...)` runs (`ops.solve_points` / the torch "
        "block loop / `ops.solve_dense` on the stored cost). **Ratio** = peer time / "
        "ours[native] time (> 1: ours is faster). **Pairs/s** = B·N·M·2 / time per iteration. "
        f"At N = 50 000, rows estimated to need more than {ROW_BUDGET_S:g} s are not run "
        "(estimate shown).",
        "",
        "## Per iteration",
        "",
    ]
    recs = reg.select("pc-forward")
    keys = []
    for r in recs:
        if (r.info["dim"], r.info["n"]) not in keys:
            keys.append((r.info["dim"], r.info["n"]))
    rows = []
    for dim, n in keys:
        row_recs = [r for r in recs if r.info["dim"] == dim and r.info["n"] == n]
        ours = next((r for r in row_recs if r.info["key"] == "ours-native"), None)
        base = ours.value if ours and math.isfinite(ours.value) and ours.value > 0 else None
        for r in row_recs:
            if "why" in r.info:
                rows.append([f"D={dim}", f"{n:,}", r.impl, "—", "—", "—", r.info["why"]])
                continue
            ok = r.value > 0
            ratio = r.value / base if base and ok and r.info["key"] != "ours-native" else None
            rows.append(
                [
                    f"D={dim}",
                    f"{n:,}",
                    r.impl,
                    fmt_time(r.value) if ok else "noise (≤ 0)",
                    fmt_ratio(ratio)
                    if ratio
                    else ("1×" if r.info["key"] == "ours-native" else "—"),
                    _fmt_rate(2 * r.info["work"] / r.value) if ok else "—",
                    f"t({r.info['n_hi']})={fmt_time(r.info['t_hi'])}, "
                    f"t({r.info['n_lo']})={fmt_time(r.info['t_lo'])}",
                ]
            )
    lines += _table(
        ["D", "N = M", "implementation", "time / iteration", "ratio", "pairs/s", "notes"], rows
    )

    over = reg.select("pc-overhead")
    if over:
        lines += [
            "## `sinkhorn()` call overhead (native)",
            "",
            'A whole `sinkhorn(PointCloud(x, y), backend="native", tol=None, max_iter=0)` '
            "minus the native loop at 0 iterations: building the result (`value_linear` and "
            "`err` through the lazy plan, on the torch side, float64 marginals). Not part of "
            "the per-iteration times above; it is paid once per call.",
            "",
        ]
        rows = []
        for r in over:
            it = reg.one("pc-forward", key="ours-native", dim=r.info["dim"], n=r.info["n"])
            equiv = r.value / it.value if it and it.value > 0 else None
            rows.append(
                [
                    f"D={r.info['dim']}",
                    f"{r.info['n']:,}",
                    fmt_time(r.value),
                    f"{equiv:.0f}" if equiv else "—",
                ]
            )
        lines += _table(["D", "N = M", "overhead per call", "= native iterations"], rows)

    lines += ["## Targets", ""]
    rows = []
    for dim, n in keys:

        def t(key, dim=dim, n=n):
            r = reg.one("pc-forward", key=key, dim=dim, n=n)
            return r.value if r and math.isfinite(r.value) and r.value > 0 else None

        nat, pot, gl, dense = (
            t("ours-native"),
            t("pot-lazy"),
            t("geomloss-tensorized"),
            t("ours-dense-native"),
        )
        rows.append(
            [
                f"D={dim}, N={n:,}",
                _check(pot / nat, PC_TARGET_POT) if pot and nat else "— (not run)",
                _check(gl / nat, PC_TARGET_GEOMLOSS)
                if gl and nat
                else "— (does not fit / not run)",
                _check(nat / dense, PC_TARGET_DENSE, higher_is_better=False)
                if nat and dense
                else "— (no dense)",
            ]
        )
    lines += _table(
        [
            "row",
            f"POT lazy / ours[native] (≥ {PC_TARGET_POT:g})",
            f"GeomLoss tensorized / ours[native] (≥ {PC_TARGET_GEOMLOSS:g})",
            f"ours[native] / ours[dense native] (≤ {PC_TARGET_DENSE:g})",
        ],
        rows,
    )

    mem = reg.select("pc-memory")
    if mem:
        lines += [
            "## Peak memory (RSS growth over the solve, one subprocess each, 1 iteration, MB)",
            "",
            "`loop`: the loop `sinkhorn()` runs; `call`: the whole `sinkhorn(PointCloud(...))` "
            '(result through the lazy plan); `dense`: `sinkhorn(C, backend="native")` with '
            "the cost built inside the measured region. Dense cost size 4·N·M bytes for "
            f"reference. Target: native loop ≤ {PC_TARGET_MEMORY_MB:g} MB at every size "
            "(flat in N·M).",
            "",
        ]
        rows = []
        for r in mem:
            dense_mb = 4 * r.info["n"] ** 2 / 2**20
            flag = ""
            if r.info["what"] == "loop" and r.info["backend"] == "native":
                flag = " ✓" if r.value <= PC_TARGET_MEMORY_MB else " ✗"
            rows.append(
                [
                    r.info["what"],
                    r.info["backend"],
                    f"D={r.info['dim']}",
                    f"{r.info['n']:,}",
                    f"{r.value:.1f}{flag}",
                    f"{dense_mb:,.0f}",
                ]
            )
        lines += _table(["what", "backend", "D", "N = M", "peak growth MB", "dense cost MB"], rows)

    agree = reg.select("pc-agreement")
    if agree:
        lines += [
            "## Agreement (before timing; N = M = 500, converged)",
            "",
            "max |P − P_ref| / max P_ref against ours[torch] at tol 1e-5 (limit "
            f"{PC_PLAN_RTOL:g}), and the potentials' difference in units of eps (after "
            "removing the free constant). Peers converge by their own rules: POT "
            "`tol=1e-5`, OTT `threshold=1e-5`, GeomLoss its `sinkhorn_loop` + "
            "`softmin_tensorized` with 2000 extra iterations at the final eps.",
            "",
        ]
        rows = []
        for r in agree:
            if "why" in r.info:
                rows.append([r.case, r.impl, "—", "—", r.info["why"]])
            else:
                ok = "✓" if r.value <= PC_PLAN_RTOL else "✗"
                rows.append(
                    [r.case, r.impl, f"{r.value:.1e} {ok}", f"{r.info['potentials']:.1e}", ""]
                )
        lines += _table(["case", "implementation", "plan diff", "potentials / eps", "note"], rows)
    return "\n".join(lines)


def write_point_clouds(reg: Registry, path: Path) -> str:
    """Write the point-cloud report (and its records as JSON beside it)."""
    import json
    from dataclasses import asdict

    text = render_point_clouds(reg)
    path.write_text(text + "\n")
    records = [asdict(r) for r in reg.records if r.section.startswith("pc-")]
    meta = {k: v for k, v in reg.meta.items()}
    path.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1, default=str)
    )
    return text
