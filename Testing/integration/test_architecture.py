"""The architecture rules of IWSegmentationLib, as tests (docs/architecture.md explains them).

The folders are the pipeline: ``core`` -> ``preprocessing`` / ``evaluation`` -> ``nn`` / ``data`` ->
``inference`` -> ``training`` -> ``cli``, with ``backend`` (``iwseg predict`` as a child process),
``testing`` (the phantom), ``serve`` (``iwseg serve``) and ``slicer`` (the module's side) beside
them. Which layer may import which is one table, :data:`ALLOWED` (docs/architecture.md shows the
same, and a test keeps the two equal). There are no exceptions: an arrow back up fails.

The imports are read from the source (lazy imports inside functions included), so a rule breaks
the moment someone writes the import, not when a test happens to run that line. No two engine
modules may import each other, directly or round a longer circle (annotation-only imports under
``TYPE_CHECKING`` count too: they are a dependency all the same). Two rules are also checked at
run time, in a fresh interpreter: the Slicer side and the evaluation load no torch.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "IWSegmentationLib"
PACKAGE = "IWSegmentationLib"

#: Which layer may import which: folder -> the engine folders its files may import (its own
#: included), the lowest layer first. The top-level files (``__init__``, ``__main__``) belong to
#: ``cli``: ``python -m IWSegmentationLib`` is the CLI.
ALLOWED: dict[str, set[str]] = {
    # the foundation (errors, image files, lesions and their names, progress): nothing above it
    "core": {"core"},
    # steps on numpy arrays
    "preprocessing": {"core", "preprocessing"},
    "evaluation": {"core", "evaluation"},
    # the network and the data (torch)
    "nn": {"core", "nn", "preprocessing"},
    "data": {"core", "data", "preprocessing"},
    "inference": {"core", "inference", "nn", "preprocessing"},
    "training": {"core", "training", "data", "nn", "preprocessing", "inference", "evaluation"},
    # the prediction use case: its options (torch-free) and the local run, files in -> files out
    "predict": {"core", "predict", "nn", "preprocessing", "inference"},
    # ``iwseg predict`` as a child process, what the module and the server share (nn: model cards,
    # no torch; predict: only its options, see ONLY_THROUGH)
    "backend": {"core", "backend", "nn", "predict"},
    # the model library: checkpoints by name, their licence and sha256, manifests and downloads (nn: the
    # safe card reader only, see ONLY_THROUGH)
    "models": {"core", "models", "nn"},
    # the phantom, and its checkpoint written by a child (backend)
    "testing": {"core", "testing", "nn", "preprocessing", "backend"},
    # the front ends: the command line, the server (its jobs are ``iwseg predict`` child processes:
    # it needs the options, never the CLI), the Slicer side (the server only through its client)
    "cli": {"core", "cli", "data", "nn", "preprocessing", "inference", "evaluation", "training", "serve", "backend",
            "predict", "models"},
    "serve": {"core", "serve", "nn", "preprocessing", "inference", "evaluation", "backend", "predict"},
    "slicer": {"core", "slicer", "evaluation", "nn", "backend", "serve", "predict", "models"},
}
#: folders with rules that the tree may not have yet (serve/ arrives with the server branch)
PLANNED: set[str] = set()
#: folder -> the only modules of another folder it may import from there (the rest of it is off limits):
#: the module talks to a remote server through the client, which needs only the standard library
ONLY_THROUGH = {("slicer", "serve"): {f"{PACKAGE}.serve.client"},
                # the torch-free parts of the prediction use case: what a job is asked, the lesion file
                ("slicer", "predict"): {f"{PACKAGE}.predict.options", f"{PACKAGE}.predict.lesion_json"},
                ("serve", "predict"): {f"{PACKAGE}.predict.options", f"{PACKAGE}.predict.lesion_json"},
                ("backend", "predict"): {f"{PACKAGE}.predict.options"},
                # the library reads model cards with the safe, torch-free reader and nothing else of nn/
                ("models", "nn"): {f"{PACKAGE}.nn.checkpoint"}}
#: files that may import only the standard library (and the engine's own modules)
STDLIB_ONLY = {"serve/client.py"}

#: third-party modules a folder must never import (at any depth of a file)
FORBIDDEN = {
    "slicer": {"torch"},
    "backend": {"torch"},
    "evaluation": {"torch"},
    "models": {"torch"},
}
#: the Slicer application's modules: only slicer/ talks to Slicer
SLICER_APP = {"slicer", "vtk", "qt", "ctk", "mrml", "vtkSegmentationCorePython"}
#: folders whose files may import torch lazily only (inside a function): importing them stays torch-free
TORCH_ONLY_LAZILY = {"core", "preprocessing", "data/cases.py", "data/datasets.py", "data/splits.py",
                     "data/sampling.py", "data/synth.py", "data/synth_anatomy.py", "training", "cli", "nn/checkpoint.py",
                     "serve", "predict"}


def folder_of(path: Path) -> str:
    rel = path.relative_to(LIB)
    return rel.parts[0] if len(rel.parts) > 1 else "cli"


def imports(source: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(absolute module, line, at module level)`` of every import in ``source`` (a file at ``path``)."""
    tree = ast.parse(source)
    package = [PACKAGE, *path.relative_to(LIB).parent.parts]
    top_level = {id(node) for node in tree.body}
    top_level |= {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)
                  if not _under_type_checking(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # "from .. import x": x is a module of that package
                    found += [(f"{module}.{alias.name}", node.lineno, id(node) in top_level) for alias in node.names]
                    continue
            else:
                module = node.module or ""
            found.append((module, node.lineno, id(node) in top_level))
    return [(m, line, top) for m, line, top in found if not _in_type_checking(tree, line)]


def _under_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _in_type_checking(tree: ast.Module, line: int) -> bool:
    return any(_under_type_checking(n) and n.lineno <= line <= n.end_lineno for n in tree.body)


def violations(path: Path, source: str | None = None) -> list[str]:
    """Every rule a file breaks, as ``file:line: what``."""
    source = path.read_text() if source is None else source
    folder = folder_of(path)
    rel = path.relative_to(LIB).as_posix()
    out = []
    for module, line, top in imports(source, path):
        parts = module.split(".")
        where = f"{rel}:{line}"
        if parts[0] == PACKAGE and len(parts) > 1 and ((LIB / parts[1]).is_dir() or parts[1] in ALLOWED):
            if parts[1] not in ALLOWED[folder]:
                out.append(f"{where}: {folder}/ may not import {parts[1]}/")
            elif (folder, parts[1]) in ONLY_THROUGH and module not in ONLY_THROUGH[folder, parts[1]]:
                allowed = ", ".join(sorted(ONLY_THROUGH[folder, parts[1]]))
                out.append(f"{where}: {folder}/ may import {parts[1]}/ only through {allowed}")
        elif rel in STDLIB_ONLY and parts[0] != PACKAGE and parts[0] not in sys.stdlib_module_names:
            out.append(f"{where}: {rel} may import only the standard library, not {parts[0]}")
        elif parts[0] in FORBIDDEN.get(folder, ()):
            out.append(f"{where}: {folder}/ may not import {parts[0]}")
        elif parts[0] in SLICER_APP and folder != "slicer":
            out.append(f"{where}: only slicer/ may import {parts[0]}")
        elif parts[0] == "torch" and top and (folder in TORCH_ONLY_LAZILY or rel in TORCH_ONLY_LAZILY):
            out.append(f"{where}: {rel} imports torch at module level (it must stay importable without torch)")
    return out


def engine_files() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_folder_has_rules():
    folders = {p.parent.relative_to(LIB).parts[0] for p in LIB.rglob("__init__.py") if p.parent != LIB}
    assert not folders - set(ALLOWED), f"folders without rules: {folders - set(ALLOWED)}"
    assert set(ALLOWED) - folders <= PLANNED, f"rules for folders that do not exist: {set(ALLOWED) - folders - PLANNED}"


def test_every_import_follows_the_folder_rules():
    """No exceptions: every import of every engine file, lazy ones included, follows :data:`ALLOWED`."""
    broken = [v for path in engine_files() for v in violations(path)]
    assert not broken, "architecture rules broken:\n" + "\n".join(broken)


def test_the_docs_show_the_same_rules():
    """docs/architecture.md's folder table says, in its "may import" column, what :data:`ALLOWED` says."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    documented = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 4 and re.fullmatch(r"`\w+/`", cells[0]):
            may_import = re.sub(r"\([^)]*\)", "", cells[2])  # "nn (`checkpoint.read_metadata`)": the folder
            documented[cells[0].strip("`/")] = set(re.findall(r"\b(" + "|".join(ALLOWED) + r")\b", may_import))
    assert documented == {folder: allowed - {folder} for folder, allowed in ALLOWED.items()}


def module_name(path: Path) -> str:
    """``IWSegmentationLib.slicer.mrml.segments`` for .../slicer/mrml/segments.py (a package for its ``__init__``)."""
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    return ".".join([PACKAGE] + (parts[:-1] if parts[-1] == "__init__" else parts))


def import_targets(source: str, path: Path) -> set[str]:
    """Every module ``source`` (a file at ``path``) may load: ``import a.b`` is ``a.b``; ``from a import b``
    is ``a`` and ``a.b`` (``b`` may be a module). Lazy and ``TYPE_CHECKING`` imports included."""
    package = [PACKAGE, *path.relative_to(LIB).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_cycles(sources: Mapping[Path, str]) -> list[list[str]]:
    """The circles of the import graph of ``sources`` (engine file -> its source): each strongly
    connected group of two or more modules, sorted (Tarjan's algorithm)."""
    modules = {module_name(path): path for path in sources}
    graph = {name: sorted((import_targets(sources[path], path) & modules.keys()) - {name})
             for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in graph[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while not group or group[-1] != name:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(cycles)


def test_no_two_engine_modules_import_each_other():
    cycles = import_cycles({path: path.read_text() for path in engine_files()})
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_catches_a_made_up_cycle():
    """The check can fail: the circle this layout cut (segments asking matching for a type), and a
    made-up circle of three modules through a lazy import."""
    sources = {path: path.read_text() for path in engine_files()}
    segments = LIB / "slicer" / "mrml" / "segments.py"
    sources[segments] += "\nif TYPE_CHECKING:\n    from .matching import DiceMatch\n"
    assert import_cycles(sources) == [[f"{PACKAGE}.slicer.mrml.matching", f"{PACKAGE}.slicer.mrml.segments"]]
    made_up = {LIB / "core" / "a.py": "from .b import x\n", LIB / "core" / "b.py": "def f():\n    from . import c\n",
               LIB / "core" / "c.py": "import IWSegmentationLib.core.a\n"}
    assert import_cycles(made_up) == [[f"{PACKAGE}.core.a", f"{PACKAGE}.core.b", f"{PACKAGE}.core.c"]]



def private_imports(source: str, path: Path) -> list[str]:
    """``file:line: name`` for every ``from X import _name`` in ``source`` (a file at ``path``) that
    takes a private name from another module of the engine (dunder names such as ``__version__``
    are public). What another module needs is public, with a docstring."""
    rel = path.relative_to(LIB).as_posix()
    package = [PACKAGE, *path.relative_to(LIB).parent.parts]
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
            if node.level else node.module or ""
        if module.split(".")[0] != PACKAGE:
            continue
        found += [f"{rel}:{node.lineno}: {alias.name} from {module}" for alias in node.names
                  if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    broken = [v for path in engine_files() for v in private_imports(path.read_text(), path)]
    assert not broken, "private names imported from another module (make them public):\n" + "\n".join(broken)


@pytest.mark.parametrize(("rel", "source", "expected"), [
    ("inference/x.py", "from .sliding_window import _triple\n", "inference/x.py:1: _triple from "
     "IWSegmentationLib.inference.sliding_window"),
    ("slicer/mrml/x.py", "def f():\n    from ..views import sizes, _font\n", "slicer/mrml/x.py:2: _font from "
     "IWSegmentationLib.slicer.views"),
    ("core/x.py", "from IWSegmentationLib.core import _lesions\n", "core/x.py:1: _lesions from IWSegmentationLib.core"),
])
def test_the_private_name_check_catches_a_made_up_import(rel, source, expected):
    """The check can fail: a made-up module taking a private name, relatively, lazily or absolutely."""
    assert private_imports(source, LIB / rel) == [expected]


def test_the_private_name_check_allows_public_and_dunder_names():
    ok = "from .. import __version__\nfrom .sliding_window import as_triple\nfrom os import _exit\n"
    assert private_imports(ok, LIB / "inference" / "x.py") == []


@pytest.mark.parametrize(("rel", "source", "expected"), [
    ("slicer/x.py", "import torch\n", "slicer/ may not import torch"),
    ("slicer/x.py", "def f():\n    from ..training import train\n", "slicer/ may not import training/"),
    ("slicer/x.py", "def f():\n    from IWSegmentationLib.data import load_case\n", "slicer/ may not import data/"),
    ("inference/x.py", "from ..training.config import TrainConfig\n", "inference/ may not import training/"),
    ("evaluation/x.py", "def f():\n    import torch\n", "evaluation/ may not import torch"),
    ("core/x.py", "import slicer\n", "only slicer/ may import slicer"),
    ("core/x.py", "from ..slicer.mrml.segments import segment_name\n", "core/ may not import slicer/"),
    ("nn/checkpoint.py", "import torch\n", "imports torch at module level"),
    ("data/x.py", "from .. import slicer\n", "data/ may not import slicer/"),
    ("serve/app.py", "from ..training import train\n", "serve/ may not import training/"),
    ("slicer/x.py", "def f():\n    from ..serve.app import create_app\n", "only through IWSegmentationLib.serve.client"),
    ("serve/client.py", "import requests\n", "only the standard library, not requests"),
    ("serve/app.py", "import torch\n", "imports torch at module level"),
    # the server and its client never climb to the command line; they use the use case's options
    ("serve/client.py", "from ..cli.commands.predict import run\n", "serve/ may not import cli/"),
    ("serve/jobs.py", "from ..predict.predictor import Predictor\n", "only through"),
    ("backend/job.py", "from ..predict.cases import collect_cases\n", "only through"),
    ("predict/options.py", "from ..backend.job import Outcome\n", "predict/ may not import backend/"),
    ("models/library.py", "from ..nn.unet import build_model\n", "only through IWSegmentationLib.nn.checkpoint"),
    ("models/library.py", "import torch\n", "models/ may not import torch"),
    ("predict/options.py", "from ..models.library import resolve_model\n", "predict/ may not import models/"),
])
def test_the_checker_catches_each_kind_of_violation(rel, source, expected):
    """The rules can fail: each of these made-up files breaks one."""
    found = violations(LIB / rel, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_what_the_rules_allow():
    ok = ("import numpy\nfrom ..core.errors import InputError\nfrom typing import TYPE_CHECKING\n"
          "if TYPE_CHECKING:\n    import torch\n"
          "def f():\n    import torch\n    from ..nn.unet import build_model\n")
    assert violations(LIB / "inference" / "x.py", ok) == []
    assert violations(LIB / "nn" / "checkpoint.py", ok) == []
    client = "import json\nimport urllib.request\nfrom ..core.errors import InputError\n"
    assert violations(LIB / "serve" / "client.py", client) == []
    assert violations(LIB / "slicer" / "x.py", "from ..serve.client import RemoteRun\n") == []
    assert violations(LIB / "serve" / "client.py", "from ..predict.options import PredictOptions\n") == []


def _loaded(modules: list[str], heavy: str = "torch") -> bool:
    """Whether importing ``modules`` in a fresh interpreter loads ``heavy``."""
    code = f"import sys\nfor m in {modules!r}:\n    __import__(m)\nprint({heavy!r} in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def _loads_torch(modules: list[str]) -> bool:
    return _loaded(modules, "torch")


def test_the_slicer_side_loads_no_torch():
    """What the module imports into Slicer's GUI process (views needs vtk, which the module has too)."""
    modules = [f"{PACKAGE}.slicer.{m}" for m in ("panel", "logic", "deps", "lesion_row", "mrml")]
    modules += [f"{PACKAGE}.backend.{m}" for m in ("local_run", "device_probe")]
    modules += [f"{PACKAGE}.slicer.model_choices", f"{PACKAGE}.models.library"]
    assert not _loads_torch(modules)


def test_the_modules_gui_process_loads_no_numpy():
    """What the module's GUI process imports when the module opens (the panel, the logic, the job
    contract, the card reader) loads the standard library only: it opens faster (docs/benchmarks.md,
    entry points). The scene code (``slicer.mrml``) and the views need numpy and load it later."""
    modules = [f"{PACKAGE}.slicer.{m}" for m in ("panel", "logic", "parameter_node", "lesion_row", "deps", "reloading")]
    modules += [f"{PACKAGE}.backend.{m}" for m in ("job", "local_run", "device_probe")]
    modules += [f"{PACKAGE}.nn.checkpoint", f"{PACKAGE}.serve.client"]
    assert not _loaded(modules, "numpy")
    # the check can fail: the scene code does load numpy
    assert _loaded([f"{PACKAGE}.slicer.mrml.geometry"], "numpy")


def test_predict_flags_are_read_without_the_pipeline():
    """``iwseg predict --help`` (and a bad flag) is answered before numpy or the predictor loads."""
    code = (f"import sys\nfrom {PACKAGE}.cli.main import main\ntry:\n    main(['predict', '--help'])\n"
            f"except SystemExit:\n    pass\nprint('numpy' in sys.modules, '{PACKAGE}.predict.predictor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split()[-2:] == ["False", "False"], done.stderr


def test_evaluation_and_the_cli_start_without_torch():
    assert not _loads_torch([f"{PACKAGE}.evaluation", f"{PACKAGE}.core.weights", f"{PACKAGE}.nn.checkpoint"])
    code = f"import sys\nfrom {PACKAGE}.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_the_reload_button_reloads_every_imported_engine_module_dependencies_first():
    """In a fresh interpreter (a reload makes new classes; the other tests must keep theirs): after
    the module's imports, the Reload button reloads every engine module then loaded, each after the
    engine modules its source imports; the logic is a new class afterwards."""
    code = (f"import json, sys\nimport {PACKAGE}.slicer.logic as logic, {PACKAGE}.slicer.panel\n"
            f"from {PACKAGE}.slicer.reloading import engine_imports, reload_engine\n"
            f"loaded = sorted(n for n in sys.modules if n.startswith('{PACKAGE}.'))\n"
            f"known = {{n: sys.modules[n] for n in loaded}}\n"
            f"imports = {{n: sorted(engine_imports(sys.modules[n], known)) for n in loaded}}\n"
            f"old = logic.LesionSegmentationLogic\nnames = reload_engine()\n"
            f"new = sys.modules['{PACKAGE}.slicer.logic'].LesionSegmentationLogic is not old\n"
            f"print(json.dumps([loaded, imports, names, new]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    loaded, imports, names, new_class = json.loads(done.stdout.splitlines()[-1])
    full = [f"{PACKAGE}.{n}" for n in names]
    assert sorted(full) == loaded and new_class  # every loaded engine module, once
    position = {n: i for i, n in enumerate(full)}
    late = [(n, d) for n in full for d in imports[n] if position[d] > position[n]]
    assert not late, late  # a module never comes before one it imports
    # e.g. the logic imports the panel, which imports the lesion sizes
    assert position[f"{PACKAGE}.core.lesion_sizes"] < position[f"{PACKAGE}.slicer.panel"] < \
        position[f"{PACKAGE}.slicer.logic"]


def test_the_reload_order_follows_a_made_up_import_chain(tmp_path):
    """Three made-up modules, a imports b (relative, inside a function), b imports c: c, b, a."""
    from types import ModuleType

    from IWSegmentationLib.slicer.reloading import reload_order

    sources = {"a": "def f():\n    from .b import g\n", "b": f"from {PACKAGE}.c import h\n", "c": "h = 1\n"}
    modules = {}
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source)
        module = ModuleType(f"{PACKAGE}.{name}")
        module.__file__ = str(tmp_path / f"{name}.py")
        modules[module.__name__] = module
    assert reload_order(dict(reversed(modules.items()))) == [f"{PACKAGE}.c", f"{PACKAGE}.b", f"{PACKAGE}.a"]
    assert reload_order({"numpy": ModuleType("numpy")}) == []  # only the engine's modules


# ---------------------------------------------------------------------------- the tests' own layout

#: Test folders that are not named after an engine folder: cross-layer seams, the Slicer module
#: (IWSegmentation/) and the repository's scripts/.
TEST_FOLDERS_OF_THEIR_OWN = {"integration", "module", "scripts"}


def test_testing_mirrors_the_package():
    """Every test file sits in a folder named after the engine folder it tests (or integration/,
    module/, scripts/), and no two test files share a name: pytest imports them by base name
    (the folders have no ``__init__.py``, so that Testing/slicer/ cannot shadow Slicer's ``slicer``)."""
    testing = ROOT / "Testing"
    engine_folders = {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    tests = sorted(p.relative_to(testing) for p in testing.rglob("test_*.py") if "_output" not in p.parts)
    misplaced = [str(t) for t in tests if len(t.parts) != 2 or t.parts[0] not in engine_folders | TEST_FOLDERS_OF_THEIR_OWN]
    assert not misplaced, f"test files outside the mirrored folders: {misplaced}"
    names = [t.name for t in tests]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert not list(testing.rglob("__init__.py"))
