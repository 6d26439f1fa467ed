"""Sub-commands of ``iwseg``: each module defines ``run(args)``, what the command does with the
arguments its flags (:mod:`IWSegmentationLib.cli.flags`, same module name) parsed."""
