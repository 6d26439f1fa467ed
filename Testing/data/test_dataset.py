"""Datasets, splits and the patch sampler.

Every reader runs on a tiny dataset written here with SimpleITK in its real layout (MSD with
and without the nnU-Net ``_0000`` suffix, LiTS, LUNA16-style ``.mhd``, plain folder). The
sampler is checked statistically (≈50% lesion-centred patches) and exactly (a centred patch
holds its lesion; cropped labels are the whole-image labelling, cropped).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.core.errors import GeometryMismatchError, InputError
from IWSegmentationLib.core.imageio import Geometry
from IWSegmentationLib.core.lesions import label_components
from IWSegmentationLib.data import (
    Case,
    CaseVolume,
    PatchSampler,
    augment_patch,
    check_splits,
    detect_layout,
    lesion_mask,
    load_case,
    load_dataset,
    make_splits,
    read_splits,
    write_splits,
)
from IWSegmentationLib.data.loader import PatchDataset, make_loader
from IWSegmentationLib.data.synth import generate_case

SHAPE = (6, 8, 10)


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write a [z, y, x] array with spacing (sz, sy, sx) through SimpleITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(image, str(path))
    return path


def liver_label() -> np.ndarray:
    """0 background, 1 liver (a 4x6x6 block), 2 tumour (two 1-voxel-apart blobs inside)."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:5, 1:7, 2:8] = 1
    lab[2, 2, 3] = 2  # tumour A: 1 voxel
    lab[2:4, 4:6, 5:7] = 2  # tumour B: 8 voxels
    return lab


def image_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-100, 200, SHAPE).astype(np.int16)


# ----------------------------------------------------------------------------- readers


def test_msd_with_nnunet_channel_suffix_and_organ_label(tmp_path):
    for i in range(3):
        write(tmp_path / "imagesTr" / f"liver_{i}_0000.nii.gz", image_for(i), (2.0, 0.8, 0.8))
        write(tmp_path / "labelsTr" / f"liver_{i}.nii.gz", liver_label(), (2.0, 0.8, 0.8))
    meta = {
        "name": "Task03_Liver",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        # MSD lists images without the channel suffix; the files carry _0000 (nnU-Net)
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                     for i in (2, 0, 1)],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    assert ds.layout == "msd" and ds.ids == ["liver_0", "liver_1", "liver_2"]
    case = ds.case("liver_1")
    assert case.lesion_values == (2,) and case.other_values == (1,)
    assert case.image.name == "liver_1_0000.nii.gz" and case.mask == case.label and case.mask_values == (1, 2)
    vol = load_case(case)
    assert vol.image.dtype == np.float32 and np.array_equal(vol.image, image_for(1))
    assert np.array_equal(vol.lesion, (liver_label() == 2).astype(np.uint8))
    assert np.array_equal(vol.organ, (liver_label() > 0).astype(np.uint8))  # liver ∪ tumour
    assert vol.spacing == pytest.approx((2.0, 0.8, 0.8))


def test_msd_nnunet_v2_without_training_list(tmp_path):
    for name in ("b_10", "b_2"):
        write(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", image_for(3))
        write(tmp_path / "imagesTr" / f"{name}_0001.nii.gz", image_for(4))  # 2nd channel (multi-sequence)
        write(tmp_path / "labelsTr" / f"{name}.nii.gz", (liver_label() == 2).astype(np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "metastasis": 1},
                                                       "channel_names": {"0": "T1", "1": "T2"}}))
    ds = load_dataset(tmp_path, layout="msd")
    assert ds.ids == ["b_2", "b_10"]  # natural order
    assert ds.cases[0].image.name == "b_2_0000.nii.gz" and ds.cases[0].mask is None
    assert load_case(ds.cases[0]).lesion.sum() == 9
    assert ds.channels == 2 and load_case(ds.cases[0]).image.shape[0] == 2


def test_msd_ambiguous_labels_need_explicit_lesion_values(tmp_path):
    write(tmp_path / "imagesTr" / "a.nii.gz", image_for(0))
    write(tmp_path / "labelsTr" / "a.nii.gz", liver_label())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "kidney", "2": "cyst"}}))
    with pytest.raises(InputError, match="cannot tell which label is the lesion.*lesion_values"):
        load_dataset(tmp_path)
    ds = load_dataset(tmp_path, lesion_values=[2])
    assert load_case(ds.cases[0]).lesion.sum() == 9
    assert ds.cases[0].mask_values == (1, 2)  # "kidney" is an organ word


def test_lits_layout(tmp_path):
    batch = tmp_path / "Training Batch 1"
    for n in (3, 0, 12):
        write(batch / f"volume-{n}.nii", image_for(n))
        write(batch / f"segmentation-{n}.nii", liver_label())
    assert detect_layout(tmp_path) == "lits"
    ds = load_dataset(tmp_path)
    assert ds.layout == "lits" and ds.ids == ["volume-0", "volume-3", "volume-12"]
    vol = load_case(ds.case("volume-12"))
    # tumour (2) is the lesion; liver (1) and tumour form the organ mask
    assert vol.lesion.sum() == 9 and vol.organ.sum() == 4 * 6 * 6
    assert np.array_equal(vol.image, image_for(12))


def test_luna16_style_layout(tmp_path):
    uids = ["1.3.6.1.4.1.14519.5.2.1.6279.6001.100", "1.3.6.1.4.1.14519.5.2.1.6279.6001.200"]
    nodules = np.zeros(SHAPE, np.uint8)
    nodules[1:3, 1:3, 1:3] = 1
    nodules[4, 6, 8] = 1
    lungs = np.zeros(SHAPE, np.uint8)
    lungs[:, :, :5], lungs[:, :, 5:] = 3, 4  # official LUNA16 lung masks: 3 and 4 (5 trachea)
    for i, uid in enumerate(uids):
        write(tmp_path / f"subset{i}" / f"{uid}.mhd", image_for(i), (2.5, 0.7, 0.7))
        write(tmp_path / "seg-nodules" / f"{uid}.mhd", nodules, (2.5, 0.7, 0.7))
        write(tmp_path / "seg-lungs-LUNA16" / f"{uid}.mhd", lungs, (2.5, 0.7, 0.7))
    assert (tmp_path / "subset0" / f"{uids[0]}.raw").exists()  # a real MetaImage pair
    ds = load_dataset(tmp_path)
    assert ds.layout == "luna16" and ds.ids == uids  # the case id keeps the dots of the series UID
    vol = load_case(ds.cases[1])
    assert vol.lesion.sum() == 9 and vol.organ.all()
    assert label_components(vol.lesion)[1] == 2


def test_luna16_scan_without_nodule_mask_is_an_error(tmp_path):
    write(tmp_path / "subset0" / "a.mhd", image_for(0))
    write(tmp_path / "subset0" / "b.mhd", image_for(1))
    write(tmp_path / "seg-nodules" / "a.mhd", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match=r"no nodule mask .* 'b'"):
        load_dataset(tmp_path)


def test_plain_layout_with_masks(tmp_path):
    for name in ("p1", "p2"):
        write(tmp_path / "images" / f"{name}.nrrd", image_for(5).astype(np.float32))
        write(tmp_path / "labels" / f"{name}.nrrd", (liver_label() == 2).astype(np.uint8))
        write(tmp_path / "masks" / f"{name}.nrrd", (liver_label() > 0).astype(np.uint8))
    ds = load_dataset(tmp_path, layout="folder")  # the trainer's alias
    assert ds.layout == "plain" and ds.ids == ["p1", "p2"]
    vol = load_case(ds.cases[0])
    assert vol.lesion.sum() == 9 and vol.organ.sum() == 144


def test_plain_layout_unpaired_files(tmp_path):
    write(tmp_path / "images" / "a.nii.gz", image_for(0))
    write(tmp_path / "images" / "b.nii.gz", image_for(0))
    write(tmp_path / "labels" / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    write(tmp_path / "labels" / "c.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match=r"no label .* 'b'.*no image .* 'c'"):
        load_dataset(tmp_path)


def test_unknown_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError, match="cannot tell the layout"):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="unknown dataset layout"):
        load_dataset(tmp_path, layout="kaggle")
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "missing")


# ----------------------------------------------------------------------------- bad cases


def _plain_case(tmp_path, image, label, image_spacing=(1, 1, 1), label_spacing=(1, 1, 1)) -> Case:
    return Case("case_7", write(tmp_path / "images" / "case_7.nii.gz", image, image_spacing),
                write(tmp_path / "labels" / "case_7.nii.gz", label, label_spacing))


def test_geometry_mismatch_names_the_case(tmp_path):
    case = _plain_case(tmp_path, image_for(0), np.zeros(SHAPE, np.uint8), label_spacing=(1, 1, 2))
    with pytest.raises(GeometryMismatchError, match=r"case case_7.*spacing"):
        load_case(case)


def test_size_mismatch_names_the_case(tmp_path):
    case = _plain_case(tmp_path, image_for(0), np.zeros((6, 8, 9), np.uint8))
    with pytest.raises(GeometryMismatchError, match=r"case case_7.*size"):
        load_case(case)


def test_unexpected_label_values_name_the_case(tmp_path):
    case = _plain_case(tmp_path, image_for(0), liver_label())  # holds 2, plain expects 0/1
    with pytest.raises(InputError, match=r"case case_7.*unexpected label value\(s\) 2 in 9 voxels"):
        load_case(case)


def test_lesion_mask_values():
    lab = np.array([0, 1, 2, 2, 1, 0], np.uint8).reshape(1, 2, 3)
    assert lesion_mask(lab, (2,), (1,)).ravel().tolist() == [0, 0, 1, 1, 0, 0]
    assert lesion_mask(lab, (1, 2)).ravel().tolist() == [0, 1, 1, 1, 1, 0]
    with pytest.raises(InputError, match="unexpected label value"):
        lesion_mask(np.array([0.0, 0.5, 1.0]).reshape(1, 1, 3), (1,))  # a probability map


# ----------------------------------------------------------------------------- splits


@settings(max_examples=60, deadline=None)
@given(n=st.integers(5, 60), seed=st.integers(0, 2**31), three=st.booleans())
def test_make_splits_partitions_the_cases(n, seed, three):
    ids = [f"c{i}" for i in range(n)]
    fractions = (0.6, 0.2, 0.2) if three else (0.8, 0.2)
    splits = make_splits(ids, fractions, seed)
    parts = [set(v) for v in splits.values()]
    assert sum(len(p) for p in parts) == n and set().union(*parts) == set(ids)  # disjoint and complete
    for name, f in zip(splits, fractions):
        assert abs(len(splits[name]) - f * n) < 1.0 + 1e-9  # largest-remainder rounding
    assert make_splits(list(reversed(ids)), fractions, seed) == splits  # order of the ids is irrelevant
    check_splits(splits, ids)


def test_make_splits_errors():
    with pytest.raises(InputError, match="val would be empty"):
        make_splits(["a", "b"], (0.9, 0.1))  # 2 * 0.1 = 0.2 -> 0 cases
    with pytest.raises(InputError, match="add up to 1"):
        make_splits(["a", "b", "c"], (0.5, 0.2))
    with pytest.raises(InputError, match="duplicate"):
        make_splits(["a", "a", "b"])
    with pytest.raises(InputError, match="split names"):
        make_splits(["a", "b"], {"train": 0.5, "holdout": 0.5})
    assert make_splits(["a", "b", "c", "d"], {"train": 0.5, "test": 0.5}, seed=1).keys() == {"train", "test"}


def test_read_splits_roundtrip_and_errors(tmp_path):
    ids = ["a", "b", "c", "d"]
    path = write_splits(tmp_path / "splits.json", {"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    assert read_splits(path, ids) == {"train": ["a", "b"], "val": ["c"], "test": ["d"]}

    def bad(obj, match):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(obj))
        with pytest.raises(InputError, match=match):
            read_splits(p, ids)

    bad({"train": ["a", "b"], "val": ["b"]}, r"case 'b' is in both 'train' and split 'val'")
    bad({"train": ["a"], "val": []}, r"split 'val' is empty")
    bad({"train": ["a", "zz"]}, r"case id\(s\) 'zz' are not in the dataset")
    bad({"train": ["a"], "holdout": ["b"]}, r"unknown split name")
    bad({"val": ["a"]}, r"no 'train' split")
    bad({"train": ["a", "a"]}, r"case 'a' is twice in split 'train'")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read split file"):
        read_splits(tmp_path / "broken.json")
    with pytest.raises(InputError, match="not found"):
        read_splits(tmp_path / "nope.json")
    # nnU-Net splits_final.json: a list of folds
    (tmp_path / "folds.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["c", "d"]},
                                                     {"train": ["c", "d"], "val": ["a", "b"]}]))
    assert read_splits(tmp_path / "folds.json", ids, fold=1)["val"] == ["a", "b"]
    with pytest.raises(InputError, match="fold 2 does not exist"):
        read_splits(tmp_path / "folds.json", ids, fold=2)


# ----------------------------------------------------------------------------- sampler


def two_lesion_volume():
    """20x30x40 volume: lesion 1 a 6x6x6 cube, lesion 2 a single voxel far away."""
    lesion = np.zeros((20, 30, 40), np.uint8)
    lesion[2:8, 3:9, 4:10] = 1  # 216 voxels
    lesion[15, 25, 35] = 1  # 1 voxel
    image = np.random.default_rng(0).standard_normal(lesion.shape).astype(np.float32)
    return image, lesion


def test_half_of_the_patches_are_lesion_centred_and_lesions_chosen_uniformly():
    image, lesion = two_lesion_volume()
    sampler = PatchSampler((8, 8, 8))
    case = sampler.prepare(image, lesion, "two")
    rng = np.random.default_rng(1)
    chosen = np.array([sampler.patch_start(case, rng)[1] for _ in range(4000)])
    centred = chosen > 0
    # Binomial(4000, 0.5): sd = sqrt(4000 * 0.25) / 4000 = 0.0079; 4 sd = 0.032
    assert abs(centred.mean() - 0.5) < 0.032
    # each of the 2 lesions chosen with probability 1/2 among ~2000 centred draws, regardless of
    # their 216:1 size ratio: sd = sqrt(0.25 / 2000) = 0.011; 4 sd = 0.045
    assert abs((chosen[centred] == 2).mean() - 0.5) < 0.045


def test_centred_patches_contain_their_lesion_and_labels_are_the_whole_image_labelling():
    image, lesion = two_lesion_volume()
    sampler = PatchSampler((8, 8, 8), lesion_probability=1.0)
    case = sampler.prepare(image, lesion, "two")
    whole, k = label_components(lesion, 26)
    assert k == 2
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = sampler.sample(case, rng)
        assert p.lesion in (1, 2) and p.lesion_centred
        assert (p.labels == p.lesion).any()  # the chosen lesion is in the patch
        box = tuple(slice(s, s + 8) for s in p.start)
        assert np.array_equal(p.labels, whole[box])  # crop of the labelling of the whole image
        assert np.array_equal(p.target, (whole[box] > 0).astype(np.uint8))
        assert np.array_equal(p.image, image[box])
        assert p.labels.dtype == np.int32 and p.image.dtype == np.float32


def test_component_cut_by_the_patch_keeps_its_whole_image_id():
    """A U-shaped lesion cut by the patch into two pieces stays one id (the paper labels the whole
    image): the trainer's in-patch weights then see one lesion, not two."""
    lesion = np.zeros((4, 12, 12), np.uint8)
    lesion[1, 2:10, 2] = lesion[1, 2:10, 8] = lesion[1, 9, 2:9] = 1  # U opening towards y = 0
    sampler = PatchSampler((4, 6, 12), lesion_probability=0.0)
    case = sampler.prepare(np.zeros(lesion.shape, np.float32), lesion)
    patch_labels = case.labels[0:4, 0:6, 0:12]
    assert label_components((patch_labels > 0).astype(np.uint8))[1] == 2  # two pieces in the patch
    assert set(np.unique(patch_labels)) == {0, 1}  # but one id


def test_uniform_patches_cover_the_volume_and_no_lesion_cases_are_uniform():
    image = np.zeros((10, 12, 14), np.float32)
    sampler = PatchSampler((4, 4, 4), lesion_probability=1.0)
    case = sampler.prepare(image, np.zeros(image.shape, np.uint8))
    rng = np.random.default_rng(3)
    starts = np.array([sampler.sample(case, rng).start for _ in range(600)])
    assert case.num_lesions == 0
    assert starts.min(axis=0).tolist() == [0, 0, 0]
    assert starts.max(axis=0).tolist() == [6, 8, 10]  # shape - patch: every position is reachable


def test_small_image_is_padded():
    image = np.full((3, 5, 20), 7.0, np.float32)
    image[0, 0, 0] = -2.0  # the minimum: the default pad value
    lesion = np.zeros(image.shape, np.uint8)
    lesion[1, 2, 10] = 1
    sampler = PatchSampler((8, 8, 8), lesion_probability=1.0)
    case = sampler.prepare(image, lesion)
    # padded to (8, 8, 20), centred: z gets 2 before / 3 after, y 1 / 2
    assert case.shape == (8, 8, 20) and case.pad_before == (2, 1, 0)
    p = sampler.sample(case, np.random.default_rng(0))
    assert p.image.shape == (8, 8, 8) and p.lesion == 1 and p.target.sum() == 1
    assert p.image[0, 0, 0] == -2.0 and p.image[2, 1, 0] == 7.0  # pad (z < 2) vs original voxel
    assert np.array_equal(np.argwhere(p.target)[0] + p.start, [1 + 2, 2 + 1, 10])


def test_sampler_is_deterministic_given_the_seed():
    image, lesion = two_lesion_volume()
    sampler = PatchSampler((8, 8, 8))
    case = sampler.prepare(image, lesion)
    a = [sampler.sample(case, np.random.default_rng(9)).start for _ in range(3)]
    b = [sampler.sample(case, np.random.default_rng(9)).start for _ in range(3)]
    assert a == b


def test_sampler_argument_errors():
    with pytest.raises(InputError, match="patch_size"):
        PatchSampler((8, 8))
    with pytest.raises(InputError, match="lesion_probability"):
        PatchSampler((8, 8, 8), lesion_probability=1.5)
    with pytest.raises(InputError, match="same 3D shape"):
        PatchSampler((8, 8, 8)).prepare(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), "x")


def test_augment_flips_all_arrays_alike_and_jitters_intensity():
    image, lesion = two_lesion_volume()
    sampler = PatchSampler((8, 8, 8), lesion_probability=1.0)
    case = sampler.prepare(image, lesion)
    p = sampler.sample(case, np.random.default_rng(4))
    q = augment_patch(p, np.random.default_rng(5), flip_probability=1.0, intensity_scale=0.0, intensity_shift=0.0)
    assert np.array_equal(q.image, p.image[::-1, ::-1, ::-1])
    assert np.array_equal(q.labels, p.labels[::-1, ::-1, ::-1]) and np.array_equal(q.target, q.labels > 0)
    r = augment_patch(p, np.random.default_rng(6), flip_probability=0.0, intensity_scale=0.1, intensity_shift=0.2)
    # x -> x (1 + a) + b with |a| <= 0.1, |b| <= 0.2: recover a and b from two voxels
    a = (r.image.ravel()[1] - r.image.ravel()[0]) / (p.image.ravel()[1] - p.image.ravel()[0]) - 1
    b = r.image.ravel()[0] - p.image.ravel()[0] * (1 + a)
    assert abs(a) <= 0.1 + 1e-5 and abs(b) <= 0.2 + 1e-5 and (a, b) != (0, 0)
    assert np.bincount(r.labels.ravel()).tolist() == np.bincount(p.labels.ravel()).tolist()


# ----------------------------------------------------------------------------- torch dataset


@pytest.fixture(scope="module")
def synth_volumes():
    out = []
    for i in range(3):
        image, label, organ, spacing = generate_case((11, i), (24, 48, 48), "ct-liver")
        out.append(CaseVolume(f"s{i}", image.astype(np.float32) / 1000, label, organ,
                              Geometry.identity(image.shape, spacing)))
    return out


def batches(ds, n):
    return [ds.batch(step) for step in range(ds.start_step, ds.start_step + n)]


def test_patch_dataset_batches(synth_volumes):
    ds = PatchDataset(synth_volumes, PatchSampler((16, 16, 16)), batch_size=3, steps=4, seed=1)
    items = list(ds)
    assert len(items) == len(ds) == 4 and [b["step"] for b in items] == [0, 1, 2, 3]
    b = items[0]
    assert b["image"].shape == b["target"].shape == b["labels"].shape == (3, 1, 16, 16, 16)
    assert b["image"].dtype == torch.float32 and b["target"].dtype == torch.float32
    assert b["labels"].dtype == torch.int32 and b["lesion_centred"].shape == (3,)
    assert torch.equal(b["target"], (b["labels"] > 0).float())
    assert all(c in ("s0", "s1", "s2") for c in b["case"])


def test_patch_dataset_stream_is_independent_of_workers_and_resumable(synth_volumes):
    def make(**kw):
        return PatchDataset(synth_volumes, PatchSampler((16, 16, 16)), batch_size=2, seed=5,
                            augment=augment_patch, **kw)

    reference = batches(make(steps=6), 6)
    ds = make(steps=6)
    assert ds.preload() > 0
    with_workers = list(make_loader(ds, num_workers=2))
    assert [b["step"] for b in with_workers] == list(range(6))
    for x, y in zip(reference, with_workers):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["labels"], y["labels"])
    resumed = list(make(steps=2, start_step=4))  # a run resumed at step 4
    assert torch.equal(resumed[0]["image"], reference[4]["image"])
    other_rank = batches(make(steps=6, rank=1, world_size=2), 1)[0]
    assert not torch.equal(other_rank["image"], reference[0]["image"])
    with pytest.raises(InputError, match="rank"):
        make(rank=2, world_size=2)


def test_patch_dataset_loader_transform_and_cache(synth_volumes, tmp_path):
    calls = []
    by_id = {v.id: v for v in synth_volumes}

    def loader(record):
        calls.append(record.id)
        vol = by_id[record.id]
        return CaseVolume(vol.id, np.zeros_like(vol.image), vol.lesion, vol.organ, vol.geometry)

    def add_weights(batch):
        batch["weight"] = torch.ones_like(batch["image"])
        return batch

    records = [Case(v.id, tmp_path / f"{v.id}.nii.gz", tmp_path / f"{v.id}_l.nii.gz") for v in synth_volumes]
    ds = PatchDataset(records, PatchSampler((8, 8, 8)), batch_size=4, steps=5, loader=loader,
                      transform=add_weights, cache_size=1)
    out = list(ds)
    assert all(float(b["image"].abs().max()) == 0.0 and "weight" in b for b in out)
    assert len(ds._cache) == 1  # least recently used cases were dropped
    assert len(calls) > 3  # ... and re-loaded when needed again
    with pytest.raises(InputError, match="at least one case"):
        PatchDataset([], PatchSampler((8, 8, 8)))


def test_patch_dataset_reads_cases_from_disk(tmp_path):
    case = Case("d0", write(tmp_path / "i.nii.gz", image_for(0).astype(np.float32)),
                write(tmp_path / "l.nii.gz", (liver_label() == 2).astype(np.uint8)))
    ds = PatchDataset([case], PatchSampler((4, 4, 4), lesion_probability=1.0), batch_size=2, steps=1)
    b = next(iter(ds))
    assert b["lesion_centred"].all() and b["target"].sum() > 0 and b["case"] == ["d0", "d0"]


# ----------------------------------------------------------------------------- case sampling (issue 20)


def _counted_volumes():
    """Four 12x20x20 cases with 0, 1, 3 and 6 lesions (2x2x1 blocks, apart under 26-connectivity)."""
    rng = np.random.default_rng(2024)
    out = []
    for i, k in enumerate((0, 1, 3, 6)):
        shape = (12, 20, 20)
        image = rng.standard_normal(shape).astype(np.float32)
        lesion = np.zeros(shape, np.uint8)
        for j in range(k):
            z, y, x = 1 + 3 * (j % 3), 2 + 6 * (j // 3), 3 + 2 * j
            lesion[z:z + 2, y:y + 2, x:x + 1] = 1
        assert label_components(lesion, 26)[1] == k
        out.append(CaseVolume(f"c{i}", image, lesion, None, Geometry.identity(shape)))
    return out


def test_uniform_case_sampling_is_the_stream_it_always_was():
    """Without case weights the patch stream is byte for byte the one of the code before
    ``case_sampling`` existed: the digest below was computed with that code (commit ff970f0) for
    these cases, seed 7, 20 batches of 3 augmented patches (case, image, labels, corner)."""
    import hashlib

    ds = PatchDataset(_counted_volumes(), PatchSampler((8, 8, 8)), batch_size=3, steps=20, seed=7,
                      augment=augment_patch)
    assert ds.case_probabilities is None
    digest = hashlib.sha256()
    for step in range(20):
        for p in ds.sample_patches(step):
            digest.update(p.case.encode())
            digest.update(p.image.tobytes())
            digest.update(p.labels.tobytes())
            digest.update(np.asarray(p.start, np.int64).tobytes())
    assert digest.hexdigest() == "8c44030d12f8d2abf69d3c51bdd1711fce129abc5282fb975f29d55539e691d2"


def test_lesion_case_sampling_draws_cases_in_proportion_to_their_lesions():
    counts = [0, 1, 3, 6]
    ds = PatchDataset(_counted_volumes(), PatchSampler((8, 8, 8)), batch_size=2, steps=4, seed=3,
                      case_weights=counts)
    expected = np.asarray(counts) / 10  # 0, .1, .3, .6
    assert np.allclose(ds.case_probabilities, expected)
    rng = np.random.default_rng(0)
    n = 20_000
    freq = np.bincount([ds.draw_case(rng) for _ in range(n)], minlength=4) / n
    # each frequency is Binomial(n, p)/n: sd = sqrt(p(1-p)/n) <= sqrt(.25/20000) = 0.0035; a
    # tolerance of 4 sd (0.014) is exceeded by chance with probability < 1e-4 per case (and the
    # seed is fixed), while uniform draws (0.25 each) miss .1, .3 and .6 by 0.05 or more
    assert np.abs(freq - expected).max() < 0.014
    assert freq[0] == 0  # a case without lesions is never drawn
    # the batches use the same draw: no patch from the lesion-free case
    assert all(c != "c0" for step in range(4) for c in ds.batch(step)["case"])
    for bad in ([1, 2, 3], [0, 0, 0, 0], [1, -1, 1, 1], [1, float("nan"), 1, 1]):
        with pytest.raises(InputError, match="case_weights"):
            PatchDataset(_counted_volumes(), PatchSampler((8, 8, 8)), case_weights=bad)
