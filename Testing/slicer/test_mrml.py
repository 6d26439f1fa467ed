"""IWSegmentationLib.slicer.mrml with Slicer's real MRML (the ``slicer-core`` wheel, no Qt).

What is checked, and against what (never against mrml's own code):

* geometry: LPS <-> RAS and IJKToRAS against ``Geometry.index_to_physical`` (hypothesis) and a
  hand-written matrix; an oblique NRRD read by *Slicer's own* volume reader
  (``vtkMRMLVolumeArchetypeStorageNode``) gives the same grid and voxels;
* segments: count, order, names, palette colours, terminology (as Slicer's terminology logic
  serialises it), tags (hand-computed diameters), reference geometry, and every segment voxel
  landing on the RAS point SimpleITK computes for the mask voxel, on an oblique anisotropic grid;
* object Dice: a hand-computed case, and rows equal to ``evaluation.match_case`` on the arrays;
  a reference drawn on another grid (finer, flipped axis) is resampled exactly;
* the confidence slider's visibility and counts; the table node; the module's entry point.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib import evaluation
from IWSegmentationLib.core import imageio, lesions
from IWSegmentationLib.core.errors import GeometryMismatchError, InputError
from IWSegmentationLib.slicer import mrml


def _rotation(angle_z: float, angle_x: float = 0.0) -> np.ndarray:
    cz, sz, cx, sx = math.cos(angle_z), math.sin(angle_z), math.cos(angle_x), math.sin(angle_x)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


#: An oblique (rotated about two axes), anisotropic grid: 40 x 30 x 20 voxels (x, y, z).
OBLIQUE = imageio.Geometry(
    size=(40, 30, 20), spacing=(0.7, 0.9, 2.5), origin=(10.0, -20.0, 30.0),
    direction=tuple(_rotation(0.3, 0.2).ravel()),
)


# ============================================================================ without Slicer


def test_module_imports_without_slicer():
    # mrml imports slicer lazily: with `slicer` made unimportable the module still loads.
    code = "import sys; sys.modules['slicer'] = None; import IWSegmentationLib.slicer.mrml as m; print(m.LABELMAP)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Binary labelmap"


def test_ijk_to_ras_by_hand():
    # Axis-aligned LPS grid, spacing (0.5, 0.7, 2), origin (1, 2, 3) LPS = (-1, -2, 3) RAS.
    # RAS = diag(-1, -1, 1) * (origin + spacing * ijk): the first two rows flip sign.
    g = imageio.Geometry(size=(4, 5, 6), spacing=(0.5, 0.7, 2.0), origin=(1.0, 2.0, 3.0))
    expected = np.array([[-0.5, 0, 0, -1], [0, -0.7, 0, -2], [0, 0, 2, 3], [0, 0, 0, 1]])
    np.testing.assert_allclose(mrml.ijk_to_ras_matrix(g), expected)


rotations = st.tuples(st.floats(-3.1, 3.1), st.floats(-1.5, 1.5))
spacings = st.tuples(*[st.floats(0.1, 5.0)] * 3)
origins = st.tuples(*[st.floats(-500, 500)] * 3)


@settings(max_examples=40, deadline=None)
@given(rotations, spacings, origins, st.tuples(*[st.integers(1, 300)] * 3))
def test_geometry_round_trip_and_voxel_positions(angles, spacing, origin, size):
    g = imageio.Geometry(size=size, spacing=spacing, origin=origin, direction=tuple(_rotation(*angles).ravel()))
    m = mrml.ijk_to_ras_matrix(g)
    back = mrml.geometry_from_ijk_to_ras(m, g.shape_zyx)
    assert back.differences(g, rtol=1e-9, atol=1e-9) == []
    # A voxel's RAS point is its LPS point (Geometry.index_to_physical) with x and y negated.
    ijk = np.array([size[0] - 1, 0, size[2] // 2], dtype=float)
    lps = np.array(g.index_to_physical(ijk[::-1]))
    np.testing.assert_allclose((m @ np.r_[ijk, 1])[:3], lps * [-1, -1, 1], atol=1e-9)


def test_degenerate_matrix_is_refused():
    with pytest.raises(InputError, match="degenerate"):
        mrml.geometry_from_ijk_to_ras(np.diag([1.0, 0.0, 1.0, 1.0]), (2, 2, 2))


# ============================================================================ with slicer-core

needs_slicer = pytest.mark.slicer


@pytest.fixture(scope="session")
def slicer():
    return pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'slicer-core==5.13.*')")


def _sphere(shape, center_zyx, radius_vox) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    c = center_zyx
    return ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= radius_vox**2


@pytest.fixture
def oblique_case():
    """Three lesions of 1, 12 and 125 voxels on the oblique grid, maximum logits 0.5 / 1.5 / 30
    (30: a probability that is exactly 1.0 in float32; the logit still ranks it)."""
    shape = OBLIQUE.shape_zyx
    mask = np.zeros(shape, np.uint8)
    logits = np.full(shape, -8.0, np.float32)
    mask[15, 25, 35] = 1  # 1 voxel
    logits[15, 25, 35] = 0.5
    mask[2:4, 3:5, 30:33] = 1  # 2 x 2 x 3 = 12 voxels
    logits[2:4, 3:5, 30:33] = 0.2
    logits[3, 4, 31] = 1.5
    mask[8:13, 10:15, 5:10] = 1  # 5 x 5 x 5 = 125 voxels
    logits[8:13, 10:15, 5:10] = 30.0
    image = (mask * 100).astype(np.int16)
    return image, mask, logits


@needs_slicer
def test_slicer_reader_agrees_with_geometry(scene, tmp_path, oblique_case, slicer):
    image = oblique_case[0]
    path = tmp_path / "oblique.nrrd"
    imageio.write_image(path, image, OBLIQUE)
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    np.testing.assert_allclose(mrml.volume_ijk_to_ras(node), mrml.ijk_to_ras_matrix(OBLIQUE), atol=1e-6)
    array, geometry = mrml.array_from_volume(node)
    assert geometry.differences(OBLIQUE) == []
    np.testing.assert_array_equal(array, image)
    mrml.check_on_volume_grid(OBLIQUE, node)
    shifted = imageio.Geometry(OBLIQUE.size, OBLIQUE.spacing, (10.0, -20.0, 31.0), OBLIQUE.direction)
    with pytest.raises(GeometryMismatchError, match="origin"):
        mrml.check_on_volume_grid(shifted, node, "mask.nrrd")


@needs_slicer
def test_lesion_segments(scene, oblique_case, slicer):
    import vtk

    image, mask, logits = oblique_case
    volume = mrml.add_volume_from_array(scene, image, OBLIQUE, "CT")
    node = mrml.lesion_segmentation(scene, volume, mask, logits=logits, size_thresholds_mm=(3.0, 6.0))
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    assert node.GetName() == "CT lesions" and node.GetAttribute(mrml.ATTR_LESION_COUNT) == "3"

    # Voxel volume 0.7 * 0.9 * 2.5 = 1.575 mm³; d = (6 V / π)^(1/3):
    # 125 voxels -> 196.875 mm³ -> (376.00)^(1/3) = 7.2177 mm (large, >= 6); 12 -> 18.9 mm³ -> 3.305 mm (medium);
    # 1 -> 1.575 mm³ -> 1.444 mm (small, < 3). Largest first.
    expected = [
        ("Lesion 01 · 7.2 mm · large", 125, 7.2177, "large", 30.0),
        ("Lesion 02 · 3.3 mm · medium", 12, 3.3049, "medium", 1.5),
        ("Lesion 03 · 1.4 mm · small", 1, 1.4435, "small", 0.5),
    ]
    rows = mrml.lesion_rows(node)
    assert [r["segment_id"] for r in rows] == ["lesion_01", "lesion_02", "lesion_03"]
    terminology = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        "Segmentation category and type - DICOM master list", "49755003", "SCT",
        "Morphologically Altered Structure", "52988006", "SCT", "Lesion", "", "", "", "", "", "", "", "", "", "")
    for row, (name, voxels, diameter, group, confidence) in zip(rows, expected):
        segment = segmentation.GetSegment(row["segment_id"])
        assert segment.GetName() == row["name"] == name
        assert row["voxels"] == voxels and row["size_group"] == group
        assert row["diameter_mm"] == pytest.approx(diameter, abs=1e-4)
        assert row["volume_mm3"] == pytest.approx(voxels * 1.575)
        assert row["confidence"] == pytest.approx(confidence, abs=1e-6)
        assert tuple(round(c * 255) for c in segment.GetColor()) == lesions.SIZE_GROUP_COLORS[group]
        assert segment.GetTerminology() == terminology == mrml.LESION_TERMINOLOGY
        assert segment.GetLabelValue() == row["id"]

    # Reference geometry is the volume's grid (Slicer's own serialisation of it).
    probe = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(probe)
    probe.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert segmentation.GetConversionParameter(key) == probe.GetSegmentation().GetConversionParameter(key)
    assert mrml.reference_volume_node(node) is volume

    # Every segment voxel sits on the RAS point SimpleITK gives the mask voxel (LPS, x/y negated).
    itk = imageio.to_sitk(mask, OBLIQUE)
    for row in rows:
        labelmap = segmentation.GetSegment(row["segment_id"]).GetRepresentation(mrml.LABELMAP)
        from vtkmodules.util import numpy_support

        extent = labelmap.GetExtent()
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
            extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        k, j, i = np.nonzero(values == labelmap_value(segmentation, row["segment_id"]))
        ijk = np.c_[i + extent[0], j + extent[2], k + extent[4]]
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        ras = (m @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
        lps = np.array([itk.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in ijk])
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)
        assert np.all(mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]] == 1) and len(ijk) == row["voxels"]
    # The 125-voxel cube is symmetric: Slicer's segment centre equals our centroid tag.
    np.testing.assert_allclose(node.GetSegmentCenterRAS("lesion_01"), rows[0]["center_ras"], atol=1e-6)
    sitk_center = np.array(itk.TransformContinuousIndexToPhysicalPoint([7.0, 12.0, 10.0])) * [-1, -1, 1]
    np.testing.assert_allclose(rows[0]["center_ras"], sitk_center, atol=1e-6)
    # The 3D view's representation exists.
    assert segmentation.GetSegment("lesion_01").GetRepresentation(mrml.CLOSED_SURFACE).GetNumberOfPoints() > 0


def labelmap_value(segmentation, segment_id):
    return segmentation.GetSegment(segment_id).GetLabelValue()


@needs_slicer
def test_empty_mask_and_bad_input(scene, oblique_case, slicer):
    image, mask, logits = oblique_case
    volume = mrml.add_volume_from_array(scene, image, OBLIQUE, "CT")
    empty = mrml.lesion_segmentation(scene, volume, np.zeros_like(mask))
    assert empty.GetSegmentation().GetNumberOfSegments() == 0
    assert empty.GetAttribute(mrml.ATTR_LESION_COUNT) == "0"
    with pytest.raises(GeometryMismatchError, match=r"shape \(20, 30, 41\).*'CT'"):
        mrml.lesion_segmentation(scene, volume, np.zeros((20, 30, 41), np.uint8))
    nan_logits = logits.copy()
    nan_logits[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="logits must be numbers"):
        mrml.lesion_segmentation(scene, volume, mask, logits=nan_logits)
    with pytest.raises(InputError, match="size thresholds"):
        mrml.lesion_segmentation(scene, volume, mask, size_thresholds_mm=(6.0, 3.0))
    with pytest.raises(InputError, match="volume node"):
        mrml.lesion_segmentation(scene, None, mask)
    vector = slicer.vtkMRMLVectorVolumeNode()
    scene.AddNode(vector)
    import vtk

    rgb = vtk.vtkImageData()
    rgb.SetDimensions(4, 4, 4)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(rgb)
    vector.SetName("RGB")
    with pytest.raises(InputError, match="'RGB' has 3 components"):
        mrml.array_from_volume(vector)


@needs_slicer
def test_confidence_threshold_hides_and_counts(scene, oblique_case, slicer):
    image, mask, logits = oblique_case
    volume = mrml.add_volume_from_array(scene, image, OBLIQUE, "CT")
    node = mrml.lesion_segmentation(scene, volume, mask, logits=logits, closed_surface=False)
    display = node.GetDisplayNode()
    # Confidences (maximum logits) 30, 1.5, 0.5 (largest first). τ = 1.5 keeps >= 1.5: two shown.
    assert mrml.set_confidence_threshold(node, 1.5) == {"threshold": 1.5, "shown": 2, "hidden": 1, "total": 3}
    assert [display.GetSegmentVisibility(s) for s in ("lesion_01", "lesion_02", "lesion_03")] == [True, True, False]
    # τ = 20: only the lesion at logit 30 (its probability, like that of any logit above 17, is 1.0)
    assert mrml.set_confidence_threshold(node, 20.0)["shown"] == 1
    assert mrml.set_confidence_threshold(node, 31.0)["shown"] == 0
    assert mrml.set_confidence_threshold(node, -5.0)["hidden"] == 0
    assert node.GetAttribute(mrml.ATTR_CONFIDENCE_THRESHOLD) == "-5.0"
    assert all(r["visible"] for r in mrml.lesion_rows(node))
    with pytest.raises(InputError, match="confidence threshold"):
        mrml.set_confidence_threshold(node, float("nan"))
    # Without a logit map there are no confidences: nothing is ever hidden.
    plain = mrml.lesion_segmentation(scene, volume, mask, closed_surface=False)
    assert mrml.set_confidence_threshold(plain, 2.5) == {"threshold": 2.5, "shown": 3, "hidden": 0, "total": 3}


# ---------------------------------------------------------------------------- object Dice


@needs_slicer
def test_object_dice_by_hand(scene, slicer):
    # Reference: a 3x3x3 cube (27 voxels) and a lone voxel far away (missed: FN).
    # Prediction: 2 of the cube's 3 slices (18 voxels) -> Dice 2*18/(27+18) = 0.8 (TP),
    # and a 2-voxel blob where there is no reference (FP, Dice 0).
    g = imageio.Geometry.identity((12, 12, 12), (2.0, 1.0, 1.0))
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[10, 10, 10] = 1
    pred = np.zeros_like(ref)
    pred[1:3, 1:4, 1:4] = 1
    pred[6, 8, 1:3] = 1
    logits = np.where(pred > 0, 2.2, -5.0).astype(np.float32)
    volume = mrml.add_volume_from_array(scene, np.zeros_like(ref, dtype=np.int16), g, "V")
    seg = mrml.lesion_segmentation(scene, volume, pred, logits=logits, closed_surface=False)
    reference = mrml.lesion_segmentation(scene, volume, ref, name="Reference", closed_surface=False)
    rows = mrml.object_dice_table(seg, reference)
    assert [(r["segment_id"], r["status"]) for r in rows] == [("lesion_01", "TP"), ("lesion_02", "FP"), ("lesion_02", "FN")]
    assert rows[0]["dice"] == pytest.approx(0.8) and rows[1]["dice"] == 0.0 and rows[2]["dice"] == 0.0
    # An FN row's segment is the *reference* segment holding the missed voxel (its lesion_02).
    match = mrml.match_segmentations(seg, reference)
    fn = [r for r in match.references if r["status"] == "FN"][0]
    assert fn["segment_id"] == "lesion_02" and fn["voxels"] == 1
    # Voxel (10, 10, 10) [z, y, x] with spacing (2, 1, 1) is at LPS (10, 10, 20) = RAS (-10, -10, 20).
    np.testing.assert_allclose(fn["center_ras"], (-10.0, -10.0, 20.0))
    # Nothing found: every reference lesion is FN; nothing in the reference: every detection FP.
    empty = mrml.lesion_segmentation(scene, volume, np.zeros_like(pred), closed_surface=False)
    assert [r["status"] for r in mrml.object_dice_table(empty, reference)] == ["FN", "FN"]
    assert [r["status"] for r in mrml.object_dice_table(seg, empty)] == ["FP", "FP"]


def _metrics_rows(logits, ref, spacing):
    case = evaluation.match_case(logits, ref, spacing, threshold=0.5, score="logit")
    comps = sorted(((c.voxels, c.hit_dice, c.confidence, c.false_positive) for c in case.components), reverse=True)
    refs = sorted((les.voxels, les.hit_dice, les.confidence) for les in case.lesions)
    return comps, refs


@needs_slicer
def test_object_dice_equals_metrics(scene, rng, slicer):
    # Random blobs: the segments' table must carry exactly match_case's numbers.
    from scipy import ndimage

    shape = (20, 40, 40)
    ref = ndimage.binary_dilation(rng.random(shape) > 0.998, iterations=2).astype(np.uint8)
    shift = np.roll(ref, 1, axis=2)
    fps = np.zeros_like(ref)
    fps[::7, ::9, ::11] = 1
    # logits: lesions at 0.2 .. 40 (probabilities 0.55 .. 1.0, many exactly 1.0), false positives at 0.85
    logits = (shift * rng.uniform(0.2, 40.0, shape) + fps * 0.85 - (1 - np.maximum(shift, fps)) * 6).astype(np.float32)
    pred = (logits > 0).astype(np.uint8)
    g = imageio.Geometry(size=shape[::-1], spacing=(0.8, 0.8, 2.0), origin=(3.0, 4.0, 5.0),
                         direction=tuple(_rotation(0.4).ravel()))
    volume = mrml.add_volume_from_array(scene, ref.astype(np.int16), g, "V")
    seg = mrml.lesion_segmentation(scene, volume, pred, logits=logits, closed_surface=False)
    reference = mrml.lesion_segmentation(scene, volume, ref, name="Reference", closed_surface=False)
    match = mrml.match_segmentations(seg, reference)
    comps, refs = _metrics_rows(logits, ref, g.spacing_zyx)
    assert len(comps) > 5 and any(c[3] for c in comps) and any(not c[3] for c in comps)
    got_comps = sorted(((d["voxels"], d["dice"], d["confidence"], d["status"] == "FP") for d in match.detections),
                       reverse=True)
    assert [c[:2] + (c[3],) for c in got_comps] == [c[:2] + (c[3],) for c in comps]
    np.testing.assert_allclose([c[2] for c in got_comps], [c[2] for c in comps], atol=1e-6)
    got_refs = sorted((r["voxels"], r["dice"], r["confidence"]) for r in match.references)
    assert [r[:2] for r in got_refs] == [r[:2] for r in refs]
    for (_, _, a), (_, _, b) in zip(got_refs, refs):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6)
    assert {r["status"] for r in match.references} <= {"TP", "FN"}
    assert len(match.rows) == len(match.detections) + sum(r["status"] == "FN" for r in match.references)


@needs_slicer
def test_reference_on_another_grid_is_resampled(scene, slicer):
    # The reference is drawn on a grid 3x finer with its x axis flipped. Fine voxels 3i..3i+2
    # tile coarse voxel i and the middle one's centre is the coarse centre, so resampling onto
    # the volume's grid must give back the coarse mask exactly (and Dice 1 for every lesion).
    coarse = imageio.Geometry(size=(16, 14, 10), spacing=(1.0, 1.2, 3.0), origin=(0.0, 0.0, 0.0),
                              direction=tuple(_rotation(0.25).ravel()))
    mask = np.zeros(coarse.shape_zyx, np.uint8)
    mask[2:5, 3:7, 2:6] = 1
    mask[7, 10, 12:14] = 1
    volume = mrml.add_volume_from_array(scene, mask.astype(np.int16), coarse, "V")
    d = coarse.direction_matrix
    fine_spacing = np.asarray(coarse.spacing) / 3
    flip = d @ np.diag([-1.0, 1.0, 1.0])
    # fine voxel 0 along x is the last third of coarse voxel 15; along y, z the first third of voxel 0
    start = np.array([15 + 1 / 3, -1 / 3, -1 / 3]) * np.asarray(coarse.spacing)
    fine = imageio.Geometry(size=tuple(s * 3 for s in coarse.size), spacing=tuple(fine_spacing),
                            origin=tuple(d @ start), direction=tuple(flip.ravel()))
    fine_mask = mask.repeat(3, 0).repeat(3, 1).repeat(3, 2)[:, :, ::-1]
    ref_volume = mrml.add_volume_from_array(scene, fine_mask, fine, "fine", labelmap=True)
    reference = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(ref_volume, reference)
    before = scene.GetNumberOfNodes()
    np.testing.assert_array_equal(mrml.labelmap_on_volume_grid(reference, volume) > 0, mask > 0)
    assert scene.GetNumberOfNodes() == before  # no temporary node left behind
    seg = mrml.lesion_segmentation(scene, volume, mask, closed_surface=False)
    rows = mrml.object_dice_table(seg, reference)
    assert [(r["status"], r["dice"]) for r in rows] == [("TP", 1.0), ("TP", 1.0)]
    with pytest.raises(InputError, match="no segment"):
        mrml.object_dice_table(seg, reference, reference_segment_ids=["nope"])


@needs_slicer
def test_dice_table_node(scene, slicer):
    rows = [
        {"name": "Lesion 01 · 7.2 mm · large", "status": "TP", "diameter_mm": 7.2, "volume_mm3": 196.9,
         "size_group": "large", "confidence": 0.95, "dice": 0.8, "reference_id": 2, "segment_id": "lesion_01"},
        {"name": "Reference 01", "status": "FN", "diameter_mm": 1.4, "volume_mm3": 1.6,
         "size_group": "small", "confidence": None, "dice": 0.0, "reference_id": 1, "segment_id": None},
    ]
    table = mrml.dice_table_node(scene, rows, "Dice")
    assert table.GetNumberOfRows() == 2 and table.GetNumberOfColumns() == len(mrml.DICE_TABLE_COLUMNS)
    vtable = table.GetTable()
    assert vtable.GetColumnByName("Lesion").GetValue(0) == "Lesion 01 · 7.2 mm · large"
    assert vtable.GetColumnByName("Dice").GetValue(0) == pytest.approx(0.8)
    assert math.isnan(vtable.GetColumnByName("Max logit").GetValue(1))
    assert vtable.GetColumnByName("Reference lesion").GetValue(1) == 1
    assert vtable.GetColumnByName("Segment ID").GetValue(1) == ""
    assert table.GetColumnUnitLabel("Diameter") == "mm"


@needs_slicer
def test_load_prediction_phantom_known_answer(scene, slicer):
    # The module's known-answer case without the backend: the prediction is the reference.
    from IWSegmentationLib.slicer import panel
    from IWSegmentationLib.testing import phantom

    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    g = imageio.Geometry.identity(case.reference.shape, case.spacing)
    volume = mrml.add_volume_from_array(scene, case.image, g, "Phantom")
    reference = mrml.lesion_segmentation(scene, volume, case.reference, name="Reference", closed_surface=False)
    confidences = case.confidences()  # maximum logits 4, 7, 10
    labels, _ = lesions.label_components(case.reference)
    logits = np.full(case.reference.shape, -10.0, np.float32)
    for component, value in zip(range(1, 4), sorted(confidences)):
        logits[labels == component] = value
    results = mrml.load_prediction(scene, volume, case.reference, logits, reference=reference,
                                   size_thresholds_mm=phantom.DEFAULT_SIZE_THRESHOLDS, keep_probabilities=True)
    assert [les["size_group"] for les in results.lesions] == ["large", "medium", "small"]
    assert [m["status"] for m in results.matches] == ["TP", "TP", "TP"]
    assert all(m["dice"] == 1.0 and les["status"] == "TP" for m, les in zip(results.matches, results.lesions))
    assert results.table.GetNumberOfRows() == 3
    # the probability volume is the sigmoid of the logit map
    assert mrml.array_from_volume(results.probabilities)[0].max() == pytest.approx(1 / (1 + math.exp(-10)))
    assert [r["status"] for r in results.rows] == ["TP", "TP", "TP"] and results.rows == results.lesions
    tau = sorted(les["confidence"] for les in results.lesions)[1]
    counts = panel.detection_counts(results.lesions, tau, results.matches)
    shown = mrml.set_confidence_threshold(results.segmentation, tau)["shown"]
    assert counts.shown == shown == 2 and counts.detected == 2 and counts.false_positives == 0
    # Without a reference: no matches, the table lists the lesions.
    alone = mrml.load_prediction(scene, volume, case.reference, logits, make_table=False, geometry=g)
    assert alone.matches is None and alone.table is None and len(alone.lesions) == 3
    assert [r["status"] for r in alone.rows] == [None] * 3  # no reference: no TP/FP
    # A mask read from a file on another grid is refused, naming what differs, and adds nothing.
    nodes = scene.GetNumberOfNodes()
    other = imageio.Geometry(g.size, g.spacing, (0.0, 0.0, 1.0), g.direction)
    with pytest.raises(GeometryMismatchError, match="lesion mask.*origin"):
        mrml.load_prediction(scene, volume, case.reference, logits, geometry=other)
    assert scene.GetNumberOfNodes() == nodes


@needs_slicer
def test_direct_layer_read_equals_slicer_export(scene, oblique_case, slicer):
    # labelmap_on_volume_grid reads layers on the volume's grid directly; under an identity
    # transform it must fall back to Slicer's export. Both must agree voxel for voxel, including
    # "later segment wins" where a hand-drawn segment (own layer) overlaps a lesion.
    import vtk
    from vtkmodules.util import numpy_support

    image, mask, logits = oblique_case
    volume = mrml.add_volume_from_array(scene, image, OBLIQUE, "CT")
    node = mrml.lesion_segmentation(scene, volume, mask, closed_surface=False)
    extra = np.zeros(mask.shape, np.uint8)
    extra[10:12, 12:20, 7:9] = 1  # overlaps lesion_01 (the cube at [8:13, 10:15, 5:10])
    layer = slicer.vtkOrientedImageData()
    layer.SetDimensions(*mask.shape[::-1])
    layer.GetPointData().SetScalars(numpy_support.numpy_to_vtk(extra.ravel(), deep=True))
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    layer.SetImageToWorldMatrix(m)
    segment = slicer.vtkSegment()
    segment.SetName("drawn")
    segment.AddRepresentation(mrml.LABELMAP, layer)
    node.GetSegmentation().AddSegment(segment, "drawn")
    assert node.GetSegmentation().GetNumberOfLayers() == 2
    for ids in (["lesion_01", "drawn", "lesion_03"], ["drawn", "lesion_01"]):
        direct = mrml.labelmap_on_volume_grid(node, volume, ids)
        transform = slicer.vtkMRMLLinearTransformNode()
        scene.AddNode(transform)
        node.SetAndObserveTransformNodeID(transform.GetID())
        exported = mrml.labelmap_on_volume_grid(node, volume, ids)
        node.SetAndObserveTransformNodeID(None)
        np.testing.assert_array_equal(direct, exported)
        assert direct[11, 12, 8] == 2  # the overlap belongs to the later of the two: 2nd in both lists


# ---------------------------------------------------------------------------- lesion table rows


#: A small oblique grid: 30° about the z axis, spacing (1, 2, 3) mm (x, y, z), LPS origin (10, -5, 3).
COS30, SIN30 = math.sqrt(3) / 2, 0.5
SMALL_OBLIQUE = imageio.Geometry(size=(8, 10, 6), spacing=(1.0, 2.0, 3.0), origin=(10.0, -5.0, 3.0),
                                 direction=(COS30, -SIN30, 0.0, SIN30, COS30, 0.0, 0.0, 0.0, 1.0))


def _slice_nodes(scene, slicer):
    """Red (axial) and Green (coronal) slice nodes, as Slicer's layout makes them."""
    nodes = []
    for name, orientation in (("Red", "Axial"), ("Green", "Coronal")):
        node = scene.CreateNodeByClass("vtkMRMLSliceNode")  # copies the scene's orientation presets
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetOrientation(orientation)
        scene.AddNode(node)
        nodes.append(node)
    return nodes


def _slice_center(node) -> np.ndarray:
    m = node.GetSliceToRAS()
    return np.array([m.GetElement(r, 3) for r in range(3)])


@needs_slicer
def test_table_rows_carry_lesion_centres_and_centre_the_views(scene, slicer):
    # RAS = diag(-1, -1, 1) · (origin + D · (spacing ⊙ ijk)), D the 30° rotation about z:
    # * prediction A = reference lesion A, the 3×3×3 cube x 2..4, y 4..6, z 1..3: centroid ijk (3, 5, 2),
    #   spacing ⊙ ijk = (3, 10, 6), D · that = (3c - 10s, 3s + 10c, 6) = (-2.401924, 10.160254, 6),
    #   LPS = (7.598076, 5.160254, 9), RAS = (-7.598076, -5.160254, 9);
    # * prediction B, one voxel ijk (0, 9, 0) with no reference (FP): (0, 18, 0) -> D · = (-9, 15.588457, 0),
    #   LPS (1, 10.588457, 3), RAS (-1, -10.588457, 3);
    # * reference lesion C, one voxel ijk (6, 1, 5), missed (FN): (6, 2, 15) -> (6c - 2s, 6s + 2c, 15) =
    #   (4.196152, 4.732051, 15), LPS (14.196152, -0.267949, 18), RAS (-14.196152, 0.267949, 18).
    # A and C are ONE reference segment (one label value): the FN row must point at C, not the segment.
    pred = np.zeros(SMALL_OBLIQUE.shape_zyx, np.uint8)
    pred[1:4, 4:7, 2:5] = 1
    pred[0, 9, 0] = 1
    ref = np.zeros_like(pred)
    ref[1:4, 4:7, 2:5] = 1
    ref[5, 1, 6] = 1
    volume = mrml.add_volume_from_array(scene, np.zeros(pred.shape, np.int16), SMALL_OBLIQUE, "Oblique")
    label = mrml.add_volume_from_array(scene, ref, SMALL_OBLIQUE, "Reference label", labelmap=True)
    reference = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, reference)
    (reference_segment,) = [reference.GetSegmentation().GetNthSegmentID(0)]
    assert reference.GetSegmentation().GetNumberOfSegments() == 1

    results = mrml.load_prediction(scene, volume, pred, reference=reference, closed_surface=False,
                                   geometry=SMALL_OBLIQUE)
    expected = [
        ("detection", "TP", "lesion_01", (-7.598076, -5.160254, 9.0)),
        ("detection", "FP", "lesion_02", (-1.0, -10.588457, 3.0)),
        ("reference", "FN", reference_segment, (-14.196152, 0.267949, 18.0)),
    ]
    assert [(r["row"], r["status"], r["segment_id"]) for r in results.rows] == [e[:3] for e in expected]
    for row, (*_, ras) in zip(results.rows, expected):
        np.testing.assert_allclose(row["center_ras"], ras, atol=1e-5)
    assert results.rows[0]["dice"] == 1.0 and results.rows[2]["dice"] == 0.0
    assert results.table.GetNumberOfRows() == 3  # the table node holds the same rows
    # The reference segment's own centre lies between A and C: centring on it would miss C.
    segment_center = np.array(reference.GetSegmentCenterRAS(reference_segment))
    assert np.linalg.norm(segment_center - np.array(expected[2][3])) > 5.0

    # A click on a row centres every slice view on that lesion.
    red, green = _slice_nodes(scene, slicer)
    for row, (*_, ras) in zip(results.rows, expected):
        assert mrml.center_slice_views(scene, row["center_ras"], volume) == pytest.approx(ras, abs=1e-5)
        for node in (red, green):
            np.testing.assert_allclose(_slice_center(node), ras, atol=1e-5)
    # Under a transform (volume and segments move together), the views go to the moved lesion.
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    import vtk

    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    shift.SetElement(2, 3, -2.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = mrml.center_slice_views(scene, results.rows[2]["center_ras"], volume)
    np.testing.assert_allclose(world, (-9.196152, 0.267949, 16.0), atol=1e-5)
    np.testing.assert_allclose(_slice_center(red), world, atol=1e-5)
    with pytest.raises(InputError, match="three finite RAS"):
        mrml.center_slice_views(scene, None)


@needs_slicer
def test_mask_on_another_grid_is_refused(scene, slicer):
    # Same shape, another grid: the arrays alone cannot tell, the geometry read with the mask does.
    volume = mrml.add_volume_from_array(scene, np.zeros(SMALL_OBLIQUE.shape_zyx, np.int16), SMALL_OBLIQUE, "Oblique")
    mask = np.zeros(SMALL_OBLIQUE.shape_zyx, np.uint8)
    mask[1:4, 4:7, 2:5] = 1
    axis_aligned = imageio.Geometry(SMALL_OBLIQUE.size, SMALL_OBLIQUE.spacing, SMALL_OBLIQUE.origin)
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match=r"lesion mask is not on the voxel grid of volume 'Oblique'.*direction"):
        mrml.load_prediction(scene, volume, mask, geometry=axis_aligned)
    with pytest.raises(InputError, match=r"logit map .*spacing"):
        mrml.load_prediction(scene, volume, mask, mask.astype(np.float32), geometry=SMALL_OBLIQUE,
                             logits_geometry=imageio.Geometry.identity(SMALL_OBLIQUE.shape_zyx))
    assert scene.GetNumberOfNodes() == nodes
