"""``iwseg train``'s ``reviewed`` cases: a reader's verdicts (core.verdicts) as labels and hard negatives.

The seam: the label the trainer uses for a reviewed case is (label ∪ accepted ∪ edited) − rejected,
and the rejected voxels are the sampler's hard negatives. The end-to-end test trains a tiny model,
reviews its false positives with real verdict files, fine-tunes and predicts again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _tiny_training import tiny_config, write_tiny_dataset

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.core.lesions import analyze_lesions
from IWSegmentationLib.core.verdicts import LesionSet, Verdict, VerdictFile, verdict_paths
from IWSegmentationLib.data import load_dataset
from IWSegmentationLib.data.cases import load_case
from IWSegmentationLib.data.datasets import Case
from IWSegmentationLib.data.sampling import PatchSampler
from IWSegmentationLib.training import load_training_data, train


def _write_review(folder: Path, case: str, image: Path, grid: Geometry, labels: np.ndarray,
                  verdicts: dict[int, str]) -> Path:
    """A real verdict file and reviewed label map for ``case`` (lesion n = value n of ``labels``; the
    lesion set's fingerprint is not what training checks, so a placeholder)."""
    json_path, labels_path = verdict_paths(folder, case)
    write_image(labels_path, labels.astype(np.uint16), grid)
    VerdictFile(case, image.name, grid, "base", None, LesionSet(int(labels.max()), "0" * 64, 0.5),
                {n: Verdict(v, "test") for n, v in verdicts.items()}, labels_path.name).write(json_path)
    return json_path


def test_the_label_of_a_reviewed_case_is_label_plus_accepted_and_edited_minus_rejected(tmp_path):
    # A 1x1x6 line: reference label voxels 0, 1, 4. Reviewed label map: lesion 1 (accepted) at 1-2,
    # lesion 2 (edited) at 3, lesion 3 (rejected) at 4-5, lesion 4 (not reviewed) at 0.
    # label = {0, 1, 4} + {1, 2} + {3} - {4, 5} = {0, 1, 2, 3}; negatives = {4, 5}.
    grid = Geometry.identity((1, 1, 6))
    image, label = tmp_path / "c1.nii.gz", tmp_path / "c1_label.nii.gz"
    write_image(image, np.zeros((1, 1, 6), np.float32), grid)
    write_image(label, np.array([[[1, 1, 0, 0, 1, 0]]], np.uint8), grid)
    reviewed = np.array([[[4, 1, 1, 2, 3, 3]]], np.uint16)
    folder = tmp_path / "reviews"
    folder.mkdir()
    path = _write_review(folder, "c1", image, grid, reviewed, {1: "accepted", 2: "edited", 3: "rejected"})

    plain = load_case(Case("c1", image, label))
    volume = load_case(Case("c1", image, label, verdicts=path))
    assert plain.lesion.ravel().tolist() == [1, 1, 0, 0, 1, 0] and plain.negatives is None
    assert volume.lesion.ravel().tolist() == [1, 1, 1, 1, 0, 0]
    assert volume.negatives.ravel().tolist() == [0, 0, 0, 0, 1, 1]

    # another case's file, and a label map on another grid, are refused naming the case
    other = tmp_path / "c2.nii.gz"
    write_image(other, np.zeros((1, 1, 6), np.float32), grid)
    with pytest.raises(InputError, match="is for case 'c1', not for case 'c2'"):
        load_case(Case("c2", other, label, verdicts=path))
    write_image(folder / "c1.verdicts.nii.gz", reviewed[:, :, :5], Geometry.identity((1, 1, 5)))
    with pytest.raises(InputError, match="c1"):
        load_case(Case("c1", image, label, verdicts=path))


def test_hard_negative_patches_are_centred_on_the_rejected_components():
    lesion = np.zeros((24, 24, 24), np.uint8)
    lesion[3:5, 3:5, 3:5] = 1
    negatives = np.zeros_like(lesion)
    negatives[18:20, 18:20, 18:20] = 1
    image = np.random.default_rng(0).random(lesion.shape, dtype=np.float32)
    every = PatchSampler((8, 8, 8), hard_negative_probability=1.0)
    case = every.prepare(image, lesion, "c", negatives)
    assert case.num_negatives == 1
    for seed in range(20):
        patch = every.sample(case, np.random.default_rng(seed))
        # the centre voxel (start + 4) lies in 18..19 on every axis, so start = centre - 4 in 14..15
        assert patch.hard_negative and patch.lesion == 0 and all(14 <= s <= 15 for s in patch.start)
    # probability 0 draws nothing for them: the stream is the one a case without negatives gives
    plain, none = PatchSampler((8, 8, 8)), PatchSampler((8, 8, 8), hard_negative_probability=0.0)
    a = [plain.sample(plain.prepare(image, lesion), np.random.default_rng(s)).start for s in range(20)]
    b = [none.sample(case, np.random.default_rng(s)).start for s in range(20)]
    assert a == b
    with pytest.raises(InputError, match="hard_negative_probability"):
        PatchSampler((8, 8, 8), hard_negative_probability=1.5)


def test_reviewed_config_errors_name_the_key_or_the_case(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    with pytest.raises(InputError, match="hard_negative_probability.*needs 'reviewed'"):
        tiny_config(data, tmp_path / "out", hard_negative_probability=0.5)
    assert tiny_config(data, tmp_path / "out").hard_negatives == 0.0
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny_config(data, tmp_path / "out", reviewed=str(empty))
    assert config.hard_negatives == 0.33
    with pytest.raises(InputError, match="config key 'reviewed': no \\*.verdicts.json"):
        load_training_data(config, verbose=False)
    case = load_dataset(data).cases[0]
    _, grid = read_image(case.image)
    path = _write_review(empty, case.id, case.image, grid, np.zeros(grid.shape_zyx, np.uint16), {})
    stranger = json.loads(path.read_text())
    stranger["case"]["name"] = "nobody"
    (empty / "nobody.verdicts.json").write_text(json.dumps(stranger))
    with pytest.raises(InputError, match="'nobody', which is not a case of the dataset"):
        load_training_data(config, verbose=False)


def _rejected_max_logits(checkpoint: Path, cases, rejected: dict) -> np.ndarray:
    """The maximum logit of each rejected component, predicted by ``checkpoint`` on its case."""
    from IWSegmentationLib.inference.predict import predict_volume
    from IWSegmentationLib.nn.checkpoint import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    out = []
    for case in cases:
        if case.id in rejected:
            image, grid = read_image(case.image)
            logits = predict_volume(model, image, card, geometry=grid, device="cpu").logits
            labels, ids = rejected[case.id]
            out += [float(logits[labels == n].max()) for n in ids]
    return np.array(out)


@pytest.mark.slow
def test_rejected_false_positives_fall_after_fine_tuning(tmp_path):
    import torch

    torch.set_num_threads(1)
    data = write_tiny_dataset(tmp_path / "data")
    cases = load_dataset(data).cases
    base = train(tiny_config(data, tmp_path / "base", loss="iw-bce", optimizer="adam", lr=0.003, epochs=4,
                             iters_per_epoch=40, val_fraction=0.0, checkpoint_choice="last"), verbose=False)
    from IWSegmentationLib.inference.predict import predict_volume
    from IWSegmentationLib.nn.checkpoint import load_checkpoint

    # review at the operating point logit 3 (probability 0.953): every predicted component that
    # touches no reference lesion is a false positive, and the reader rejects it
    model, card = load_checkpoint(base.last_checkpoint)
    rejected, accepted = tmp_path / "rejected", tmp_path / "accepted"
    rejected.mkdir(), accepted.mkdir()
    found = {}
    for case in cases:
        image, grid = read_image(case.image)
        reference, _ = read_image(case.label)
        logits = predict_volume(model, image, card, geometry=grid, device="cpu").logits
        labels, lesions = analyze_lesions(logits > 3.0, scores=logits)
        fps = [les.id for les in lesions if not reference[labels == les.id].any()]
        if fps:
            found[case.id] = (labels, fps)
            _write_review(rejected, case.id, case.image, grid, labels, dict.fromkeys(fps, "rejected"))
            _write_review(accepted, case.id, case.image, grid, labels, dict.fromkeys(fps, "accepted"))
    assert sum(len(ids) for _, ids in found.values()) >= 4, "the base model should make false positives to review"
    before = _rejected_max_logits(base.last_checkpoint, cases, found)

    def fine_tune(name: str, reviewed: Path, **keys) -> np.ndarray:
        run = train(tiny_config(data, tmp_path / name, loss="iw-bce", optimizer="sgd", lr=0.01, lr_schedule="constant",
                                epochs=1, iters_per_epoch=20, val_fraction=0.0, checkpoint_choice="last",
                                init_checkpoint=str(base.last_checkpoint), reviewed=str(reviewed), **keys),
                    verbose=False)
        return _rejected_max_logits(run.last_checkpoint, cases, found) - before

    hard = fine_tune("hard", rejected)  # hard_negative_probability: 0.33 by default
    plain = fine_tune("plain", rejected, hard_negative_probability=0.0)
    kept = fine_tune("kept", accepted)  # the same components accepted: the same patch stream as "plain"
    print(f"rejected components: {len(before)}; mean change of their max logit after 20 steps: "
          f"rejected + hard negatives {hard.mean():+.3f}, rejected {plain.mean():+.3f}, accepted {kept.mean():+.3f}")
    assert hard.mean() < 0 and plain.mean() < 0  # rejected false positives fall
    # the label decides: with the same patches, every rejected component ends below its accepted self
    assert np.all(plain < kept)
