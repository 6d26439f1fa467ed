"""What ``iwseg train`` says before its first step: device, network size, cases and how long it
will take, with a warning when a CPU run would take more than an hour.

The time comes from a measurement, not a guess: one warm-up and the fastest of two timed training steps
(forward, loss surrogate, backward) of a *copy* of the network on a zero batch of the run's
batch size — so the run's weights, BatchNorm statistics and random streams are untouched. When
the patch has more than :data:`PROBE_MAX_VOXELS` voxels the probe patch is shrunk (each side a
multiple of the network stride) and the time scaled by the voxel ratio: a convolution's cost is
proportional to the voxels it covers, and this keeps the probe of the paper's 128³ net on a CPU
to a few seconds. Validation and data-loading waits are not included.

Why: the paper's recipe (Resources/Configs/example_train.yaml) is a GPU job; on two CPU cores it
takes days, and a new user should learn that in seconds, with the CPU-sized config
(Resources/Configs/cpu_train.yaml) named.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

#: Above this estimate on a CPU the report warns and points to the CPU config.
CPU_WARN_SECONDS = 3600.0
#: The probe patch is shrunk to at most this many voxels (64³) and its time scaled up.
PROBE_MAX_VOXELS = 64**3
CPU_CONFIG = "Resources/Configs/cpu_train.yaml"
#: Timed steps after the warm-up; the fastest counts (a busy machine makes single steps noisy).
TIMED_STEPS = 2


@dataclass
class StartReport:
    """The numbers of the start-up report (also for tests and benchmarks)."""

    device: str
    parameters: int
    train_cases: int
    val_cases: int
    steps: int
    seconds_per_step: float
    probe_patch: tuple[int, int, int]

    @property
    def estimated_seconds(self) -> float:
        return self.seconds_per_step * self.steps

    def lines(self) -> list[str]:
        """The report as printed: one summary line, and a warning line when a CPU run exceeds an hour."""
        out = [
            f"device {self.device} | {self.parameters:,} parameters | {self.train_cases} training / "
            f"{self.val_cases} validation case(s) | {self.steps} steps, about {self.seconds_per_step:.2f} s each "
            f"-> estimated {format_duration(self.estimated_seconds)} (training steps only, validation extra)"
        ]
        if self.device.startswith("cpu") and self.estimated_seconds > CPU_WARN_SECONDS:
            out.append(
                f"warning: this run would take about {format_duration(self.estimated_seconds)} on the CPU; "
                f"use a GPU, or a CPU-sized config such as {CPU_CONFIG} (a small network and patches)"
            )
        return out


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``, ``7.3 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def probe_patch(patch: Sequence[int], stride: int, max_voxels: int = PROBE_MAX_VOXELS) -> tuple[int, int, int]:
    """``patch`` shrunk by a common factor until it has at most ``max_voxels`` voxels, each side
    rounded down to a multiple of ``stride`` (at least one stride)."""
    patch = tuple(int(p) for p in patch)
    voxels = patch[0] * patch[1] * patch[2]
    if voxels <= max_voxels:
        return patch  # type: ignore[return-value]
    factor = (max_voxels / voxels) ** (1 / 3)
    return tuple(max(stride, int(p * factor) // stride * stride) for p in patch)  # type: ignore[return-value]


def time_training_step(model, patch: Sequence[int], batch_size: int, device, *, autocast_dtype=None,
                       stride: int = 1) -> tuple[float, tuple[int, int, int]]:
    """Seconds of one training step at ``patch`` (measured on a smaller probe patch and scaled,
    see the module docstring) and the probe patch used. ``model`` itself is not touched."""
    import torch  # lazy: `iwseg` starts without torch

    probe = probe_patch(patch, stride)
    net = copy.deepcopy(model).to(device).train()
    in_channels = int(getattr(model, "config", {}).get("in_channels", 1))
    x = torch.zeros((batch_size, in_channels, *probe), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = net(x).float().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: oneDNN / cuDNN pick their kernels here
    timings = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    seconds = min(timings)  # the least disturbed by other processes
    ratio = (patch[0] * patch[1] * patch[2]) / (probe[0] * probe[1] * probe[2])
    return seconds * ratio, probe


def start_report(model, *, device, patch: Sequence[int], batch_size: int, train_cases: int, val_cases: int,
                 steps: int, autocast_dtype=None) -> StartReport:
    """Measure and collect the start-up numbers of a run of ``steps`` training steps."""
    seconds, probe = time_training_step(model, patch, batch_size, device, autocast_dtype=autocast_dtype,
                                        stride=int(getattr(model, "stride", 1) or 1))
    return StartReport(
        device=str(device), parameters=int(sum(p.numel() for p in model.parameters())),
        train_cases=int(train_cases), val_cases=int(val_cases), steps=int(steps), seconds_per_step=seconds,
        probe_patch=probe,
    )


def log_start_report(model, config: Any, data: Any, device, *, start_epoch: int, autocast_dtype,
                     log: Callable[[str], None]) -> StartReport:
    """The trainer's one call: report on ``log`` the run about to start (``config`` a
    ``TrainConfig``, ``data`` its ``TrainingData``), from ``start_epoch`` on."""
    report = start_report(
        model, device=device, patch=config.patch_size, batch_size=config.batch_size,
        train_cases=len(data.train_cases), val_cases=len(data.val_cases),
        steps=(config.epochs - start_epoch) * config.iters_per_epoch, autocast_dtype=autocast_dtype,
    )
    for line in report.lines():
        log(line)
    return report
