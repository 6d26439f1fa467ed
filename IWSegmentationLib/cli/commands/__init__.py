"""Sub-commands of ``iwseg``: each module defines ``register(subparsers)`` and a ``run(args)``."""
