"""The automatic CT lung mask: the real pyradiomics chest CTs, and a hand-built chest with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from IWSegmentationLib.core.imageio import Geometry, read_image
from IWSegmentationLib.preprocessing.lung_mask import (
    AUTOMATIC_MASKS,
    automatic_organ_mask,
    closing,
    lung_mask,
    superior_last,
)
from IWSegmentationLib.preprocessing.presets import (
    AUTOMATIC_MASK_ORGANS,
    automatic_mask_available,
    get_preset,
)


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_real_chest_ct_lesions_lie_inside_the_lung_mask(clinical_data, case):
    # lung1: a 13.8 mm nodule; lung2: a 45.2 mm mass on the posterior pleura, next to the spine,
    # which the aerated lung only half surrounds (without the closing and margin 3% of it is inside)
    image, geometry = read_image(clinical_data / f"{case}_image.nrrd")
    label, _ = read_image(clinical_data / f"{case}_label.nrrd")
    mask = lung_mask(image, geometry)
    assert mask is not None and mask.shape == image.shape and mask.dtype == bool
    inside = float(mask[label > 0].mean())
    assert inside >= 0.99, f"{case}: only {inside:.1%} of the lesion lies in the lung mask"
    # a chest CT's lungs (with a 10 mm rim) fill a fraction of the scan, not all of it
    fraction = float(mask.mean())
    assert 0.08 <= fraction <= 0.45, f"{case}: lung mask is {fraction:.1%} of the volume"
    # the corners of the scan (air around the patient) are never lung
    assert not mask[:, :20, :20].any() and not mask[:, -20:, -20:].any()


def chest(shape=(40, 128, 128), spacing=(2.5, 2.0, 2.0), trachea_top=True):
    """Air -1000 HU around an elliptic body (40 HU) with two lungs (-850 HU, boxes of rows 34-93,
    columns 22-53 and 74-105, slices 4-35), a trachea (-1000 HU, 6x6 voxels = 12x12 mm, rows 50-55,
    columns 61-66) from the top slice down to slice 30, where it ends in the right lung through a
    bronchus, and a 6 mm nodule (40 HU) in a notch of the left lung's outer wall."""
    d, h, w = shape
    image = np.full(shape, -1000, np.int16)
    y, x = np.ogrid[:h, :w]
    body = ((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.47 * w)) ** 2 <= 1
    image[:, body] = 40
    image[4:36, 34:94, 22:54] = -850
    image[4:36, 34:94, 74:106] = -850
    image[16:20, 60:66, 22:26] = 40  # a juxtapleural nodule: a notch in the lung's outer wall
    top = range(30, d) if trachea_top else range(0, 10)
    for z in top:
        image[z, 50:56, 61:67] = -1000
    z_join = 30 if trachea_top else 9
    image[z_join, 50:56, 54:67] = -1000  # the bronchus into the right lung
    geometry = Geometry.identity(shape, spacing)
    if not trachea_top:  # the same chest stored feet last: index 0 is the head
        geometry = Geometry(size=geometry.size, spacing=geometry.spacing, origin=geometry.origin,
                            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    return image, geometry


@pytest.mark.parametrize("head_last", [True, False], ids=["head-last", "head-first"])
def test_hand_built_chest_lungs_nodule_and_no_trachea(head_last):
    image, geometry = chest(trachea_top=head_last)
    assert superior_last(geometry) is head_last
    mask = lung_mask(image, geometry, closing_mm=0.0, margin_mm=0.0)
    assert mask is not None
    lungs = image == -850
    assert mask[lungs].all()  # every lung voxel
    # the trachea above the lungs (slices 36-39, or 0-3 head first) is air inside the body but not lung
    above = slice(36, 40) if head_last else slice(0, 4)
    assert not mask[above, 50:56, 61:67].any()
    # no closing: the notch of the nodule is not lung
    assert not mask[16:20, 60:66, 22:26].all()
    closed = lung_mask(image, geometry)  # default closing (15 mm) and margin (10 mm)
    assert closed[16:20, 60:66, 22:26].all()  # the juxtapleural nodule is inside


def test_no_air_inside_a_body_is_no_lung_mask():
    flat = np.full((8, 64, 64), -1000, np.int16)
    flat[:, 8:56, 8:56] = 40  # a body without lungs (an abdomen, an MR-like volume)
    assert lung_mask(flat) is None
    assert lung_mask(np.full((8, 64, 64), -1000, np.int16)) is None  # only the air outside


def test_closing_in_mm_is_spacing_aware():
    # two blocks with 3 empty voxels between them along x (8, 9, 10): the middle one, 2 voxels from
    # each block, is reached by a dilation of r when 2 voxels <= r: at 2 mm per voxel 4 mm <= r,
    # so r = 4 mm closes the gap's axis and r = 2 mm does not; at 4 mm per voxel it is 8 mm > 4 mm
    mask = np.zeros((9, 9, 20), bool)
    mask[2:7, 2:7, 2:8] = True
    mask[2:7, 2:7, 11:17] = True
    gap = (4, 4, slice(8, 11))
    assert closing(mask, (2.0, 2.0, 2.0), 4.0)[gap].all()
    assert not closing(mask, (2.0, 2.0, 2.0), 2.0)[gap].any()
    assert not closing(mask, (4.0, 4.0, 4.0), 4.0)[gap].any()
    # a margin grows it: 2 mm at 2 mm per voxel is one voxel further on every side
    grown = closing(mask, (2.0, 2.0, 2.0), 0.0, margin_mm=2.0)
    assert grown[4, 4, 1] and grown[4, 4, 17] and not grown[4, 4, 0]


def test_only_ct_lung_has_an_automatic_mask():
    assert automatic_mask_available(get_preset("ct-lung"))
    assert not automatic_mask_available(get_preset("ct-liver"))
    assert not automatic_mask_available(get_preset("mr"))
    # what the presets say has an automatic mask (numpy-free, read by the model card) is what has a finder
    assert set(AUTOMATIC_MASKS) == AUTOMATIC_MASK_ORGANS
    image, geometry = chest()
    found = automatic_organ_mask(image, get_preset("ct-lung"), geometry)
    assert found.dtype == np.uint8 and set(np.unique(found)) == {0, 1}
    np.testing.assert_array_equal(found, lung_mask(image, geometry))
    # a channel-first image: channel 0
    np.testing.assert_array_equal(automatic_organ_mask(np.stack([image, image * 0]), get_preset("ct-lung"), geometry),
                                  found)
    assert automatic_organ_mask(image, get_preset("ct-liver"), geometry) is None
