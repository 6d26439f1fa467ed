"""Lesion-wise metrics: matching, FROC, CPM, avg recall, object Dice, bootstrap, size groups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesions import SizeThresholds
from IWSegmentationLib.evaluation import (
    CPM_FP_RATES,
    avg_recall,
    bootstrap,
    bootstrap_recall_curves,
    cpm,
    evaluate_cases,
    froc,
    froc_of_cases,
    match_case,
    voxel_dice,
)

# Size cut-offs for the hand case (1 mm voxels): small if d < 2 mm, large if d >= 4 mm.
# d = (6 V / pi)^(1/3): 1 voxel 1.241 (small), 4 voxels 1.970 (small), 8 voxels 2.481
# (medium), 12 voxels 2.840 (medium), 20 voxels 3.368 (medium).
HAND_SIZES = SizeThresholds(2.0, 4.0)


def hand_case_arrays():
    """Three 10³ images, 1 mm voxels; ``{name: (prob, ref)}``. The working is in the tests."""
    shape = (10, 10, 10)
    # Image A: lesion A1 (20 voxels), A2 (4 voxels), one false positive.
    ref_a, prob_a = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    ref_a[1:3, 1:3, 1:6] = 1  # A1: 2x2x5 = 20 voxels, x = 1..5
    prob_a[1:3, 1:3, 1:4] = 0.6  # component c1: 12 voxels inside A1 (x = 1..3) ...
    prob_a[2, 2, 3] = 0.9  # ... whose max, hence confidence, is 0.9
    prob_a[1, 1, 5] = 0.99  # c2: 1 voxel inside A1 (x = 5), not touching c1 (x = 3): a weaker match
    ref_a[6, 6, 2:6] = 1  # A2: 4 voxels, x = 2..5
    prob_a[6, 6, 4:8] = 0.6  # c3: 4 voxels, x = 4..7, overlaps A2 in 2 voxels
    prob_a[8, 1, 8] = 0.7  # c4: false positive, 1 voxel
    # Image B: lesion B1 (8 voxels) missed; two false positives.
    ref_b, prob_b = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    ref_b[5:7, 5:7, 5:7] = 1
    prob_b[5:7, 5:7, 5:7] = 0.4  # below t_seg = 0.5: no component
    prob_b[1, 1, 1] = 0.95
    prob_b[1, 8, 8] = 0.55
    # Image C: nothing at all (still counts as an image in FP/image).
    ref_c, prob_c = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    return {"A": (prob_a, ref_a), "B": (prob_b, ref_b), "C": (prob_c, ref_c)}


def hand_cases():
    return [match_case(p, r, (1, 1, 1), thresholds=HAND_SIZES, case=name) for name, (p, r) in hand_case_arrays().items()]


def test_match_case_by_hand():
    a, b, c = hand_cases()
    # A1 (20 voxels) overlaps c1 (12 voxels) in 12: Dice 2*12/(20+12) = 0.75, and c2 (1 voxel)
    # in 1: Dice 2/21 = 0.095. Best Dice wins although c2 is more confident: hit_conf 0.9.
    a1, a2 = a.lesions
    assert (a1.voxels, a1.size_group, a1.component) == (20, "medium", 1)
    assert a1.hit_dice == pytest.approx(0.75) and a1.confidence == pytest.approx(0.9)
    # A2 (4) vs c3 (4) overlap 2 -> Dice 2*2/8 = 0.5, confidence 0.6
    assert a2.hit_dice == pytest.approx(0.5) and a2.confidence == pytest.approx(0.6)
    assert a2.size_group == "small"
    comps = {comp.id: comp for comp in a.components}
    assert len(comps) == 4
    assert comps[1].hit_dice == pytest.approx(0.75) and comps[1].lesion == 1
    # c2 overlaps a lesion: not a false positive, but not the lesion's match either
    assert comps[2].hit_dice == pytest.approx(2 / 21) and not comps[2].false_positive
    assert comps[2].confidence == pytest.approx(0.99)
    assert comps[4].false_positive and comps[4].confidence == pytest.approx(0.7) and comps[4].lesion is None
    assert a.n_false_positives == 1
    # voxel Dice of A: ref 24 voxels, pred 12+1+4+1 = 18, overlap 12+1+2 = 15 -> 30/42
    assert a.voxel_dice == pytest.approx(30 / 42)
    (b1,) = b.lesions
    assert b1.hit_dice == 0 and b1.confidence is None and b1.component is None and not b1.detected
    assert sorted(x.confidence for x in b.components) == pytest.approx([0.55, 0.95])
    assert c.lesions == [] and c.components == [] and math.isnan(c.voxel_dice)


def test_froc_cpm_avg_recall_object_dice_by_hand():
    report = evaluate_cases(hand_cases())
    # Lesions: hit_conf A1 0.9, A2 0.6, B1 missed. False positives: 0.7 (A), 0.95, 0.55 (B).
    # 3 images (C counts), 3 lesions. Going down the distinct confidences:
    #   tau=inf: (FP 0, TP 0) added    tau=0.99: c2 is neither TP nor FP -> (0, 0)
    #   tau=0.95: (1, 0)   0.9: (1, 1)   0.7: (2, 1)   0.6: (2, 2)   0.55: (3, 2)
    # Highest recall per FP count: (0,0) (1/3,1/3) (2/3,2/3) (1,2/3), reported at the highest tau.
    assert report["n_images"] == 3 and report["n_lesions"] == 3
    assert report["froc"]["fp_per_image"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert report["froc"]["recall"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    assert report["froc"]["threshold"][0] is None  # the added (0, 0) point, tau = inf
    assert report["froc"]["threshold"][1:] == pytest.approx([0.9, 0.6, 0.55])
    # Recall = FP/image up to 2/3, then 2/3 (clamped):
    # CPM = (0.125 + 0.25 + 0.5 + 4 * 2/3) / 7 = 0.505952
    assert report["cpm"] == pytest.approx((0.125 + 0.25 + 0.5 + 4 * 2 / 3) / 7)
    # avg recall over x = i/100, i = 0..500: sum_{i<=66} i/100 = 22.11, plus 434 * 2/3; / 501
    assert report["avg_recall_0_5"] == pytest.approx((22.11 + 434 * 2 / 3) / 501)
    # object Dice over the hit lesions A1 (0.75) and A2 (0.5): mean 0.625, std 0.125
    assert report["object_dice"] == pytest.approx({"mean": 0.625, "std": 0.125, "n": 2})
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere


def test_size_groups_by_hand():
    by = evaluate_cases(hand_cases())["by_size"]
    # small: lesion A2 (hit_conf 0.6); its FPs are the three 1-voxel components (0.95, 0.7, 0.55).
    #   tau: 0.95 -> (1/3, 0), 0.7 -> (2/3, 0), 0.6 -> (2/3, 1), 0.55 -> (1, 1)
    #   curve (0,0) (1/3,0) (2/3,1) (1,1): recall at 1/8, 1/4 = 0; at 1/2 = 3*(1/2-1/3) = 0.5; then 1
    #   CPM = (0 + 0 + 0.5 + 4) / 7
    assert by["small"]["n_lesions"] == 1
    assert by["small"]["froc"]["fp_per_image"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert by["small"]["froc"]["recall"] == pytest.approx([0, 0, 1, 1])
    assert by["small"]["cpm"] == pytest.approx(4.5 / 7)
    assert by["small"]["object_dice"] == pytest.approx({"mean": 0.5, "std": 0.0, "n": 1})
    # medium: A1 (hit at 0.9) and B1 (missed), no medium FP: one point (0, 1/2), recall 1/2 everywhere
    assert by["medium"]["froc"]["fp_per_image"] == [0.0]
    assert by["medium"]["cpm"] == pytest.approx(0.5) and by["medium"]["avg_recall_0_5"] == pytest.approx(0.5)
    # large: no lesions -> recall undefined -> null, consistently
    assert by["large"]["n_lesions"] == 0
    assert by["large"]["cpm"] is None and by["large"]["avg_recall_0_5"] is None
    assert by["large"]["object_dice"] == {"mean": None, "std": None, "n": 0}
    assert by["large"]["bootstrap"] == {"cpm": {"mean": None, "std": None},
                                        "avg_recall_0_5": {"mean": None, "std": None}, "n": 0}


def test_lesion_group_is_its_own_and_fp_group_is_the_components_own():
    ref, prob = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.float32)
    ref[2, 2, 2] = 1  # small lesion (d 1.24 mm) ...
    prob[1:4, 1:4, 1:4] = 0.8  # ... hit by a 27-voxel component (d 3.72 mm, medium)
    prob[10:16, 10:16, 10:16] = 0.9  # unmatched 216-voxel component: d 7.44 mm -> a large FP
    case = match_case(prob, ref, thresholds=SizeThresholds(2.0, 5.0))
    assert [les.size_group for les in case.lesions] == ["small"]
    assert sorted(c.size_group for c in case.components) == ["large", "medium"]
    by = evaluate_cases([case])["by_size"]
    # small: 1 lesion, TP at 0.8, no small FP -> recall 1 at 0 FP/image
    assert by["small"]["froc"]["recall"] == [1.0] and by["small"]["cpm"] == 1.0
    # the large FP counts for the large group (which has no lesions: FP/image 1, recall undefined)
    assert by["large"]["froc"]["fp_per_image"] == [0.0, 1.0] and by["large"]["cpm"] is None
    assert by["medium"]["froc"]["fp_per_image"] == [0.0]


def test_bootstrap_divides_by_resample_size():
    cases = hand_cases()
    # 80% of 3 images = 2 images. Subset {A, C}: lesions A1 (0.9) and A2 (0.6), FP 0.7, 2 images:
    #   (0,0) -> tau 0.9 (0, 1/2) -> 0.7 (1/2, 1/2) -> 0.6 (1/2, 1): curve (0, .5), (.5, 1)
    #   CPM = (0.625 + 0.75 + 1 + 4) / 7 = 0.910714 (dividing FP by 3 images would give another value)
    subset_ac = froc([0.9, 0.6], [0.7], 2)
    assert cpm(subset_ac) == pytest.approx(6.375 / 7)
    curves = bootstrap_recall_curves(cases, CPM_FP_RATES, seed=3)
    per_resample = curves.mean(axis=1)
    possible = [cpm(froc([0.9, 0.6, np.nan], [0.7, 0.95, 0.55], 2)),  # {A, B}
                6.375 / 7,  # {A, C}
                cpm(froc([np.nan], [0.95, 0.55], 2))]  # {B, C}: no hit at all -> 0
    assert possible[2] == 0.0
    nearest = np.abs(per_resample[:, None] - np.array(possible)[None]).min(axis=1)
    assert nearest.max() < 1e-12
    assert {int(np.argmin(np.abs(v - np.array(possible)))) for v in per_resample} == {0, 1, 2}
    summary = bootstrap(cases, seed=3)
    assert summary["n"] == 100
    assert summary["cpm"]["mean"] == pytest.approx(per_resample.mean())
    assert summary["cpm"]["std"] == pytest.approx(per_resample.std())
    assert bootstrap(cases, seed=3) == summary  # seeded
    assert bootstrap(cases, seed=4) != summary


def test_empty_images():
    empty = np.zeros((6, 6, 6), np.float32)
    # No lesions and no components anywhere: every recall-based value is undefined (null).
    report = evaluate_cases([match_case(empty, empty.astype(np.uint8), case="x")])
    assert report["n_lesions"] == 0 and report["cpm"] is None and report["avg_recall_0_5"] is None
    assert report["froc"] == {"fp_per_image": [0.0], "recall": [None], "threshold": [None]}
    assert report["object_dice"] == {"mean": None, "std": None, "n": 0}
    # Lesions but an empty prediction: recall 0 everywhere, CPM 0.
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[2:4, 2:4, 2:4] = 1
    report = evaluate_cases([match_case(empty, ref, case="y")])
    assert report["cpm"] == 0.0 and report["avg_recall_0_5"] == 0.0 and report["froc"]["recall"] == [0.0]
    # An empty image dilutes FP/image: 1 FP over 2 images is 0.5 FP/image.
    prob = np.zeros((6, 6, 6), np.float32)
    prob[0, 0, 0] = 0.8
    prob[2:4, 2:4, 2:4] = 0.9
    cases = [match_case(prob, ref, case="a"), match_case(empty, np.zeros_like(ref), case="b")]
    assert evaluate_cases(cases)["froc"]["fp_per_image"] == [0.0, 0.5]


def test_binary_prediction_is_one_operating_point():
    # A 0/1 mask: every component has confidence 1, so the curve is (0,0) -> (FP/img, recall).
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[7:9, 7:9, 7:9] = 1
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:3] = 1  # hits one lesion
    pred[5, 0, 11] = 1  # one FP
    curve = froc_of_cases([match_case(pred, ref)])
    assert curve.fp_per_image.tolist() == [0.0, 1.0] and curve.recall.tolist() == [0.0, 0.5]
    # recall at 1/8 = 0.0625 (on the line), ..., at 1 and beyond = 0.5
    assert cpm(curve) == pytest.approx((0.0625 + 0.125 + 0.25 + 4 * 0.5) / 7)


def test_clinical_label_against_itself_is_perfect(clinical_data):
    from IWSegmentationLib.core.imageio import read_image

    ref, geom = read_image(clinical_data / "lung1_label.nrrd")
    case = match_case(ref.astype(np.float32), ref, geom.spacing_zyx, case="lung1")
    report = evaluate_cases([case])
    assert report["n_lesions"] == 1 and report["cpm"] == 1.0 and report["avg_recall_0_5"] == 1.0
    assert report["object_dice"] == {"mean": 1.0, "std": 0.0, "n": 1}
    # 837 voxels of 0.5703125² x 5 mm -> d = (6 V / pi)^(1/3) = 13.8 mm: medium for the lung preset
    assert case.lesions[0].diameter_mm == pytest.approx((6 * 837 * 0.5703125**2 * 5 / math.pi) ** (1 / 3))
    assert case.lesions[0].size_group == "medium" and case.voxel_dice == 1.0


@pytest.mark.parametrize(
    "prob, ref, match",
    [
        (np.zeros((4, 4)), np.zeros((4, 4)), "3D"),
        (np.full((3, 3, 3), np.nan), np.zeros((3, 3, 3)), "NaN"),
        (np.full((3, 3, 3), np.inf), np.zeros((3, 3, 3)), "infinite"),
        (np.full((3, 3, 3), 1.5), np.zeros((3, 3, 3)), r"\[0, 1\]"),
        (np.full((3, 3, 3), -2.0), np.zeros((3, 3, 3)), "sigmoid"),
        (np.full((3, 3, 3), 255, np.uint8), np.zeros((3, 3, 3)), "0/255"),
        (np.zeros((3, 3, 3)), np.full((3, 3, 3), 2), "not a binary mask"),
        (np.zeros((3, 3, 3)), np.full((3, 3, 3), 0.5), "not a binary mask"),
        (np.zeros((3, 3, 3)), np.full((3, 3, 3), np.nan), "NaN"),
        (np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), "shape"),
    ],
)
def test_bad_input_names_the_file(prob, ref, match):
    with pytest.raises(InputError, match=match) as info:
        match_case(prob, ref, pred_name="p.nii.gz", ref_name="r.nii.gz")
    assert "p.nii.gz" in str(info.value) or "r.nii.gz" in str(info.value)


def test_bad_parameters():
    z = np.zeros((3, 3, 3))
    with pytest.raises(InputError, match="threshold"):
        match_case(z, z, threshold=1.0)
    with pytest.raises(InputError, match="connectivity"):
        match_case(z, z, connectivity=8)
    with pytest.raises(InputError, match="no cases"):
        evaluate_cases([])
    with pytest.raises(InputError, match="n_images"):
        froc([0.5], [], 0)
    with pytest.raises(InputError, match="shapes"):
        voxel_dice(z, np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------- properties


def _naive_best(labels_a, labels_b, conf_b=None):
    """Per id of labels_a: (best Dice, partner) by the O(K·M) definition (for cross-checking)."""
    out = {}
    for i in range(1, labels_a.max() + 1):
        a = labels_a == i
        best = (0.0, None)
        for j in range(1, labels_b.max() + 1):
            b = labels_b == j
            inter = np.count_nonzero(a & b)
            if inter:
                d = 2 * inter / (a.sum() + b.sum())
                key = (d, conf_b[j] if conf_b is not None else 0, -j)
                if best[1] is None or key > best[2]:
                    best = (d, j, key)
        out[i] = best[:2]
    return out


masks = arrays(np.uint8, (5, 6, 6), elements=st.integers(0, 1))
probs = arrays(np.float32, (5, 6, 6), elements=st.floats(0, 1, width=32))


@settings(max_examples=40, deadline=None)
@given(ref=masks, prob=probs, connectivity=st.sampled_from([6, 26]))
def test_sparse_matching_equals_the_definition(ref, prob, connectivity):
    case = match_case(prob, ref, connectivity=connectivity, keep_labels=True)
    rl, pl = case.ref_labels, case.pred_labels
    conf = {c.id: c.confidence for c in case.components}
    conf_arr = np.zeros(pl.max() + 1)
    for j, v in conf.items():
        conf_arr[j] = v
        assert v == pytest.approx(float(prob[pl == j].max()))
    naive_les = _naive_best(rl, pl, conf_arr)
    for les in case.lesions:
        assert les.hit_dice == pytest.approx(naive_les[les.id][0])
        assert les.component == naive_les[les.id][1]
    naive_comp = _naive_best(pl, rl)
    for comp in case.components:
        assert comp.hit_dice == pytest.approx(naive_comp[comp.id][0])
        assert comp.lesion == naive_comp[comp.id][1]


@st.composite
def case_lists(draw):
    n = draw(st.integers(1, 4))
    out = []
    for i in range(n):
        ref = draw(masks)
        prob = draw(probs)
        out.append(match_case(prob, ref, case=f"case{i}"))
    return out


@settings(max_examples=25, deadline=None)
@given(cases=case_lists(), data=st.data())
def test_report_invariants(cases, data):
    report = evaluate_cases(cases, n_resamples=5)
    fr = report["froc"]
    fp = np.array(fr["fp_per_image"])
    assert fp[0] == 0 and np.all(np.diff(fp) > 0)  # one point per FP/image value
    if report["n_lesions"]:
        rec = np.array(fr["recall"])
        assert np.all((rec >= 0) & (rec <= 1)) and np.all(np.diff(rec) >= 0)
        assert 0 <= report["cpm"] <= 1 and 0 <= report["avg_recall_0_5"] <= 1
    # permuting the images changes nothing but the order of the per-case entries
    perm = data.draw(st.permutations(cases))
    other = evaluate_cases(perm, n_resamples=5)
    assert {k: v for k, v in other.items() if k != "cases"} == {k: v for k, v in report.items() if k != "cases"}


@settings(max_examples=25, deadline=None)
@given(
    hit=st.lists(st.one_of(st.none(), st.floats(0.5, 1)), min_size=0, max_size=8),
    fps=st.lists(st.floats(0.5, 1), max_size=8),
    extra=st.lists(st.floats(0.5, 1), max_size=4),
    n_images=st.integers(1, 5),
)
def test_froc_thresholds_superset_gives_same_curve(hit, fps, extra, n_images):
    hit_conf = [np.nan if h is None else h for h in hit]
    a = froc(hit_conf, fps, n_images)
    b = froc(hit_conf, fps, n_images, thresholds=[*(h for h in hit if h is not None), *fps, *extra])
    np.testing.assert_array_equal(a.fp_per_image, b.fp_per_image)
    np.testing.assert_array_equal(a.recall, b.recall)
    np.testing.assert_array_equal(a.threshold, b.threshold)
    if hit:
        on_grid = a.recall_at(np.linspace(0, 10, 101))
        assert np.all(np.diff(on_grid) >= 0) and 0 <= cpm(a) <= 1 and 0 <= avg_recall(a) <= 1
        # the right end is the recall of all components: detected lesions / lesions
        assert a.recall[-1] == pytest.approx(sum(h is not None for h in hit) / len(hit))
    else:
        assert math.isnan(cpm(a)) and math.isnan(avg_recall(a))


@settings(max_examples=25, deadline=None)
@given(ref=masks.filter(lambda m: m.any()), conf=st.floats(0.51, 1.0))
def test_perfect_prediction_scores_one(ref, conf):
    case = match_case(ref.astype(np.float32) * np.float32(conf), ref)
    report = evaluate_cases([case], n_resamples=3)
    assert report["cpm"] == 1.0 and report["avg_recall_0_5"] == 1.0
    assert report["object_dice"]["mean"] == pytest.approx(1.0)
    assert report["object_dice"]["n"] == report["n_lesions"]
    assert all(c.hit_dice == pytest.approx(1.0) for c in case.components)
