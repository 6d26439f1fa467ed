"""One case matched under several hit rules from one labelling: ``case_overlaps`` + ``CaseOverlaps.match``.

``iwseg evaluate`` compares hit rules side by side; the labelling and the overlap counting do not
depend on the rule, so they are done once per case (:func:`case_overlaps`) and each rule's matching
is derived from the shared :class:`CaseOverlaps`. These tests check that this shared path gives,
rule by rule, exactly the :class:`CaseResult` of a fresh ``match_case(..., hit_rule=rule)`` (the
path that labels the case again for every rule), also when the rules are matched one after the
other on the same object in any order (nothing leaks from one rule's matching into the next), and
that a case is labelled once per volume however many rules it is matched under.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _hand_cases import HAND_SIZES, blob_case, hand_case_arrays
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from IWSegmentationLib.core import lesions as core_lesions
from IWSegmentationLib.evaluation import CaseResult, case_overlaps, match_case
from IWSegmentationLib.evaluation import matching as matching_module

#: Rules that pair the hand cases differently: many-to-one, the two one-to-one matchings, and
#: each kind of overlap condition.
RULES = ("paper", "one-to-one", "panoptica", "hungarian", "many,voxels>=2", "dice>0.3", "fraction>=0.5",
         "greedy,iou>0.2")


def assert_same_result(shared: CaseResult, fresh: CaseResult) -> None:
    """Every field equal; the label maps (numpy arrays, which ``==`` on a dataclass cannot compare) voxel by voxel."""
    for name in ("ref_labels", "pred_labels"):
        a, b = getattr(shared, name), getattr(fresh, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert np.array_equal(a, b), name
    assert dataclasses.replace(shared, ref_labels=None, pred_labels=None) == \
        dataclasses.replace(fresh, ref_labels=None, pred_labels=None)
    assert shared.as_dict() == fresh.as_dict()


def hand_arrays() -> dict:
    return {**hand_case_arrays(), "blob": blob_case()}


@pytest.mark.parametrize("min_lesion_size", [None, "3vox"])
@pytest.mark.parametrize("name", sorted(hand_arrays()))
def test_shared_path_equals_one_match_case_per_rule_on_the_hand_cases(name, min_lesion_size):
    prob, ref = hand_arrays()[name]
    kwargs = {"thresholds": HAND_SIZES, "case": name, "min_lesion_size": min_lesion_size}
    overlaps = case_overlaps(prob, ref, (1, 1, 1), **kwargs)
    # forwards and backwards on the same object: a rule's result must not depend on what was matched before
    for order in (RULES, RULES[::-1]):
        for rule in order:
            assert_same_result(overlaps.match(rule, keep_labels=True),
                               match_case(prob, ref, (1, 1, 1), hit_rule=rule, keep_labels=True, **kwargs))


def test_the_blob_case_still_differs_between_the_rules():
    # The equality above must not hold because every rule gives the same answer: on the blob case
    # (Dice of each 8-voxel lesion with the 1000-voxel blob = 2*8/1008) paper hits all three lesions,
    # one-to-one one of them, and panoptica (IoU 8/1000 <= 0.5) none.
    prob, ref = blob_case()
    overlaps = case_overlaps(prob, ref)
    hits = {rule: sum(les.detected for les in overlaps.match(rule).lesions) for rule in ("paper", "one-to-one",
                                                                                        "panoptica")}
    assert hits == {"paper": 3, "one-to-one": 1, "panoptica": 0}
    assert overlaps.match("paper").lesions[0].hit_dice == pytest.approx(16 / 1008)
    assert [overlaps.match(r).hit_rule for r in ("paper", "greedy", "hungarian,iou>0.5")] == \
        ["paper", "one-to-one", "panoptica"]


# Small random volumes: few score levels so that components tie in confidence and lesions are
# split and merged in every way; logits are the same levels through log(p / (1 - p)).
LEVELS = (0.0, 0.3, 0.55, 0.7, 0.9, 0.97)
volumes = st.tuples(st.integers(2, 5), st.integers(2, 6), st.integers(2, 6)).flatmap(
    lambda shape: st.tuples(arrays(np.uint8, shape, elements=st.integers(0, 1)),
                            arrays(np.float32, shape, elements=st.sampled_from(LEVELS))))


@settings(max_examples=60, deadline=None)
@given(volume=volumes, connectivity=st.sampled_from([6, 18, 26]), score=st.sampled_from(["probability", "logit"]),
       threshold=st.sampled_from([0.5, 0.8]), min_lesion_size=st.sampled_from([None, "2vox", "3mm3"]),
       rules=st.permutations(RULES))
def test_shared_path_equals_one_match_case_per_rule_on_random_volumes(volume, connectivity, score, threshold,
                                                                      min_lesion_size, rules):
    ref, prob = volume
    if score == "logit":
        with np.errstate(divide="ignore"):
            prob = np.log(prob / (1 - prob)).astype(np.float32)  # 0 -> -inf (allowed: probability 0)
    spacing = (1.0, 0.5, 2.0)
    kwargs = {"threshold": threshold, "connectivity": connectivity, "score": score,
              "min_lesion_size": min_lesion_size, "case": "r"}
    overlaps = case_overlaps(prob, ref, spacing, **kwargs)
    for rule in rules:
        assert_same_result(overlaps.match(rule), match_case(prob, ref, spacing, hit_rule=rule, **kwargs))


class LabelCounter:
    """Wraps ``label_components`` and records each call's (shape, foreground voxels)."""

    def __init__(self, real):
        self.real = real
        self.calls: list[tuple[tuple, int]] = []

    def __call__(self, mask, connectivity=26):
        self.calls.append((mask.shape, int(np.count_nonzero(mask))))
        return self.real(mask, connectivity)


@pytest.fixture
def label_counter(monkeypatch) -> LabelCounter:
    """One counter in place of ``label_components``, where matching looks it up and in core.lesions."""
    counter = LabelCounter(core_lesions.label_components)
    monkeypatch.setattr(matching_module, "label_components", counter)
    monkeypatch.setattr(core_lesions, "label_components", counter)
    return counter


def test_one_labelling_per_volume_however_many_rules(label_counter):
    prob, ref = blob_case()
    overlaps = case_overlaps(prob, ref)
    # the reference (3 lesions of 8 voxels: 24) and the prediction (the 1000-voxel blob > 0.5), once each
    assert sorted(label_counter.calls) == [((12, 12, 12), 24), ((12, 12, 12), 1000)]
    for rule in RULES:
        overlaps.match(rule)
    assert len(label_counter.calls) == 2  # matching reads no voxel
    match_case(prob, ref)  # the one-rule path: its own case_overlaps, so two more
    assert len(label_counter.calls) == 4
