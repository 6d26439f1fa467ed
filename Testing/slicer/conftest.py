"""Fixtures of the Slicer-side tests (slicer-core: Slicer's real MRML without Qt)."""

from __future__ import annotations

import pytest


@pytest.fixture
def scene():
    """A headless MRML scene with Slicer's application logic (segmentations, displayable managers);
    skips when slicer-core is not installed."""
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'slicer-core==5.13.*')")
    from IWSegmentationLib.slicer import mrml  # lazy: imports slicer

    scene, app_logic = mrml.headless_scene()
    yield scene  # app_logic stays alive for the test, as Slicer's does
    del app_logic
