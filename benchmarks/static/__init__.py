"""The static GPU report: every variant of smoothce's Triton kernels compiled for GPUs the machine
need not have (sm_90, sm_80, sm_100), read from their binaries, and held to the kernels' targets.

``python -m benchmarks.static`` (benchmarks/README.md, "Static GPU report"). variants.py says
what is compiled and how (the project's own launchers), sass.py reads a binary, model.py turns
it into per-logit figures and ceilings, record.py holds each row to the targets, table.py writes
the Markdown.
"""
