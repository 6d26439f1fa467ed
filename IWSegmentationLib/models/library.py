"""The local model library: checkpoints kept by name in one folder, each checked by sha256.

The folder (:func:`default_library_dir`: ``$IWSEG_MODELS``, else the platform's per-user data
folder) holds ``NAME.safetensors`` files and ``index.json``, which records for each name its
file, sha256, licence, whether the licence needs accepting and when it was accepted, and where
the file came from. ``iwseg models`` (list, add, verify, remove, fetch, accept) edits it; ``iwseg
predict --model NAME`` and the Slicer module's model drop-down read it (:func:`resolve_model`,
:meth:`ModelLibrary.entries`). The index is rewritten whole, under a lock on the folder and
through a temporary file, so two commands never leave a half-written or mixed index.

A model card is read with :func:`~IWSegmentationLib.nn.checkpoint.read_metadata` (the header
only; nothing is ever unpickled). Its licence is the card's ``license`` field when it has one
(a manifest's ``license`` wins for a fetched model); "not stated" otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..core.errors import CheckpointError, InputError
from ..core.outputs import atomic_output, folder_lock
from ..nn.checkpoint import read_metadata
from .download import Progress, download, file_sha256, partial_path
from .manifest import ManifestEntry, check_name

#: The environment variable naming the library folder (``--library DIR`` overrides it).
LIBRARY_ENV = "IWSEG_MODELS"
#: The index file in the library folder.
INDEX_NAME = "index.json"
#: The ``format`` of the index file.
INDEX_FORMAT = "iwsegmentation.model_library"
#: What a model without a stated licence shows.
NOT_STATED = "not stated"


def default_library_dir(environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The library folder: ``$IWSEG_MODELS`` when set, else the per-user data folder
    (Linux ``$XDG_DATA_HOME/iwsegmentation/models``, default ``~/.local/share/...``; macOS
    ``~/Library/Application Support/IWSegmentation/models``; Windows
    ``%LOCALAPPDATA%\\IWSegmentation\\models``)."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if environ.get(LIBRARY_ENV):
        return Path(environ[LIBRARY_ENV]).expanduser()
    home = Path(environ.get("HOME") or Path.home())
    if platform.startswith("win"):
        base = environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "IWSegmentation" / "models"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "IWSegmentation" / "models"
    base = environ.get("XDG_DATA_HOME")
    return (Path(base) if base else home / ".local" / "share") / "iwsegmentation" / "models"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LibraryEntry:
    """One model of the library, as its index records it."""

    name: str
    #: the file's name inside the library folder
    file: str
    sha256: str
    license: str = NOT_STATED
    license_requires_acceptance: bool = False
    #: when the licence was accepted (ISO time), None if never
    accepted: str | None = None
    #: where the file came from: its URL, or the path it was added from
    source: str | None = None
    description: str = ""
    modality: str | None = None
    organ: str | None = None
    added: str | None = None

    @property
    def needs_acceptance(self) -> bool:
        """Whether the licence must still be accepted before the model may be used."""
        return self.license_requires_acceptance and self.accepted is None

    def licence_notice(self) -> str:
        """The licence as shown before first use."""
        return f"model {self.name!r} is licensed under: {self.license}"


@dataclass(frozen=True)
class Stored:
    """What :meth:`ModelLibrary.add` or :meth:`ModelLibrary.fetch` did with a name.

    ``action`` is ``added`` (a new name), ``unchanged`` (the same file, by sha256, was already
    there under the name: nothing copied, the entry kept as it was; only a licence acceptance
    given now is recorded), ``restored`` (the same file, whose copy in the library had gone
    missing, copied again) or ``replaced`` (another file was there, and ``replace`` was given;
    ``previous`` is its entry)."""

    entry: LibraryEntry
    action: str
    previous: LibraryEntry | None = None


@dataclass(frozen=True)
class VerifyResult:
    """What :meth:`ModelLibrary.verify` found for one entry: ``ok`` or the problem."""

    name: str
    ok: bool
    message: str


def card_summary(card: Mapping[str, Any]) -> str:
    """A model card in one line: its description, preset, window and threshold."""
    preprocessing = card.get("preprocessing")
    preset = preprocessing.get("name") if isinstance(preprocessing, dict) else None
    parts = [str(card.get("description") or "").strip().split("\n")[0][:120].rstrip(".")]
    if preset:
        parts.append(f"preset {preset}")
    if card.get("patch_size"):
        parts.append("window " + "x".join(str(p) for p in card["patch_size"]))
    if card.get("threshold") is not None:
        parts.append(f"threshold {card['threshold']:g}")
    return "; ".join(p for p in parts if p)


def card_licence(card: Mapping[str, Any]) -> tuple[str | None, bool]:
    """The card's licence (``license``, None if absent) and whether it asks to be accepted."""
    licence = card.get("license")
    text = licence.strip() if isinstance(licence, str) and licence.strip() else None
    return text, card.get("license_requires_acceptance") is True


class ModelLibrary:
    """The library folder ``root`` (default :func:`default_library_dir`) and its index."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_library_dir()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"model library {self.root} is not a folder")

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    # -- reading ---------------------------------------------------------------------------------

    def entries(self) -> list[LibraryEntry]:
        """Every entry, sorted by name (an empty list for a library not created yet)."""
        return sorted(self._read_index().values(), key=lambda e: e.name)

    def get(self, name: str) -> LibraryEntry:
        """The entry called ``name``; :class:`InputError` listing the names there are."""
        index = self._read_index()
        if name not in index:
            names = ", ".join(sorted(index)) or "it is empty"
            raise InputError(f"no model {name!r} in the model library {self.root} ({names}); "
                             "see `iwseg models list`")
        return index[name]

    def path_of(self, entry: LibraryEntry) -> Path:
        return self.root / entry.file

    def card(self, entry: LibraryEntry) -> dict[str, Any]:
        """The model card of an entry's file (the header only; never unpickled)."""
        return read_metadata(self.path_of(entry))

    def resolve(self, name: str) -> Path:
        """The checkpoint of the model ``name``, ready to use: it must be in the library and its
        licence accepted where it needs to be (:class:`InputError` otherwise)."""
        entry = self.get(name)
        if entry.needs_acceptance:
            raise InputError(f"{entry.licence_notice()}; it must be accepted before first use: "
                             f"`iwseg models accept {name}` (see docs/models.md)")
        path = self.path_of(entry)
        if not path.is_file():
            raise InputError(f"model {name!r}: its file {path} is missing; `iwseg models verify` checks the library")
        return path

    def verify(self, name: str | None = None) -> list[VerifyResult]:
        """Check each entry (or ``name``): its file exists, has the recorded sha256, and its card reads."""
        results = []
        for entry in [self.get(name)] if name else self.entries():
            path = self.path_of(entry)
            if not path.is_file():
                results.append(VerifyResult(entry.name, False, f"file missing: {path}"))
                continue
            got = file_sha256(path)
            if got != entry.sha256:
                results.append(VerifyResult(entry.name, False, f"{path} was modified: sha256 {got}, "
                                            f"the library recorded {entry.sha256}"))
                continue
            try:
                self.card(entry)
            except CheckpointError as exc:
                results.append(VerifyResult(entry.name, False, str(exc)))
                continue
            results.append(VerifyResult(entry.name, True, f"sha256 {got} matches"))
        return results

    # -- changing --------------------------------------------------------------------------------

    def add(self, file: str | os.PathLike, name: str | None = None, *, accept_license: bool = False,
            replace: bool = False) -> Stored:
        """Copy the checkpoint ``file`` into the library as ``name`` (default: its file name's stem).

        The card must read (a safetensors checkpoint with a valid card; pickles are refused). A
        card asking for its licence to be accepted needs ``accept_license`` (refused otherwise,
        nothing copied). The same file (by sha256) added again under its name changes nothing but
        the acceptance (``Stored.action`` ``unchanged``), so a script may run it again. Another
        file under a name already taken is refused with :class:`InputError` naming the entry there
        (its sha256 and when it was added), unless ``replace``: a model someone configured by name
        is never swapped without being asked to.
        """
        file = Path(file)
        card = read_metadata(file)
        name = check_name(name if name is not None else file.stem, "--name" if name is not None else "model name")
        licence, requires = card_licence(card)
        entry = LibraryEntry(name=name, file=f"{name}.safetensors", sha256=file_sha256(file),
                             license=licence or NOT_STATED, license_requires_acceptance=requires,
                             source=str(file.resolve()), description=card_summary(card), added=_now())
        self._check_accepted(entry, accept_license)
        return self._store(entry, lambda target: shutil.copyfile(file, target), accept_license, replace)

    def fetch(self, item: ManifestEntry, *, accept_license: bool = False, progress: Progress | None = None,
              cancelled: Callable[[], bool] | None = None, replace: bool = False) -> Stored:
        """Download a manifest entry into the library (resuming an interrupted download), check its
        sha256 and its card, and record it.

        A manifest licence that needs accepting is refused before any byte is fetched unless
        ``accept_license``. When only the downloaded card asks for acceptance, the model is kept
        in the library, not accepted, and :class:`InputError` says how to accept it (``iwseg
        predict`` refuses it until then). Fetching a model already there with the same sha256
        downloads nothing and keeps its entry (``unchanged``). A name already taken by another
        file is refused before any byte is fetched, as :meth:`add` refuses it, unless ``replace``:
        then the new file is downloaded and checked first and replaces the old one in one rename.
        """
        entry = LibraryEntry(name=check_name(item.name), file=f"{item.name}.safetensors", sha256=item.sha256,
                             license=item.license, license_requires_acceptance=item.license_requires_acceptance,
                             source=item.url, description=item.description, modality=item.modality,
                             organ=item.organ, added=_now())
        self._check_accepted(entry, accept_license, item.license_url)
        existing = self._read_index().get(entry.name)
        if existing is not None and existing.sha256 != entry.sha256 and not replace:
            raise self._name_taken(existing, entry, "fetch")
        if existing is not None and existing.sha256 == entry.sha256 and self.path_of(existing).is_file():
            stored = self._store(entry, None, accept_license, command="fetch")  # nothing downloaded
        else:
            stored = self._download(item, entry, accept_license, replace, progress, cancelled)
        if stored.entry.needs_acceptance:
            raise InputError(f"{stored.entry.licence_notice()} (its model card says so); it is in the library but "
                             f"must be accepted before first use: `iwseg models accept {stored.entry.name}`")
        return stored

    def _download(self, item: ManifestEntry, entry: LibraryEntry, accept_license: bool, replace_existing: bool,
                  progress: Progress | None, cancelled: Callable[[], bool] | None) -> Stored:
        """Download ``item`` beside the library, check its card, and store it as ``entry``."""
        self.root.mkdir(parents=True, exist_ok=True)
        downloaded = self.root / f".{entry.file}.download"
        download(item.url, downloaded, item.sha256, size=item.size, progress=progress, cancelled=cancelled)
        try:
            try:
                card = read_metadata(downloaded)
            except CheckpointError as exc:
                raise CheckpointError(f"{item.url} is not a usable checkpoint (the download was deleted): {exc}") \
                    from None
            entry = self._with_card_licence(entry, card)
            stored = self._store(entry, lambda tmp: os.replace(downloaded, tmp), accept_license, replace_existing, "fetch")
        finally:
            if downloaded.exists():
                downloaded.unlink()
        return stored

    def accept(self, name: str) -> LibraryEntry:
        """Record that the licence of ``name`` was accepted (now, unless it already was)."""
        with self._locked() as index:
            entry = self._entry_of(index, name)
            index[name] = replace(entry, accepted=entry.accepted or _now())
            self._write_index(index)
            return index[name]

    def remove(self, name: str) -> LibraryEntry:
        """Delete ``name``'s file and its entry."""
        with self._locked() as index:
            entry = self._entry_of(index, name)
            del index[name]
            self._write_index(index)
            path = self.path_of(entry)
            if path.is_file():
                path.unlink()
            return entry

    def partial_download(self, name: str) -> Path:
        """Where an interrupted download of ``name`` is kept until the next fetch resumes it."""
        return partial_path(self.root / f".{check_name(name)}.safetensors.download")

    # -- the index -------------------------------------------------------------------------------

    def _check_accepted(self, entry: LibraryEntry, accept_license: bool, url: str | None = None) -> None:
        """Refuse a licence that needs accepting, unless accepted now or before (same file)."""
        if not entry.license_requires_acceptance or accept_license:
            return
        existing = self._read_index().get(entry.name)
        if existing is not None and existing.sha256 == entry.sha256 and existing.accepted:
            return
        raise InputError(f"{entry.licence_notice()}{f' ({url})' if url else ''}; it must be accepted before "
                         "first use: read it, then give --accept-license")

    def _entry_of(self, index: dict[str, LibraryEntry], name: str) -> LibraryEntry:
        if name not in index:
            self.get(name)  # raises, listing the names
        return index[name]

    @staticmethod
    def _with_card_licence(entry: LibraryEntry, card: Mapping[str, Any]) -> LibraryEntry:
        """A fetched entry with its card's licence: the card may ask for acceptance the manifest did
        not, and names the licence when the manifest does not."""
        licence, requires = card_licence(card)
        return replace(entry, license_requires_acceptance=entry.license_requires_acceptance or requires,
                       license=entry.license if entry.license != NOT_STATED else licence or NOT_STATED)

    def _name_taken(self, existing: LibraryEntry, entry: LibraryEntry, command: str) -> InputError:
        """The refusal of another file under a name already taken: which entry is there, and the way out."""
        when = f"added {existing.added}" if existing.added else "added at a time not recorded"
        other = "add it under another --name" if command == "add" else f"`iwseg models remove {entry.name}` first"
        return InputError(f"model {entry.name!r} is already in the library {self.root}: sha256 "
                          f"{existing.sha256[:12]}..., {when}, from {existing.source or 'a source not recorded'}; "
                          f"this file's sha256 is {entry.sha256[:12]}..., another file. Nothing was changed: give "
                          f"--replace to `iwseg models {command}` to replace it, or {other}")

    def _store(self, entry: LibraryEntry, write: Callable[[Path], Any] | None, accept_license: bool,
               replace_existing: bool = False, command: str = "add") -> Stored:
        """Put ``entry``'s file in place (``write(path)`` fills a temporary path beside it, renamed
        when whole, over the old file when one is replaced) and record the entry, under the
        folder's lock, so the check for a name already taken and the write are one step."""
        with self._locked() as index:
            existing = index.get(entry.name)
            same = existing is not None and existing.sha256 == entry.sha256
            if existing is not None and not same and not replace_existing:
                raise self._name_taken(existing, entry, command)
            if same and self.path_of(existing).is_file():
                action = "unchanged"  # the entry as it was (its source, card, licence), not the new one's
                entry = replace(existing, license_requires_acceptance=existing.license_requires_acceptance
                                or entry.license_requires_acceptance)
            else:
                if write is None:
                    raise InputError(f"model {entry.name!r}: its file {self.path_of(entry)} went missing; try again")
                with atomic_output(self.path_of(entry)) as tmp:
                    write(tmp)
                    if file_sha256(tmp) != entry.sha256:  # it changed while it was copied
                        raise InputError(f"{entry.source} changed while it was copied into the library; try again")
                action = "added" if existing is None else "restored" if same else "replaced"
                if same:
                    entry = replace(entry, added=existing.added, accepted=existing.accepted)
                elif existing is not None and existing.file != entry.file and self.path_of(existing).is_file():
                    self.path_of(existing).unlink()  # an index written elsewhere named another file
            accepted = entry.accepted if same else None  # a replacing file's licence is accepted anew
            if accept_license and entry.license_requires_acceptance:
                accepted = accepted or _now()
            index[entry.name] = replace(entry, accepted=accepted)
            self._write_index(index)
            return Stored(index[entry.name], action, existing if action == "replaced" else None)

    def _read_index(self) -> dict[str, LibraryEntry]:
        path = self.index_path
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"model library index {path} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or not isinstance(data.get("models"), dict):
            raise InputError(f"model library index {path} is not an {INDEX_FORMAT} index")
        index = {}
        for name, raw in data["models"].items():
            try:
                entry = LibraryEntry(**raw)
            except TypeError as exc:
                raise InputError(f"model library index {path}: entry {name!r} is malformed ({exc})") from None
            if entry.name != name or Path(entry.file).name != entry.file:
                raise InputError(f"model library index {path}: entry {name!r} is malformed (its name or file)")
            index[name] = entry
        return index

    def _write_index(self, index: Mapping[str, LibraryEntry]) -> None:
        data = {"format": INDEX_FORMAT, "models": {n: asdict(e) for n, e in sorted(index.items())}}
        with atomic_output(self.index_path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, LibraryEntry]]:
        """The index, read under the folder's lock, for a read-modify-write."""
        self.root.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.root):
            yield self._read_index()


def looks_like_path(value: str | os.PathLike) -> bool:
    """Whether a ``--model`` value is a file path rather than a library name: it exists, has a
    folder part, or is not a valid model name (e.g. ends in ``.safetensors``)."""
    text = os.fspath(value)
    if Path(text).exists() or os.sep in text or (os.altsep and os.altsep in text):
        return True
    try:
        check_name(text)
    except InputError:
        return True
    return False


def resolve_model(value: str | os.PathLike, library: str | os.PathLike | None = None) -> Path:
    """A ``--model`` value as a checkpoint path: a path stays as it is; a library model's name
    becomes its file, once its licence is accepted (:meth:`ModelLibrary.resolve`). The one place
    that turns a name into a file, for ``iwseg predict`` and any other front end."""
    if looks_like_path(value):
        return Path(value)
    lib = ModelLibrary(library)
    name = os.fspath(value)
    if name not in {e.name for e in lib.entries()}:
        raise InputError(f"--model {name}: no such file, and no model {name!r} in the model library {lib.root} "
                         "(`iwseg models list`; IWSEG_MODELS names another library folder)")
    return lib.resolve(name)
