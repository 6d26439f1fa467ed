"""The torch side of the data: :class:`PatchDataset` (an IterableDataset of patch batches) and :func:`make_loader`."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..core.errors import InputError, IWSegError
from ..core.progress import reinstall_cancel_handlers
from .cases import load_case
from .datasets import Case
from .sampling import batch_images, default_batch_rng

if TYPE_CHECKING:
    from .cases import CaseVolume
    from .sampling import CaseSource, Patch, PatchSampler, PreparedCase


class PatchDataset(IterableDataset):
    """Batches of training patches for a torch ``DataLoader(dataset, batch_size=None)``.

    Each item is one *batch* (a dict): ``image`` float32 ``(B, C, D, H, W)`` (C image channels),
    ``target`` float32 ``(B, 1, D, H, W)``, ``labels`` int32 ``(B, 1, D, H, W)`` (cropped whole-image component
    ids, for :func:`~IWSegmentationLib.core.weights.component_weights`), ``lesion_centred`` and
    ``hard_negative`` bool ``(B,)``, ``origin`` int64 ``(B, 3)`` (each patch's corner on its case's grid), ``case``
    (list of ids) and ``step``.

    **Determinism.** Batch ``step`` is drawn from its own generator
    ``rng_factory(step)`` (default :func:`default_batch_rng` of ``(seed, rank, step)``): which
    cases, where the patches go and the augmentation are a pure function of the seed, the
    DDP ``rank`` and the step. DataLoader worker ``w`` of ``W`` makes the steps with
    ``step % W == w`` and the loader returns them in step order, so the stream of batches is
    the same for any number of workers, and a resumed run (``start_step``) continues it
    exactly. Each rank draws its own stream over all cases.

    **Cases are used as given.** A :class:`CaseVolume` source is sampled as it is; a
    :class:`Case` record is turned into one by ``loader`` (default :func:`load_case`; the
    trainer passes :func:`load_prepared_case`). The dataset never transforms a volume itself,
    so whoever builds it decides, in one place, how a case is prepared.

    **Cache.** Cases are loaded, labelled and padded once, then kept in memory (at most ``cache_size`` cases, least recently used out;
    None = all; about 5–7 bytes per voxel). Call :meth:`preload` before creating the
    DataLoader: with the ``fork`` start method the workers then share the cached volumes.

    ``transform`` (optional, ``dict -> dict``) runs on each finished batch in the worker, e.g.
    to compute the inverse weights off the training step; ``augment`` (``(Patch, rng) -> Patch``,
    e.g. :func:`augment_patch`) on each patch.

    **Which case.** Each patch's case is drawn uniformly (``case_weights=None``), or with
    probability proportional to ``case_weights`` (one weight >= 0 per case, e.g. its lesion
    count: the trainer's ``case_sampling: lesions``); a case of weight 0 is never drawn.
    """

    def __init__(
        self,
        cases: Sequence[CaseSource],
        sampler: PatchSampler,
        *,
        batch_size: int = 2,
        steps: int | None = None,
        start_step: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: Callable[[Patch, np.random.Generator], Patch] | None = None,
        transform: Callable[[dict], dict] | None = None,
        loader: Callable[[Case], CaseVolume] = load_case,
        cache_size: int | None = None,
        rng_factory: Callable[[int], np.random.Generator] | None = None,
        case_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if not cases:
            raise InputError("PatchDataset needs at least one case (is the training split empty?)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise InputError(f"steps must be a non-negative integer or None, got {steps!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise InputError(f"start_step must be a non-negative integer, got {start_step!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise InputError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank} world_size={world_size}")
        if cache_size is not None and cache_size < 1:
            raise InputError(f"cache_size must be >= 1 or None, got {cache_size}")
        self.cases = list(cases)
        self.sampler = sampler
        self.batch_size = batch_size
        self.steps = steps
        self.start_step = start_step
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.augment, self.transform, self.loader = augment, transform, loader
        self.cache_size = cache_size
        self.rng_factory = rng_factory
        self.case_probabilities = None if case_weights is None else _probabilities(case_weights, len(self.cases))
        self._cache: OrderedDict[int, PreparedCase] = OrderedDict()

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless PatchDataset (steps=None) has no length")
        return self.steps

    def prepared(self, index: int) -> PreparedCase:
        """The cached, prepared case ``index`` (loaded on first use)."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        source = self.cases[index]
        volume = self.loader(source) if isinstance(source, Case) else source
        prepared = self.sampler.prepare(volume.image, volume.lesion, volume.id, volume.negatives)
        self._cache[index] = prepared
        if self.cache_size is not None:
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return prepared

    def preload(self) -> int:
        """Load and prepare every case now (in this process); returns the bytes cached."""
        n = len(self.cases) if self.cache_size is None else min(self.cache_size, len(self.cases))
        for i in range(n):
            self.prepared(i)
        return sum(p.nbytes for p in self._cache.values())

    def rng(self, step: int) -> np.random.Generator:
        if self.rng_factory is not None:
            return self.rng_factory(step)
        return default_batch_rng(self.seed, self.rank, step)

    def sample_patches(self, step: int) -> list[Patch]:
        """The patches of batch ``step`` (a pure function of seed, rank and step)."""
        rng = self.rng(step)
        out = []
        for _ in range(self.batch_size):
            index = self.draw_case(rng)
            patch = self.sampler.sample(self.prepared(index), rng)
            if self.augment is not None:
                patch = self.augment(patch, rng)
            out.append(patch)
        return out

    def draw_case(self, rng: np.random.Generator) -> int:
        """The index of the next patch's case: uniform (one ``rng.integers`` draw, the stream every
        run had before ``case_weights`` existed), or by :attr:`case_probabilities`."""
        if self.case_probabilities is None:
            return int(rng.integers(len(self.cases)))
        return int(rng.choice(len(self.cases), p=self.case_probabilities))

    def batch(self, step: int) -> dict:
        """Batch ``step`` as tensors (see the class docstring)."""
        patches = self.sample_patches(step)
        batch = {
            "image": torch.from_numpy(batch_images([p.image for p in patches])),
            "target": torch.from_numpy(np.stack([p.target for p in patches])[:, None].astype(np.float32)),
            "labels": torch.from_numpy(np.stack([p.labels for p in patches])[:, None]),
            "lesion_centred": torch.tensor([p.lesion_centred for p in patches]),
            "hard_negative": torch.tensor([p.hard_negative for p in patches]),
            "origin": torch.tensor([p.origin for p in patches], dtype=torch.int64),
            "case": [p.case for p in patches],
            "step": step,
        }
        return self.transform(batch) if self.transform is not None else batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        end = None if self.steps is None else self.start_step + self.steps
        step = self.start_step + worker
        while end is None or step < end:
            yield self.batch(step)
            step += workers


def _probabilities(weights: Sequence[float], n: int) -> np.ndarray:
    """``weights`` normalised to sum to 1, after checking there is one finite weight >= 0 per case
    and that some case can be drawn."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError(f"case_weights must be one finite weight >= 0 per case ({n}), got {list(weights)!r}")
    if w.sum() <= 0:
        raise InputError("case_weights are all 0: no case can be drawn (with case_sampling: lesions, no training "
                         "case has a lesion)")
    return w / w.sum()


def make_loader(dataset: PatchDataset, *, num_workers: int = 2, pin_memory: bool = False,
                prefetch_factor: int = 2):
    """A ``DataLoader`` over batches of ``dataset`` with ``num_workers`` background processes
    (persistent, so their caches live for the whole run; they keep a cancel handler the
    parent installed, see :func:`~IWSegmentationLib.core.progress.reinstall_cancel_handlers`)."""
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor,
                      worker_init_fn=reinstall_cancel_handlers)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


#: How torch's DataLoader starts the message of an error it re-raises from a worker process.
_WORKER_ERROR_PREFIX = "Caught "


def next_batch(stream: Iterator[dict]) -> dict:
    """The next batch of a :func:`make_loader` stream.

    A user error (:class:`~IWSegmentationLib.core.errors.IWSegError`, e.g. a case that cannot be
    prepared, named by :func:`prepare_volume`) raised in a worker process reaches the parent
    as torch's re-raise: the same class, but its message is the worker's whole traceback.
    Here it becomes that class again with the worker's own message, so the command line still
    prints one line naming the case. Other errors pass unchanged.
    """
    try:
        return next(stream)
    except IWSegError as exc:
        text = str(exc)
        marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        if not text.startswith(_WORKER_ERROR_PREFIX) or marker not in text:
            raise
        raise type(exc)(text.rsplit(marker, 1)[1].strip()) from None
