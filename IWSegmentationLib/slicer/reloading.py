"""The module's developer *Reload* button: reload the engine's modules Slicer has imported,
dependencies first, so that an edit anywhere in the engine takes effect without restarting Slicer.

The order is worked out from the modules' own import statements (:func:`engine_imports`, read from
their source files), not kept as a hand list: a hand list misses the modules added after it was
written, and a module left out keeps its old code while the modules that import it are reloaded.
Standard library only.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

#: The engine's top-level package.
ENGINE = __name__.split(".")[0]


def engine_imports(module: ModuleType, known: Mapping[str, ModuleType]) -> set[str]:
    """The modules of ``known`` (full names) that ``module``'s source imports, at its top or inside
    functions. ``from PACKAGE import name`` counts ``PACKAGE.name`` when that is a module, else
    ``PACKAGE``; a module without a source file imports nothing here."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return set()
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    package = module.__name__ if path.endswith("__init__.py") else module.__name__.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module.__name__}


def reload_order(modules: Mapping[str, ModuleType]) -> list[str]:
    """The engine modules among ``modules`` (``sys.modules`` by default in :func:`reload_engine`),
    each after every engine module it imports; ties in name order. The top package is left out
    (it holds only the version)."""
    known = {name: mod for name, mod in modules.items()
             if name.startswith(f"{ENGINE}.") and isinstance(mod, ModuleType)}
    sorter = graphlib.TopologicalSorter({name: engine_imports(mod, known) for name, mod in sorted(known.items())})
    return list(sorter.static_order())


def reload_engine(modules: Mapping[str, ModuleType] | None = None) -> list[str]:
    """Reload the imported engine modules in :func:`reload_order`; return their names (without the
    ``IWSegmentationLib.`` prefix)."""
    order = reload_order(dict(sys.modules if modules is None else modules))
    for name in order:
        importlib.reload(sys.modules[name])
    return [name.removeprefix(f"{ENGINE}.") for name in order]
