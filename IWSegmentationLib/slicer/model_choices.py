"""The module's model drop-down: the models of the library (docs/models.md), no Qt.

:func:`model_choices` lists the library's models with their licence and checkpoint path;
:class:`ModelMenu` fills a combo box with them and, when one is chosen, puts its path into the
checkpoint path field (which still takes any file, as before). A model whose licence has not
been accepted is listed, marked, and not put in the field: ``iwseg models accept NAME`` first,
the same gate as ``iwseg predict --model NAME``. The widgets are duck-typed (``addItem``,
``setItemData``, ``currentPath``), so this is tested without Qt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError
from ..models.library import ModelLibrary

#: The first item of the drop-down: the path field below decides.
FILE_ITEM = "A checkpoint file (below)"
#: The first item when the library has no models.
EMPTY_ITEM = "Model library: empty (iwseg models add / fetch)"
#: Qt.ToolTipRole: the role of an item's tool tip in a combo box.
TOOLTIP_ROLE = 3


@dataclass(frozen=True)
class ModelChoice:
    """One model of the drop-down."""

    name: str
    license: str
    #: the checkpoint; None when the model cannot be used yet (``problem`` says why)
    path: Path | None
    description: str = ""
    problem: str | None = None

    @property
    def label(self) -> str:
        """What the drop-down shows: the name and the licence (and why it cannot be used)."""
        return f"{self.name} — {self.license}" + (" (licence not accepted)" if self.problem else "")

    @property
    def tooltip(self) -> str:
        return "\n".join(t for t in (self.description, f"Licence: {self.license}", self.problem or "",
                                     str(self.path or "")) if t)


def model_choices(library: str | os.PathLike | None = None) -> list[ModelChoice]:
    """The library's models as drop-down entries, sorted by name; an unreadable library gives none."""
    try:
        lib = ModelLibrary(library)
        entries = lib.entries()
    except InputError:
        return []
    choices = []
    for entry in entries:
        problem = (f"Accept its licence first: iwseg models accept {entry.name}" if entry.needs_acceptance else None)
        choices.append(ModelChoice(entry.name, entry.license, None if problem else lib.path_of(entry),
                                   entry.description, problem))
    return choices


class ModelMenu:
    """A combo box of :func:`model_choices` that fills the checkpoint path field when a model is chosen."""

    def __init__(self, combo, path_field, library: str | os.PathLike | None = None, row: int | None = None):
        """``row``: insert ``combo`` as that row of the path field's form layout, labelled "Model library:"."""
        self.combo, self.path_field, self.library = combo, path_field, library
        if row is not None:
            path_field.parentWidget().layout().insertRow(row, "Model library:", combo)
        self.choices: list[ModelChoice] = []
        self.refresh()
        combo.connect("currentIndexChanged(int)", self.on_chosen)

    def refresh(self) -> None:
        """Read the library again and list its models (the first item leaves the path field alone)."""
        self.choices = model_choices(self.library)
        self.combo.clear()
        self.combo.addItem(FILE_ITEM if self.choices else EMPTY_ITEM)
        for index, choice in enumerate(self.choices, start=1):
            self.combo.addItem(choice.label)
            self.combo.setItemData(index, choice.tooltip, TOOLTIP_ROLE)
        self.combo.toolTip = "Models of the library (iwseg models list; docs/models.md); a file path still works"

    def on_chosen(self, index: int) -> None:
        """Put the chosen model's checkpoint into the path field (not one whose licence is not accepted)."""
        if not 1 <= index <= len(self.choices):
            return
        choice = self.choices[index - 1]
        self.combo.toolTip = choice.problem or choice.tooltip
        if choice.path is not None:
            self.path_field.currentPath = str(choice.path)
