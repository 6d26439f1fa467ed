"""``python -m IWSegmentationLib ...`` is the same as the ``iwseg`` command (Slicer runs it this way)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
