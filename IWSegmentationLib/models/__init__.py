"""The model library: checkpoints kept in a local folder by name, each checked by sha256, with its
licence and model card (``library``); the manifest format that lists downloadable models
(``manifest``); downloads with resume and a sha256 check (``download``). ``iwseg models`` is its
command line, ``iwseg predict --model NAME`` resolves a name through it, and the Slicer module's
model drop-down lists it. Torch-free. See docs/models.md.

Nothing is re-exported: import the modules one by one.
"""
