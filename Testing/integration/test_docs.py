"""The docs work as written (issue 22 item 5): every fenced code block of README.md and docs/**/*.md
is run here on tiny data, or checked cheaply, or marked as not runnable here with a reason; every
relative link and anchor resolves.

Markers (an HTML comment on the line right before a block's opening fence; see README "Docs that are tested"):

* ``<!-- not-run: REASON -->``: not run here (a GPU, a server on another host, hours of training).
  Its ``iwseg`` flags, Python syntax and names are still checked; only unknown commands and
  imports that need that environment are let through.
* ``<!-- given: a, b -->``: a Python fragment that uses names defined around it (``model``, ``out``).

The cheap checks, for every block: ``bash``/``console`` lines (and ``$ `` lines of ``text`` blocks)
are split into simple commands; ``iwseg CMD`` / ``python -m IWSegmentationLib CMD`` (also under
``torchrun``, ``srun``, ``nice``, ``taskset``) must name a sub-command and flags that its parser has;
``python -m scripts.X`` a module whose source has the flags; ``make T`` a Makefile target;
``pip install`` only torch or this repository with extras that pyproject.toml defines; paths like
``scripts/gpu_recipe.sh`` must exist. Python blocks compile, their imports resolve, and ruff finds no
undefined name beyond the ``given`` ones. JSON blocks parse; YAML blocks are training configs
(``TrainConfig`` knows every key). The commands in :data:`RUN_FOR_REAL` run as written, on a
hand-wired threshold model and phantom scans, and the lesion JSON they write has the keys of the
documented example.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from IWSegmentationLib.cli.main import COMMANDS, build_parser
from IWSegmentationLib.cli.main import main as cli_main

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARKER = re.compile(r"^\s*<!--\s*(not-run|given):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
SHELL = {"bash", "sh", "shell", "console"}
KNOWN_LANGUAGES = SHELL | {"python", "json", "yaml", "text", ""}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason, when marked not-run
    given: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the markers right before each."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        indent = len(match.group(1))
        body = "\n".join(line[indent:] for line in lines[i + 1:end])
        not_run, given, k = None, (), i - 1
        while k >= 0 and MARKER.match(lines[k]):
            kind, value = MARKER.match(lines[k]).groups()
            if kind == "not-run":
                not_run = value
            else:
                given = tuple(n.strip() for n in value.split(",") if n.strip())
            k -= 1
        blocks.append(Block(path, i + 1, match.group(2), body, not_run, given))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for p in DOCS for b in code_blocks(p)]


def blocks_of(*languages: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.language in languages]


# ------------------------------------------------------------------------------ shell commands


def shell_lines(block: Block) -> list[str]:
    """Command lines of a block: continuation lines joined; for console/text only ``$ `` lines."""
    text = block.text.replace("\\\n", " ")
    lines = text.split("\n")
    if block.language in ("console", "text"):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """Split a shell line into simple commands (``;``, ``&&``, ``|``, ``&``, ``do``/``done``);
    comments dropped, ``[--option VALUE]`` placeholders unwrapped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in (";", "&", "&&", "|", "||", ";;") or token in ("do", "done", "then", "fi"):
            if current:
                commands.append(current)
            current = []
        else:
            if token.startswith("[-"):  # `[--iterations 100]`: an optional part, shown in brackets
                token = token[1:]
            if token.endswith("]") and "[" not in token:
                token = token[:-1]
            current.append(token)
    if current:
        commands.append(current)
    return [c for c in commands if c and c[0] not in ("for", "while", "if")]


def unwrap(command: list[str]) -> list[str]:
    """The command a wrapper runs: environment assignments, ``nice -n N``, ``taskset -c L``,
    ``srun``/``torchrun`` options dropped; ``torchrun ... -m X`` becomes ``python -m X``."""
    cmd = list(command)
    while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
        cmd = cmd[1:]
    if cmd[:1] == ["nice"]:
        cmd = cmd[3:] if cmd[1:2] == ["-n"] else cmd[1:]
        return unwrap(cmd)
    if cmd[:1] == ["taskset"]:
        return unwrap(cmd[3:])
    if cmd[:1] == ["srun"]:
        rest = cmd[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        return unwrap(rest)
    if cmd[:1] == ["torchrun"]:
        if "-m" in cmd:
            return ["python", *cmd[cmd.index("-m"):]]
        return cmd
    return cmd


def nested_commands(sub: str) -> set[str]:
    """The sub-commands of ``iwseg SUB`` (``iwseg models list``), empty when it has none."""
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    inner = [a for a in top.choices[sub]._actions if isinstance(a, argparse._SubParsersAction)]
    return set(inner[0].choices) if inner else set()


def iwseg_help_flags(*subs: str) -> set[str]:
    """The ``--flags`` of ``iwseg SUB [SUB2]`` as its ``--help`` lists them (option lines only)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser().parse_args([*subs, "--help"])
    flags = set()
    for line in out.getvalue().splitlines():
        if re.match(r"^\s+-", line):
            flags.update(re.findall(r"--[\w-]+", re.split(r"\s{2,}", line.strip())[0]))
    return flags


def iwseg_subcommands() -> set[str]:
    return set(COMMANDS)


def pyproject_extras() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def check_command(cmd: list[str]) -> str | None:
    """None when ``cmd`` is verified; a problem (text) otherwise; ``"unknown"`` for a command this
    checker cannot verify (allowed only in a not-run block)."""
    cmd = unwrap(cmd)
    if not cmd:
        return None
    head = cmd[0]
    if head in ("python", "python3") and cmd[1:3] == ["-m", "IWSegmentationLib"]:
        cmd, head = ["iwseg", *cmd[3:]], "iwseg"
    if head == "iwseg":
        if len(cmd) < 2 or cmd[1] not in iwseg_subcommands():
            return f"`iwseg {cmd[1] if len(cmd) > 1 else ''}` is not a sub-command"
        subs = cmd[1:3] if len(cmd) > 2 and cmd[2] in nested_commands(cmd[1]) else cmd[1:2]
        known = iwseg_help_flags(*subs)
        bad = [t.split("=")[0] for t in cmd[1 + len(subs):] if t.startswith("--") and t.split("=")[0] not in known]
        return f"`iwseg {' '.join(subs)}` has no {', '.join(bad)}" if bad else None
    if head in ("python", "python3") and cmd[1:2] == ["-m"]:
        module = cmd[2]
        if module == "venv":
            return None
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return f"no module {module}"
        # the flags may be defined by the module or by a helper of its package (scripts/bench/report.py)
        source = "".join(p.read_text() for p in Path(spec.origin).parent.glob("*.py"))
        bad = [t for t in cmd[3:] if t.startswith("--") and t != "--help" and f'"{t.split("=")[0]}"' not in source]
        return f"{module} has no {', '.join(bad)}" if bad else None
    if head == "make":
        targets = makefile_targets()
        makefile = (REPO / "Makefile").read_text()
        for arg in cmd[1:]:
            if "=" in arg:
                if not re.search(rf"\b{re.escape(arg.split('=')[0])}\b", makefile):
                    return f"the Makefile has no variable {arg.split('=')[0]}"
            elif arg not in targets:
                return f"the Makefile has no target {arg}"
        return None
    if head == "pip" and cmd[1:2] == ["install"]:
        extras = pyproject_extras()
        args = cmd[2:]
        for i, arg in enumerate(args):
            if arg.startswith("-") or (i and args[i - 1] == "--index-url"):
                continue
            if re.match(r"^torch([=<>!~].*)?$", arg):
                continue
            match = re.match(r"^(\.|\./?)(\[([\w,-]+)\])?$", arg)
            if not match:
                return f"pip install {arg}: not this repository (the package is not on PyPI) or torch"
            wanted = set((match.group(3) or "").split(",")) - {""}
            if wanted - extras:
                return f"pip install {arg}: pyproject.toml has no extra {', '.join(sorted(wanted - extras))}"
        return None
    if head in (".", "source") and cmd[1:] == [".venv/bin/activate"]:
        return None
    if head in ("bash", "sh") and len(cmd) > 1 or head.startswith((".venv/bin/", "scripts/")):
        path = cmd[1] if head in ("bash", "sh") else cmd[0]
        if head.startswith(".venv/bin/"):
            path = next((a for a in cmd[1:] if not a.startswith("-")), "")
        return None if (REPO / path.split("::")[0]).exists() else f"{path} does not exist"
    if head == "wait":
        return None
    return "unknown"


@pytest.mark.parametrize("block", blocks_of(*SHELL, "text"), ids=str)
def test_shell_blocks_name_commands_and_flags_that_exist(block):
    problems = []
    for line in shell_lines(block):
        for command in simple_commands(line):
            problem = check_command(command)
            if problem == "unknown" and block.not_run:
                continue
            if problem == "unknown":
                problem = (f"cannot check `{' '.join(command)}`: run it in Testing/integration/test_docs.py "
                           "or mark the block <!-- not-run: REASON -->")
            if problem:
                problems.append(problem)
    assert not problems, f"{block}: " + "; ".join(problems)


def test_the_checker_catches_what_failed_as_written():
    """The broken lines issue 22 listed, as a new user typed them, are refused; their fixes pass."""
    assert "not on PyPI" in check_command(shlex.split("pip install 'iwsegmentation[dicom]'"))
    assert "no extra gpu" in check_command(shlex.split('pip install -e ".[gpu]"'))
    assert check_command(shlex.split('pip install -e ".[dicom,serve]"')) is None
    assert "has no --organ" in check_command(shlex.split("iwseg predict --model m --organ x"))
    assert "not a sub-command" in check_command(["iwseg", "segment"])
    assert check_command(shlex.split("CUDA_VISIBLE_DEVICES=1 iwseg predict --shard 1/4")) is None
    assert "no module" in check_command(shlex.split("python -m scripts.bench_inference"))
    assert "no target" in check_command(["make", "deploy"])
    assert check_command(["jq", ".state"]) == "unknown"
    assert simple_commands("for i in 0 1; do iwseg predict --shard $i/2 & done; wait  # note") == [
        ["iwseg", "predict", "--shard", "$i/2"], ["wait"]]


# ------------------------------------------------------------------------------ python, json, yaml


def ruff() -> str | None:
    return shutil.which("ruff") or next((str(p) for p in [Path(sys.executable).parent / "ruff"] if p.exists()), None)


@pytest.mark.parametrize("block", blocks_of("python"), ids=str)
def test_python_blocks_compile_import_and_define_their_names(block):
    tree = ast.parse(block.text, filename=str(block))  # a SyntaxError names the block
    if not block.not_run:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert importlib.util.find_spec(alias.name) is not None, f"{block}: no module {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}") is not None, f"{block}: {node.module} has no {alias.name}"
    exe = ruff()
    if exe is None:
        pytest.skip("ruff is not installed (the `test` extra)")
    done = subprocess.run([exe, "check", "--isolated", "--select", "F821", "--output-format", "json",
                           "--stdin-filename", "block.py", "-"], input=block.text, capture_output=True,
                          text=True, timeout=60)
    undefined = {re.search(r"`(\w+)`", d["message"]).group(1) for d in json.loads(done.stdout or "[]")}
    assert not undefined - set(block.given), (
        f"{block}: undefined names {sorted(undefined - set(block.given))}; define them, or list them in "
        "<!-- given: ... --> right before the block")


@pytest.mark.parametrize("block", blocks_of("json"), ids=str)
def test_json_blocks_parse(block):
    json.loads(block.text)


@pytest.mark.parametrize("block", blocks_of("yaml"), ids=str)
def test_yaml_blocks_are_training_configs_with_known_keys(block):
    from IWSegmentationLib.training import TrainConfig

    values = yaml.safe_load(block.text)
    unknown = set(values) - set(TrainConfig.key_names())
    assert not unknown, f"{block}: unknown training config keys {sorted(unknown)}"


def test_every_block_has_a_known_language_and_every_not_run_says_why():
    for block in ALL_BLOCKS:
        assert block.language in KNOWN_LANGUAGES, f"{block}: unknown language {block.language!r}"
        assert block.not_run is None or len(block.not_run) > 10, f"{block}: not-run needs a reason"


# ------------------------------------------------------------------------------ the options table


def test_every_predict_flag_is_in_the_options_table():
    text = (REPO / "docs" / "inference.md").read_text()
    table = text.split("## Command-line options")[1].split("\n\n")[1]
    documented = set(re.findall(r"^\| `(--[\w-]+)", table, flags=re.M))
    documented |= set(re.findall(r"/ `(--[\w-]+)", table))  # `--size-preset` / `--size-thresholds S M`
    missing = iwseg_help_flags("predict") - documented - {"--help"}
    assert not missing, f"docs/inference.md's options table lacks {sorted(missing)}"


# ------------------------------------------------------------------------------ links and anchors


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: Markdown stripped, lower case, punctuation but ``-`` and
    ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if FENCE.match(line) or line.strip() == "```":
            in_code = not in_code
            continue
        if in_code:
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = github_anchor(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(re.findall(r'<a (?:id|name)="([^"]+)"', line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every Markdown link and image outside code."""
    out, in_code = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if FENCE.match(line) or line.strip() == "```":
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        out.extend((number, t) for t in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line))
    return out


def test_relative_links_and_anchors_resolve():
    problems = []
    for path in DOCS:
        for number, target in links(path):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(REPO)}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no such heading)")
            elif anchor and dest.is_dir() and anchor not in anchors(dest / "README.md"):
                problems.append(f"{where} (no such heading in its README.md)")
    assert not problems, "\n".join(problems)


def test_the_anchor_rule_matches_github():
    assert github_anchor("`iwseg predict --server URL`") == "iwseg-predict---server-url"
    assert github_anchor("Reproducing the paper's Table 2 from the authors' records") == (
        "reproducing-the-papers-table-2-from-the-authors-records")
    assert github_anchor("fp32 against bf16 (`precision`)") == "fp32-against-bf16-precision"


# ------------------------------------------------------------------------------ run for real


def doc_command(path: str, start: str) -> list[str]:
    """The documented command of ``path`` that starts with ``start`` (continuation lines joined,
    comment dropped), as argv without the leading ``iwseg``: the test runs what the docs say."""
    for block in code_blocks(REPO / path):
        for line in shell_lines(block):
            if line.strip().startswith(start):
                (command,) = simple_commands(line)
                return command[1:]
    raise AssertionError(f"{path} no longer documents a command starting {start!r}; update RUN_FOR_REAL")


#: The documented commands this test runs as written: (file, how the command starts).
RUN_FOR_REAL = [
    ("docs/inference.md", "iwseg predict --model model.safetensors --input chest.nrrd"),
    ("docs/checkpoints.md", "iwseg inspect model.safetensors"),
    ("docs/metrics.md", "iwseg predict --model model.safetensors --input images/"),
    ("docs/metrics.md", "iwseg evaluate --logits logits/"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding what the documented commands name: model.safetensors (the hand-wired
    threshold model), chest.nrrd, and images/ + labels/ of two phantom cases."""
    from IWSegmentationLib.core import imageio
    from IWSegmentationLib.testing.phantom import phantom_case, threshold_checkpoint

    root = tmp_path_factory.mktemp("docs")
    threshold_checkpoint(root / "model.safetensors")
    case = phantom_case()
    geometry = imageio.Geometry.identity(case.image.shape, (2.5, 0.7, 0.7))
    imageio.write_image(root / "chest.nrrd", case.image, geometry)
    for folder in ("images", "labels"):
        (root / folder).mkdir()
    for name in ("a", "b"):
        imageio.write_image(root / "images" / f"{name}.nii.gz", case.image, geometry)
        imageio.write_image(root / "labels" / f"{name}.nii.gz", case.reference, geometry)
    return root


@pytest.mark.slow
def test_documented_commands_run_as_written(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    for path, start in RUN_FOR_REAL:
        argv = doc_command(path, start)
        assert cli_main([*argv, "--progress-format", "jsonl"] if argv[0] == "predict" else argv) == 0, (path, argv)
        assert cli_main(["inspect", "model.safetensors", "--verify"]) == 0
    capsys.readouterr()
    # the outputs the documented commands promise
    for name in ("chest_mask.nrrd", "chest_prob.nrrd", "chest_lesions.json", "report.json", "lesions.csv", "froc.png"):
        assert (workdir / name).is_file(), name
    assert sorted(p.name for p in (workdir / "masks").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    report = json.loads((workdir / "report.json").read_text())
    assert report["n_images"] == 2 and report["recall"] == 1.0  # the threshold model finds every phantom lesion

    # the lesion-JSON example of docs/inference.md has exactly the keys of a real lesion JSON
    (example,) = [json.loads(b.text) for b in code_blocks(REPO / "docs" / "inference.md")
                  if b.language == "json" and '"lesions"' in b.text]
    real = json.loads((workdir / "chest_lesions.json").read_text())
    assert set(example) == set(real), f"docs/inference.md's lesion JSON: {set(example) ^ set(real)}"
    assert real["lesions"] and set(example["lesions"][0]) == set(real["lesions"][0])
    assert example["coordinates"] == real["coordinates"] and example["image"] == real["image"]


def test_markers_are_read(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- given: model, out -->\n<!-- not-run: needs a GPU and a day -->\n```python\nx\n```\n"
                   "\n  ```bash\n  iwseg inspect m\n  ```\n")
    first, second = code_blocks(doc)
    assert (first.line, first.language, first.text, first.not_run, first.given) == (
        4, "python", "x", "needs a GPU and a day", ("model", "out"))
    assert (second.line, second.language, second.text, second.not_run, second.given) == (
        8, "bash", "iwseg inspect m", None, ())
