"""Exceptions and the exit codes the ``iwseg`` command line maps them to.

Every error a user can cause (a bad file, a bad parameter) is an :class:`InputError`
whose message names the file or parameter and the problem. The command line turns it
into exit code 2 with the message on stderr, never a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


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


class Cancelled(IWSegError):
    """The user cancelled a long-running job. Exit code 3."""

    exit_code = EXIT_CANCELLED
