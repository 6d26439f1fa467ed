"""The lesion table file of ``iwseg predict`` (``--lesions``): its text, and the note on what a
lesion's ``confidence`` is. Standard library only: the server and its client rewrite the file's
``image`` (a job's temporary path means nothing to the user) and write it as a local run does."""

from __future__ import annotations

import json

#: What the lesion JSON's ``confidence`` is (its top-level ``confidence`` entry says so too).
CONFIDENCE_NOTE = ("maximum blended logit inside the lesion (probability = sigmoid(confidence)); logits, because "
                   "a float32 probability rounds to 1.0 above logit 17 and would tie every confident lesion")


def format_lesion_report(report: dict) -> str:
    """The lesion JSON file's text."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def relabelled_lesion_report(text: str, image: str) -> str:
    """The lesion JSON ``text`` with its ``image`` set to ``image``, formatted as ``iwseg predict`` writes it."""
    report = json.loads(text)
    report["image"] = image
    return format_lesion_report(report)
