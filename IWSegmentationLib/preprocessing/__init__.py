"""Preprocessing, one code path for training and inference: the presets and their parameters
(:mod:`.presets`), intensities (:mod:`.intensity`), the foreground (:mod:`.foreground`), the automatic
lung mask (:mod:`.lung_mask`), resampling (:mod:`.resampling`), the organ crop (:mod:`.cropping`).

Nothing is re-exported here on purpose: the model card (:mod:`IWSegmentationLib.nn.model_card`, which
the Slicer panel reads) checks presets with :mod:`.presets` alone, which needs no numpy; importing this
package must not load the array code.
"""
