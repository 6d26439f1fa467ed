"""What the user chose for one prediction, checked, and the ``iwseg predict`` options it becomes.

:class:`PredictParameters` is what a :class:`~IWSegmentationLib.backend.job.JobFactory` is given:
the local job turns it into a command line (:meth:`PredictParameters.arguments`), the remote job
into a server request. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.devices import DEVICES
from ..core.errors import InputError


@dataclass
class PredictParameters:
    """What the user chose for one prediction; :meth:`validate` names the bad parameter."""

    checkpoint: Path
    device: str = "auto"
    overlap: float | None = None  # None: the checkpoint's own (or the backend's default)
    threshold: float | None = None  # None: the checkpoint's own threshold
    probabilities: bool = True
    lesions: bool = True
    logits: bool = False  # the logit map (--logits): what the module loads, for maximum-logit confidences

    def validate(self, *, local: bool = True) -> None:
        """``local=False``: the checkpoint names a model on a server, so it need not exist here."""
        if not self.checkpoint:
            raise InputError("no checkpoint selected")
        if local and not Path(self.checkpoint).is_file():
            raise InputError(f"checkpoint not found: {self.checkpoint}")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")

    def arguments(self, input_path: Path, outputs: dict[str, Path], organ_mask: Path | None = None) -> list[str]:
        """The ``predict`` sub-command and its options (see ``iwseg predict --help``)."""
        # absolute: the backend runs in its working folder, not in the caller's current folder
        args = [
            "predict", "--model", str(Path(self.checkpoint).resolve()), "--input", str(input_path),
            "--output", str(outputs["mask"]), "--device", self.device, "--progress-format", "jsonl",
            "--overwrite",  # the job's own fresh folder: a file there is this job's, never the user's
        ]
        if "probabilities" in outputs:
            args += ["--probabilities", str(outputs["probabilities"])]
        if "logits" in outputs:
            args += ["--logits", str(outputs["logits"])]
        if "lesions" in outputs:
            args += ["--lesions", str(outputs["lesions"])]
        if organ_mask is not None:
            args += ["--organ-mask", str(organ_mask)]
        if self.overlap is not None:
            args += ["--overlap", repr(float(self.overlap))]
        if self.threshold is not None:
            args += ["--threshold", repr(float(self.threshold))]
        return args
