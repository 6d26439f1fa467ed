"""``iwseg predict`` at the model's voxel spacing (issue 22, item 1): the input is resampled to the
model card's ``spacing`` and the logits back to the input grid (linear), the mask derived there;
``--keep-spacing`` gives the old result; a card without spacing keeps the grid and says so once;
a CT model refuses MR (and the reverse); a resampled grid that cannot fit is refused first.

The network is Testing/_threshold_model.py's hand-set voxel-wise threshold with the ``ct-lung``
preset: ``logit = 40 (x - 0.5)``, ``x = (HU + 1000) / 1300`` inside the clip window, so a voxel
is lesion exactly when its (interpolated) HU > -350, and the logit is linear in HU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _threshold_model import NO_ORGAN_MASK, threshold_model

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.core.progress import parse_progress_line
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.preprocessing.resampling import check_resampled_memory


def logit_of(hu: float) -> float:
    """The threshold model's logit of a voxel of ``hu`` HU (inside the ct-lung window)."""
    return 40.0 * ((hu + 1000.0) / 1300.0 - 0.5)


def checkpoint(path: Path, spacing=None, preset="ct-lung", patch=(16, 16, 16)) -> Path:
    card = {"patch_size": list(patch), "preprocessing": get_preset(preset), "threshold": 0.5,
            "description": "hand-set voxel-wise threshold at -350 HU (tests)", "organ_mask": NO_ORGAN_MASK}
    if spacing is not None:
        card["spacing"] = list(spacing)
    save_checkpoint(path, threshold_model(), card)
    return path


def two_mm_scan(path: Path) -> Path:
    """8 slices of 2 mm (16 x 16 voxels of 1 mm): body -800 HU; lesion A +100 HU in slices 3-4
    (y 6:10, x 6:10, 32 voxels); lesion B -300 HU in slice 6 only (y 2:4, x 11:14, 6 voxels)."""
    image = np.full((8, 16, 16), -800, np.int16)
    image[3:5, 6:10, 6:10] = 100
    image[6, 2:4, 11:14] = -300
    return write_image(path, image, Geometry.identity(image.shape, (2.0, 1.0, 1.0)))


def run(capsys, *argv, skip: bool = False) -> tuple[int, list, str]:
    """``iwseg predict`` in this process (every window run unless ``skip``): its exit code, its
    progress events and its stderr."""
    code = main(["predict", "--device", "cpu", "--progress-format", "jsonl", *([] if skip else ["--no-skip"]),
                 *map(str, argv)])
    captured = capsys.readouterr()
    events = [parse_progress_line(line) for line in captured.out.splitlines() if line.strip()]
    return code, [e for e in events if e is not None], captured.err


def messages(events, stage: str) -> list[str]:
    return [e.get("message") for e in events if e.stage == stage and e.get("message")]


def test_a_2mm_scan_is_resampled_to_the_models_1mm_and_back_as_worked_by_hand(tmp_path, capsys):
    """The 1 mm grid covers the same 16 mm in z: 16 slices, fine slice k centred at k - 0.5 mm,
    i.e. at input index (k - 0.5) / 2. Linear interpolation: fine slice 2j = 0.75 HU[j] +
    0.25 HU[j-1], fine 2j+1 = 0.75 HU[j] + 0.25 HU[j+1]. Input slice j (at 2j mm) lies halfway
    between fine slices 2j and 2j+1, so the logit brought back is their mean, the logit of
    0.75 HU[j] + 0.125 (HU[j-1] + HU[j+1]) (the logit is linear in HU here):

    * lesion A, slice 3 (and 4): 0.75 * 100 + 0.125 (-800 + 100) = -12.5 HU > -350: lesion;
    * lesion B, slice 6: 0.75 * -300 + 0.125 (-800 - 800) = -425 HU < -350: gone (a lone 2 mm
      slice at -300 HU is diluted by its neighbours at the model's 1 mm);
    * slice 2 under A: 0.75 * -800 + 0.125 (100 - 800) = -687.5 HU; plain body: -800 HU.
    """
    model = checkpoint(tmp_path / "m.safetensors", spacing=(1.0, 1.0, 1.0))
    src = two_mm_scan(tmp_path / "scan.nrrd")
    code, events, _ = run(capsys, "--model", model, "--input", src, "--output", tmp_path / "mask.nrrd",
                       "--logits", tmp_path / "logits.nrrd", "--probabilities", tmp_path / "prob.nrrd")
    assert code == 0
    assert messages(events, "preprocess") == [
        "resampling 1.00x1.00x2.00 mm -> 1.00x1.00x1.00 mm (model's spacing) and the result back; "
        "--keep-spacing to skip"]
    mask, mask_geometry = read_image(tmp_path / "mask.nrrd")
    logits, _ = read_image(tmp_path / "logits.nrrd")
    probabilities, _ = read_image(tmp_path / "prob.nrrd")
    assert mask_geometry == read_image(src)[1]  # on the input grid
    expected = np.zeros((8, 16, 16), np.uint8)
    expected[3:5, 6:10, 6:10] = 1  # lesion A only
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(mask, (logits > 0).astype(np.uint8))  # the mask of the logits brought back
    np.testing.assert_allclose(logits[3, 7, 7], logit_of(-12.5), atol=1e-3)  # 10.385
    np.testing.assert_allclose(logits[6, 2, 12], logit_of(-425.0), atol=1e-3)  # -2.308
    np.testing.assert_allclose(logits[2, 7, 7], logit_of(-687.5), atol=1e-3)  # -10.385
    np.testing.assert_allclose(logits[0, 0, 0], logit_of(-800.0), atol=1e-3)  # -13.846
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6)


def test_keep_spacing_and_a_card_without_spacing_segment_on_the_input_grid(tmp_path, capsys):
    """On its own grid every voxel keeps its HU: A (+100) and B (-300 > -350) are both lesion."""
    src = two_mm_scan(tmp_path / "scan.nrrd")
    expected = np.zeros((8, 16, 16), np.uint8)
    expected[3:5, 6:10, 6:10] = 1
    expected[6, 2:4, 11:14] = 1
    with_spacing = checkpoint(tmp_path / "m.safetensors", spacing=(1.0, 1.0, 1.0))
    code, events, _ = run(capsys, "--model", with_spacing, "--input", src, "--output", tmp_path / "keep.nrrd",
                       "--logits", tmp_path / "keep_logits.nrrd", "--keep-spacing")
    assert code == 0 and messages(events, "preprocess") == []
    np.testing.assert_array_equal(read_image(tmp_path / "keep.nrrd")[0], expected)
    np.testing.assert_allclose(read_image(tmp_path / "keep_logits.nrrd")[0][6, 2, 12], logit_of(-300.0), atol=1e-3)

    without = checkpoint(tmp_path / "old.safetensors")
    code, events, _ = run(capsys, "--model", without, "--input", src, "--output", tmp_path / "old.nrrd")
    assert code == 0 and messages(events, "preprocess") == []
    notes = [m for m in messages(events, "load") if "voxel spacing" in m]
    assert notes == ["the model card records no voxel spacing, so every input is segmented on its own grid, "
                     "whatever its voxel size (results on a spacing unlike the training data's can be poor)"]
    np.testing.assert_array_equal(read_image(tmp_path / "old.nrrd")[0], expected)


def test_a_ct_model_refuses_mr_and_an_mr_model_refuses_ct(tmp_path, capsys):
    mr_like = (300 + np.random.default_rng(0).normal(0, 40, (8, 16, 16))).astype(np.int16)  # all > 0
    mr = write_image(tmp_path / "mr.nrrd", mr_like, Geometry.identity(mr_like.shape))
    ct_model = checkpoint(tmp_path / "ct.safetensors", spacing=(1.0, 1.0, 1.0))
    code, _, err = run(capsys, "--model", ct_model, "--input", mr, "--output", tmp_path / "out.nrrd")
    assert code == 2  # bad input
    assert f"{mr}: the model was trained on CT (model card preprocessing.modality, preset ct-lung)" in err
    assert f"no negative values (range {mr_like.min()} … {mr_like.max()})" in err
    assert "--allow-modality-mismatch" in err
    assert not (tmp_path / "out.nrrd").exists()

    code, events, _ = run(capsys, "--model", ct_model, "--input", mr, "--output", tmp_path / "out.nrrd",
                       "--allow-modality-mismatch")
    assert code == 0 and any("running anyway" in m for m in messages(events, "warning"))

    ct = write_image(tmp_path / "ct.nrrd", np.full((8, 16, 16), -1000, np.int16), Geometry.identity((8, 16, 16)))
    mr_model = checkpoint(tmp_path / "mrm.safetensors", preset="mr")
    code, _, err = run(capsys, "--model", mr_model, "--input", ct, "--output", tmp_path / "out2.nrrd")
    assert code == 2 and "trained on MR (model card preprocessing.modality, preset mr) but the volume has values " \
                         "down to -1000, like CT in Hounsfield units" in err


def test_a_resampled_grid_that_cannot_fit_is_refused_before_allocation(tmp_path, capsys):
    # the memory check, worked by hand: 100^3 resampled voxels x 4 bytes x (1 channel + 2) =
    # 12e6 bytes = 0.0112 GiB, more than 10e6 bytes = 0.00931 GiB
    source = Geometry.identity((50, 100, 100), (2.0, 1.0, 1.0))
    target = Geometry.identity((100, 100, 100))
    with pytest.raises(InputError) as caught:
        check_resampled_memory(source, target, available=10_000_000)
    assert str(caught.value) == (
        "resampling the input (100x100x50 voxels of 1x1x2 mm) to the model's spacing gives 100x100x100 voxels of "
        "1x1x1 mm, which needs about 0.0112 GiB of memory, more than this machine's 0.00931 GiB; crop the volume, "
        "or predict on its own grid (--keep-spacing)")
    check_resampled_memory(source, target, available=12_000_000)  # exactly enough
    # end to end: a card at 0.01 mm (the smallest it may hold) asks 1600 x 1600 x 1600 voxels of the 2 mm scan
    model = checkpoint(tmp_path / "fine.safetensors", spacing=(0.01, 0.01, 0.01))
    code, _, err = run(capsys, "--model", model, "--input", two_mm_scan(tmp_path / "scan.nrrd"),
                       "--output", tmp_path / "mask.nrrd")
    assert code == 2
    assert "16x16x8 voxels of 1x1x2 mm" in err and "(1600x1600x1600)" in err and "more than 2147483648" in err


@pytest.mark.slow
def test_the_real_lung1_ct_is_resampled_and_its_mask_comes_back_on_its_grid(clinical_data, tmp_path, capsys):
    """lung1 (512 x 512 x 48 voxels of 0.57 x 0.57 x 5 mm) at a model spacing of 2.5 x 2.28 x 2.28
    mm (z, y, x; 128 x 128 x 96 voxels, coarse in-plane to keep the test short): the mask is on
    lung1's grid, equals logits > 0 there, and holds the nodule (soft tissue, far above -350 HU)
    as the reference mask draws it. Windows outside the lung field are skipped, as by default."""
    model = checkpoint(tmp_path / "m.safetensors", spacing=(2.5, 2.28125, 2.28125), patch=(32, 64, 64))
    src = clinical_data / "lung1_image.nrrd"
    code, events, err = run(capsys, "--model", model, "--input", src, "--output", tmp_path / "mask.nrrd",
                            "--logits", tmp_path / "logits.nrrd", skip=True)
    assert code == 0, err
    assert messages(events, "preprocess") == [
        "resampling 0.57x0.57x5.00 mm -> 2.28x2.28x2.50 mm (model's spacing) and the result back; "
        "--keep-spacing to skip"]
    mask, geometry = read_image(tmp_path / "mask.nrrd")
    logits, _ = read_image(tmp_path / "logits.nrrd")
    _, lung1 = read_image(src)
    nodule, _ = read_image(clinical_data / "lung1_label.nrrd")
    assert geometry.differences(lung1) == [] and mask.shape == (48, 512, 512)
    np.testing.assert_array_equal(mask, (logits > 0).astype(np.uint8))
    # 0.896 of the reference nodule's voxels (its rim is blurred by the 2.28 mm in-plane grid); a
    # result shifted by the resampling round trip would miss most of a 13.8 mm nodule
    assert mask[nodule > 0].mean() > 0.85
