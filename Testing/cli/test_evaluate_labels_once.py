"""``iwseg evaluate`` labels each case once per volume, though it matches every case under several hit rules.

The command matches each case under ``--hit-rule`` and under the rules it compares side by side
(``COMPARED_HIT_RULES``); the connected-component labelling is the expensive part, and it does not
depend on the rule. Run in-process so that ``label_components`` can be wrapped and its calls counted.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from _hand_cases import hand_case_arrays

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core import lesions as core_lesions
from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.evaluation import matching as matching_module


def test_each_volume_is_labelled_once_under_three_hit_rules(tmp_path, monkeypatch, capsys):
    calls = []
    real = core_lesions.label_components

    def counting(mask, connectivity=26):
        calls.append((mask.shape, int(np.count_nonzero(mask))))
        return real(mask, connectivity)

    monkeypatch.setattr(matching_module, "label_components", counting)
    monkeypatch.setattr(core_lesions, "label_components", counting)
    expected = Counter()
    for name, (prob, ref) in hand_case_arrays().items():
        for folder, array in (("pred", prob), ("ref", ref)):
            (tmp_path / folder).mkdir(exist_ok=True)
            write_image(tmp_path / folder / f"{name}.nrrd", array, Geometry.identity(array.shape))
        # one labelling of the reference and one of the prediction above t_seg = 0.5
        expected[(ref.shape, int(np.count_nonzero(ref)))] += 1
        expected[(prob.shape, int(np.count_nonzero(prob > 0.5)))] += 1
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--hit-rule", "panoptica",
                 "--json", str(tmp_path / "report.json"), "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    # three rules, each with all three cases: labelled once per rule, this would be 3 x 3 x 2 = 18 calls
    assert [r["hit_rule"] for r in report["hit_rule_comparison"]["rules"]] == ["panoptica", "paper", "one-to-one"]
    assert report["hit_rule"] == "panoptica" and len(report["cases"]) == 3
    assert len(calls) == 6 and Counter(calls) == expected
