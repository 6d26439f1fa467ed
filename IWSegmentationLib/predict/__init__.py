"""The prediction use case: what one prediction is asked to do, and the local run that does it.

* :mod:`.options` — :class:`~.options.PredictOptions`: every prediction parameter, checked once,
  and the backend's command line (torch-free; the module, the server and its client use it);
* :mod:`.lesion_json` — the lesion table file's text (standard library only);
* :mod:`.cases` — the cases of a run and where their outputs go, every path checked first;
* :mod:`.outputs` — what a case writes (mask, maps, lesion table, DICOM SEG), renamed together;
* :mod:`.predictor` — :class:`~.predictor.Predictor`: files in -> files out on this computer.

``iwseg predict`` turns its flags into a ``PredictOptions`` and calls ``Predictor.run``. Nothing
is re-exported: importing the package stays light.
"""
