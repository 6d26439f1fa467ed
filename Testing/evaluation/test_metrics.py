"""Lesion-wise metrics: matching, FROC, CPM, avg recall, object Dice, bootstrap, size groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _hand_cases import HAND_SIZES, hand_case_arrays
from _tiny_training import tiny_config, write_tiny_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesions import (
    MinLesionSize,
    SizeThresholds,
    parse_min_lesion_size,
    remove_small_components,
)
from IWSegmentationLib.evaluation import (
    CPM_FP_RATES,
    HitRule,
    avg_recall,
    bootstrap,
    bootstrap_recall_curves,
    cpm,
    evaluate_cases,
    froc,
    froc_of_cases,
    match_case,
    parse_hit_rule,
    voxel_dice,
)
from IWSegmentationLib.evaluation.records import load_records


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
                                        "avg_recall_0_5": {"mean": None, "std": None}, "n": 0,
                                        "mode": "ours", "seed": 0}


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
        (np.full((3, 3, 3), -2.0), np.zeros((3, 3, 3)), r"logits\? .*--logits"),
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


# ---------------------------------------------------------------------------- hit rules (issue 9)


def _blob_over_three_lesions():
    """Three 2x2x2 lesions (8 voxels each) along x, and one predicted 2x2x14 box over all of them."""
    ref = np.zeros((4, 4, 16), np.uint8)
    for x0 in (1, 6, 11):
        ref[1:3, 1:3, x0:x0 + 2] = 1
    prob = np.zeros(ref.shape, np.float32)
    prob[1:3, 1:3, 1:15] = 0.9  # 56 voxels
    return prob, ref


def test_one_blob_cannot_hit_three_lesions_one_to_one():
    prob, ref = _blob_over_three_lesions()
    # Dice of the blob with each lesion: 2*8 / (8 + 56) = 0.25
    paper = match_case(prob, ref)
    assert [les.hit_dice for les in paper.lesions] == pytest.approx([0.25] * 3)
    assert evaluate_cases([paper])["recall"] == 1.0 and paper.n_false_positives == 0
    for rule in ("one-to-one", "hungarian", "greedy,voxels>=8"):
        case = match_case(prob, ref, hit_rule=rule)
        # one component, one lesion: recall 1/3, and the blob is matched, so no FP
        assert evaluate_cases([case])["recall"] == pytest.approx(1 / 3), rule
        assert [les.detected for les in case.lesions] == [True, False, False] and case.n_false_positives == 0
    # Dice > 0.3 rejects every pair: no hit, and the blob becomes a false positive
    strict = match_case(prob, ref, hit_rule="dice>0.3")
    assert evaluate_cases([strict])["recall"] == 0.0 and strict.n_false_positives == 1


def test_overlap_iou_and_dice_conditions_by_hand():
    """Lesion x = 1..8 on a 2x2 cross-section (32 voxels); prediction x = 5..12 (32 voxels), overlap x = 5..8.

    overlap 16 voxels = 1/2 of the lesion; Dice = 2*16/64 = 0.5; IoU = 16/48 = 1/3."""
    ref = np.zeros((4, 4, 16), np.uint8)
    ref[1:3, 1:3, 1:9] = 1
    prob = np.zeros(ref.shape, np.float32)
    prob[1:3, 1:3, 5:13] = 0.8
    expect = {"paper": True, "voxels>=16": True, "voxels>=17": False, "fraction>=0.5": True,
              "fraction>=0.51": False, "dice>0.49": True, "dice>0.5": False, "iou>0.33": True,
              "panoptica": False}  # panoptica = hungarian, IoU > 0.5
    for rule, hit in expect.items():
        case = match_case(prob, ref, hit_rule=rule)
        assert case.lesions[0].detected is hit, rule
        assert case.n_false_positives == (0 if hit else 1), rule
        assert case.lesions[0].hit_dice == (pytest.approx(0.5) if hit else 0.0)


def test_hungarian_maximises_total_dice_where_greedy_does_not():
    """On a line (1x1x10): L1 = x 0..3, L2 = x 6..9; C1 = x 2..6, C2 = x 0.

    Dice(L1, C1) = 2*2/9 = 0.444, Dice(L2, C1) = 2*1/9 = 0.222, Dice(L1, C2) = 2*1/5 = 0.4.
    greedy takes (L1, C1) first: L2 is missed and C2 is left over (an FP), recall 1/2;
    hungarian takes (L1, C2) + (L2, C1) = 0.622 > 0.444: recall 1, no FP;
    paper: L1 -> C1, L2 -> C1 (many-to-one), C2 a weaker fragment of L1: recall 1, no FP."""
    ref = np.zeros((1, 1, 10), np.uint8)
    ref[0, 0, 0:4] = 1
    ref[0, 0, 6:10] = 1
    prob = np.zeros(ref.shape, np.float32)
    prob[0, 0, 2:7] = 0.9
    prob[0, 0, 0] = 0.8
    greedy, hungarian, paper = (match_case(prob, ref, hit_rule=r) for r in ("greedy", "hungarian", "paper"))
    assert [les.hit_dice for les in greedy.lesions] == pytest.approx([4 / 9, 0.0]) and greedy.n_false_positives == 1
    assert [les.hit_dice for les in hungarian.lesions] == pytest.approx([0.4, 2 / 9])
    assert hungarian.n_false_positives == 0
    assert [les.hit_dice for les in paper.lesions] == pytest.approx([4 / 9, 2 / 9]) and paper.n_false_positives == 0
    assert {c.hit_rule for c in (greedy, hungarian, paper)} == {"one-to-one", "hungarian", "paper"}
    with pytest.raises(InputError, match="different hit rules"):
        evaluate_cases([greedy, paper])


def test_hit_rule_text_form():
    assert parse_hit_rule(None) == parse_hit_rule("paper") == HitRule()
    assert parse_hit_rule("panoptica") == HitRule("hungarian", min_iou=0.5)
    assert parse_hit_rule("iou>0.5, hungarian") == HitRule("hungarian", min_iou=0.5)
    assert str(parse_hit_rule("many,voxels>=10,dice>0.1")) == "many,voxels>=10,dice>0.1"
    assert str(HitRule("hungarian", min_iou=0.5)) == "panoptica"
    for bad, match in (("diagonal", "unknown term"), ("iou>x", "needs a number"), ("iou>1.5", "min_iou"),
                       ("voxels>=0", "N >= 1"), ("lonely", "unknown term")):
        with pytest.raises(InputError, match=match):
            parse_hit_rule(bad)


@settings(max_examples=40, deadline=None)
@given(ref=masks, prob=probs, rule=st.sampled_from(["greedy", "hungarian", "one-to-one,voxels>=2"]))
def test_one_to_one_recall_never_exceeds_the_paper_rule(ref, prob, rule):
    paper, strict = match_case(prob, ref), match_case(prob, ref, hit_rule=rule)
    assert sum(les.detected for les in strict.lesions) <= sum(les.detected for les in paper.lesions)
    # one-to-one: no component serves two lesions
    used = [les.component for les in strict.lesions if les.detected]
    assert len(used) == len(set(used))


# ---------------------------------------------------------------------------- minimum lesion size


def test_min_lesion_size_by_hand():
    """Components of 1, 4 and 9 voxels on a 2 x 1 x 1 mm grid (2 mm³ per voxel)."""
    prob = np.zeros((3, 8, 12), np.float32)
    prob[0, 0, 0] = 0.9  # 1 voxel = 2 mm³
    prob[1, 2:4, 2:4] = 0.9  # 4 voxels = 8 mm³
    prob[1, 5:8, 6:9] = 0.9  # 9 voxels = 18 mm³
    ref = np.zeros(prob.shape, np.uint8)
    spacing = (2.0, 1.0, 1.0)
    n_left = {None: 3, "2vox": 2, "4vox": 2, "5vox": 1, "8mm3": 2, "8.5mm3": 1, "19mm3": 0}
    for spec, n in n_left.items():
        case = match_case(prob, ref, spacing, min_lesion_size=spec)
        assert len(case.components) == n == case.n_false_positives, spec
    assert parse_min_lesion_size("8.5mm3").min_voxels(spacing) == 5  # ceil(8.5 / 2)
    assert parse_min_lesion_size({"value": 10, "unit": "voxels"}) == MinLesionSize(10.0, "voxels")
    kept = remove_small_components(prob > 0.5, spacing, MinLesionSize(5, "voxels"))
    assert kept.sum() == 9 and kept[1, 5:8, 6:9].all()
    for bad in ("ten", "5cm", "0vox", {"value": 5}):
        with pytest.raises(InputError):
            parse_min_lesion_size(bad)


@settings(max_examples=40, deadline=None)
@given(ref=masks, prob=probs, size=st.integers(1, 6))
def test_min_size_filter_never_adds_false_positives(ref, prob, size):
    plain = match_case(prob, ref)
    filtered = match_case(prob, ref, min_lesion_size=f"{size}vox")
    assert filtered.n_false_positives <= plain.n_false_positives
    assert all(c.voxels >= size for c in filtered.components)
    assert sum(les.detected for les in filtered.lesions) <= sum(les.detected for les in plain.lesions)


# ---------------------------------------------------------------------------- the paper's bootstrap (issue 13)


def _records_cases(tmp_path, records: dict):
    path = tmp_path / "prc_records.json"
    path.write_text(json.dumps(records))
    return load_records(path, HAND_SIZES)


def test_paper_bootstrap_quirk_by_hand(tmp_path):
    """Authors' records: A has a lesion hit with logit 0.5 and an FP with logit 0.9; B a missed
    lesion; C no records. Draws of 1/3 of the images, one image per draw:

    paper: C is never drawn (no records); FP/image divides by 3 (all images). Draw {A}: points
    (0, 0), (1/3, 0) at tau 0.9, (1/3, 1) at tau 0.5 -> recall at 1/8, 1/4 = 0, then 1 from 1/3 on
    ... with the highest recall per FP count the curve is (0, 0), (1/3, 1): recall 3/8, 3/4, 1, 1, 1, 1, 1,
    CPM (0.375 + 0.75 + 5) / 7 = 0.875. Draw {B}: recall 0, CPM 0.
    ours: C can be drawn (a resample without lesions: left out, NaN); FP/image divides by 1
    (the draw's size): {A} gives (0, 0), (1, 1): CPM (0.125 + 0.25 + 0.5 + 4) / 7 = 0.6964."""
    records = {
        "A": [{"obj": "tum_1", "is_tum": True, "hit_dice": 0.8, "hit_logit": 0.5, "hit_stat": 0.6, "hit_obj": "pred_1"},
              {"obj": "pred_1", "is_tum": False, "hit_dice": 0.8, "self_logit": 0.5, "self_stat": 0.6},
              {"obj": "pred_2", "is_tum": False, "hit_dice": 0.0, "self_logit": 0.9, "self_stat": 0.7}],
        "B": [{"obj": "tum_1", "is_tum": True, "hit_dice": 0.0, "hit_logit": float("-inf"), "hit_stat": 0.0}],
        "C": [],
    }
    cases = _records_cases(tmp_path, records)
    assert [len(c.lesions) for c in cases] == [1, 1, 0] and cases[0].lesions[0].confidence == 0.5
    full = evaluate_cases(cases)
    assert full["cpm"] == pytest.approx(0.875 / 2) and full["object_dice"]["mean"] == pytest.approx(0.8)

    def per_draw(mode):
        curves = bootstrap_recall_curves(cases, CPM_FP_RATES, fraction=1 / 3, n_resamples=30, mode=mode)
        return {round(float(v), 4) if np.isfinite(v) else "nan" for v in curves.mean(axis=1)}

    assert per_draw("paper") == {0.875, 0.0}
    assert per_draw("ours") == {0.6964, 0.0, "nan"}
    boot = bootstrap(cases, mode="paper", seed=42)
    assert boot["mode"] == "paper" and boot["seed"] == 42 and boot["n"] == 100
    with pytest.raises(InputError, match="bootstrap mode"):
        bootstrap(cases, mode="theirs")


# Synthetic records in the authors' prc_records.json format (written for these tests; see
# "Per-lesion records" in docs/metrics.md). The authors' own records are not committed (their
# repository has no licence): the Table 2 tests below read them from a local copy and skip without one.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # Testing/fixtures
SATURATED_RECORDS = FIXTURES / "prc_records_synthetic_saturated.json"
LOGITS_ONLY_RECORDS = FIXTURES / "prc_records_synthetic_logits_only.json"
LIVER = SizeThresholds(12.0, 24.0)


def test_saturated_records_rank_by_logit_not_by_probability():
    """prc_records_synthetic_saturated.json, 3 images, liver sizes (small < 12 mm, large >= 24 mm):
    A: lesions A1 (logit 14, d 30, Dice 0.9), A2 (logit 9, d 8, Dice 0.6), A3 missed (d 5); an FP
       a3 (logit 10.5, d 4); a fragment of A1 (Dice 0.1, logit 11), neither TP nor FP.
    B: lesion B1 (logit 3, d 15, Dice 0.3); FPs b2 (logit 2, d 6) and b3 (logit 8.5, d 20).
    C: no records (counts as an image). Their float16 probabilities: 1.0 above logit 8, sigmoid(3)
    = 0.9526, sigmoid(2) = 0.8809.
    By logit, (FP, TP) going down: 14 (0,1), 10.5 (1,1), 9 (1,2), 8.5 (2,2), 3 (2,3), 2 (3,3); curve
    (0, 1/4), (1/3, 1/2), (2/3, 3/4), (1, 3/4), i.e. recall 1/4 + 3x/4 up to x = 2/3:
    CPM = (0.34375 + 0.4375 + 0.625 + 4 x 0.75) / 7 = 4.40625 / 7 = 0.629464;
    avg recall 0-5 = (sum_{i=0..66} (0.25 + 0.0075 i) + 434 x 0.75) / 501 = (33.3325 + 325.5) / 501 = 0.716233.
    By probability, A1, a3, A2, b3 tie at 1.0: (2,2) in one step, then 0.9526 (2,3), 0.8809 (3,3); curve
    (0, 0), (2/3, 3/4), (1, 3/4): CPM = (0.140625 + 0.28125 + 0.5625 + 3) / 7 = 3.984375 / 7 = 0.569196.
    Small group (A2, A3; FPs a3, b2): logit 10.5 FP, 9 TP, 2 FP and probability (1.0: FP+TP, then FP)
    give the same curve (0, 0), (1/3, 1/2), (2/3, 1/2): CPM (0.1875 + 0.375 + 0.5 + 2) / 7 = 0.4375.
    Object Dice mean(0.9, 0.6, 0.3) = 0.6 ± sqrt(0.06) with either score. The paper's bootstrap draws
    round(0.8 x 2) = 2 of the 2 images with records (C never) and divides FP by all 3: every draw is
    the full data, so its mean is the CPM and its std 0."""
    reports = {score: evaluate_cases(load_records(SATURATED_RECORDS, LIVER, score=score), seed=42,
                                     bootstrap_mode="paper") for score in ("logit", "stat")}
    by_logit, by_stat = reports["logit"], reports["stat"]
    assert by_logit["n_images"] == 3 and by_logit["n_lesions"] == 4 and by_logit["recall"] == 0.75
    assert by_logit["cpm"] == pytest.approx(4.40625 / 7) and by_stat["cpm"] == pytest.approx(3.984375 / 7)
    assert by_logit["avg_recall_0_5"] == pytest.approx(358.8325 / 501)
    assert by_logit["froc"]["fp_per_image"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert by_stat["froc"]["fp_per_image"] == pytest.approx([0, 2 / 3, 1])
    for report in reports.values():
        assert report["by_size"]["small"]["cpm"] == pytest.approx(0.4375)
        assert report["object_dice"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.06), "n": 3})
        assert report["bootstrap"]["cpm"]["mean"] == pytest.approx(report["cpm"])
        assert report["bootstrap"]["cpm"]["std"] == pytest.approx(0.0, abs=1e-12)


def test_logits_only_records():
    """prc_records_synthetic_logits_only.json, 4 images, only the keys obj, is_tum, hit_dice,
    hit_logit, hit_obj, self_logit (no diameter, no probabilities). P: lesion P1 hit (logit 1.5,
    Dice 0.5), FP p2 (0.5); Q: lesion Q1 missed, FP q1 (2.5); R, S: no records. Going down: 2.5 FP,
    1.5 TP, 0.5 FP; FP/image over 4 images: curve (0, 0), (1/4, 1/2), (1/2, 1/2); CPM =
    (1/4 + 6 x 1/2) / 7 = 3.25 / 7. The paper's bootstrap always draws P and Q (R and S hold no
    records) over all 4 images: its mean is the CPM. Without diameters no lesion has a size
    group, and ranking by probability is refused, naming the object."""
    report = evaluate_cases(load_records(LOGITS_ONLY_RECORDS, LIVER), seed=42, bootstrap_mode="paper")
    assert report["n_images"] == 4 and report["n_lesions"] == 2 and report["cpm"] == pytest.approx(3.25 / 7)
    assert report["bootstrap"]["cpm"]["mean"] == pytest.approx(3.25 / 7)
    assert all(report["by_size"][g]["n_lesions"] == 0 for g in ("small", "medium", "large"))
    with pytest.raises(InputError, match="image 'P', object 0.*hit_stat"):
        load_records(LOGITS_ONLY_RECORDS, LIVER, score="stat")


@pytest.mark.parametrize(
    "dataset, loss, paper, counts",
    [
        # Table 2, LiTS, Dice: avg Recall .62, object Dice .63; 28 images, all with records
        ("lits", "dl", (0.62, 0.63), {"images": 28, "without_records": 0, "lesions": 138, "hit": 103, "fp": 103}),
        # Table 2, LUNA16, BCE: avg Recall .42, object Dice .57; 28 of the 159 scans have no record at all
        ("luna", "bce", (0.42, 0.57), {"images": 159, "without_records": 28, "lesions": 196, "hit": 91, "fp": 239}),
    ],
    ids=["lits-dice", "luna16-bce"],
)
def test_table_2_reproduced_from_the_authors_records(authors_records, dataset, loss, paper, counts):
    cases = load_records(authors_records(dataset, loss), SizeThresholds(10.0, 20.0))
    # the counts, from the files: images, images without any object, lesions, hit lesions, false positives
    assert len(cases) == counts["images"]
    assert sum(not c.lesions and not c.components for c in cases) == counts["without_records"]
    assert sum(len(c.lesions) for c in cases) == counts["lesions"]
    assert sum(c.n_false_positives for c in cases) == counts["fp"]
    report = evaluate_cases(cases, seed=42, bootstrap_mode="paper")
    assert report["recall"] == pytest.approx(counts["hit"] / counts["lesions"])
    # Table 2's "avg Recall" is the CPM with the authors' bootstrap ...
    assert report["bootstrap"]["cpm"]["mean"] == pytest.approx(paper[0], abs=0.01)
    # ... and the object Dice, the mean hit Dice over the hit lesions, matches to the printed digits
    assert report["object_dice"]["mean"] == pytest.approx(paper[1], abs=0.005)
    assert report["object_dice"]["n"] == counts["hit"]


def test_table_2_is_not_the_mean_recall_over_0_5_fp_and_scores_are_logits(authors_records):
    """On the authors' LiTS Dice records: the 0-5 FP/image mean is 0.68, not .62; our bootstrap (FP/image
    over each resample's 22 of 28 images) reads every curve at 28/22 times the FP/image, so it is
    lower (0.596 against 0.616); ranking by the float16-saturated probabilities instead of the
    logits puts 73 hits and 11 FPs in one step at 1.0 (0.592)."""
    path = authors_records("lits", "dl")
    report = evaluate_cases(load_records(path, LIVER), seed=42, bootstrap_mode="paper")
    assert abs(report["avg_recall_0_5"] - 0.62) > 0.05
    ours = evaluate_cases(load_records(path, LIVER), seed=42)
    assert ours["bootstrap"]["cpm"]["mean"] < report["bootstrap"]["cpm"]["mean"] - 0.015
    by_stat = evaluate_cases(load_records(path, LIVER, score="stat"), seed=42, bootstrap_mode="paper")
    assert by_stat["bootstrap"]["cpm"]["mean"] < 0.60 and by_stat["object_dice"] == report["object_dice"]


# ---------------------------------------------------------------------------- logits (issue 20)

# no magnitudes that 2^-8 would scale into float32's subnormals (where scaling is no longer exact)
logit_maps = arrays(np.float32, (5, 6, 6),
                    elements=st.floats(-30, 30, width=32).filter(lambda v: v == 0 or abs(v) > 1e-30))


def _curve_summary(cases):
    report = evaluate_cases(cases, n_resamples=1)
    return report["cpm"], report["froc"]["fp_per_image"], report["froc"]["recall"]


@settings(max_examples=30, deadline=None)
@given(refs=st.lists(masks, min_size=1, max_size=3), data=st.data(), exponent=st.integers(-8, 8))
def test_positive_scaling_of_logits_changes_no_mask_ranking_cpm_or_froc(refs, data, exponent):
    """x -> a x with a > 0 is monotone and keeps the sign, so it keeps every component of
    ``x > logit(0.5) = 0``, every ranking and so every CPM and FROC point; only the FROC
    thresholds scale by a. a = 2^k scales float32 exactly, so no rounding ties values apart."""
    a = np.float32(2.0 ** exponent)
    logits = [data.draw(logit_maps) for _ in refs]
    plain = [match_case(x, r, case=f"c{i}", score="logit") for i, (x, r) in enumerate(zip(logits, refs))]
    scaled = [match_case(a * x, r, case=f"c{i}", score="logit") for i, (x, r) in enumerate(zip(logits, refs))]
    for p, q in zip(plain, scaled):
        assert [(c.id, c.voxels, c.hit_dice, c.lesion) for c in p.components] == \
               [(c.id, c.voxels, c.hit_dice, c.lesion) for c in q.components]
        assert [(g.hit_dice, g.component) for g in p.lesions] == [(g.hit_dice, g.component) for g in q.lesions]
        assert [a * c.confidence for c in p.components] == [c.confidence for c in q.components]
    cpm_p, fp_p, rec_p = _curve_summary(plain)
    cpm_q, fp_q, rec_q = _curve_summary(scaled)
    assert fp_p == fp_q and rec_p == rec_q and (cpm_p == cpm_q or (cpm_p is None and cpm_q is None))


def test_confident_false_positives_below_more_confident_hits_rank_by_logit_not_probability():
    """Known bad vs known good: four images, each with one lesion hit at logit 40 and one false
    positive at logit 20. Ranked by logit, the FROC reaches recall 1 at 0 FP/image: CPM 1. In
    float32 both probabilities are exactly 1.0 (sigmoid rounds to 1 above logit ~17), so ranked
    by probability the hits and the false positives tie: the only points are (0, 0) and
    (1 FP/image, recall 1); recall at 1/8, 1/4, 1/2 is interpolated 0.125, 0.25, 0.5, then 1 at
    1, 2, 4, 8: CPM (0.875 + 4) / 7 = 0.696. The model that orders its detections right must
    score higher, and does only by logit."""
    from IWSegmentationLib.core.prediction_maps import sigmoid

    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    logits = np.full(ref.shape, -10.0, np.float32)
    logits[1:3, 1:3, 1:3] = 40.0  # the hit
    logits[4, 4, 4] = 20.0  # the confident false positive
    prob = sigmoid(logits)
    assert prob[1, 1, 1] == prob[4, 4, 4] == 1.0  # the saturation
    by_logit = evaluate_cases([match_case(logits, ref, case=f"c{i}", score="logit") for i in range(4)])
    by_prob = evaluate_cases([match_case(prob, ref, case=f"c{i}") for i in range(4)])
    assert by_logit["cpm"] == pytest.approx(1.0) and by_logit["score"] == "logit"
    assert by_prob["cpm"] == pytest.approx((0.125 + 0.25 + 0.5 + 4) / 7) and by_prob["score"] == "probability"
    assert by_logit["cpm"] > by_prob["cpm"]


def test_logit_threshold_is_the_probability_threshold_in_logit_space():
    """t = 0.8 is logit log(0.8 / 0.2) = 1.386: a voxel at logit 1.3 is out, one at 1.5 is in.
    Components of all-negative logits (t = 0.1, logit -2.197) keep their negative maximum as
    confidence; -inf is probability 0 and allowed; NaN and +inf are refused naming the file."""
    ref = np.zeros((3, 3, 8), np.uint8)
    x = np.full(ref.shape, -np.inf, np.float32)
    x[1, 1, 1], x[1, 1, 4], x[1, 1, 6] = 1.3, 1.5, -1.0
    case = match_case(x, ref, threshold=0.8, score="logit")
    assert [c.confidence for c in case.components] == [1.5]
    low = match_case(x, ref, threshold=0.1, score="logit")
    assert sorted(c.confidence for c in low.components) == pytest.approx([-1.0, 1.3, 1.5])
    for value, needle in ((np.nan, "NaN"), (np.inf, r"\+inf")):
        bad = x.copy()
        bad[0, 0, 0] = value
        with pytest.raises(InputError, match=f"l.nii.gz.*{needle}"):
            match_case(bad, ref, score="logit", pred_name="l.nii.gz")
    with pytest.raises(InputError, match="score must be one of"):
        match_case(x, ref, score="logits")


def test_logits_that_look_like_probabilities_warn_and_scores_do_not_mix():
    ref = np.zeros((3, 3, 3), np.uint8)
    warnings = []
    match_case(np.full(ref.shape, 0.7, np.float32), ref, score="logit", pred_name="p.nrrd", on_warning=warnings.append)
    assert len(warnings) == 1 and "p.nrrd" in warnings[0] and "probability map" in warnings[0]
    match_case(np.full(ref.shape, -0.7, np.float32), ref, score="logit", on_warning=warnings.append)
    assert len(warnings) == 1  # a negative value: logits, no warning
    mixed = [match_case(np.zeros(ref.shape, np.float32), ref, case="a"),
             match_case(np.zeros(ref.shape, np.float32), ref, case="b", score="logit")]
    with pytest.raises(InputError, match="different scores"):
        evaluate_cases(mixed)


# ---------------------------------------------------------------------------- best checkpoint (issue 9)


def test_default_best_metric_does_not_prefer_a_merging_model(capsys):
    """Three 8-voxel lesions. "blob": one 2x2x50 box (200 voxels) over all of them, Dice 16/208 = 0.077
    with each; the paper's rule hits all three: CPM 1, object Dice 0.077, harmonic mean
    2 * 0.077 / 1.077 = 0.143. "good": two lesions exactly, the third missed: a single FROC point
    (0, 2/3), CPM 2/3, object Dice 1, harmonic mean 2 * (2/3) / (5/3) = 0.8."""
    from IWSegmentationLib.training import TrainConfig, harmonic_mean, merging_warning
    from IWSegmentationLib.training.validation import metric_value

    ref = np.zeros((4, 4, 56), np.uint8)
    for x0 in (2, 20, 40):
        ref[1:3, 1:3, x0:x0 + 2] = 1
    blob = np.zeros(ref.shape, np.float32)
    blob[1:3, 1:3, 2:52] = 0.9
    good = ref.astype(np.float32) * np.float32(0.9)
    good[:, :, 40:] = 0
    reports = {name: evaluate_cases([match_case(p, ref)]) for name, p in (("blob", blob), ("good", good))}
    assert reports["blob"]["cpm"] == 1.0 and reports["blob"]["object_dice"]["mean"] == pytest.approx(16 / 208)
    assert metric_value(reports["blob"], "cpm") > metric_value(reports["good"], "cpm")  # CPM alone is gamed
    default = TrainConfig().val_metric
    assert default == "cpm_object_dice"
    assert metric_value(reports["blob"], default) == pytest.approx(2 * (16 / 208) / (1 + 16 / 208))
    assert metric_value(reports["good"], default) == pytest.approx(0.8)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(None, 0.5) is None
    # nothing hit: object Dice is undefined, but the combined metric is 0 (not None), so an untrained
    # model still gets a best checkpoint
    nothing = evaluate_cases([match_case(np.zeros(ref.shape, np.float32), ref)])
    assert nothing["object_dice"]["mean"] is None and metric_value(nothing, default) == 0.0
    assert "object Dice 0.077" in merging_warning(reports["blob"]) and merging_warning(reports["good"]) is None


def test_validation_detection_keys():
    from IWSegmentationLib.training import TrainConfig

    config = TrainConfig(val_hit_rule="panoptica", min_lesion_size="5mm3")
    config.validate()
    assert config.detection_rule() == (HitRule("hungarian", min_iou=0.5), MinLesionSize(5.0, "mm3"))
    for key, value, match in (("val_hit_rule", "diagonal", "config key 'val_hit_rule'.*unknown term"),
                              ("min_lesion_size", "3cm", "config key 'min_lesion_size'.*10vox")):
        with pytest.raises(InputError, match=match):
            TrainConfig(**{key: value}).validate()


def test_tiny_training_run_validates_with_the_hit_rule_and_writes_min_size_to_the_card(tmp_path):
    """A real 1-epoch run of the tiny U-Net (Testing/_tiny_training.py's synthetic liver data) with
    val_hit_rule one-to-one and min_lesion_size 2 voxels: validation uses both, the card keeps
    them, the log has the combined metric, and best.safetensors is chosen by cpm_object_dice."""
    from IWSegmentationLib.nn.checkpoint import load_checkpoint
    from IWSegmentationLib.training import train

    write_tiny_dataset(tmp_path / "data")
    config = tiny_config(tmp_path / "data", tmp_path / "run", epochs=1, iters_per_epoch=2, val_every=1,
                         val_hit_rule="one-to-one", min_lesion_size="2vox", tensorboard=False)
    result = train(config, verbose=False)
    _, card = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert card["min_lesion_size"] == {"value": 2.0, "unit": "voxels"}
    assert card["validation_metrics"]["hit_rule"] == "one-to-one"
    assert result.best_metric == "cpm_object_dice"
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"val_recall", "val_cpm_object_dice"} <= set(header)


def test_case_pool_counts_an_image_drawn_twice_twice():
    """A draw with replacement (the study's paired bootstrap) repeats an image's lesions and FPs.

    Working, on the hand cases (A: lesions A1 hit at 0.9 and A2 hit at 0.6, FP at 0.7; B: lesion B1
    missed, FPs at 0.95 and 0.55; C: nothing). Images [0, 0, 1] (A twice, B once):
    hit confidences 0.9, 0.6, 0.9, 0.6 and NaN (B1); FPs 0.7, 0.7, 0.95, 0.55; 3 images.
    Images [0, 1] (no repeat) keep what the boolean selection gave: 2 images, 2 + 1 lesions, 1 + 2 FPs.
    """
    from IWSegmentationLib.evaluation.bootstrap import CasePool

    pool = CasePool.from_cases(hand_cases())
    hits, fps, n = pool.select(images=np.array([0, 0, 1]))
    assert n == 3
    assert sorted(hits[np.isfinite(hits)].tolist()) == pytest.approx([0.6, 0.6, 0.9, 0.9]) and np.isnan(hits).sum() == 1
    assert sorted(fps.tolist()) == pytest.approx([0.55, 0.7, 0.7, 0.95])
    hits, fps, n = pool.select(images=np.array([0, 1]))
    assert n == 2 and hits.size == 3 and sorted(fps.tolist()) == pytest.approx([0.55, 0.7, 0.95])
