"""The module's model drop-down (slicer/model_choices.py) without Qt: the library's models with
their licence and path, and a stand-in combo box and path field."""

from __future__ import annotations

import json

import pytest

from IWSegmentationLib.models.library import ModelLibrary
from IWSegmentationLib.slicer.model_choices import (
    EMPTY_ITEM,
    FILE_ITEM,
    TOOLTIP_ROLE,
    ModelMenu,
    model_choices,
)
from IWSegmentationLib.testing.phantom import threshold_checkpoint


class FakeCombo:
    """A QComboBox: its items, their tool tips and the connected slot."""

    def __init__(self):
        self.items, self.data, self.slots, self.toolTip = [], {}, {}, ""

    def clear(self):
        self.items, self.data = [], {}

    def addItem(self, text):  # noqa: N802 (Qt's name)
        self.items.append(text)

    def setItemData(self, index, value, role):  # noqa: N802
        self.data[index, role] = value

    def connect(self, signal, slot):
        self.slots[signal] = slot


class FakePathField:
    def __init__(self):
        self.currentPath = ""  # noqa: N815 (Qt's name)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    lib = ModelLibrary(root)
    checkpoint = threshold_checkpoint(root.parent / "phantom.safetensors")
    lib.add(checkpoint, "b-open")
    lib.add(checkpoint, "a-research")
    index = json.loads(lib.index_path.read_text())  # a licence that still needs accepting
    index["models"]["a-research"].update(license="Research only", license_requires_acceptance=True)
    lib.index_path.write_text(json.dumps(index))
    return lib


def test_the_choices_are_the_library_models_with_licence_and_path(library):
    research, open_ = model_choices(library.root)
    assert (open_.name, open_.license, open_.path) == ("b-open", "not stated", library.root / "b-open.safetensors")
    assert open_.label == "b-open — not stated" and open_.problem is None
    assert research.path is None and research.label == "a-research — Research only (licence not accepted)"
    assert "iwseg models accept a-research" in research.tooltip


def test_choosing_a_model_fills_the_path_field_except_an_unaccepted_one(library):
    combo, field = FakeCombo(), FakePathField()
    menu = ModelMenu(combo, field, library.root)
    assert combo.items == [FILE_ITEM, "a-research — Research only (licence not accepted)", "b-open — not stated"]
    assert "Licence: not stated" in combo.data[2, TOOLTIP_ROLE]
    combo.slots["currentIndexChanged(int)"](2)
    assert field.currentPath == str(library.root / "b-open.safetensors")
    combo.slots["currentIndexChanged(int)"](1)
    assert field.currentPath == str(library.root / "b-open.safetensors"), "the unaccepted model is not put in"
    assert "iwseg models accept a-research" in combo.toolTip
    combo.slots["currentIndexChanged(int)"](0)  # "a file": the field keeps what it has
    assert field.currentPath == str(library.root / "b-open.safetensors")
    assert menu.choices[1].name == "b-open"


def test_an_empty_or_unreadable_library_leaves_only_the_file_path(tmp_path):
    combo = FakeCombo()
    ModelMenu(combo, FakePathField(), tmp_path / "none")
    assert combo.items == [EMPTY_ITEM]
    (tmp_path / "index.json").write_text("{broken")
    assert model_choices(tmp_path) == []
