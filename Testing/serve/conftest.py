"""Fixtures of the server tests: a models folder holding the hand-wired phantom checkpoint
(``logit = 20 (x - 0.5)``, so the right mask is known in advance), a tokens file, one shared
server, and an oblique phantom scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _server_harness import LIMIT_MB, TOKENS, Server

from IWSegmentationLib.core import imageio
from IWSegmentationLib.testing import phantom


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    phantom.threshold_checkpoint(folder / "phantom.safetensors")
    (folder.parent / "elsewhere.safetensors").write_bytes((folder / "phantom.safetensors").read_bytes())
    (folder / "linked.safetensors").symlink_to(folder.parent / "elsewhere.safetensors")  # points outside
    return folder


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("# two users\n" + "\n".join(TOKENS) + "\n")
    return path


@pytest.fixture(scope="module")
def srv(models, tokens_file, tmp_path_factory):
    """One server for most tests: two tokens, one worker, a 1 MB upload limit."""
    s = Server(models, tmp_path_factory.mktemp("serve"), "--token-file", str(tokens_file), "--workers", "1",
               "--max-upload-mb", str(LIMIT_MB), "--device", "cpu")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[Path, phantom.PhantomCase]:
    """The phantom (32 x 48 x 48, three lesions) on an anisotropic, oblique grid, as NIfTI."""
    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    geometry = imageio.Geometry(size=case.image.shape[::-1], spacing=case.spacing[::-1], origin=(10.0, -5.0, 3.0),
                                direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = imageio.write_image(tmp_path_factory.mktemp("scan") / "case_7.nii.gz", case.image, geometry)
    return path, case
