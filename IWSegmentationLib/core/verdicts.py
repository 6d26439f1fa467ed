"""Reviewer verdicts: the file a reader's accept / reject / edited decisions are kept in, defined once.

A verdict file (``CASE.verdicts.json``, beside the case; docs/verdicts.md) records *what* was
reviewed, so that it is never applied to anything else:

* the **case**: its name (the image file name without extension, as ``iwseg predict`` and
  ``iwseg evaluate`` name cases), the image file name and its voxel grid (size, spacing, origin,
  direction: the image header; compared with the tolerances of :meth:`Geometry.differences`, so a
  grid read by Slicer and by SimpleITK agree where a hash of rounded floats might not);
* the **model**: its name (the checkpoint file's stem) and ``weights_sha256`` from its model card;
* the **lesion set**: a fingerprint of the predicted lesions, numbered as every output numbers them
  (:func:`IWSegmentationLib.core.lesions.number_lesions`: lesion ``n`` is the same in the lesion JSON,
  the DICOM SEG and the Slicer segments): the sha256 of the sorted ``[id, voxels, bbox_zyx]`` list
  (:func:`lesion_set_fingerprint`; integers only, so it is exact on every machine), with the
  probability threshold and connectivity that made the lesions;
* per lesion, keyed by its id: ``accepted``, ``rejected`` or ``edited``, the reviewer and the time
  (UTC, ISO 8601).

Beside it, ``CASE.verdicts.nii.gz`` (the *reviewed label map*, on the case's grid) holds lesion
``n``'s voxels as the reader left them: the edited voxels of an edited lesion, else the predicted
ones. ``iwseg evaluate --verdicts`` uses it for edited lesions and ``iwseg train``'s ``reviewed``
for every lesion.

:func:`read_verdicts` validates a file and, given what it is to be applied to, refuses it with
:class:`VerdictMismatchError` naming every field that differs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import InputError
from .imageio import Geometry
from .outputs import atomic_output

#: The ``format`` entry of every verdict file, and the version this code writes and reads.
FORMAT = "iwseg-verdicts"
VERSION = 1
#: A lesion's verdict: the reader kept it, judged it a false positive, or changed its voxels.
VERDICTS = ("accepted", "rejected", "edited")
#: Suffixes of a case's verdict file and its reviewed label map, after the case name.
JSON_SUFFIX = ".verdicts.json"
LABELS_SUFFIX = ".verdicts.nii.gz"


class VerdictMismatchError(InputError):
    """A verdict file that belongs to another case, model or lesion set than the one at hand."""


def lesion_key(lesion: Any) -> tuple[int, int, tuple[int, ...]]:
    """``(id, voxels, bbox_zyx)`` of a :class:`~IWSegmentationLib.core.lesions.Lesion`, a lesion-JSON row
    (``bbox_zyx``) or a ``{"id", "voxels", "bbox"}`` mapping: what identifies a predicted lesion."""
    if isinstance(lesion, Mapping):
        box = lesion.get("bbox_zyx", lesion.get("bbox"))
        return int(lesion["id"]), int(lesion["voxels"]), tuple(int(v) for v in box)
    return int(lesion.id), int(lesion.voxels), tuple(int(v) for v in lesion.bbox)


def lesion_set_fingerprint(lesions: Iterable[Any]) -> str:
    """The sha256 (hex) of the lesions' sorted ``[id, voxels, [z0, y0, x0, z1, y1, x1]]`` list, as
    compact JSON: two predictions have the same fingerprint exactly when they number the same
    lesions with the same sizes and boxes."""
    rows = sorted([i, v, list(b)] for i, v, b in map(lesion_key, lesions))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def utc_now() -> str:
    """The current time as the verdict files write it: UTC, ISO 8601, whole seconds (``...Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class LesionSet:
    """The predicted lesions a verdict file is about: how many, their fingerprint
    (:func:`lesion_set_fingerprint`) and what made them (probability threshold, connectivity)."""

    count: int
    sha256: str
    threshold: float | None = None
    connectivity: int = 26

    @classmethod
    def of(cls, lesions: Sequence[Any], *, threshold: float | None = None, connectivity: int = 26) -> LesionSet:
        return cls(len(lesions), lesion_set_fingerprint(lesions), threshold, connectivity)


@dataclass(frozen=True)
class Verdict:
    """One lesion's verdict (one of :data:`VERDICTS`), who gave it and when (UTC, ISO 8601)."""

    verdict: str
    reviewer: str = ""
    time: str = ""


@dataclass
class VerdictFile:
    """A verdict file's content (docs/verdicts.md). ``verdicts`` maps a lesion id (1 = the largest)
    to its :class:`Verdict`; lesions without one were not reviewed. ``reviewed_labels`` is the
    reviewed label map's file name (beside the JSON), or None when none was saved."""

    case: str
    image: str
    grid: Geometry
    model_name: str
    model_sha256: str | None
    lesion_set: LesionSet
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    reviewed_labels: str | None = None

    def ids(self, verdict: str) -> list[int]:
        """The ids of the lesions with ``verdict``, ascending."""
        return sorted(n for n, v in self.verdicts.items() if v.verdict == verdict)

    def as_dict(self) -> dict:
        g = self.grid
        return {
            "format": FORMAT,
            "version": VERSION,
            "case": {"name": self.case, "image": self.image,
                     "grid": {"size": list(g.size), "spacing": list(g.spacing), "origin": list(g.origin),
                              "direction": list(g.direction)}},
            "model": {"name": self.model_name, "weights_sha256": self.model_sha256},
            "lesion_set": {"count": self.lesion_set.count, "sha256": self.lesion_set.sha256,
                           "threshold": self.lesion_set.threshold, "connectivity": self.lesion_set.connectivity},
            "reviewed_labels": self.reviewed_labels,
            "lesions": {str(n): {"verdict": v.verdict, "reviewer": v.reviewer, "time": v.time}
                        for n, v in sorted(self.verdicts.items())},
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (temporary name, then rename)."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return Path(path)

    def differences(self, *, case: str | None = None, grid: Geometry | None = None,
                    model_sha256: str | None = None, lesion_set: LesionSet | None = None) -> list[str]:
        """What differs from the case, model and lesion set at hand (each None: not compared)."""
        out = []
        if case is not None and case != self.case:
            out.append(f"case: the file is for {self.case!r}, this is {case!r}")
        if grid is not None:
            out += [f"case grid: {d} (file vs this image)" for d in self.grid.differences(grid)]
        if model_sha256 is not None and model_sha256 != self.model_sha256:
            out.append(f"model: the file is for {self.model_name!r} (weights sha256 {_short(self.model_sha256)}), "
                       f"this model's weights sha256 is {_short(model_sha256)}")
        if lesion_set is not None and lesion_set.sha256 != self.lesion_set.sha256:
            out.append(f"lesion set: the file is for {self.lesion_set.count} lesion(s) (fingerprint "
                       f"{_short(self.lesion_set.sha256)}), this prediction has {lesion_set.count} "
                       f"(fingerprint {_short(lesion_set.sha256)})")
        return out

    def check_matches(self, source: str | os.PathLike, **at_hand: Any) -> None:
        """Raise :class:`VerdictMismatchError` naming ``source`` and every :meth:`differences`
        (keywords ``case``, ``grid``, ``model_sha256``, ``lesion_set``) from what is at hand."""
        diffs = self.differences(**at_hand)
        if diffs:
            raise VerdictMismatchError(f"verdict file {source} is not for this case, model and prediction: "
                                       + "; ".join(diffs))


def _short(sha: str | None) -> str:
    return "none" if not sha else sha[:12]


def _fail(source: str, key: str, message: str) -> InputError:
    return InputError(f"verdict file {source}: {key} {message}")


def parse_verdicts(data: Any, source: str = "verdict file") -> VerdictFile:
    """Validate a verdict file's JSON object; :class:`InputError` names the file and the entry."""
    if not isinstance(data, Mapping):
        raise _fail(source, "the file", "must hold a JSON object")
    if data.get("format") != FORMAT:
        raise _fail(source, "'format'", f"must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise _fail(source, "'version'", f"must be {VERSION} (this version of iwseg), got {data.get('version')!r}")
    try:
        case, model, lesion_set = data["case"], data["model"], data["lesion_set"]
        g = case["grid"]
        grid = Geometry(tuple(int(v) for v in g["size"]), tuple(float(v) for v in g["spacing"]),
                        tuple(float(v) for v in g["origin"]), tuple(float(v) for v in g["direction"]))
        if len(grid.size) != 3 or len(grid.spacing) != 3 or len(grid.origin) != 3 or len(grid.direction) != 9:
            raise ValueError("case.grid needs 3 sizes, spacings and origins and 9 direction values")
        threshold = lesion_set.get("threshold")
        sets = LesionSet(int(lesion_set["count"]), str(lesion_set["sha256"]),
                         None if threshold is None else float(threshold), int(lesion_set.get("connectivity", 26)))
        sha = model.get("weights_sha256")
        out = VerdictFile(str(case["name"]), str(case.get("image", "")), grid, str(model.get("name", "")),
                          None if sha is None else str(sha), sets, {}, data.get("reviewed_labels"))
        lesions = data["lesions"]
        if not isinstance(lesions, Mapping):
            raise ValueError("'lesions' must map lesion ids to verdicts")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _fail(source, "", f"is not a valid verdict file: {exc.__class__.__name__}: {exc}") from None
    for key, entry in lesions.items():
        if not str(key).isdigit() or not 1 <= int(key) <= sets.count:
            raise _fail(source, f"lesion {key!r}", f"is not a lesion id of this lesion set (1..{sets.count})")
        if not isinstance(entry, Mapping) or entry.get("verdict") not in VERDICTS:
            got = entry.get("verdict") if isinstance(entry, Mapping) else entry
            raise _fail(source, f"lesion {key}'s verdict", f"must be one of {', '.join(VERDICTS)}, got {got!r}")
        out.verdicts[int(key)] = Verdict(entry["verdict"], str(entry.get("reviewer", "")), str(entry.get("time", "")))
    return out


def read_verdicts(path: str | os.PathLike, *, case: str | None = None, grid: Geometry | None = None,
                  model_sha256: str | None = None, lesion_set: LesionSet | None = None) -> VerdictFile:
    """Read and validate a verdict file; with ``case``/``grid``/``model_sha256``/``lesion_set`` (what
    it is about to be applied to), refuse it with :class:`VerdictMismatchError` naming what differs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"verdict file not found: {path}")
    verdicts = parse_verdicts(_read_json(path), str(path))
    verdicts.check_matches(path, case=case, grid=grid, model_sha256=model_sha256, lesion_set=lesion_set)
    return verdicts


def verdict_paths(folder: str | os.PathLike, case: str) -> tuple[Path, Path]:
    """The verdict file and the reviewed label map of ``case`` in ``folder``."""
    return Path(folder) / f"{case}{JSON_SUFFIX}", Path(folder) / f"{case}{LABELS_SUFFIX}"


def find_verdict_files(source: str | os.PathLike, *, flag: str = "--verdicts") -> dict[str, Path]:
    """The verdict files of ``source`` (a folder of ``CASE.verdicts.json``, or one such file) by case name."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob(f"*{JSON_SUFFIX}"))
        if not files:
            raise InputError(f"{flag}: no *{JSON_SUFFIX} file in {source}")
    elif source.is_file():
        files = [source]
    else:
        raise InputError(f"{flag}: no such file or folder: {source}")
    out: dict[str, Path] = {}
    for path in files:
        name = parse_verdicts(_read_json(path), str(path)).case
        if name in out:
            raise InputError(f"{flag}: two verdict files for case {name!r}: {out[name]} and {path}")
        out[name] = path
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"verdict file {path} cannot be read as JSON: {exc}") from None
