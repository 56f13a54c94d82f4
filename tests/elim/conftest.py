"""Make the ELIM example package (``examples/elim/elim``) importable from the tests."""

import sys
from pathlib import Path

EXAMPLE_ROOT = Path(__file__).resolve().parents[2] / "examples" / "elim"
if str(EXAMPLE_ROOT) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_ROOT))
