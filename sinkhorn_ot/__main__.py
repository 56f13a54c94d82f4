"""Command line: ``python -m sinkhorn_ot build|info``.

* ``build``: compile the native extensions now (CPU always, CUDA where torch has CUDA
  and ``nvcc`` exists), print the compiler log, exit non-zero if any build fails.
* ``info``: one line per backend (``torch: ok``, ``native-cpu: ...``,
  ``native-cuda: ...``), each ``ok``, ``compiled, no device`` or
  ``unavailable: <reason>``; builds what is not built yet.
"""

from __future__ import annotations

import argparse
import sys

from . import native


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: the arguments after ``python -m sinkhorn_ot``; default ``sys.argv[1:]``.

    Example:
        >>> from sinkhorn_ot.__main__ import main
        >>> status = main(["build", "--no-cuda", "--quiet"])  # doctest: +ELLIPSIS
        torch: ok
        native-cpu: ...
        native-cuda: ...
        >>> status == 0  # 1 where the CPU extension cannot be compiled
        True
    """
    parser = argparse.ArgumentParser(
        prog="python -m sinkhorn_ot", description="sinkhorn_ot native backends"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the native extensions ahead of time")
    p_build.add_argument("--quiet", action="store_true", help="do not print the compiler log")
    group = p_build.add_mutually_exclusive_group()
    group.add_argument(
        "--cuda",
        dest="cuda",
        action="store_true",
        default=None,
        help="require the CUDA extension (fail if it cannot be built)",
    )
    group.add_argument(
        "--no-cuda", dest="cuda", action="store_false", help="build the CPU extension only"
    )
    sub.add_parser("info", help="print which backends are available and why not")
    args = parser.parse_args(argv)

    if args.command == "info":
        for line in native.info_lines():
            print(line)
        return 0
    errors = native.build(cuda=args.cuda, verbose=not args.quiet)
    for line in native.info_lines(cuda=args.cuda is not False):
        print(line)
    failed = {name: err for name, err in errors.items() if err is not None}
    for name, err in failed.items():
        print(f"error: {name} build failed: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
