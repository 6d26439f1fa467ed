"""What made a prediction: the model, its weights, the threshold and the engine (:class:`Provenance`).

One record, written into every result a reader may keep apart from the run that made it: the
lesion JSON of ``iwseg predict`` (its ``provenance`` entry), the lesion CSV of the Slicer module,
the DICOM SEG (each segment's ``AlgorithmIdentificationSequence``: ``AlgorithmVersion`` the engine
version, ``AlgorithmParameters`` the rest) and the DICOM SR (each measurement group's algorithm
identification, TID 4019, and the device observer's model name). docs/dicom.md says why there.

* ``model``: the checkpoint file's name without ``.safetensors`` (a library model's name is its
  file name); an ensemble's names joined with ``" + "``;
* ``weights_sha256``: the model card's ``weights_sha256`` (the digest of the tensors,
  :func:`IWSegmentationLib.nn.checkpoint.weights_sha256`), joined the same way for an ensemble;
* ``threshold`` (a probability) and ``logit_threshold`` (the same threshold as a logit, what the
  mask is cut at: exact where the probability rounds to 1); ``operating_point``: the card's
  operating point the threshold came from (``"1fp"``), or None when the threshold was given or the
  card's own;
* ``engine_version``: ``IWSegmentationLib.__version__``.

Standard library only (the Slicer module's GUI process reads it back from the lesion JSON).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import __version__
from .errors import InputError

#: How an ensemble's model names and digests are joined.
ENSEMBLE_SEPARATOR = " + "


def model_name(path: str | os.PathLike) -> str:
    """A checkpoint's name: its file name without ``.safetensors`` (a library model's own name)."""
    name = Path(path).name
    return name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name


@dataclass(frozen=True)
class Provenance:
    """The model, weights, threshold and engine version behind a prediction (see the module docstring)."""

    model: str
    weights_sha256: str
    threshold: float
    logit_threshold: float
    operating_point: str | None = None
    engine_version: str = __version__

    @classmethod
    def of_models(cls, paths: Sequence[str | os.PathLike], cards: Sequence[Mapping[str, Any]], *, threshold: float,
                  logit_threshold: float, operating_point: str | None = None) -> Provenance:
        """The provenance of a run of the checkpoints ``paths`` (their model cards ``cards``, in the same order)."""
        if not paths or len(paths) != len(cards):
            raise ValueError(f"{len(paths)} checkpoint path(s) for {len(cards)} model card(s)")
        return cls(model=ENSEMBLE_SEPARATOR.join(model_name(p) for p in paths),
                   weights_sha256=ENSEMBLE_SEPARATOR.join(str(c.get("weights_sha256") or "unknown") for c in cards),
                   threshold=float(threshold), logit_threshold=float(logit_threshold),
                   operating_point=operating_point)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], *, where: str = "provenance") -> Provenance:
        """The record of :meth:`as_dict` (a lesion JSON's ``provenance``); :class:`InputError` naming
        ``where`` and the key when one is missing or of the wrong type."""
        if not isinstance(value, Mapping):
            raise InputError(f"{where} must be a JSON object, got {type(value).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in value and f.name != "operating_point"]
        if missing:
            raise InputError(f"{where} has no {', '.join(missing)}")
        for key in ("threshold", "logit_threshold"):
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise InputError(f"{where}: {key} must be a finite number, got {number!r}")
        for key in ("model", "weights_sha256", "engine_version"):
            if not isinstance(value[key], str) or not value[key]:
                raise InputError(f"{where}: {key} must be a non-empty string, got {value[key]!r}")
        point = value.get("operating_point")
        if point is not None and not isinstance(point, str):
            raise InputError(f"{where}: operating_point must be a string or null, got {point!r}")
        return cls(model=value["model"], weights_sha256=value["weights_sha256"], threshold=float(value["threshold"]),
                   logit_threshold=float(value["logit_threshold"]), operating_point=point,
                   engine_version=value["engine_version"])

    def as_dict(self) -> dict[str, Any]:
        """The JSON record (the lesion JSON's ``provenance``; :meth:`from_dict` reads it)."""
        return asdict(self)

    def parameters(self) -> dict[str, str]:
        """What the engine was run with, as ``name: text`` (DICOM ``AlgorithmParameters``, TID 4019
        *Algorithm Parameter*): model, weights_sha256, threshold, logit_threshold, operating_point."""
        return {"model": self.model, "weights_sha256": self.weights_sha256, "threshold": f"{self.threshold:.6g}",
                "logit_threshold": f"{self.logit_threshold:.6g}", "operating_point": self.operating_point or "none"}

    def csv_cells(self) -> dict[str, str]:
        """The CSV columns of the record (:data:`CSV_COLUMNS`), the same in every row of a table."""
        return {"model": self.model, "weights_sha256": self.weights_sha256, "threshold": repr(self.threshold),
                "logit_threshold": repr(self.logit_threshold), "operating_point": self.operating_point or "",
                "engine_version": self.engine_version}


def read_provenance(lesion_json: str | os.PathLike | None) -> Provenance | None:
    """The ``provenance`` of a lesion JSON file of ``iwseg predict``; None without a file, or for a
    file written before provenance was recorded. :class:`InputError` naming the file when it is not
    JSON or its record is malformed."""
    if lesion_json is None:
        return None
    try:
        report = json.loads(Path(lesion_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"lesion table {lesion_json}: cannot be read as JSON ({exc})") from None
    if not isinstance(report, dict) or report.get("provenance") is None:
        return None
    return Provenance.from_dict(report["provenance"], where=f"lesion table {lesion_json}: provenance")


#: The columns :meth:`Provenance.csv_cells` fills, in order.
CSV_COLUMNS: tuple[str, ...] = ("model", "weights_sha256", "threshold", "logit_threshold", "operating_point",
                                "engine_version")
