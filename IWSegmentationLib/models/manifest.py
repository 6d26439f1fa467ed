"""The model manifest: a JSON list of downloadable models, checked once (:func:`parse_manifest`).

A manifest is a JSON object ``{"format": "iwsegmentation.models", "models": [ENTRY, ...]}``; each
entry names one checkpoint: ``name``, ``url`` (http or https), ``sha256`` (64 lowercase hex
digits of the whole file), ``license``, ``description``, ``modality``, ``organ``, and optionally
``size`` (bytes), ``license_url`` and ``license_requires_acceptance`` (true: ``iwseg models
fetch`` shows the licence and needs ``--accept-license``). docs/models.md has an example.

Every problem is an :class:`~IWSegmentationLib.core.errors.InputError` naming the manifest, the
entry (its position and name) and the field, so a typo such as ``licence`` is reported rather
than silently ignored. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import InputError

#: The ``format`` of a manifest file.
MANIFEST_FORMAT = "iwsegmentation.models"
#: Fields every entry must have (text), in the order docs/models.md lists them.
REQUIRED_FIELDS = ("name", "url", "sha256", "license", "description", "modality", "organ")
#: Fields an entry may have: their types.
OPTIONAL_FIELDS = {"size": int, "license_url": str, "license_requires_acceptance": bool}
#: A manifest larger than this is refused before it is parsed (a list of models is a few kB).
MAX_MANIFEST_BYTES = 10_000_000
#: Seconds a manifest download may wait for the server.
MANIFEST_TIMEOUT_S = 30.0

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
#: A model's name: what ``iwseg predict --model NAME`` and the library folder use.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Names may not end like a checkpoint file, so that ``--model x.safetensors`` is always a path.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def check_name(name: Any, what: str = "model name") -> str:
    """``name`` if it can name a library model (letters, digits, ``.``, ``_``, ``-``; at most 64;
    not ending in a checkpoint suffix), else :class:`InputError` naming ``what``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.lower().endswith(CHECKPOINT_SUFFIXES):
        raise InputError(f"{what} {name!r} is not a valid model name: use 1-64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit and not ending in {', '.join(CHECKPOINT_SUFFIXES)}")
    return name


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an http(s) URL rather than a file path."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class ManifestEntry:
    """One downloadable model of a manifest (checked by :func:`parse_manifest`)."""

    name: str
    url: str
    sha256: str
    license: str
    description: str
    modality: str
    organ: str
    #: bytes, when the manifest says
    size: int | None = None
    license_url: str | None = None
    #: the licence must be accepted (``--accept-license``) before the model is fetched or used
    license_requires_acceptance: bool = False


def parse_manifest(data: Any, source: str) -> list[ManifestEntry]:
    """The entries of a parsed manifest ``data`` (read from ``source``, named in messages)."""
    where = f"manifest {source}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: must be a JSON object with \"format\" and \"models\", got {type(data).__name__}")
    if data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{where}: \"format\" must be {MANIFEST_FORMAT!r}, got {data.get('format')!r}")
    unknown = sorted(set(data) - {"format", "models"})
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (a manifest has format and models)")
    models = data.get("models")
    if not isinstance(models, list):
        raise InputError(f"{where}: \"models\" must be a list of entries, got {type(models).__name__}")
    entries: list[ManifestEntry] = []
    for index, raw in enumerate(models):
        entry = _entry(raw, f"{where}: entry {index}")
        if any(e.name == entry.name for e in entries):
            raise InputError(f"{where}: entry {index}: name {entry.name!r} appears twice")
        entries.append(entry)
    return entries


def _entry(raw: Any, where: str) -> ManifestEntry:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str):
        where = f"{where} ({raw['name']!r})"
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(REQUIRED_FIELDS)}"
                         f" and optionally {', '.join(OPTIONAL_FIELDS)}")
    for name in REQUIRED_FIELDS:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: field {name!r} is required (non-empty text), got {value!r}")
    check_name(raw["name"], f"{where}: field 'name'")
    if not is_url(raw["url"]):
        raise InputError(f"{where}: field 'url' must be an http:// or https:// URL, got {raw['url']!r}")
    if not SHA256_PATTERN.match(raw["sha256"]):
        raise InputError(f"{where}: field 'sha256' must be 64 lowercase hexadecimal digits, got {raw['sha256']!r}")
    for name, kind in OPTIONAL_FIELDS.items():
        value = raw.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise InputError(f"{where}: field {name!r} must be {'a whole number' if kind is int else kind.__name__}, "
                             f"got {value!r}")
    if raw.get("size") is not None and raw["size"] <= 0:
        raise InputError(f"{where}: field 'size' must be a positive number of bytes, got {raw['size']}")
    return ManifestEntry(**{k: raw.get(k) for k in REQUIRED_FIELDS}, size=raw.get("size"),
                         license_url=raw.get("license_url"),
                         license_requires_acceptance=bool(raw.get("license_requires_acceptance", False)))


def read_manifest(source: str | os.PathLike) -> list[ManifestEntry]:
    """The entries of the manifest at ``source``: a file path or an http(s) URL."""
    if is_url(source):
        try:
            with urllib.request.urlopen(str(source), timeout=MANIFEST_TIMEOUT_S) as response:
                raw = response.read(MAX_MANIFEST_BYTES + 1)
        except (urllib.error.URLError, OSError) as exc:
            raise InputError(f"cannot read the manifest {source}: {getattr(exc, 'reason', exc)}") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"manifest not found: {path}" if not path.exists() else f"manifest {path} is not a file")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES} bytes")
        raw = path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InputError(f"manifest {source} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"manifest {source} is not valid JSON: {exc}") from None
    return parse_manifest(data, str(source))


def find_entry(entries: Sequence[ManifestEntry], name: str, source: str) -> ManifestEntry:
    """The entry called ``name``; :class:`InputError` listing the names the manifest has."""
    for entry in entries:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in entries) or "none"
    raise InputError(f"manifest {source} has no model {name!r} (it lists: {names})")
