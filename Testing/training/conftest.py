"""Fixtures of the trainer's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny_training import write_tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four synthetic liver-CT cases of 16x32x32 voxels (8, 6, 3 and 3 lesions, seed 0)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("synth") / "data")
