"""IWSegmentationLib: the engine of the IWSegmentation 3D Slicer extension.

Lesion analysis, inverse weighting (Shirokikh et al., MICCAI 2020), the loss family,
lesion-wise detection metrics, the 3D U-Net, safe checkpoints, sliding-window
inference, data pipeline and trainer. Nothing here imports Slicer or Qt, except
:mod:`IWSegmentationLib.slicer.mrml`, which imports ``slicer`` lazily.
"""

__version__ = "0.1.0"
