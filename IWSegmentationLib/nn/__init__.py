"""The network side: the 3D U-Net (:mod:`.unet`), the loss family (:mod:`.losses`), safe checkpoints
(:mod:`.checkpoint`) and the resume state of a run (:mod:`.training_state`).

Nothing is re-exported here on purpose: :func:`.checkpoint.read_metadata` must stay importable without
torch (the Slicer panel reads model cards with it), and importing this package must not load torch.
"""
