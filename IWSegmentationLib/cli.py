"""The ``iwseg`` command line: one sub-command per job, each in :mod:`IWSegmentationLib.commands`.

Errors a user can cause are printed as one clear line (no traceback) with exit code 2;
a cancel (SIGINT/SIGTERM) exits with 3. ``IWSEG_DEBUG=1`` shows full tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_CANCELLED, Cancelled, IWSegError

#: sub-command name -> module in IWSegmentationLib.commands; each module defines
#: ``register(subparsers)`` that adds its parser and sets ``func=run``.
COMMANDS = {
    "evaluate": "evaluate",
    "predict": "predict",
    "train": "train",
    "synth": "synth",
    "inspect": "inspect",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwseg",
        description="Inverse-weighted 3D lesion segmentation: train, predict, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"iwseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f".commands.{module_name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"commands.{module_name}"):
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled as exc:
        print(f"iwseg {args.command}: cancelled{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print(f"iwseg {args.command}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except IWSegError as exc:
        if os.environ.get("IWSEG_DEBUG"):
            raise
        print(f"iwseg {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if os.environ.get("IWSEG_DEBUG"):
            raise
        print(f"iwseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
