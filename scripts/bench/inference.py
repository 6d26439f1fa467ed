"""Sliding-window inference speed and memory, side by side with MONAI (issue 3, "Speed and memory").

    python -m scripts.bench.inference [--quick] [--threads 2] [--report FILE] [--device cpu] [--parts compare,paper,ct]

Three parts, every measured job in a **fresh subprocess** (so each peak RSS is its own):

1. **Against MONAI** on a CT-like synthetic volume (256x256x128 int16 HU: air, an elliptic body
   covering 40% of each slice's field of view with lungs, soft tissue, bone and nodules,
   noise 20 HU), the same network (default: the library's ``small`` U-Net, 0.7 M parameters),
   patch (64³) and overlap (0.25), ``sigmoid(net(x))`` blended with Gaussian weights,
   ``torch.inference_mode`` for both, ``--threads`` threads:
   ``monai`` = ``monai.inferers.sliding_window_inference`` with the eager network; ``plain`` =
   ours without skipping (must be >= 1.0x MONAI's speed, max |diff| <= 1e-5); ``plain+cl`` = plus
   ``channels_last_3d``; ``plain+frozen`` = with the frozen CPU engine; ``skip (eager)`` =
   background skipping alone; ``default`` = ours as ``iwseg predict`` runs it (skipping by the
   ``ct-lung`` body threshold -900 HU, frozen engine): speed ratio and max |diff| inside the body
   (goal <= 1e-4). Reported: median seconds of ``--repeats`` runs after a warm-up forward pass,
   windows run, seconds per window, the fraction of time outside the network's forward pass,
   peak RSS and RSS above the job's baseline (volume and network built, before inference).
2. **The paper's network** (11.07 M parameters, 0.40 MFLOP/voxel) on 128³ windows, batch 1:
   seconds per window and achieved GFLOP/s, in fp32, fp32 + ``channels_last_3d``, bf16 autocast
   + ``channels_last_3d`` and the frozen fp32 engine (goal: fp32 >= 80% of the measured conv peak, ~235
   GFLOP/s on the 2-core development machine).
3. **A 512x512x300 CT end to end** through ``iwseg predict`` (read, preprocess, inference with
   the paper network at 128³ / overlap 0.25, threshold, lesions, write): wall time and peak
   RSS of the process (goal on 2 CPU cores: <= 4 min, <= 4 GB).

Run it on a quiet machine, pinned to two cores, with glibc's allocator told not to return
memory eagerly (``python -m scripts.bench`` sets it, see :mod:`scripts.bench.timing`):

    taskset -c 0,1 python -m scripts.bench inference

Each part writes its own block of the report (``inference/compare``, ``inference/paper``,
``inference/ct``) as soon as it is done, so a long run keeps what it measured and rerunning one
part (``--parts ct``) keeps the others' tables.

``--quick`` shrinks everything (96x96x48 volume, 32³ patches, the tiny net, one repeat, a
96x96x64 "CT") only to check that the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts.bench import report, timing

REPO = Path(__file__).resolve().parents[2]
CONV_PEAK_GFLOPS = 235.0  # measured fp32 conv3d peak of the 2-core development machine (method notes)


# --------------------------------------------------------------------------- the phantom


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume in HU: air -1000; an elliptic body (semi-axes 0.85 W/2 and 0.6 H/2:
    pi * 0.85 * 0.6 / 4 = 40% of the slice) of soft tissue 40 HU with a fat rim -100 HU, two
    lungs -850 HU (37% of the body, inside a chest wall at least 2% of the width thick: the
    lung field sees them as lungs, not as outside air), a spine 400 HU and a few nodules 30 HU;
    Gaussian noise sigma 20 HU."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    y, x = np.ogrid[:h, :w]
    cy, cx = h / 2, w / 2
    ell = ((x - cx) / (0.85 * w / 2)) ** 2 + ((y - cy) / (0.6 * h / 2)) ** 2
    plane = np.full((h, w), -1000.0, np.float32)
    plane[ell <= 1] = -100.0
    plane[ell <= 0.85] = 40.0
    for side in (-1, 1):
        lung = ((x - cx - side * 0.2 * w) / (0.14 * w)) ** 2 + ((y - cy + 0.03 * h) / (0.17 * h)) ** 2
        plane[lung <= 1] = -850.0
    plane[((x - cx) / (0.05 * w)) ** 2 + ((y - cy - 0.17 * h) / (0.05 * h)) ** 2 <= 1] = 400.0
    volume = np.empty(shape, np.int16)
    for z0 in range(0, d, 16):  # slab-wise noise: no full-size float64 temporary
        z1 = min(d, z0 + 16)
        slab = plane[None] + rng.normal(0.0, 20.0, size=(z1 - z0, h, w)).astype(np.float32)
        volume[z0:z1] = np.clip(np.rint(slab), -1024, 3071).astype(np.int16)
    zz, yy, xx = np.ogrid[:d, :h, :w]
    for _ in range(6):
        c = (rng.uniform(0.2, 0.8) * d, cy + rng.uniform(-0.1, 0.1) * h, cx + rng.choice([-1, 1]) * 0.2 * w)
        r = rng.uniform(2.0, 6.0)
        nodule = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        volume[nodule] = 30
    return volume


BODY_THRESHOLD = -900.0  # the ct-lung preset's body threshold


def network_input(volume: np.ndarray) -> np.ndarray:
    """The ct-lung preset's scaling: clip to [-1000, 300] HU, map onto [0, 1]."""
    from IWSegmentationLib.preprocessing.intensity import preprocess
    from IWSegmentationLib.preprocessing.presets import get_preset

    return preprocess(volume, get_preset("ct-lung"))


# --------------------------------------------------------------------------- worker jobs


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _build_net(size: str, seed: int = 0):
    import torch

    from IWSegmentationLib.nn.unet import build_model, default_config

    torch.manual_seed(seed)
    return build_model(default_config(size)).eval()


class _TimedPredictor:
    """``sigmoid(net(x))`` that adds up its own seconds (synchronising on CUDA)."""

    def __init__(self, net, device):
        import torch

        self.net, self.device, self.seconds, self.calls = net, device, 0.0, 0
        self._torch = torch

    def __call__(self, x):
        start = time.perf_counter()
        out = self._torch.sigmoid(self.net(x))
        if self.device.type == "cuda":
            self._torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def job_window(spec: dict) -> dict:
    """One sliding-window run (MONAI's or ours) on the phantom; see the module docstring."""
    import torch

    from IWSegmentationLib.inference import InferenceStats, sliding_window_inference

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    # the phantom is made once by the parent: no transient generation peak inflates the baseline
    image = np.load(spec["image"])
    body = np.load(spec["body"]) if spec["skip"] else None
    net, setup = _prepared_net(spec, device)
    patch = (spec["patch"],) * 3
    with torch.inference_mode():  # warm-up: oneDNN/cuDNN pick their kernels for this shape
        net(torch.zeros((spec["batch_size"], 1, *patch), device=device))
    baseline = _rss_mb()
    times, outside = [], []
    result = None
    for _ in range(spec["repeats"]):
        predictor = _TimedPredictor(net, device)
        start = time.perf_counter()
        if spec["impl"] == "monai":
            from monai.inferers import sliding_window_inference as monai_swi

            with torch.inference_mode():
                out = monai_swi(torch.from_numpy(image)[None, None].to(device), patch, spec["batch_size"],
                                predictor, overlap=spec["overlap"], mode="gaussian")
            result = out[0, 0].cpu().numpy()
            windows = predictor.calls * spec["batch_size"]
            run_windows = total_windows = None
        else:
            stats = InferenceStats()
            out = sliding_window_inference(image, predictor, patch, overlap=spec["overlap"], blend="gaussian",
                                           batch_size=spec["batch_size"], device=device, foreground=body,
                                           stats=stats)
            result = out[0]
            run_windows, total_windows = stats.windows_run, stats.windows_total
        seconds = time.perf_counter() - start
        times.append(seconds)
        outside.append(max(0.0, 1.0 - predictor.seconds / seconds))
        del out
    if spec["impl"] == "monai":
        run_windows = total_windows = _monai_windows(image.shape, patch, spec["overlap"])
        assert windows >= run_windows
    np.save(spec["save"], result)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {
        "seconds": statistics.median(times), "all_seconds": times, "windows_run": run_windows,
        "windows_total": total_windows, "outside_forward": statistics.median(outside),
        "peak_rss_mb": _rss_mb(), "baseline_rss_mb": baseline, "peak_gpu_mb": peak_gpu, "setup_seconds": setup,
    }


def _prepared_net(spec: dict, device):
    """The job's network as its ``engine`` runs it — ``eager``, ``eager+cl`` (channels_last_3d
    weights) or ``frozen`` (:func:`inference.freeze_for_cpu`) — and the seconds that took."""
    import torch

    from IWSegmentationLib.inference import freeze_for_cpu

    net = _build_net(spec["net"]).to(device)
    start = time.perf_counter()
    if spec["engine"] == "eager+cl":
        net = net.to(memory_format=torch.channels_last_3d)
    elif spec["engine"] == "frozen":
        net = freeze_for_cpu(net)
        if net is None:
            raise SystemExit("the frozen engine could not be built")
    return net, time.perf_counter() - start


def _monai_windows(shape, patch, overlap) -> int:
    from IWSegmentationLib.inference import window_starts

    starts = window_starts(tuple(max(s, p) for s, p in zip(shape, patch)), patch, (overlap,) * 3)
    return int(np.prod([len(s) for s in starts]))


def job_paper(spec: dict) -> dict:
    """Seconds per window and GFLOP/s of the paper network (or ``spec['net']``) on one window."""
    import torch

    from IWSegmentationLib.inference.devices import autocast_context
    from IWSegmentationLib.nn.unet import default_config, flops_per_voxel

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    net, _ = _prepared_net(spec, device)
    x = torch.rand((1, 1, *(spec["patch"],) * 3), device=device)

    def forward():
        net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast_context(device, spec["precision"]):
        seconds, _ = timing.median_time(forward, spec["repeats"], warmup=1)
    voxels = spec["patch"] ** 3
    flops = flops_per_voxel(default_config(spec["net"])) * voxels
    return {"seconds": seconds, "gflops": flops / seconds / 1e9, "mvoxel_s": voxels / seconds / 1e6,
            "peak_rss_mb": _rss_mb()}


def run_worker(spec: dict) -> dict:
    """Run ``spec`` in a fresh interpreter and return its JSON result (the last stdout line)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.inference", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['kind']}/{spec.get('impl', '')} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the three parts


def part_compare(args, tmp: Path) -> tuple[list[str], dict]:
    shape = (48, 96, 96) if args.quick else (128, 256, 256)
    base = {"kind": "window", "shape": list(shape), "net": args.net, "patch": args.patch, "overlap": args.overlap,
            "batch_size": args.batch_size, "threads": args.threads, "device": args.device, "repeats": args.repeats}
    jobs = {
        "monai": {"impl": "monai", "skip": False, "engine": "eager"},
        "plain": {"impl": "ours", "skip": False, "engine": "eager"},
        "plain+cl": {"impl": "ours", "skip": False, "engine": "eager+cl"},
        "plain+frozen": {"impl": "ours", "skip": False, "engine": "frozen"},
        "skip (eager)": {"impl": "ours", "skip": True, "engine": "eager"},
        "default": {"impl": "ours", "skip": True, "engine": "frozen"},
    }
    volume = ct_phantom(shape, seed=0)
    body = volume > BODY_THRESHOLD
    np.save(tmp / "image.npy", network_input(volume))
    np.save(tmp / "body.npy", body)
    del volume
    base.update(image=str(tmp / "image.npy"), body=str(tmp / "body.npy"))
    results = {}
    for name, extra in jobs.items():
        spec = {**base, **extra, "save": str(tmp / f"{name}.npy")}
        print(f"  {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(spec)
    reference = np.load(tmp / "monai.npy")
    for name in jobs:
        out = np.load(tmp / f"{name}.npy")
        diff = np.abs(out - reference)
        results[name]["max_diff"] = float(diff.max())
        results[name]["max_diff_body"] = float(diff[body].max())
    monai_s = results["monai"]["seconds"]
    lines = [
        f"### Against MONAI: {shape[2]}x{shape[1]}x{shape[0]} CT phantom (body {body.mean():.0%} of voxels), "
        f"`{args.net}` net, patch {args.patch}³, overlap {args.overlap}, batch {args.batch_size}, "
        f"{args.threads} threads, {args.device}",
        "",
        "| path | windows run / total | median s | speed vs MONAI | s / window | outside forward | "
        "max abs diff (all) | max abs diff (body) | peak RSS MB | RSS above baseline MB | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['windows_run']} / {r['windows_total']} | {r['seconds']:.2f} | "
            f"{monai_s / r['seconds']:.2f}x | {r['seconds'] / max(1, r['windows_run']):.3f} | "
            f"{r['outside_forward']:.1%} | {r['max_diff']:.1e} | {r['max_diff_body']:.1e} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['setup_seconds']:.2f} |"
        )
    lines += ["", "Paths: `plain` = our loop, eager network, no skipping; `+cl` = channels_last_3d weights; "
              "`+frozen` = the CPU engine `iwseg predict` uses (`inference.freeze_for_cpu`); `skip (eager)` = "
              "background skipping alone; `default` = skipping + frozen engine, as `iwseg predict` runs. "
              "`setup s` = building the engine (not in `median s`; a one-off per run of `iwseg predict`).", "",
              "Goals: plain >= 1.0x with max diff <= 1e-5; default >= 2x with body diff <= 1e-4; "
              "peak RSS <= MONAI's; outside forward < 10%.", ""]
    return lines, results


def part_paper(args) -> tuple[list[str], dict]:
    net, patch = ("tiny", 32) if args.quick else ("paper", 128)
    base = {"kind": "paper", "net": net, "patch": patch, "threads": args.threads, "device": args.device,
            "repeats": 1 if args.quick else max(3, args.repeats)}
    modes = {"fp32": ("fp32", "eager"), "fp32 + channels_last_3d": ("fp32", "eager+cl"),
             "bf16 autocast + channels_last_3d": ("bf16", "eager+cl")}
    if args.device.startswith("cuda"):
        modes["fp16 autocast + channels_last_3d"] = ("fp16", "eager+cl")
    else:
        modes["fp32 frozen engine"] = ("fp32", "frozen")
    results = {}
    for name, (precision, engine) in modes.items():
        print(f"  {net} {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker({**base, "precision": precision, "engine": engine})
    lines = [f"### The `{net}` network on one {patch}³ window (batch 1, {args.threads} threads, {args.device})", "",
             "| mode | s / window | GFLOP/s | % of the 235 GFLOP/s fp32 conv peak | Mvoxel/s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['gflops']:.1f} | {r['gflops'] / CONV_PEAK_GFLOPS:.0%} | "
                     f"{r['mvoxel_s']:.3f} |")
    lines += ["", "Goal: fp32 forward >= 80% of the measured fp32 conv peak (on the 2-core development machine).", ""]
    return lines, results


def part_ct(args, tmp: Path) -> tuple[list[str], dict]:
    """``iwseg predict`` on a full CT in a child process: wall time and the child's own peak RSS."""

    from IWSegmentationLib.core.imageio import Geometry, write_image
    from IWSegmentationLib.nn.checkpoint import save_checkpoint
    from IWSegmentationLib.preprocessing.presets import get_preset

    shape = (64, 96, 96) if args.quick else tuple(args.ct_shape)
    net, patch = ("tiny", 32) if args.quick else ("paper", 128)
    ckpt = tmp / "net.safetensors"
    save_checkpoint(ckpt, _build_net(net), {"patch_size": [patch] * 3, "preprocessing": get_preset("ct-lung"),
                                           "inference": {"overlap": 0.25}})
    src = tmp / "ct.nrrd"
    volume = ct_phantom(shape, seed=1)
    body_fraction = float((volume > BODY_THRESHOLD).mean())
    write_image(src, volume, Geometry.identity(shape, (1.0, 0.7, 0.7)), compress=False)
    del volume
    cmd = [sys.executable, "-m", "IWSegmentationLib", "predict", "--model", str(ckpt), "--input", str(src),
           "--output", str(tmp / "mask.nrrd"), "--lesions", str(tmp / "lesions.json"), "--device", args.device,
           "--threads", str(args.threads), "--progress-format", "jsonl"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"  iwseg predict on {shape[2]}x{shape[1]}x{shape[0]} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(tmp / "stdout.txt", "w") as out_fh, open(tmp / "stderr.txt", "w") as err_fh:
        proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS alone
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"iwseg predict failed ({code}):\n{(tmp / 'stderr.txt').read_text()}")
    peak = usage.ru_maxrss / 1024.0
    out = (tmp / "stdout.txt").read_text()
    case = next(json.loads(ln) for ln in out.splitlines() if '"case_done"' in ln)
    result = {"seconds": seconds, "peak_rss_mb": peak, "windows_run": case["windows"],
              "windows_total": case["windows_total"], "body_fraction": body_fraction}
    lines = [f"### End to end: `iwseg predict` on a {shape[2]}x{shape[1]}x{shape[0]} CT phantom "
             f"(`{net}` net, patch {patch}³, overlap 0.25, {args.threads} threads, {args.device})", "",
             "| windows run / total | body voxels | wall s (incl. start-up, reading, writing) | peak RSS MB |",
             "|---|---|---|---|",
             f"| {case['windows']} / {case['windows_total']} | {body_fraction:.0%} | {seconds:.1f} | {peak:.0f} |",
             "", "Goal on 2 CPU cores: <= 240 s and <= 4096 MB.", ""]
    return lines, result


# --------------------------------------------------------------------------- main


def machine_line(args) -> str:
    return (timing.machine_line(("torch", "monai"), threads=args.threads)
            + f" Median of {args.repeats} run(s) after a warm-up.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script works")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every job (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per job (median; default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--net", default="small", choices=("tiny", "small", "paper"),
                        help="network of the MONAI comparison (default small)")
    parser.add_argument("--patch", type=int, default=64, help="patch side of the MONAI comparison (default 64)")
    parser.add_argument("--overlap", type=float, default=0.25, help="overlap of the MONAI comparison (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"),
                        help="size of the end-to-end CT (default 300 512 512)")
    parser.add_argument("--parts", default="compare,paper,ct", help="comma-separated parts to run")
    report.add_report_argument(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = {"window": job_window, "paper": job_paper}[spec["kind"]](spec)
        print(json.dumps(result))
        return 0
    if args.quick:
        args.repeats, args.patch, args.net = 1, 32, "tiny"
    runners = {"compare": lambda tmp: part_compare(args, tmp), "paper": lambda tmp: part_paper(args),
               "ct": lambda tmp: part_ct(args, tmp)}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(runners))
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(runners)}")
    with tempfile.TemporaryDirectory(prefix="iwseg-bench-") as tmp:
        for part in parts:
            # each finished part is printed and saved at once, so a long run keeps what it measured
            lines = [machine_line(args), "", *runners[part](Path(tmp))[0]]
            report.publish(f"inference/{part}", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
