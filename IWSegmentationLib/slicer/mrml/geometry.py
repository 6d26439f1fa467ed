"""Volume node <-> numpy and :class:`~IWSegmentationLib.core.imageio.Geometry` (RAS <-> LPS, IJKToRAS)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...core.errors import GeometryMismatchError, InputError
from ...core.imageio import Geometry
from .scene import slicer_module

#: RAS <-> LPS: flip the first two axes (homogeneous 4x4).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_ras_matrix(geometry: Geometry) -> np.ndarray:
    """The 4x4 ``IJKToRAS`` matrix of an ITK (LPS) :class:`Geometry`."""
    m = np.eye(4)
    m[:3, :3] = geometry.direction_matrix * np.asarray(geometry.spacing, dtype=float)[None, :]
    m[:3, 3] = geometry.origin
    return LPS_TO_RAS @ m


def geometry_from_ijk_to_ras(ijk_to_ras: Any, shape_zyx: Sequence[int]) -> Geometry:
    """The ITK (LPS) :class:`Geometry` of a grid of ``shape_zyx`` voxels with this ``IJKToRAS``.

    ``ijk_to_ras`` is a 4x4 numpy array or a ``vtkMatrix4x4``. Spacing is the length of each
    column; a zero-length column (a degenerate matrix) is refused.
    """
    m = as_numpy_matrix(ijk_to_ras)
    lps = LPS_TO_RAS @ m
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise InputError(f"IJKToRAS matrix is degenerate: {m.tolist()}")
    direction = columns / spacing[None, :]
    return Geometry(
        size=tuple(int(v) for v in tuple(shape_zyx)[::-1]),
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in lps[:3, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def as_numpy_matrix(matrix: Any) -> np.ndarray:
    """A 4x4 matrix (a numpy array or a ``vtkMatrix4x4``) as a float numpy array; :class:`InputError`
    for another shape."""
    if isinstance(matrix, np.ndarray):
        m = np.asarray(matrix, dtype=float)
    else:  # vtkMatrix4x4
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)
    if m.shape != (4, 4):
        raise InputError(f"expected a 4x4 matrix, got shape {m.shape}")
    return m


def to_vtk_matrix(m: np.ndarray):
    """The 4x4 numpy matrix ``m`` as a ``vtkMatrix4x4`` (what MRML nodes take)."""
    import vtk  # lazy: Slicer's own; importable without it

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def centroid_ras(ijk_to_ras: np.ndarray, centroid_zyx: Sequence[float]) -> tuple[float, float, float]:
    """The RAS point (mm) of a ``[z, y, x]`` (continuous) voxel index on a grid with this ``IJKToRAS``."""
    ijk = np.asarray(centroid_zyx, dtype=float)[::-1]
    return tuple(float(v) for v in (ijk_to_ras @ np.r_[ijk, 1.0])[:3])


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume node's ``IJKToRAS`` as a 4x4 numpy array (its parent transform is not applied)."""
    import vtk  # lazy: Slicer's own; importable without it

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return as_numpy_matrix(m)


def check_volume_node(volume_node, what: str = "volume") -> None:
    """Refuse (:class:`InputError`, naming the node as ``what``) anything but a scalar volume node
    with non-empty image data."""
    slicer = slicer_module()
    if volume_node is None or not isinstance(volume_node, slicer.vtkMRMLVolumeNode):
        raise InputError(f"{what} must be a volume node, got {type(volume_node).__name__}")
    image = volume_node.GetImageData()
    name = volume_node.GetName()
    if image is None:
        raise InputError(f"{what} {name!r} has no image data")
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetNumberOfPoints() == 0:
        raise InputError(f"{what} {name!r} is empty ({dims})")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"{what} {name!r} has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a single-component (scalar) volume is needed"
        )


def volume_geometry(volume_node) -> Geometry:
    """The ITK (LPS) :class:`Geometry` of a volume node's voxel grid."""
    check_volume_node(volume_node)
    dims = volume_node.GetImageData().GetDimensions()
    return geometry_from_ijk_to_ras(volume_ijk_to_ras(volume_node), dims[::-1])


def array_from_volume(volume_node) -> tuple[np.ndarray, Geometry]:
    """A copy of the volume's voxels as a ``[z, y, x]`` array, and its :class:`Geometry`.

    With :func:`IWSegmentationLib.core.imageio.write_image` this writes the volume to a file the
    backend reads (NRRD, NIfTI) on exactly the volume's grid.
    """
    from vtkmodules.util import numpy_support  # lazy: Slicer's own; importable without it

    check_volume_node(volume_node)
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[::-1]).copy(), volume_geometry(volume_node)


def check_on_volume_grid(geometry: Geometry, volume_node, what: str = "image") -> None:
    """Raise :class:`GeometryMismatchError` when ``geometry`` is not the volume node's grid."""
    diffs = volume_geometry(volume_node).differences(geometry)
    if diffs:
        raise GeometryMismatchError(
            f"{what} is not on the voxel grid of volume {volume_node.GetName()!r}: " + "; ".join(diffs)
        )


def add_volume_from_array(scene, array: np.ndarray, geometry: Geometry, name: str = "Volume", *,
                          labelmap: bool = False):
    """Add a scalar (or labelmap) volume node holding a ``[z, y, x]`` array on ``geometry``."""
    import vtk  # lazy: Slicer's own; importable without it
    from vtkmodules.util import numpy_support  # lazy: Slicer's own; importable without it

    slicer = slicer_module()
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        raise InputError(f"{name}: a 3D [z, y, x] array is needed, got {getattr(array, 'shape', type(array))}")
    if tuple(array.shape) != geometry.shape_zyx:
        raise InputError(f"{name}: array of shape {array.shape} does not fit a grid of shape {geometry.shape_zyx}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(to_vtk_matrix(ijk_to_ras_matrix(geometry)))
    node.CreateDefaultDisplayNodes()
    return node
