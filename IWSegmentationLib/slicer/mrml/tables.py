"""Table nodes: the lesion Dice table and any list of rows as a ``vtkMRMLTableNode``."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .scene import slicer_module

#: Columns of :func:`dice_table_node`: (row key, column title, unit).
DICE_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "Lesion", ""),
    ("status", "Status", ""),
    ("diameter_mm", "Diameter", "mm"),
    ("volume_mm3", "Volume", "mm3"),
    ("size_group", "Size group", ""),
    ("confidence", "Max logit", ""),
    ("dice", "Dice", ""),
    ("reference_id", "Reference lesion", ""),
    ("segment_id", "Segment ID", ""),
)


def table_node_from_rows(scene, rows: Sequence[dict], name: str = "Table",
                         columns: Sequence[tuple[str, str, str]] | None = None):
    """A ``vtkMRMLTableNode`` with one row per dict and one column per ``(key, title, unit)``.

    Column types follow the values: integers -> int, other numbers -> double (missing = NaN),
    anything else -> string (missing = empty). Default columns: the keys of the first row.
    """
    import vtk  # lazy: Slicer's own; importable without it

    slicer = slicer_module()
    rows = list(rows)
    if columns is None:
        columns = [(key, key, "") for key in (rows[0] if rows else {})]
    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    scene.AddNode(node)
    was_modifying = node.StartModify()
    try:
        for key, title, unit in columns:
            values = [row.get(key) for row in rows]
            present = [v for v in values if v is not None]
            if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present) \
                    and len(present) == len(values):
                array = vtk.vtkIntArray()
                for v in values:
                    array.InsertNextValue(int(v))
            elif present and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
                array = vtk.vtkDoubleArray()
                for v in values:
                    array.InsertNextValue(math.nan if v is None else float(v))
            else:
                array = vtk.vtkStringArray()
                for v in values:
                    array.InsertNextValue("" if v is None else _cell_text(v))
            array.SetName(title)
            node.AddColumn(array)
            if unit:
                node.SetColumnUnitLabel(title, unit)
    finally:
        node.EndModify(was_modifying)
    return node


def _cell_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ", ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def dice_table_node(scene, rows: Sequence[dict], name: str = "Lesion Dice"):
    """The Dice table (:func:`object_dice_table` rows) as a ``vtkMRMLTableNode`` (:data:`DICE_TABLE_COLUMNS`)."""
    return table_node_from_rows(scene, rows, name, DICE_TABLE_COLUMNS)
