"""The ``iwseg`` command line: one sub-command per job, its flags in :mod:`IWSegmentationLib.cli.flags` and
what it does in :mod:`IWSegmentationLib.cli.commands`.

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
import importlib.util
import os
import signal
import sys
import threading
from typing import Iterator, Sequence

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

#: sub-command -> the engine folder it needs beyond those every installation has (None: none).
#: Each command is two modules of the same name: ``cli.flags.NAME`` (``register(subparsers)``: its
#: flags) and ``cli.commands.NAME`` (``run(args)``: what it does), imported once the flags are read.
#: The 3D Slicer extension ships no ``training/`` or ``data/`` (IWSegmentation/CMakeLists.txt), so its
#: ``iwseg`` has no ``train`` or ``synth``.
COMMANDS: dict[str, str | None] = {
    "evaluate": None,
    "predict": None,
    "train": "training",
    "synth": "data",
    "inspect": None,
    "serve": None,
    "models": None,
}

#: OSError numbers that mean the system could not store a file (exit code 4, not a traceback).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def command_installed(name: str) -> bool:
    """Whether the engine folder command ``name`` needs is installed (found without importing it)."""
    folder = COMMANDS[name]
    return folder is None or importlib.util.find_spec(f"{__package__.split('.')[0]}.{folder}") is not None


def requested_commands(argv: Sequence[str]) -> tuple[str, ...]:
    """The sub-commands whose flags ``iwseg ARGV`` needs: only the one it names, when its first
    argument is a command, else all of them (``iwseg --help`` lists every command).

    Why: ``iwseg predict`` (the process the Slicer module starts for every run) then reads only its
    own flags; the other commands' flags import their names and ranges (evaluation, data).
    """
    if argv and argv[0] in COMMANDS:
        return (argv[0],)
    return tuple(COMMANDS)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``iwseg`` parser with the sub-commands ``commands`` (default: all of them); a command
    whose engine folder is not installed (the Slicer extension ships no trainer) is left out."""
    parser = argparse.ArgumentParser(
        prog="iwseg",
        description="Inverse-weighted 3D lesion segmentation: train, predict, evaluate.",
        epilog="Exit codes (every command): 0 success, 1 internal error, 2 bad input, 3 cancelled, "
               "4 output not writable (disk full, read-only), 141 stdout closed by its reader.",
    )
    parser.add_argument("--version", action="version", version=f"iwseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS if commands is None else commands:
        if command_installed(name):
            importlib.import_module(f".flags.{name}", __package__).register(sub)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(requested_commands(argv))
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
        command = importlib.import_module(f".commands.{args.command}", __package__)
        return int(command.run(args) or 0)
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
