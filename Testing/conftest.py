"""Shared pytest fixtures.

``clinical_data`` gives the folder of real clinical sample volumes (chest CT with lung
nodule masks, brain and breast MR with lesion masks, BSD-3) shipped in the sdist of
``pyradiomics-bhklab==3.1.4``. It is downloaded on first use into ``Testing/.data`` (never
committed) with ``pip download``; tests that use it are skipped cleanly when offline.
Set ``IWSEG_TEST_DATA`` to a folder holding the ``*.nrrd`` files to use a local copy.

``authors_records`` reads the inverse-weighting authors' released per-lesion records
(``neuro-ml/inverse_weighting``, no licence, so never committed here) from a local copy: the
checkout, bare git copy or ``froc_data`` folder named by ``IWSEG_AUTHORS_REPO``; tests that use
it are skipped without one. Nothing is downloaded.

``fake_backend``, ``fake_checkpoint`` and ``stranger`` are the backend tests' fixtures (the fake
``iwseg predict`` of Testing/_fake_backend.py, a checkpoint file it does not read, an unrelated process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _fake_backend import FAKE_BACKEND

TESTING = Path(__file__).resolve().parent
REPO = TESTING.parent
DATA_CACHE = TESTING / ".data"
OUTPUT = TESTING / "_output"
PYRADIOMICS_SDIST = "pyradiomics-bhklab==3.1.4"


def _download_clinical_data() -> Path | None:
    target = DATA_CACHE / "pyradiomics"
    if any(target.glob("*.nrrd")):
        return target
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "-q", "-d", str(DATA_CACHE), PYRADIOMICS_SDIST]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    sdists = sorted(DATA_CACHE.glob("pyradiomics*3.1.4*.tar.gz"))
    if not sdists:
        return None
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/data/" in m.name and m.name.endswith(".nrrd") and m.isfile()]
        for m in members:
            m.name = Path(m.name).name
            tar.extract(m, target)
    return target if any(target.glob("*.nrrd")) else None


@pytest.fixture(scope="session")
def clinical_data() -> Path:
    """Folder of the pyradiomics sample ``*.nrrd`` volumes and masks (skips if unavailable)."""
    local = os.environ.get("IWSEG_TEST_DATA")
    if local and any(Path(local).glob("*.nrrd")):
        return Path(local)
    folder = _download_clinical_data()
    if folder is None:
        pytest.skip(f"clinical sample data ({PYRADIOMICS_SDIST} sdist) not available offline")
    return folder


@pytest.fixture(scope="session")
def authors_records(tmp_path_factory):
    """``(dataset, loss) -> Path`` of the authors' ``prc_records.json`` (``"lits", "dl"``); skips
    when no local copy of their repository (or of that file) is found."""
    if str(REPO) not in sys.path:  # scripts/ is a package of the repository, not of the installed engine
        sys.path.insert(0, str(REPO))
    from scripts import rescore_authors_records as rescore

    repo = os.environ.get(rescore.REPO_ENV)
    if not repo or not Path(repo).exists():
        pytest.skip(f"the authors' records are not here ({repo}; set {rescore.REPO_ENV} to a checkout of "
                    "neuro-ml/inverse_weighting)")
    dest = tmp_path_factory.mktemp("authors_records")

    def path(dataset: str, loss: str) -> Path:
        found = rescore.records_file(Path(repo), dataset, loss, dest)
        if found is None:
            pytest.skip(f"{repo} lacks the authors' {dataset}/{loss} records")
        return found

    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20200101)


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """A persistent folder for artefacts a person may want to look at (screenshots, plots)."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT


@pytest.fixture
def fake_backend(tmp_path) -> Path:
    """The fake ``iwseg predict`` script (:data:`_fake_backend.FAKE_BACKEND`), written to a file."""
    script = tmp_path / "fake_backend.py"
    script.write_text(FAKE_BACKEND)
    return script


@pytest.fixture
def fake_checkpoint(tmp_path) -> Path:
    """A checkpoint file for the fake backend, which never reads it (the parameters need it to exist)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not read by the fake backend")
    return path


@pytest.fixture
def stranger():
    """A process outside every backend tree (what a reused pid would belong to)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()
