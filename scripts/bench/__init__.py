"""The benchmark suite: one runner, shared timing rules, one report.

``make bench`` (``python -m scripts.bench``, from the repository root) runs every benchmark, each
in a fresh process with the allocator settings of :mod:`scripts.bench.timing`, and writes each
one's tables into its block of docs/benchmarks.md (:mod:`scripts.bench.report`). Each benchmark
is also a module that runs alone with its own options (``python -m scripts.bench.weights
--help``). The list, in the order the runner runs them, is :data:`scripts.bench.__main__.BENCHMARKS`.
"""
