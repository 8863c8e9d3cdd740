"""icefleet benchmarks: each ``bench_<name>.py`` module has a ``main(argv=None) -> int``.

``python -m benchmarks`` runs them all; ``python -m benchmarks <name> ...`` runs the named ones.
Results are printed and written as JSON under ``benchmarks/results/`` (not committed).
"""
