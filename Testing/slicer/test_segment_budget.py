"""The display budget (slicer.mrml.segments): of a result with many lesions only the most confident
become segments; the rest are counted and reachable. Real MRML (the ``slicer-core`` wheel)."""

from __future__ import annotations

import numpy as np
import pytest

from IWSegmentationLib.core import imageio
from IWSegmentationLib.slicer import mrml


def _many_lesions(n: int, seed: int = 0):
    """``n`` one-voxel lesions on even coordinates (never touching, even diagonally) of a 20x40x40
    grid, with distinct maximum logits: a random permutation of 1.00, 1.01, ... (n values)."""
    shape = (20, 40, 40)
    slots = np.stack(np.meshgrid(*(np.arange(0, s, 2) for s in shape), indexing="ij"), -1).reshape(-1, 3)[:n]
    confidence = 1.0 + 0.01 * np.random.default_rng(seed).permutation(n)
    mask = np.zeros(shape, np.uint8)
    logits = np.full(shape, -8.0, np.float32)
    mask[tuple(slots.T)] = 1
    logits[tuple(slots.T)] = confidence
    return mask, logits, np.sort(logits[tuple(slots.T)])[::-1]


def test_a_budget_of_50_makes_the_50_most_confident_segments_and_counts_the_rest(scene):
    mask, logits, ranked = _many_lesions(1000)
    g = imageio.Geometry.identity(mask.shape, (1.0, 1.0, 1.0))
    volume = mrml.add_volume_from_array(scene, mask.astype(np.int16), g, "many")
    results = mrml.load_prediction(scene, volume, mask, logits, budget=50, closed_surface=False)
    node = results.segmentation
    assert node.GetSegmentation().GetNumberOfSegments() == 50
    shown = sorted((row["confidence"] for row in results.lesions), reverse=True)
    assert shown == pytest.approx(ranked[:50].tolist())  # the 50 most confident (1.00 + 0.01 * 950 ... 999)
    assert node.GetAttribute(mrml.ATTR_LESION_COUNT) == "1000"
    assert node.GetAttribute(mrml.ATTR_NOT_SHOWN) == "950" and len(results.not_shown) == 950
    rest = results.not_shown.rows()  # reachable: listed, most confident first, no segment
    assert [r["confidence"] for r in rest] == pytest.approx(ranked[50:].tolist())
    assert all(r["segment_id"] is None and r["row"] == "not shown" for r in rest)
    assert results.table.GetNumberOfRows() == 50
    # "show next 100": the next 100 most confident become segments; their numbers are their own
    assert mrml.show_more_results(scene, results, 100) == 100
    assert node.GetSegmentation().GetNumberOfSegments() == 150 and node.GetAttribute(mrml.ATTR_NOT_SHOWN) == "850"
    shown = sorted((row["confidence"] for row in results.lesions), reverse=True)
    assert shown == pytest.approx(ranked[:150].tolist()) and results.table.GetNumberOfRows() == 150
    numbers = [row["id"] for row in results.lesions]
    assert len(set(numbers)) == 150 and max(numbers) <= 1000
    # every shown segment holds exactly its own lesion's voxel
    labels = mrml.labelmap_on_volume_grid(node, volume)
    assert int((labels > 0).sum()) == 150


def test_without_a_budget_every_lesion_is_a_segment(scene):
    mask, logits, _ = _many_lesions(30)
    g = imageio.Geometry.identity(mask.shape, (1.0, 1.0, 1.0))
    volume = mrml.add_volume_from_array(scene, mask.astype(np.int16), g, "few")
    results = mrml.load_prediction(scene, volume, mask, logits, budget=None, closed_surface=False)
    assert results.segmentation.GetSegmentation().GetNumberOfSegments() == 30 and not len(results.not_shown)
    assert mrml.show_more_results(scene, results) == 0
