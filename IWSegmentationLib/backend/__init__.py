"""Running the backend: ``iwseg predict`` in a child process, watched and cancelled from a front end.

Standard library only, no torch and no Slicer: the Slicer module (``slicer/``) and the inference
server (``serve/``) both run their jobs with it. A job is given a
:class:`~IWSegmentationLib.predict.options.PredictOptions` (what the user chose, checked, and its
command line). Its modules, each importing only those above it:

* :mod:`.job` — the job contract: :class:`Signal`, the exit-code policy (:class:`Outcome`),
  :class:`RunResult`, the :class:`SegmentationJob` and :class:`JobFactory` protocols, and
  :class:`FolderJob` (the working folder every job shares, the remote job of ``serve.client`` too);
* :mod:`.process_tree` — processes as the system sees them: identity, descendants, signals;
* :mod:`.child_process` — :class:`BackendProcess`, one child process tree with JSON-lines progress;
* :mod:`.interpreter` — the child interpreter's command prefix and environment;
* :mod:`.local_run` — :class:`InferenceRun` and :class:`LocalJobFactory`, the job on this computer;
* :mod:`.device_probe` — :class:`DeviceProbe`, which devices torch sees, asked in a child.

Nothing is re-exported: import each name from its module.
"""
