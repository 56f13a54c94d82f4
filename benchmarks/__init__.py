"""Benchmark suite of ``sinkhorn_ot`` (run with ``pytest benchmarks/ --benchmark``).

See ``benchmarks/README.md`` for how to run it and how to read the ratios.
"""
