"""``iwseg serve``: an inference server for a shared GPU (docs/server.md).

:mod:`.app` is the FastAPI app (needs the ``serve`` extra); :mod:`.client` is its client, standard
library only, used by ``iwseg predict --server`` and by the Slicer module's "Run on: server". This
file imports nothing, so that the module can import the client without the app.
"""
