"""``iwseg models``: the local model library (list, add, verify, remove, fetch, accept).

The argparse edge of :mod:`IWSegmentationLib.models`. ``--library DIR`` picks the folder (default
``$IWSEG_MODELS``, else the per-user data folder: :func:`~IWSegmentationLib.models.library.default_library_dir`).
``fetch`` reads a manifest (``--manifest FILE_OR_URL``, else ``$IWSEG_MODEL_MANIFEST``, else the
library's own ``manifest.json``) and reports its download like ``iwseg predict`` reports
inference: a bar on stderr, or ``--progress-format jsonl`` lines (stage ``download``) on stdout.
Exit codes: 0 success; 2 bad input (an unknown name, a bad manifest, a licence not accepted, a
download that failed or did not match its sha256, ``verify`` finding a missing or modified
file); 3 cancelled (the partial download is kept and resumed next time); 4 the library cannot
be written. See docs/models.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from ...core.errors import EXIT_BAD_INPUT, InputError
from ...core.progress import CancelState, EtaEstimator, ProgressReporter
from ...models.download import RateLimit
from ...models.library import ModelLibrary, Stored, card_summary
from ...models.manifest import find_entry, read_manifest
from ..flags.models import MANIFEST_ENV


def run(args: argparse.Namespace) -> int:
    library = ModelLibrary(args.library)
    return {"list": _list, "add": _add, "verify": _verify, "remove": _remove, "fetch": _fetch,
            "accept": _accept}[args.models_command](library, args)


def _list(library: ModelLibrary, args: argparse.Namespace) -> int:
    entries = library.entries()
    if not entries and not args.json:
        print(f"no models in {library.root} (add one with `iwseg models add FILE` or `iwseg models fetch NAME`)")
    for entry in entries:
        try:
            summary = card_summary(library.card(entry))
        except InputError as exc:
            summary = f"card unreadable: {exc}"
        if args.json:
            print(json.dumps({**asdict(entry), "path": str(library.path_of(entry)), "card": summary,
                              "needs_acceptance": entry.needs_acceptance}))
            continue
        accepted = " (not accepted: `iwseg models accept " + entry.name + "`)" if entry.needs_acceptance else ""
        print(f"{entry.name}\n  licence: {entry.license}{accepted}\n  sha256:  {entry.sha256}\n"
              f"  file:    {library.path_of(entry)}\n  card:    {summary}")
    return 0


def _add(library: ModelLibrary, args: argparse.Namespace) -> int:
    stored = library.add(args.file, args.name, accept_license=args.accept_license, replace=args.replace)
    print(stored_message(library, stored))
    return 0


def stored_message(library: ModelLibrary, stored: Stored) -> str:
    """What ``add`` or ``fetch`` did, in one line: added, unchanged (the same file was there),
    restored (its missing copy) or replaced (with the old file's sha256 and when it was added)."""
    entry = stored.entry
    where = f"{entry.name} ({library.path_of(entry)})"
    licence = f"licence: {entry.license}" + (", accepted" if entry.accepted else "")
    if stored.action == "unchanged":
        return (f"{where} is already in the library with this file (sha256 {entry.sha256[:12]}...): not copied "
                f"again, its entry kept; {licence}")
    if stored.action == "replaced" and stored.previous is not None:
        old = stored.previous
        return (f"replaced {where}: sha256 {old.sha256[:12]}... (added {old.added or 'at a time not recorded'}) "
                f"by {entry.sha256[:12]}...; {licence}")
    return f"{stored.action} {where}, {licence}"


def _verify(library: ModelLibrary, args: argparse.Namespace) -> int:
    results = library.verify(args.name)
    for result in results:
        print(f"{result.name}: {'ok' if result.ok else 'FAILED'}: {result.message}")
    if not results:
        print(f"no models in {library.root}")
    return 0 if all(r.ok for r in results) else EXIT_BAD_INPUT


def _remove(library: ModelLibrary, args: argparse.Namespace) -> int:
    entry = library.remove(args.name)
    print(f"removed {entry.name} ({library.path_of(entry)})")
    return 0


def _accept(library: ModelLibrary, args: argparse.Namespace) -> int:
    entry = library.get(args.name)
    print(entry.licence_notice())
    entry = library.accept(args.name)
    print(f"accepted {entry.accepted}")
    return 0


def _fetch(library: ModelLibrary, args: argparse.Namespace) -> int:
    source = args.manifest or os.environ.get(MANIFEST_ENV)
    if not source:
        source = str(library.root / "manifest.json")
        if not os.path.isfile(source):
            raise InputError(f"no manifest: give --manifest FILE_OR_URL, set {MANIFEST_ENV}, or put a manifest.json "
                             f"in the library {library.root} (see docs/models.md)")
    item = find_entry(read_manifest(source), args.name, source)
    reporter = ProgressReporter(args.progress_format)
    if item.license_requires_acceptance or args.progress_format == "text":
        print(f"{args.name}: licence {item.license}" + (f" ({item.license_url})" if item.license_url else ""),
              file=sys.stderr)
    eta, start = EtaEstimator(), None

    def progress(done: int, total: int | None) -> None:
        nonlocal start
        if start is None:
            start = done  # the bytes kept from an earlier, interrupted try
        reporter.emit("download", case=None, model=item.name, done=done, total=total,
                      eta_s=eta.eta(done - start, total - start) if total else None)

    state = CancelState()
    with state.installed():
        stored = library.fetch(item, accept_license=args.accept_license, progress=RateLimit(progress), cancelled=state,
                               replace=args.replace)
    entry = stored.entry
    reporter.emit("done", model=entry.name, path=str(library.path_of(entry)), sha256=entry.sha256,
                  license=entry.license, message=f"{stored_message(library, stored)} (sha256 checked)")
    return 0
