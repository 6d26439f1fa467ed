"""``make demo`` end to end with a tiny budget (``scripts/demo.py --quick``) in a real subprocess:
synthetic data -> training -> held-out prediction -> lesion-wise evaluation -> demo_output/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _subprocess import run_in_group

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_quick_writes_every_output(tmp_path):
    out = tmp_path / "demo_output"
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--out", str(out)]
    proc = run_in_group(cmd, timeout=600)  # a timeout also kills the DataLoader worker
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from IWSegmentationLib.nn.checkpoint import load_checkpoint

    _, card = load_checkpoint(out / "model.safetensors")
    assert card["loss"]["name"] == "iw-dice" and card["preprocessing"]["name"] == "ct-lung"
    heldout = sorted(p.name for p in (out / "data" / "heldout" / "imagesTr").iterdir())
    assert len(heldout) == 2
    assert sorted(p.name for p in (out / "masks").iterdir()) == heldout
    assert sorted(p.name for p in (out / "probabilities").iterdir()) == heldout
    assert sorted(p.name for p in (out / "logits").iterdir()) == heldout
    report = json.loads((out / "report.json").read_text())
    assert report["score"] == "logit"  # lesions ranked by their maximum logit, as the product does
    assert report["n_images"] == 2 and set(report["by_size"]) == {"small", "medium", "large"}
    assert report["n_lesions"] > 0
    rows = (out / "lesions.csv").read_text().strip().splitlines()
    assert len(rows) == report["n_lesions"] + 1  # one row per reference lesion, plus the header
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("best.safetensors", "log.csv", "resume.safetensors"):
        assert (out / "training" / name).is_file()
    # the summary tells the user where everything is
    for name in ("model.safetensors", "report.json", "lesions.csv", "froc.png", "masks"):
        assert str(out / name) in proc.stdout

    # running it again replaces its own earlier output; a foreign folder is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    refused = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--out", str(foreign)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "not an earlier demo output" in refused.stderr
    assert (foreign / "thesis.tex").read_text() == "precious"
