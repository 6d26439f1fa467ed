"""Exceptions and the exit codes the ``iwseg`` command line maps them to.

Every error a user can cause (a bad file, a bad parameter) is an :class:`InputError`
whose message names the file or parameter and the problem. The command line turns it
into exit code 2 with the message on stderr, never a traceback.

The exit-code contract, the same for every ``iwseg`` command (docs/architecture.md):

====  =====================================================================================
0     success
1     internal error (a bug): a traceback; also out of memory (one line)
2     bad input: a file, folder, argument or checkpoint is missing, unreadable, malformed,
      or an output path would overwrite an input (one line naming it)
3     cancelled by SIGINT or SIGTERM; no partial output is left
4     an output could not be written (disk full, read-only file system, no permission);
      an existing file at that path is left as it was (one line naming it)
141   stdout was closed by its reader (``iwseg inspect | head``): stop quietly, as a process
      killed by SIGPIPE would report
====  =====================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXIT_OUTPUT = 4
#: 128 + SIGPIPE, what a shell reports for a process killed by a closed pipe.
EXIT_BROKEN_PIPE = 141


class IWSegError(Exception):
    """Base class of every error raised on purpose by IWSegmentationLib."""

    exit_code = EXIT_FAILURE


class InputError(IWSegError, ValueError):
    """Bad input: a file, array or parameter a user gave. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class GeometryMismatchError(InputError):
    """Two images that must share one voxel grid do not."""


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, unsafe or of an incompatible format."""


class OutputError(IWSegError, OSError):
    """An output file could not be written (disk full, read-only, no permission). Exit code 4.

    Also an :class:`OSError`, which it replaces (with a message naming the file), so code that
    guards a write with ``except OSError`` keeps working."""

    exit_code = EXIT_OUTPUT


class Cancelled(IWSegError):
    """The user cancelled a long-running job. Exit code 3."""

    exit_code = EXIT_CANCELLED
