"""Every parameter of one prediction, checked once: :class:`PredictOptions`.

The command line (``iwseg predict``), the server (a job's request) and the Slicer module (its
parameter node) all build one :class:`PredictOptions`; a bad value is refused here, with one
message naming the parameter by its ``iwseg predict`` flag, whichever front end it came from.
:meth:`PredictOptions.to_arguments` is the backend's command line (the local job and the
server's job run ``iwseg predict`` as a child process); :meth:`PredictOptions.from_request`
reads a server request. No torch, no argparse: the module's GUI process and the server's
standard-library client import it.

The ranges, decided once:

* ``--threshold`` in [0, 1), as :func:`~IWSegmentationLib.core.confidence.probability_to_logit`
  takes it (0 keeps every voxel a window covered: the mask of "probability > 0");
* ``--overlap`` in [0, 0.9]: at 0.9 a window already moves by a tenth of its size (1000 times the
  windows of overlap 0 in 3D); more only multiplies the work (0.999 would be 10^9 times), so a
  client cannot ask a shared server for days of work with one number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.devices import DEVICES, ENGINES, PRECISIONS
from ..core.errors import InputError
from ..core.lesion_sizes import CONNECTIVITIES, SIZE_PRESETS, parse_min_lesion_size
from ..core.operating_points import parse_operating_point

#: The closed range of ``--overlap`` (see the module docstring).
OVERLAP_RANGE = (0.0, 0.9)
#: ``--connectivity`` when none is given.
DEFAULT_CONNECTIVITY = 26
#: Options a server chooses itself (its ``--models`` folder, its ``--device``, its CPUs): a
#: request naming them is refused.
SERVER_CHOICES = ("models", "device", "threads")


def flag(name: str) -> str:
    """The ``iwseg predict`` flag of a :class:`PredictOptions` field (``batch_size`` -> ``--batch-size``)."""
    return "--model" if name == "models" else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class PredictOptions:
    """What one prediction is asked to do; built once, checked on construction (:class:`InputError`).

    The paths of the input and of the outputs are not options: the predictor (or the job) is
    given them. Which outputs are written besides the mask is (``probabilities``, ``logits``,
    ``lesions``); the defaults are the server's (mask, probabilities and lesion table).
    """

    #: checkpoint file(s); several are an ensemble. On a server: the model's name.
    models: tuple[Path, ...] = ()
    device: str = "auto"
    #: None: the checkpoint's own (else 0.25)
    overlap: float | None = None
    #: None: the checkpoint's own probability threshold
    threshold: float | None = None
    #: windows per forward pass; None: 1 on the CPU, 4 on a GPU
    batch_size: int | None = None
    precision: str = "auto"
    engine: str = "auto"
    #: test-time mirroring (8 flips)
    tta: bool = False
    #: run every window (no background skipping)
    no_skip: bool = False
    #: segment an input that looks like a label map
    force: bool = False
    #: CPU threads for PyTorch; None: PyTorch's choice
    threads: int | None = None
    probabilities: bool = True
    #: the probability map as uint8 round(255 p)
    probabilities_uint8: bool = False
    logits: bool = False
    lesions: bool = True
    size_preset: str | None = None
    size_thresholds: tuple[float, float] | None = None
    connectivity: int = DEFAULT_CONNECTIVITY
    #: e.g. "10vox", "5mm3", "none"; None: the checkpoint's own
    min_lesion_size: str | None = None
    #: segment without an organ mask a model that needs one (not as it was trained; loudly warned)
    allow_unmasked: bool = False
    #: the card's operating point ("1fp", "0.5fp", "1/8fp"): its logit threshold instead of
    #: ``threshold`` (exclusive with it); None: the threshold
    operating_point: str | None = None
    #: run the network on the input's own grid, not resampled to the model's voxel spacing
    keep_spacing: bool = False
    #: run a CT model on an input that looks like MR (or the reverse) instead of refusing it
    allow_modality_mismatch: bool = False
    #: with --tta or an ensemble, skip the per-lesion doubt (core.doubt) and keep no member maps
    no_doubt: bool = False

    def __post_init__(self) -> None:
        # normalised (so equal options compare equal whatever sequence type they came in)
        object.__setattr__(self, "models", tuple(Path(m) for m in self.models))
        if self.size_thresholds is not None:
            object.__setattr__(self, "size_thresholds", tuple(self.size_thresholds))
        self._check()

    def _check(self) -> None:
        """Every range check of a prediction parameter; the message names its flag."""
        for name, value, allowed in (("device", self.device, DEVICES), ("precision", self.precision, PRECISIONS),
                                     ("engine", self.engine, ENGINES),
                                     ("size_preset", self.size_preset, tuple(sorted(SIZE_PRESETS))),
                                     ("connectivity", self.connectivity, CONNECTIVITIES)):
            if value is None and name == "size_preset":
                continue
            if value not in allowed:
                raise InputError(f"{flag(name)} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        for field_ in fields(self):  # a switch is a bool: a server's undeclared query value "false" is a string
            if field_.type in ("bool", bool) and not isinstance(getattr(self, field_.name), bool):
                raise InputError(f"{flag(field_.name)} is a switch (true or false), got {getattr(self, field_.name)!r}")
        low, high = OVERLAP_RANGE
        if self.overlap is not None and not low <= _number(self.overlap, "overlap") <= high:
            raise InputError(f"--overlap must be in [{low:g}, {high:g}], got {self.overlap}")
        if self.threshold is not None and not 0.0 <= _number(self.threshold, "threshold") < 1.0:
            raise InputError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.batch_size is not None and not _integer(self.batch_size, "batch_size") >= 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads is not None:
            limit = os.cpu_count() or 1
            if not 1 <= _integer(self.threads, "threads") <= limit:
                raise InputError(f"--threads must be between 1 and {limit} (the CPUs of this machine), "
                                 f"got {self.threads}")
        if self.size_thresholds is not None:
            if self.size_preset is not None:
                raise InputError("--size-preset and --size-thresholds cannot both be given")
            if len(self.size_thresholds) != 2:
                raise InputError(f"--size-thresholds needs two values (S M) in mm, got {list(self.size_thresholds)}")
            small, large = (_number(v, "size_thresholds") for v in self.size_thresholds)
            if not 0 < small < large:
                raise InputError(f"--size-thresholds needs 0 < S < M, got {small:g} {large:g}")
        if self.min_lesion_size is not None and self.min_lesion_size.strip().lower() != "none":
            try:
                parse_min_lesion_size(self.min_lesion_size)
            except InputError as exc:
                raise InputError(f"--min-lesion-size: {exc}") from None
        if self.operating_point is not None:
            if self.threshold is not None:
                raise InputError("--operating-point and --threshold cannot both be given")
            parse_operating_point(self.operating_point)

    @property
    def checkpoint(self) -> Path:
        """The (first) checkpoint; :class:`InputError` when none was selected."""
        if not self.models:
            raise InputError("no checkpoint selected")
        return self.models[0]

    # -- the command line ----------------------------------------------------------------------

    def to_arguments(self, input_path: str | os.PathLike, outputs: Mapping[str, str | os.PathLike],
                     organ_mask: str | os.PathLike | None = None) -> list[str]:
        """The backend's ``iwseg predict`` command line (after the interpreter's prefix).

        ``outputs`` maps ``mask`` and the wanted outputs (``probabilities``, ``logits``,
        ``lesions``) to their paths. The checkpoints are made absolute (the backend runs in its
        own working folder); an option at its default is left out, so the checkpoint's own
        overlap and threshold apply. ``--overwrite``: the job's folder is its own, fresh.
        """
        args = ["predict", "--model", *(str(Path(m).resolve()) for m in self.models), "--input", str(input_path),
                "--output", str(outputs["mask"]), "--device", self.device, "--progress-format", "jsonl",
                "--overwrite"]
        for name in ("probabilities", "logits", "lesions"):
            if name in outputs:
                args += [flag(name), str(outputs[name])]
        if organ_mask is not None:
            args += ["--organ-mask", str(organ_mask)]
        for name in ("overlap", "threshold"):
            value = getattr(self, name)
            if value is not None:
                args += [flag(name), repr(float(value))]
        for name in ("batch_size", "threads", "size_preset", "min_lesion_size", "operating_point"):
            value = getattr(self, name)
            if value is not None:
                args += [flag(name), str(value)]
        for name in ("precision", "engine"):
            if getattr(self, name) != "auto":
                args += [flag(name), getattr(self, name)]
        if self.connectivity != DEFAULT_CONNECTIVITY:
            args += ["--connectivity", str(self.connectivity)]
        if self.size_thresholds is not None:
            args += ["--size-thresholds", *(repr(float(v)) for v in self.size_thresholds)]
        for name in ("probabilities_uint8", "no_skip", "tta", "force", "allow_unmasked"):
            if getattr(self, name):
                args.append(flag(name))
        for name in ("keep_spacing", "allow_modality_mismatch"):  # the model's spacing and modality
            if getattr(self, name):
                args.append(flag(name))
        if self.no_doubt:
            args.append(flag("no_doubt"))
        return args

    # -- a server's request --------------------------------------------------------------------

    @classmethod
    def from_request(cls, request: Mapping[str, Any], **server_choices: Any) -> PredictOptions:
        """The options of a server request (its query parameters by field name); None values
        are the defaults. A key that is not an option, or one the server chooses itself
        (:data:`SERVER_CHOICES`, given here as ``server_choices``), is refused."""
        known = options_fields()
        unknown = sorted(k for k in request if k not in known)
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)}; the options are "
                             f"{', '.join(k for k in known if k not in SERVER_CHOICES)}")
        chosen = sorted(k for k in request if k in SERVER_CHOICES and request[k] is not None)
        if chosen:
            raise InputError(f"{', '.join(flag(k) for k in chosen)}: the server chooses this, not the request")
        return cls(**{k: v for k, v in request.items() if v is not None}, **server_choices)

    def to_request(self) -> dict[str, Any]:
        """What a client sends for these options (the inverse of :meth:`from_request`): every
        option but the server's own choices, None where the default applies."""
        return {name: _plain(getattr(self, name)) for name in options_fields() if name not in SERVER_CHOICES}

    def with_outputs(self, *, probabilities: bool, logits: bool, lesions: bool) -> PredictOptions:
        """The same options asking for these outputs (a front end loads what it needs)."""
        return replace(self, probabilities=probabilities, logits=logits, lesions=lesions)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{flag(name)} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{flag(name)} must be a whole number, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def options_fields() -> Sequence[str]:
    """The names of the options (the fields a caller may set)."""
    return tuple(f.name for f in fields(PredictOptions) if f.init)
