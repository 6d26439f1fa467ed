"""The Slicer side of the engine: everything the module needs that is testable without Qt.

:mod:`IWSegmentationLib.backend` runs the ``iwseg predict`` backend and reads its JSON-lines progress; :mod:`.panel`
computes what the panel shows, :mod:`.logic` is the module's logic, :mod:`.deps` installs dependencies
inside Slicer, :mod:`.mrml` builds the scene and :mod:`.views` renders it offscreen. Only this package
imports ``slicer``/``vtk`` (lazily, except :mod:`.views`), and it never imports torch, training or data:
the network runs in the backend process. Testing/integration/test_architecture.py enforces these rules.
"""
