"""The resume state of a run (optimizer, scheduler, scaler, RNG, epoch) in safetensors, without pickle."""

from __future__ import annotations

import collections
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .. import __version__
from ..core.errors import CheckpointError, InputError

if TYPE_CHECKING:  # torch is imported lazily: reading a model card must not need it
    import torch
from .checkpoint import (
    TRAINING_STATE_FORMAT,
    check_format,
    dtype_codes,
    load_tensors,
    read_header,
    write_safetensors,
)
from .model_card import FORMAT_VERSION


def _pack(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able structure of ``obj`` with every tensor/array moved into ``tensors``.

    Encodings: tensor -> ``{"__tensor__": key}``; numpy array -> ``{"__ndarray__": key,
    "dtype": str, "shape": [...]}`` (bytes stored as a U8 tensor); tuple -> ``{"__tuple__":
    [...]}``; Counter -> ``{"__counter__": [[k, v], ...]}``; a dict with a non-string key ->
    ``{"__dict__": [[k, v], ...]}``; float NaN/inf -> ``{"__float__": "nan"}``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().clone()
        if t.dtype not in dtype_codes():
            raise InputError(f"training state {where}: tensor dtype {t.dtype} is not storable")
        key = f"t{len(tensors):06d}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise InputError(f"training state {where}: object arrays are not storable")
        import torch  # lazy: iwseg train starts without torch

        key = f"t{len(tensors):06d}"
        tensors[key] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(obj).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, collections.Counter):
        return {"__counter__": [[_pack(k, tensors, where), _pack(v, tensors, f"{where}[{k!r}]")]
                                for k, v in obj.items()]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_pack(k, tensors, where), _pack(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise InputError(
        f"training state {where}: {type(obj).__name__} cannot be stored without pickle; "
        "use tensors, arrays, numbers, strings, lists, tuples and dicts"
    )


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        raw = tensors[obj["__ndarray__"]].numpy()
        return np.frombuffer(raw.tobytes(), dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
    if "__counter__" in obj:
        return collections.Counter({_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__counter__"]})
    if "__dict__" in obj:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__dict__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: _unpack(v, tensors) for k, v in obj.items()}


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a resume state (e.g. ``{"model": ..., "optimizer": opt.state_dict(), "scheduler":
    sched.state_dict(), "rng": capture_rng_state(), "epoch": 7}``) to a ``.safetensors`` file,
    atomically, without pickle. Read it back with :func:`load_training_state`."""
    if not isinstance(state, Mapping):
        raise InputError(f"training state must be a dict, got {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    structure = _pack(dict(state), tensors, "state")
    header = {"format": TRAINING_STATE_FORMAT, "format_version": str(FORMAT_VERSION),
              "library_version": __version__,
              "state": json.dumps(structure, allow_nan=False)}
    return write_safetensors(Path(path), tensors, header)


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`save_training_state` (same structure, tensors on
    ``map_location``). Errors raise :class:`CheckpointError` naming ``path``."""
    path = Path(path)
    header = read_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "state" not in meta:
        raise CheckpointError(f"{path} is not an IWSegmentation training state (no 'state' in its header)")
    check_format(path, meta, TRAINING_STATE_FORMAT)
    tensors = load_tensors(path)
    if str(map_location) != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        return _unpack(json.loads(meta["state"]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"training state {path} is corrupt: {exc}") from None


def capture_rng_state() -> dict[str, Any]:
    """The Python, numpy (global) and torch (CPU and every CUDA device) RNG states, storable
    with :func:`save_training_state`."""
    import torch  # lazy: iwseg train starts without torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import torch  # lazy: iwseg train starts without torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
