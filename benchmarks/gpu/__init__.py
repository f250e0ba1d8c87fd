"""Measuring on a lent GPU machine that cannot reach a package registry.

``fetch_wheels`` (run where a registry is reachable) downloads the peers' wheels for the GPU
machine's Python and packs them into parts small enough to travel one at a time; ``check`` (run on
the GPU machine from the repository root) installs the project and whatever parts have arrived,
then runs the test suite and the benchmark cases in phases, most valuable first, each within a time
budget, leaving records, plots and logs in one folder. ``bundle`` is the parts' format, shared by
both. benchmarks/README.md says how to use them.
"""
