"""What the torch of this interpreter sees, printed as one JSON line: the device probe's child.

``python -m IWSegmentationLib.core.device_report`` prints ``{"torch": version or None, "cuda":
[{"index", "name", "free_mb", "total_mb"}], "mps": bool, "error": str or None}``.
:class:`~IWSegmentationLib.backend.device_probe.DeviceProbe` runs it in a child interpreter, so the
GUI process never imports torch. It lives in ``core`` because it must start light: importing the
package and ``core`` loads nothing but this module, and torch is imported inside
:func:`device_report` so that a missing or broken torch is an answer, not a crash.
"""

from __future__ import annotations

import json


def device_report() -> dict:
    """Torch's version, its CUDA devices with free and total memory (MiB), and whether MPS is there."""
    try:
        import torch  # lazy: a torch that fails to import is reported, not raised
    except Exception as exc:
        return {"torch": None, "error": f"{type(exc).__name__}: {exc}", "cuda": [], "mps": False}
    info = {"torch": torch.__version__, "cuda": [], "mps": False, "error": None}
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                info["cuda"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                     "free_mb": free // 2**20, "total_mb": total // 2**20})
        mps = getattr(torch.backends, "mps", None)
        info["mps"] = bool(mps is not None and mps.is_available())
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


if __name__ == "__main__":
    print(json.dumps(device_report()))
