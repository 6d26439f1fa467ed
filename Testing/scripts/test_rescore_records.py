"""scripts/rescore_authors_records.py on SYNTHETIC records written here in the authors' format.

The authors' own records are never used or committed here (their repository has no licence);
docs/results/authors_records.md is the script's output on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # scripts/ is a package of the repository, not of the installed engine
    sys.path.insert(0, str(REPO))

from scripts import rescore_authors_records as rescore  # noqa: E402  (a package of the repository)

INF = float("inf")


def _lesion(k: int, diameter: float, dice: float, logit: float = -INF, stat: float = 0.0) -> dict:
    """A reference lesion object as the authors wrote it (hit_* describe its best-matching component)."""
    hit = dice > 0
    return {"obj": f"tum_{k}", "is_tum": True, "diameter": diameter, "hit_dice": dice, "hit_max": stat,
            "hit_median": 0.0, "hit_q95": 0.0, "hit_logit": logit if hit else -INF, "hit_stat": stat if hit else 0.0,
            "hit_obj": f"pred_{k}" if hit else "pred_None", "self_stat": 1.0, "self_logit": INF}


def _component(k: int, diameter: float, dice: float, logit: float, stat: float, lesion: int | None = None) -> dict:
    """A predicted component object (self_* are its own maximum logit and float16 probability)."""
    return {"obj": f"pred_{k}", "is_tum": False, "diameter": diameter, "hit_dice": dice,
            "hit_max": 1.0 if dice > 0 else 0.0, "hit_median": 0.0, "hit_q95": 0.0,
            "hit_logit": INF if dice > 0 else -INF, "hit_stat": 1.0 if dice > 0 else 0.0,
            "hit_obj": f"tum_{lesion}" if lesion else "tum_None", "self_stat": stat, "self_logit": logit}


# One image, liver sizes (small < 12 mm, large >= 24 mm). float16 probabilities: sigmoid(x) rounds to
# 1.0 for x = 9, 10, 12; sigmoid(2) = 0.880859375, sigmoid(1) = 0.73095703125.
#   L1 d 30 (large), Dice 0.9, logit 12;  L2 d 8 (small), Dice 0.6, logit 10;
#   L3 d 6 (small), Dice 0.3, logit 2;    L4 d 5 (small), missed;
#   FP1 d 4 (small), logit 9;             FP2 d 15 (medium), logit 1.
# All lesions, by logit, (FP, TP) going down: 12 (0,1), 10 (0,2), 9 (1,2), 2 (1,3), 1 (2,3). Per FP
#   count the highest recall: (0, 1/2), (1, 3/4), (2, 3/4). Recall at 1/8, 1/4, 1/2 = 1/2 + x/4 =
#   0.53125, 0.5625, 0.625; at 1 ... 8: 0.75. CPM = (1.71875 + 4 x 0.75) / 7 = 4.71875 / 7 = 0.674107.
# All lesions, by probability: L1, L2 and FP1 tie at 1.0, (1,2) in one step; 0.8809 (1,3); 0.7310 (2,3).
#   Curve (0, 0), (1, 3/4), (2, 3/4): recall 3x/4 = 0.09375, 0.1875, 0.375, then 0.75.
#   CPM = (0.65625 + 3) / 7 = 3.65625 / 7 = 0.522321.
# Small (L2, L3, L4; FP1), by logit: 10 (0,1), 9 (1,1), 2 (1,2): curve (0, 1/3), (1, 2/3): recall
#   1/3 + x/3 = 0.375, 0.416667, 0.5, then 2/3: CPM = (1.291667 + 2.666667) / 7 = 0.565476.
# Small, by probability: 1.0 (1,1), 0.8809 (1,2): curve (0, 0), (1, 2/3): recall 2x/3 = 0.083333,
#   0.166667, 0.333333, then 2/3: CPM = 3.25 / 7 = 0.464286.
# Object Dice (0.9 + 0.6 + 0.3) / 3 = 0.6 either way. The paper's bootstrap draws round(0.8 x 1) = 1
# image of the one with records, every time: mean = the single pass, std 0.
PLAIN = {"0": [_lesion(1, 30.0, 0.9, 12.0, 1.0), _lesion(2, 8.0, 0.6, 10.0, 1.0),
               _lesion(3, 6.0, 0.3, 2.0, 0.880859375), _lesion(4, 5.0, 0.0),
               _component(1, 29.0, 0.9, 12.0, 1.0, 1), _component(2, 7.0, 0.6, 10.0, 1.0, 2),
               _component(3, 5.0, 0.3, 2.0, 0.880859375, 3),
               _component(4, 4.0, 0.0, 9.0, 1.0), _component(5, 15.0, 0.0, 1.0, 0.73095703125)]}
# One small lesion (d 5) hit with logit 5 (probability 0.9932), nothing else: CPM 1 by either score.
IW = {"0": [_lesion(1, 5.0, 0.8, 5.0, 0.9931640625), _component(1, 5.0, 0.8, 5.0, 0.9931640625, 1)]}


def _write(path: Path, records: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))  # Python's json writes Infinity, as the authors' files have it
    return path


def _checkout(root: Path) -> Path:
    """A folder laid out like the authors' repository, with LiTS Dice and iw-Dice records only."""
    _write(root / rescore.RECORDS_PATH.format(dataset="lits", loss="dl"), PLAIN)
    _write(root / rescore.RECORDS_PATH.format(dataset="lits", loss="iwdl"), IW)
    return root


def test_logit_and_saturated_probability_give_the_hand_computed_cpms(tmp_path):
    path = _write(tmp_path / "prc_records.json", PLAIN)
    by_logit = rescore.score_records(path, "liver", "logit")
    by_stat = rescore.score_records(path, "liver", "stat")
    assert by_logit["cpm"] == pytest.approx(4.71875 / 7) and by_stat["cpm"] == pytest.approx(3.65625 / 7)
    assert by_logit["cpm_small"] == pytest.approx(3.958333 / 7, abs=1e-6)
    assert by_stat["cpm_small"] == pytest.approx(3.25 / 7)
    for scored in (by_logit, by_stat):
        assert scored["boot_cpm"] == pytest.approx((scored["cpm"], 0.0), abs=1e-12)
        assert scored["boot_cpm_small"] == pytest.approx((scored["cpm_small"], 0.0), abs=1e-12)
        assert scored["object_dice"] == pytest.approx(0.6)
        assert (scored["n_images"], scored["n_lesions"], scored["n_small"], scored["hit"]) == (1, 4, 3, 3)
        assert scored["fp_per_image"] == 2.0
    # ranked by probability, two hits and one false positive share the top value, 1.0
    assert (by_stat["top"], by_stat["tied_hits"], by_stat["tied_fps"]) == (1.0, 2, 1)
    assert (by_logit["top"], by_logit["tied_hits"], by_logit["tied_fps"]) == (12.0, 1, 0)


def test_the_table_from_a_checkout(tmp_path, capsys):
    """The LiTS Dice row has the hand-computed CPMs; iw-Dice (CPM 1, small CPM 1) minus Dice is
    1 - 0.674107 = +0.326 by logit and 1 - 0.522321 = +0.478 by probability (small: +0.435, +0.536);
    the losses without a file are marked missing."""
    out = tmp_path / "table.md"
    assert rescore.main(["--repo", str(_checkout(tmp_path / "iw")), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    dice_row = next(line for line in text.splitlines() if line.startswith("| `dice` |"))
    cells = [c.strip() for c in dice_row.strip("|").split("|")]
    assert cells[1] == "0.62 / 0.63"  # the paper's Table 2, LiTS Dice
    assert cells[2:6] == ["0.674", "0.522", "0.565", "0.464"]
    assert cells[6:8] == ["0.674 ± 0.000", "0.522 ± 0.000"]
    assert cells[10:] == ["0.600", "1", "4 (3)", "3", "2.00", "2 / 1 at 1.0000"]
    assert "| `iw-dice` − `dice` (all) | +0.326 | +0.478 | n/a |" in text
    assert "| `iw-dice` − `dice` (small) | +0.435 | +0.536 | n/a |" in text
    assert "| `iw-bce` | 0.59 / 0.53 | missing from the snapshot |" in text
    assert "python -m scripts.rescore_authors_records --repo PATH/TO/inverse_weighting" in text


def test_reads_a_froc_data_folder_and_a_bare_git_directory(tmp_path):
    root = _checkout(tmp_path / "iw")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "froc_data"], check=True)
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "records"],
                   check=True)
    for repo in (root / "froc_data", root / ".git"):
        found = rescore.records_files(repo, tmp_path / "extracted")
        assert sorted(k for k, v in found.items() if v is not None) == [("lits", "dl"), ("lits", "iwdl")]
        assert json.loads(found["lits", "dl"].read_text())["0"][0]["hit_logit"] == 12.0
    assert len(rescore.repo_commit(root / ".git")) == 12


def test_a_missing_repository_is_a_clear_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "table.md"
    assert rescore.main(["--repo", str(tmp_path / "nowhere"), "--markdown", str(out)]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "nowhere" in err and "nothing is downloaded" in err and not out.exists()
    (tmp_path / "empty").mkdir()
    assert rescore.main(["--repo", str(tmp_path / "empty"), "--markdown", str(out)]) == 2
    assert "holds none of the authors' records" in capsys.readouterr().err
    monkeypatch.delenv(rescore.REPO_ENV, raising=False)
    assert rescore.main(["--markdown", str(out)]) == 2
    assert rescore.REPO_ENV in capsys.readouterr().err and not out.exists()

