"""The ``iwseg`` command line: the dispatcher (:mod:`.main`) and one module per sub-command (:mod:`.commands`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
