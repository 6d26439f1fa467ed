"""The flags of each ``iwseg`` sub-command, one module per command, each with ``register(subparsers)``.

Apart from :mod:`IWSegmentationLib.cli.commands` (what each command does) so that reading a command
line imports only names and ranges: :func:`IWSegmentationLib.cli.main.main` builds the parser of the
one command it is given and imports that command's pipeline after the flags are read.
"""
