"""Peak memory of forward + backward against the iteration count (10 vs 1000), one
subprocess per measurement (see ``memory_probe.py``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .cases import MEMORY_SHAPES
from .registry import get as registry

REPO = Path(__file__).resolve().parents[1]

# glibc raises its mmap threshold after the first large free, so later tensor buffers
# come from the heap and stay resident after they are freed: RSS then depends on what
# the warm-up left behind, not on the solve (we saw 10-iteration peaks from 24 MB down
# to -0.1 MB "above before" in repeated identical runs). A fixed threshold keeps every
# tensor-sized buffer in its own mapping, so RSS tracks the bytes actually live.
PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def test_memory(memory_point, bench):
    grad, backend, shape_key, iters = memory_point
    shape = MEMORY_SHAPES[shape_key]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory_probe",
        "--shape",
        *map(str, shape),
        "--iters",
        str(iters),
        "--grad",
        grad,
        "--backend",
        backend,
        "--method",
        "log",
        "--device",
        str(bench["device"]),
        "--threads",
        str(bench["threads"]),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=PROBE_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    registry().add(
        "memory",
        "x".join(map(str, shape)),
        f"ours[{backend}]",
        out["extra_mb"],
        grad=grad,
        backend=backend,
        shape_key=shape_key,
        iters=iters,
        **out,
    )
