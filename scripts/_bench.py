"""The name ``scripts/compare_losses.py`` imports its report helpers under (``import _bench``).

That study is not part of the benchmark suite and is being rewritten; until it imports
``scripts.bench`` itself, this module hands it the suite's one copy of the helpers
(:mod:`scripts.bench.timing`, :mod:`scripts.bench.report`). Delete it then.
"""

from __future__ import annotations

import sys
from pathlib import Path

# compare_losses.py runs as a file, which puts scripts/ on the path but not the repository root
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from scripts.bench.report import write_report  # noqa: E402
from scripts.bench.timing import cpu_name, machine_line, versions, visible_cores  # noqa: E402

__all__ = ["cpu_name", "machine_line", "versions", "visible_cores", "write_report"]
