"""Where and how the network runs, as the user names it: devices, precisions, engines.

Names only, no torch: the ``iwseg predict`` parser, the Slicer panel and the backend-process
wrapper check a choice against these tuples without loading torch; :mod:`IWSegmentationLib.inference`
turns a name into a ``torch.device`` (:func:`~IWSegmentationLib.inference.devices.resolve_device`),
a precision and an engine.
"""

from __future__ import annotations

#: ``--device`` values: ``auto`` is CUDA if available, else Apple MPS, else the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
#: ``--precision`` values: ``auto`` is fp16 autocast on CUDA and fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: ``--engine`` values: ``auto`` freezes small networks on the CPU, ``eager``/``frozen`` force one.
ENGINES = ("auto", "eager", "frozen")
