"""The ``iwseg`` command line: one sub-command per job, each in :mod:`IWSegmentationLib.cli.commands`.

Exit codes, the same for every command (defined in :mod:`IWSegmentationLib.core.errors`):

* 0 success;
* 1 internal error (a bug), with a traceback; out of memory, with one line;
* 2 bad input: a file, folder, argument or checkpoint that is missing, unreadable, malformed,
  or an output path that would overwrite an input; one line on stderr names it;
* 3 cancelled by SIGINT or SIGTERM; temporary outputs are removed;
* 4 an output could not be written (disk full, read-only file system, no permission); one
  line names it, and an existing file at that path is left as it was;
* 141 stdout was closed by its reader (``iwseg inspect | head``): the command stops quietly.

``IWSEG_DEBUG=1`` shows full tracebacks instead of the one-line messages.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
from typing import Iterator

from .. import __version__
from ..core.errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_CANCELLED,
    EXIT_FAILURE,
    EXIT_OUTPUT,
    Cancelled,
    IWSegError,
)

#: sub-command name -> module in IWSegmentationLib.cli.commands; each module defines
#: ``register(subparsers)`` that adds its parser and sets ``func=run``.
COMMANDS = {
    "evaluate": "evaluate",
    "predict": "predict",
    "train": "train",
    "synth": "synth",
    "inspect": "inspect",
    "serve": "serve",
    "models": "models",
}

#: OSError numbers that mean the system could not store a file (exit code 4, not a traceback).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def _not_installed(exc: ModuleNotFoundError, module_name: str) -> bool:
    """Whether a command is left out because it, or the engine folder it needs, is not installed:
    the 3D Slicer extension ships no ``training/`` or ``data/`` (see IWSegmentation/CMakeLists.txt),
    so its ``iwseg`` has no ``train`` or ``synth``."""
    name = exc.name or ""
    engine = __package__.split(".")[0]
    return name.endswith(f"commands.{module_name}") or name.startswith(f"{engine}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwseg",
        description="Inverse-weighted 3D lesion segmentation: train, predict, evaluate.",
        epilog="Exit codes (every command): 0 success, 1 internal error, 2 bad input, 3 cancelled, "
               "4 output not writable (disk full, read-only), 141 stdout closed by its reader.",
    )
    parser.add_argument("--version", action="version", version=f"iwseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f".commands.{module_name}", __package__)
        except ModuleNotFoundError as exc:
            if _not_installed(exc, module_name):
                continue
            raise
        module.register(sub)
    return parser


def _raise_cancelled(signum, _frame) -> None:
    raise Cancelled(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def _sigterm_cancels() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (temporary outputs removed, exit code 3) in every command.

    Only where SIGTERM still has its default action and in the main thread; commands with
    their own handlers (predict, train) install them on top and restore this one.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_cancelled)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so that the flush at exit stays quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_cancels():
            return _run(args)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if os.environ.get("IWSEG_DEBUG"):
        raise
    print(f"iwseg {args.command}: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    """Run the sub-command; map every expected failure to its exit code and one line on stderr."""
    try:
        return int(args.func(args) or 0)
    except Cancelled as exc:
        print(f"iwseg {args.command}: cancelled{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print(f"iwseg {args.command}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except IWSegError as exc:
        return _fail(args, str(exc), exc.exit_code)
    except BrokenPipeError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        return _fail(args, str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        return _fail(args, f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}", EXIT_OUTPUT)
    except MemoryError:
        return _fail(args, "out of memory; use smaller inputs or sizes, or a machine with more memory", EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
