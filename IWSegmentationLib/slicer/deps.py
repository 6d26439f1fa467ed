"""Python dependencies of the backend inside 3D Slicer, installed on first use.

Broken Slicer Python environments are one of the most common complaints about AI extensions:
an extension's ``pip install`` silently upgrades numpy or SimpleITK under Slicer's own compiled
modules, or replaces the CUDA build of torch that the PyTorch extension installed with a CPU
wheel from PyPI. The policy here:

* **torch** comes from the PyTorch extension's ``PyTorchUtils`` (it picks the CPU or the right
  CUDA build for the machine), never from a plain ``pip install torch``;
* the **other packages** the backend needs are installed with ``slicer.packaging.pip_ensure``
  where it exists (Slicer >= 5.12; it asks the user and offers the restart itself), else with
  ``slicer.util.pip_install`` after our own confirmation (5.6–5.10), together with a **constraints
  file that pins numpy, SimpleITK and torch to the versions already installed**, so pip
  either finds versions compatible with them or fails with a clear message — it never
  replaces them;
* everything happens on first use (pressing Apply), with a message saying what and why. On
  5.12 and newer ``pip_ensure`` prompts for a restart when an already-imported package changed;
  before 5.12 a message suggests restarting if Apply then fails with an import error.
* every failure, the PyTorch extension's included, reaches the caller as :class:`DependencyError`.

The decisions (what is missing, what the constraints say) are plain functions, tested
without Slicer; :func:`ensure_in_slicer` is the thin Slicer-side driver.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..core.errors import IWSegError

#: What ``iwseg predict`` imports besides torch, numpy and SimpleITK (pip names; see pyproject.toml).
BACKEND_REQUIREMENTS: tuple[str, ...] = (
    "scipy>=1.10",
    "connected-components-3d>=3.12",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "pyyaml>=6.0",
)

#: Packages Slicer (or the PyTorch extension) owns: pinned to the installed version, never replaced.
PROTECTED_PACKAGES: tuple[str, ...] = ("numpy", "SimpleITK", "torch")

#: Oldest torch the backend supports (``torch.inference_mode``, safetensors loading).
MINIMUM_TORCH = "2.1"

VersionLookup = Callable[[str], "str | None"]


class DependencyError(IWSegError):
    """A dependency is missing and could not (or may not) be installed."""


def installed_version(distribution: str) -> str | None:
    """Installed version of a distribution (pip name), or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _requirement(spec: str):
    from packaging.requirements import InvalidRequirement, Requirement  # lazy: an undeclared dependency

    try:
        return Requirement(spec)
    except InvalidRequirement as exc:
        raise DependencyError(f"invalid requirement {spec!r}: {exc}") from None


def missing_requirements(
    requirements: Iterable[str] = BACKEND_REQUIREMENTS, version_of: VersionLookup = installed_version
) -> list[str]:
    """The requirements that are not installed, or installed in a version outside their specifier."""
    missing = []
    for spec in requirements:
        req = _requirement(spec)
        version = version_of(req.name)
        if version is None or (req.specifier and not req.specifier.contains(version, prereleases=True)):
            missing.append(spec)
    return missing


def constraints_lines(
    protected: Sequence[str] = PROTECTED_PACKAGES, version_of: VersionLookup = installed_version
) -> list[str]:
    """``name==version`` for every protected package that is installed (pip ``-c`` file lines).

    A local version label (``2.5.1+cu121``) is kept: pinning ``torch==2.5.1+cu121`` is what
    stops pip from swapping the CUDA build for the PyPI CPU wheel of the same version.
    """
    lines = []
    for name in protected:
        version = version_of(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return lines


def write_constraints(path: str | os.PathLike | None = None, **kwargs) -> Path:
    """Write :func:`constraints_lines` to ``path`` (a temporary file when None) and return it."""
    if path is None:
        fd, name = tempfile.mkstemp(prefix="iwseg-constraints-", suffix=".txt")
        os.close(fd)
        path = name
    path = Path(path)
    path.write_text("\n".join(constraints_lines(**kwargs)) + "\n", encoding="utf-8")
    return path


def torch_problem(version_of: VersionLookup = installed_version, minimum: str = MINIMUM_TORCH) -> str | None:
    """None when a usable torch is installed, else a sentence saying what is wrong."""
    from packaging.version import InvalidVersion, Version  # lazy: an undeclared dependency

    version = version_of("torch")
    if version is None:
        return "PyTorch is not installed"
    try:
        too_old = Version(version).release < Version(minimum).release
    except InvalidVersion:
        return f"PyTorch reports an unreadable version {version!r}"
    if too_old:
        return f"PyTorch {version} is too old (IWSegmentation needs {minimum} or newer)"
    return None


# --------------------------------------------------------------------------------------------
# The Slicer side (imports slicer lazily; not reachable from the plain-Python tests)
# --------------------------------------------------------------------------------------------


def _ensure_torch_in_slicer(version_of: VersionLookup = installed_version) -> None:
    """Install torch through the PyTorch extension when it is missing or too old.

    Whatever goes wrong (the extension missing, the user declining, pip failing inside
    ``installTorch``) becomes a :class:`DependencyError` naming what to do.
    """
    problem = torch_problem(version_of)
    if problem is None:
        return
    try:
        import PyTorchUtils  # lazy: the PyTorch extension (EXTENSION_DEPENDS PyTorch), only in Slicer
    except ImportError:
        raise DependencyError(
            f"{problem}. Install the 'PyTorch' extension from the Extensions Manager, restart "
            "Slicer, and press Apply again."
        ) from None
    try:
        logic = PyTorchUtils.PyTorchUtilsLogic()
        torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH}")
    except Exception as exc:  # CalledProcessError from pip, network errors, ...
        raise DependencyError(
            f"{problem}, and installing it through the PyTorch extension failed: {type(exc).__name__}: {exc}. "
            "See the Python console, or install it in the PyTorch Utils module."
        ) from None
    if torch is None:
        raise DependencyError(f"{problem}, and it was not installed. Use the PyTorch Utils module to install it.")
    problem = torch_problem(version_of)
    if problem is not None:
        raise DependencyError(f"{problem} after installation. Use the PyTorch Utils module to fix it.")


def ensure_in_slicer(requester: str = "IWSegmentation", requirements: Sequence[str] = BACKEND_REQUIREMENTS, *,
                     torch: bool = True, protected: Sequence[str] = PROTECTED_PACKAGES) -> None:
    """Make the backend's dependencies (or other ``requirements``) available in Slicer's Python,
    asking the user first; ``torch=False`` skips the PyTorch check (the Export needs no torch),
    ``protected`` are pinned to their installed versions (e.g. Slicer's own pydicom for highdicom).

    Raises :class:`DependencyError` with a clear message when the user declines or pip fails;
    does nothing when everything is already installed (the common case, and fast).
    """
    if torch:
        _ensure_torch_in_slicer()
    missing = missing_requirements(requirements)
    if not missing:
        return
    constraints = write_constraints(protected=protected)
    try:
        try:
            from slicer import packaging as slicer_packaging  # lazy: pip_ensure, Slicer >= 5.12
        except ImportError:
            slicer_packaging = None
        if slicer_packaging is not None and hasattr(slicer_packaging, "pip_ensure"):
            requirements = [_requirement(spec) for spec in missing]
            # skip_in_testing=False: Slicer's own test runner needs the packages as much as a user does
            slicer_packaging.pip_ensure(requirements, constraints=str(constraints), requester=requester,
                                        skip_in_testing=False)
        else:
            _legacy_install(missing, constraints, requester)
    except RuntimeError as exc:  # pip_ensure raises RuntimeError when the user declines
        raise DependencyError(f"{requester} needs these Python packages: {', '.join(missing)} ({exc})") from None
    except Exception as exc:  # subprocess.CalledProcessError from pip
        raise DependencyError(
            f"installing {', '.join(missing)} failed: {exc}. The packages Slicer owns "
            f"({', '.join(PROTECTED_PACKAGES)}) were pinned and left untouched; see the Python console for pip's log."
        ) from None
    finally:
        constraints.unlink(missing_ok=True)
    still = missing_requirements(requirements)
    if still:
        raise DependencyError(f"these packages are still missing after installation: {', '.join(still)}")


def _legacy_install(missing: list[str], constraints: Path, requester: str) -> None:
    """Older Slicer: confirm, ``slicer.util.pip_install`` with ``-c``, then suggest a restart."""
    import slicer  # lazy: Slicer's own; importable without it

    text = (
        f"{requester} needs {len(missing)} Python package(s) that are not installed:\n\n"
        + "\n".join(f"  {spec}" for spec in missing)
        + "\n\nInstall them now? numpy, SimpleITK and PyTorch stay at their current versions."
    )
    if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(text, f"{requester}: install packages"):
        raise RuntimeError("the user declined the installation")
    slicer.util.pip_install(["-c", str(constraints), *missing])
    if not slicer.app.testingEnabled():
        slicer.util.infoDisplay(
            "The packages were installed. If Apply fails with an import error, restart Slicer.",
            f"{requester}: packages installed",
        )
