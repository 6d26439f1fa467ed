"""The Slicer scene itself: the lazy ``slicer`` import, a headless scene, converter rules, centring the views."""

from __future__ import annotations

import math
from typing import Sequence

from ...core.errors import InputError


def slicer_module():
    """The ``slicer`` module (3D Slicer, or the slicer-core wheel outside it); an ImportError saying
    how to install it otherwise. The mrml modules import it through here, on first use, so that
    they import without Slicer."""
    try:
        import slicer  # lazy: Slicer's own; importable without it
    except ImportError as exc:  # pragma: no cover - exercised only without slicer-core
        raise ImportError(
            "IWSegmentationLib.slicer.mrml needs 3D Slicer or the slicer-core wheel (pip install 'slicer-core==5.13.*')"
        ) from exc
    return slicer


def ensure_converter_rules() -> None:
    """Register Slicer's labelmap <-> closed-surface conversion rules if nobody has.

    Inside Slicer the Segmentations module does this at start-up; with slicer-core nobody does,
    and without the rules a segmentation cannot make the surfaces the 3D view shows. A
    segmentation copies the rules when it is created, so call this before creating one.
    """
    slicer = slicer_module()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in have:
            factory.RegisterConverterRule(cls())


def headless_scene():
    """A new scene and application logic set up the way Slicer sets up its own, for use outside
    Slicer (``slicer-core``): default colour tables (labelmaps look them up), slice orientation
    presets (slice views need them), empty slice/view logic collections (views register there)
    and the segmentation conversion rules. Returns ``(scene, app_logic)``.

    Keep ``app_logic`` alive as long as the scene is used (labelmap display nodes look their
    colour table up through it). Inside Slicer use ``slicer.mrmlScene`` and
    ``slicer.app.applicationLogic()`` instead.
    """
    import vtk  # lazy: Slicer's own; importable without it

    slicer = slicer_module()
    ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    return scene, app_logic


def center_slice_views(scene, center_ras: Sequence[float], volume_node=None) -> tuple[float, float, float]:
    """Centre every slice view of ``scene`` on a point: what a click on a lesion-table row does.

    ``center_ras`` is a row's ``center_ras`` (mm, in the volume's RAS frame, as every row's is);
    when ``volume_node`` sits under a transform the point is moved to world coordinates first.
    Each slice plane goes through the point and the point is put at the view's centre
    (``vtkMRMLSliceNode.JumpAllSlices`` in centred mode — no Qt, no Markups module). Returns the
    world point.
    """
    slicer = slicer_module()
    import vtk  # lazy: Slicer's own; importable without it

    if center_ras is None or len(center_ras) != 3 or not all(math.isfinite(float(v)) for v in center_ras):
        raise InputError(f"a lesion centre needs three finite RAS coordinates, got {center_ras!r}")
    point = [float(v) for v in center_ras]
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is not None:
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
        point = list(to_world.TransformPoint(point))
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *point, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return tuple(point)
