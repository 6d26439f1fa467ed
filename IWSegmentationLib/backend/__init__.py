"""Running the backend: ``iwseg predict`` in a child process, watched and cancelled from a front end.

:mod:`.process` holds the job contract (``SegmentationJob``, ``JobFactory``), the local job
(``InferenceRun``) and the process-tree handling. Standard library only, no torch and no Slicer:
the Slicer module (``slicer/``) and the inference server (``serve/``) both run their jobs with it.
"""
