"""Datasets on disk -> cases in memory -> patches.

:mod:`.datasets` reads dataset layouts into :class:`Case` lists, :mod:`.splits` splits them by case id,
:mod:`.cases` loads and prepares one case, :mod:`.sampling` draws patches, :mod:`.loader` is the torch
Dataset. The public names are re-exported here except those of :mod:`.loader` (so that importing this
package does not load torch) and of :mod:`.synth` (synthetic datasets, a tool of their own).
"""

from .cases import (  # noqa: F401  (re-exported)
    CaseVolume,
    lesion_mask,
    load_case,
    load_prepared_case,
    prepare_volume,
)
from .datasets import (  # noqa: F401  (re-exported)
    LAYOUT_ALIASES,
    LAYOUTS,
    LESION_WORDS,
    LUNA_LUNG_DIRS,
    LUNA_NODULE_DIRS,
    ORGAN_WORDS,
    SPLIT_NAMES,
    Case,
    Dataset,
    detect_layout,
    load_dataset,
    read_lits,
    read_luna16,
    read_msd,
    read_plain,
)
from .sampling import (  # noqa: F401  (re-exported)
    CaseSource,
    Patch,
    PatchSampler,
    PreparedCase,
    augment_patch,
    default_batch_rng,
)
from .splits import (  # noqa: F401  (re-exported)
    check_splits,
    make_splits,
    read_splits,
    write_splits,
)

__all__ = [
    "LAYOUTS",
    "LAYOUT_ALIASES",
    "SPLIT_NAMES",
    "LESION_WORDS",
    "ORGAN_WORDS",
    "LUNA_NODULE_DIRS",
    "LUNA_LUNG_DIRS",
    "Case",
    "Dataset",
    "read_msd",
    "read_lits",
    "read_luna16",
    "read_plain",
    "detect_layout",
    "load_dataset",
    "make_splits",
    "check_splits",
    "read_splits",
    "write_splits",
    "CaseVolume",
    "lesion_mask",
    "load_case",
    "prepare_volume",
    "load_prepared_case",
    "PreparedCase",
    "Patch",
    "PatchSampler",
    "augment_patch",
    "default_batch_rng",
    "CaseSource",
        ]
