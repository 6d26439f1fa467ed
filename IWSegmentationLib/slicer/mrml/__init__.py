"""Slicer scene building without Qt: lesion segments, object Dice tables, volume <-> numpy.

This is the only module of :mod:`IWSegmentationLib` that talks to Slicer. It uses nothing but
Slicer's MRML classes, its segmentation and terminology logic, ``vtk`` and numpy, all imported
*inside* the functions, so ``import IWSegmentationLib.slicer.mrml`` works anywhere and the functions run
both inside 3D Slicer and with the ``slicer-core`` wheel from PyPI (Slicer's real MRML, without
Qt), where the tests exercise them.

Conventions
    numpy arrays are ``[z, y, x]`` on the volume node's IJK grid (``array[k, j, i]``), as
    :mod:`IWSegmentationLib.core.imageio` reads files. A volume node's geometry is its
    ``IJKToRAS`` matrix (RAS millimetres); :class:`~IWSegmentationLib.core.imageio.Geometry` is ITK's
    (LPS millimetres). ``ras = diag(-1, -1, 1) · lps``, so
    ``IJKToRAS = diag(-1, -1, 1, 1) · [[D · diag(spacing), origin], [0, 1]]`` with ``D`` the
    direction matrix. Oblique and anisotropic grids go through unchanged.

Segments (:func:`lesion_segmentation`)
    One segment per connected component of the mask (:func:`IWSegmentationLib.core.lesions.analyze_lesions`),
    **largest first** (segment 1 is the largest lesion; :func:`IWSegmentationLib.core.lesions.number_lesions`,
    the numbering of the backend's lesion JSON and DICOM SEG too), named ``Lesion 07 · 4.2 mm · small``, coloured by size group
    (:data:`~IWSegmentationLib.core.lesions.SIZE_GROUP_COLORS`, the legend's colours), tagged with the
    DICOM terminology *Morphologically Altered Structure / Lesion* and with the numbers in
    :data:`TAGS`. All segments share one labelmap layer (label value = lesion number) cropped to
    the lesions' bounding box, so a case with hundreds of lesions costs one small image.

Object Dice (:func:`object_dice_table`)
    The segments and the reference are exported onto the volume's grid by Slicer's
    segmentation logic (which resamples a reference drawn on another grid), and matched by
    :func:`IWSegmentationLib.evaluation.match_case` — the same definitions and numbers as
    ``iwseg evaluate``. Each detection's confidence is its segment's confidence tag: the
    lesion's maximum logit (as ``iwseg predict`` and ``iwseg evaluate --logits`` rank lesions).

The lesion table (:func:`lesion_rows`)
    Built here and only here, from the segments' tags and the match: the module shows these rows
    (:func:`IWSegmentationLib.slicer.panel.lesion_cells` formats them), the table node holds them, and
    each row's ``center_ras`` — the lesion's own centroid, also for a missed reference lesion
    whose reference segment holds several — is where :func:`center_slice_views` takes the views."""

from ...core.lesions import LESION_TERMINOLOGY, segment_name  # noqa: F401  (re-exported: the segments' names)
from .geometry import (  # noqa: F401  (re-exported)
    LPS_TO_RAS,
    add_volume_from_array,
    array_from_volume,
    centroid_ras,
    check_on_volume_grid,
    geometry_from_ijk_to_ras,
    ijk_to_ras_matrix,
    volume_geometry,
    volume_ijk_to_ras,
)
from .loading import (  # noqa: F401  (re-exported)
    PredictionResults,
    lesion_report_extras,
    load_prediction,
    show_more_results,
)
from .matching import (  # noqa: F401  (re-exported)
    DiceMatch,
    labelmap_on_volume_grid,
    lesion_rows,
    match_segmentations,
    object_dice_table,
    reference_volume_node,
)
from .scene import (  # noqa: F401  (re-exported)
    center_slice_views,
    ensure_converter_rules,
    headless_scene,
)
from .segments import (  # noqa: F401  (re-exported)
    ATTR_CONFIDENCE_THRESHOLD,
    ATTR_LESION_COUNT,
    ATTR_NOT_SHOWN,
    ATTR_SIZE_THRESHOLDS,
    CLOSED_SURFACE,
    DEFAULT_SEGMENT_BUDGET,
    LABELMAP,
    TAG_PREFIX,
    TAGS,
    NotShownLesions,
    budgeted_lesion_segmentation,
    confidence_order,
    get_tag,
    lesion_segmentation,
    list_segment_ids,
    segment_rows,
    set_confidence_threshold,
    show_more_lesions,
)
from .tables import (  # noqa: F401  (re-exported)
    DICE_TABLE_COLUMNS,
    dice_table_node,
    table_node_from_rows,
)

__all__ = [
    "ensure_converter_rules",
    "headless_scene",
    "center_slice_views",
    "LPS_TO_RAS",
    "ijk_to_ras_matrix",
    "geometry_from_ijk_to_ras",
    "centroid_ras",
    "volume_ijk_to_ras",
    "volume_geometry",
    "array_from_volume",
    "check_on_volume_grid",
    "add_volume_from_array",
    "TAG_PREFIX",
    "TAGS",
    "ATTR_LESION_COUNT",
    "ATTR_SIZE_THRESHOLDS",
    "ATTR_CONFIDENCE_THRESHOLD",
    "LESION_TERMINOLOGY",
    "LABELMAP",
    "CLOSED_SURFACE",
    "list_segment_ids",
    "segment_name",
    "lesion_segmentation",
    "get_tag",
    "segment_rows",
    "lesion_rows",
    "set_confidence_threshold",
    "reference_volume_node",
    "labelmap_on_volume_grid",
    "DiceMatch",
    "match_segmentations",
    "object_dice_table",
    "DICE_TABLE_COLUMNS",
    "table_node_from_rows",
    "dice_table_node",
    "PredictionResults",
    "load_prediction",
    "show_more_results",
    "ATTR_NOT_SHOWN",
    "DEFAULT_SEGMENT_BUDGET",
    "NotShownLesions",
    "budgeted_lesion_segmentation",
    "confidence_order",
    "show_more_lesions",
]
