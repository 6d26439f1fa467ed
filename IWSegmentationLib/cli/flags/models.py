"""The flags of ``iwseg models``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.models`.
"""

from __future__ import annotations

import argparse

#: The environment variable naming the default manifest of ``iwseg models fetch``.
MANIFEST_ENV = "IWSEG_MODEL_MANIFEST"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="the local model library: list, add, verify, remove, fetch, accept",
        description="A local folder of checkpoints known by name, each checked by sha256, with its licence and "
                    "model card. `iwseg predict --model NAME` uses a model of the library by name. See docs/models.md.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--library", metavar="DIR", default=None,
                        help="the library folder (default: $IWSEG_MODELS, else the per-user data folder)")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    listing = sub.add_parser("list", parents=[common], help="list the models with their licence and card")
    listing.add_argument("--json", action="store_true", help="one JSON object per model on stdout")
    add = sub.add_parser("add", parents=[common], help="copy a checkpoint into the library")
    add.add_argument("file", help="checkpoint (.safetensors)")
    add.add_argument("--name", help="the model's name in the library (default: the file name without .safetensors)")
    add.add_argument("--accept-license", action="store_true",
                     help="accept the model's licence, where its card asks for acceptance")
    add.add_argument("--replace", action="store_true",
                     help="replace the model already in the library under this name with another file (refused "
                          "without it; the same file again changes nothing)")
    verify = sub.add_parser("verify", parents=[common], help="check each model's file against its sha256")
    verify.add_argument("name", nargs="?", help="one model (default: all)")
    remove = sub.add_parser("remove", parents=[common], help="delete a model and its file from the library")
    remove.add_argument("name")
    fetch = sub.add_parser("fetch", parents=[common], help="download a model of a manifest (resumable, sha256-checked)")
    fetch.add_argument("name")
    fetch.add_argument("--manifest", metavar="FILE|URL",
                       help=f"the manifest (default: ${MANIFEST_ENV}, else manifest.json in the library)")
    fetch.add_argument("--accept-license", action="store_true",
                       help="accept the model's licence, where the manifest or card asks for acceptance")
    fetch.add_argument("--replace", action="store_true",
                       help="replace the model already in the library under this name when the manifest's file is "
                            "another one (refused without it)")
    fetch.add_argument("--progress-format", default="text", choices=("text", "jsonl"),
                       help="text: a progress bar on stderr; jsonl: one JSON object per line on stdout")
    accept = sub.add_parser("accept", parents=[common], help="show a model's licence and record its acceptance")
    accept.add_argument("name")
    return p
