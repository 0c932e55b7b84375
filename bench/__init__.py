"""Benchmarks: ``python -m bench`` runs every ``bench/bench_*.py``; each prints its own figures.

A benchmark script is a module with ``main(argv) -> int`` (0 = target met). It measures against a
baseline taken in the same run (ratios, not absolute times alone), because the machine is shared.
"""
