"""Safe checkpoints: one ``.safetensors`` file with the weights and a JSON model card.

A checkpoint is a standard `safetensors <https://huggingface.co/docs/safetensors>`_ file:
the network's ``state_dict`` tensors, and in the header's ``__metadata__`` (a string->string
map) three entries:

* ``format``: ``"iwsegmentation.checkpoint"``;
* ``format_version``: the integer :data:`FORMAT_VERSION` as a string;
* ``model_card``: the JSON model card (architecture, patch size, preprocessing, threshold,
  loss, size thresholds, training data, validation metrics, versions, creation time and the
  sha256 of the weights). ``docs/checkpoints.md`` documents every field.

The card is validated as a whole, once, by :class:`~IWSegmentationLib.nn.model_card.ModelCard`
(typed fields with limits) on every read and before every write; :func:`read_model_card`
returns the record, :func:`read_metadata` and :func:`load_checkpoint` its plain dict.

Nothing is ever unpickled: safetensors holds only raw tensor bytes and JSON. A pickled
PyTorch file (``.pt``/``.pth``) is refused, unless the caller passes ``allow_torch_load=True``,
which reads it with ``torch.load(weights_only=True)`` only (tensors and plain containers; no
arbitrary objects, so no code runs).

The trainer's resume state (optimizer, scheduler, RNG, epoch) uses the same container through
:func:`save_training_state` / :func:`load_training_state`: any nesting of dicts, lists, tuples,
tensors, numpy arrays and JSON scalars, with no pickle either.

Inspect a checkpoint from a shell: ``iwseg inspect MODEL.safetensors [--verify]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import numbers
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .. import __version__
from ..core.errors import CheckpointError, InputError, OutputError
from ..core.outputs import atomic_output
from .model_card import (  # noqa: F401  (FORMAT_VERSION and the field lists are part of this module's API)
    AUTOMATIC_FIELDS,
    FORMAT,
    FORMAT_VERSION,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    ModelCard,
)

if TYPE_CHECKING:  # torch is imported lazily: reading a model card must not need it
    import torch
    from torch import nn


TRAINING_STATE_FORMAT = "iwsegmentation.training_state"


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


#: safetensors refuses headers above 100 MB; so do we, before reading them into memory.
MAX_HEADER_BYTES = 100_000_000


def dtype_codes() -> dict:
    """safetensors dtype codes (the header's "dtype" strings) of the torch dtypes we store."""
    import torch  # lazy: a checkpoint's card is read without torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict, independent of file layout and header.

    For each tensor in sorted name order the hash takes: the UTF-8 name, ``\\0``, the
    safetensors dtype code (``F32``...), ``\\0``, the shape as comma-separated ints, ``\\0``,
    then the tensor's raw little-endian bytes in C order.
    """
    import torch  # lazy: a checkpoint's card is read without torch

    codes = dtype_codes()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.dtype not in codes:
            raise InputError(f"tensor {name!r} has dtype {t.dtype}, which checkpoints do not store")
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(codes[t.dtype].encode() + b"\0")
        digest.update(",".join(str(s) for s in t.shape).encode() + b"\0")
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _to_json_value(value: Any, where: str) -> Any:
    """Plain-JSON copy of ``value``: numpy scalars/arrays, tuples, dataclasses and paths are
    converted; non-finite floats become ``None`` (strict JSON has no NaN)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers are registered as Integral
        return int(value)
    if isinstance(value, numbers.Real):  # numpy floats as Real
        return float(value) if math.isfinite(value) else None
    numpy = sys.modules.get("numpy")  # an array can only come from a caller that imported numpy
    if numpy is not None and isinstance(value, numpy.ndarray):
        return _to_json_value(value.tolist(), where)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.numel() <= 1024:
        return _to_json_value(value.detach().cpu().tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_json_value(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(f"checkpoint metadata {where}: key {k!r} is not a string")
            out[k] = _to_json_value(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise InputError(
        f"checkpoint metadata {where}: {type(value).__name__} is not JSON-serialisable; "
        "use numbers, strings, lists and dicts"
    )


def build_model_card(model: nn.Module, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    """The full model card :func:`save_checkpoint` writes: ``metadata`` converted to plain JSON,
    the automatic fields (format, versions, time, architecture, sha256) filled in, then the
    whole card validated by :meth:`ModelCard.from_dict` (defaults added)."""
    if not isinstance(metadata, Mapping):
        raise InputError(f"checkpoint metadata must be a dict, got {type(metadata).__name__}")
    card = _to_json_value(dict(metadata), "metadata")
    architecture = getattr(model, "config", None) or card.get("architecture")
    if not architecture:
        raise InputError(
            "the model has no .config and metadata has no 'architecture': build the model with "
            "models.build_model(config) or pass metadata['architecture']"
        )
    import torch  # lazy: a checkpoint's card is read without torch

    card.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        architecture=_to_json_value(architecture, "architecture"),
        library_version=__version__,
        torch_version=torch.__version__.split("+")[0],
        created=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        num_parameters=int(sum(p.numel() for p in model.parameters())),
        weights_sha256=weights_sha256(tensors),
    )
    return ModelCard.from_dict(card, source="checkpoint metadata").to_dict()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside a ``DistributedDataParallel``/``DataParallel`` (``.module``) or
    ``torch.compile`` (``._orig_mod``) wrapper, so saved names carry no wrapper prefix."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or inner is model:
            break
        model = inner
    return model


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-independent copies of the state dict, as safetensors needs."""
    out = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Write ``tensors`` with the string ``header`` as a safetensors file at ``path``, atomically (temp
    file beside ``path``, checked, fsync'ed, renamed: :func:`atomic_output`); checkpoints and training
    states are written here."""
    from safetensors.torch import save_file  # lazy: safetensors.torch imports torch

    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except Exception as exc:  # SafetensorError is not an OSError, whatever the cause
            raise OutputError(f"cannot write checkpoint {path}: {exc}") from None
    return path


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, Any]) -> dict:
    """Write ``model``'s weights and the model card to ``path`` (a ``.safetensors`` file).

    ``metadata`` must hold ``patch_size`` and ``preprocessing`` (a preset dict from
    :func:`IWSegmentationLib.preprocessing.get_preset`) and may hold ``threshold`` (default
    0.5), ``loss``, ``size_thresholds``, ``training_data``, ``validation_metrics``,
    ``description`` and any other JSON-serialisable keys. The architecture is taken from
    ``model.config`` (DDP and ``torch.compile`` wrappers are unwrapped first). The file is written atomically: an existing checkpoint at ``path`` is
    replaced only once the new one is complete. Returns the model card written.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"checkpoint {path}: use a .safetensors name; pickled formats are not written")
    model = unwrap_model(model)
    tensors = _state_tensors(model)
    card = build_model_card(model, metadata, tensors)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
              "model_card": json.dumps(card, allow_nan=False, sort_keys=True)}
    write_safetensors(path, tensors, header)
    return card


def _looks_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8


def _looks_pickled(path: Path, head: bytes, size: int) -> bool:
    """torch.save writes a zip archive (``PK\x03\x04``); legacy torch.save and pickle protocol
    >= 2 start with ``\x80`` and the protocol number. A safetensors header length can also
    start with ``\x80``, so the safetensors shape is checked first."""
    if _looks_safetensors(head, size):
        return False
    return (
        path.suffix.lower() in PICKLE_SUFFIXES
        or head[:4] == b"PK\x03\x04"
        or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
    )


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is a pickled PyTorch file, which can run arbitrary code when loaded; "
        "IWSegmentation reads only .safetensors checkpoints. If you trust its source, convert it "
        "with load_checkpoint(path, allow_torch_load=True, metadata=...) (tensors only, "
        "torch.load(weights_only=True)) followed by save_checkpoint(...)"
    )


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a safetensors header (without reading the tensors) and check it against the file
    size. Raises :class:`CheckpointError` naming ``path`` for missing, pickled, truncated or
    corrupt files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a FIFO, socket or device)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        if _looks_pickled(path, head, size):
            raise _refuse_pickle(path)
        fh.seek(8)
        if len(head) < 8:
            raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if MAX_HEADER_BYTES < n <= size - 8:
            raise CheckpointError(
                f"checkpoint {path}: its header is too large ({n} bytes; at most {MAX_HEADER_BYTES} are read)"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a safetensors file "
                f"(header claims {n} bytes, file has {size})"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable header ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {path} is corrupt: its header is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"checkpoint {path} is corrupt: bad entry for tensor {name!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"checkpoint {path} is truncated: tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header


def check_format(path: Path, meta: Mapping[str, str], expected: str) -> int:
    """The format version of the file at ``path`` (its safetensors ``meta``data), after checking it is
    an IWSegmentation file of the ``expected`` format (a checkpoint or a training state) and a version
    this code reads; :class:`CheckpointError` otherwise."""
    if meta.get("format") != expected:
        raise CheckpointError(
            f"checkpoint {path} has no IWSegmentation metadata (format {meta.get('format')!r}, "
            f"expected {expected!r}); was it written by save_checkpoint/save_training_state?"
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"checkpoint {path} has a bad format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} uses format version {version}, newer than this library "
            f"(iwsegmentation {__version__} reads versions <= {FORMAT_VERSION}); upgrade iwsegmentation"
        )
    if version < 1:
        raise CheckpointError(f"checkpoint {path} has an invalid format_version {version}")
    return version


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """The validated model card of a checkpoint, read from the header only (no weights, no
    torch import).

    Raises :class:`CheckpointError` naming ``path`` for a missing, pickled, corrupt or
    truncated file, a file without a model card, one written by a newer incompatible format
    version, or a card whose values are out of range (:meth:`ModelCard.from_dict`).
    """
    path = Path(path)
    header = read_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "model_card" not in meta:
        raise CheckpointError(
            f"checkpoint {path} has no model card (no IWSegmentation metadata in its header); "
            "it cannot say how to preprocess or threshold. Re-save it with save_checkpoint"
        )
    check_format(path, meta, FORMAT)
    try:
        card = json.loads(meta["model_card"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt model card: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {path} has a corrupt model card: nested too deeply") from None
    if isinstance(card, dict) and card.get("weights_sha256") is None:
        raise CheckpointError(f"checkpoint {path}: model card lacks weights_sha256")
    return ModelCard.from_dict(card, source=path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The model card of a checkpoint as a plain dict (:func:`read_model_card`, then
    :meth:`ModelCard.to_dict`)."""
    return read_model_card(path).to_dict()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, on the CPU (no pickle is involved);
    :class:`CheckpointError` for a damaged file."""
    from safetensors.torch import load_file  # lazy: safetensors.torch imports torch

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None


def _build_and_load(path: Path, architecture: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The network of ``architecture`` with ``tensors`` loaded. The network is first built on
    torch's ``meta`` device (no memory) and its tensor shapes compared with the file's, so a
    card that claims a huge network allocates nothing: the real build is at most as large as
    the weights the file holds."""
    import torch  # lazy: a checkpoint's card is read without torch

    from .unet import build_model  # lazy: unet imports torch

    try:
        with torch.device("meta"):
            skeleton = build_model(dict(architecture))
    except InputError as exc:
        raise CheckpointError(f"checkpoint {path}: bad architecture: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and expected[k] != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shape {', '.join(wrong[:5])}")
        raise CheckpointError(f"checkpoint {path}: weights do not fit its architecture: {'; '.join(parts)}")
    model = build_model(dict(architecture))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    allow_torch_load: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint and load its weights: ``(model in eval mode, card)``.

    Verifies the weights' sha256 against the model card. Every problem (missing, truncated or
    corrupt file, no model card, a card value out of range, sha256 mismatch, newer format
    version, weights that do not fit the architecture, a pickled file) raises
    :class:`CheckpointError` naming ``path``.

    ``allow_torch_load=True`` accepts a pickled ``.pt``/``.pth`` holding a state dict (or
    ``{"state_dict": ..., "metadata": ...}``), read with ``torch.load(weights_only=True)``
    only; its model card comes from the file's ``metadata`` entry or the ``metadata`` argument.
    """
    path = Path(path)
    if allow_torch_load and path.exists() and path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(9)
        if _looks_pickled(path, head, path.stat().st_size):
            model, card = _load_torch_weights_only(path, metadata)
            return model.to(map_location), card
    card = read_model_card(path)
    tensors = load_tensors(path)
    digest = weights_sha256(tensors)
    if digest != card.weights_sha256:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its weights' sha256 {digest[:12]}... does not match "
            f"the model card's {str(card.weights_sha256)[:12]}..."
        )
    check_finite_weights(path, tensors)
    model = _build_and_load(path, card.architecture, tensors)
    return model.to(map_location), card.to_dict()


def check_finite_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or inf (a diverged or damaged run): such a network predicts
    NaN, which thresholds to "no lesions" without any other sign. Names the first tensors."""
    import torch  # lazy: a checkpoint's card is read without torch

    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or infinite weights in {len(bad)} tensor(s) "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); the training diverged or the file is damaged"
        )


def _load_torch_weights_only(path: Path, metadata: Mapping[str, Any] | None) -> tuple[nn.Module, dict]:
    """Read a pickled state dict with ``torch.load(weights_only=True)``; never full unpickling."""
    import torch  # lazy: a checkpoint's card is read without torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for disallowed globals, RuntimeError for damage
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely with torch.load(weights_only=True): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    card = dict(metadata or (obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}) or {})
    if "architecture" not in card:
        raise CheckpointError(
            f"checkpoint {path} is a bare state dict without a model card: pass metadata= with at "
            "least 'architecture', 'patch_size' and 'preprocessing'"
        )
    if not isinstance(card["architecture"], dict):
        raise CheckpointError(f"checkpoint {path}: metadata 'architecture' must be a dict")
    model = _build_and_load(path, card["architecture"], dict(state))
    return model, build_model_card(model, card, _state_tensors(model))
