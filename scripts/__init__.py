"""Developer scripts (``make demo``, the benchmark suite, studies).

A package so that the benchmark suite (``python -m scripts.bench``, run from the repository
root) imports the demo's settings as ``from scripts import demo`` and its own parts as
``scripts.bench.*``, never a file by its path. The scripts themselves still run as files
(``python scripts/demo.py``).
"""
