"""``--model`` for every command (serve, generate, info, doctor, bench): one set of names, one default, one help.

The names and the default live with the model sets themselves (framepack_rt/pipeline/builtin.py); this module
only turns them into the flag. A value that is neither a name nor an existing folder is refused when the
command line is read, before anything loads, with the names it could have been.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from framepack_rt.pipeline.builtin import BUILTIN_MODELS, DEFAULT_MODEL, TRANSFORMER_PRESETS


def model_names(presets: bool = False) -> list[str]:
    """The names ``--model`` takes besides a PATH (``presets``: also the transformer-only presets)."""
    return [*BUILTIN_MODELS, *(TRANSFORMER_PRESETS if presets else ())]


def model_help(presets: bool = False) -> str:
    """The flag's help: every name with what it is, PATH, and the default."""
    names = {**BUILTIN_MODELS, **(TRANSFORMER_PRESETS if presets else {})}
    listed = "; ".join(f"{name}: {what}" for name, what in names.items())
    return f"{' | '.join(names)} | PATH (default: {DEFAULT_MODEL}). {listed}; PATH: local model folders"


def model_type(presets: bool = False):
    """The argparse ``type`` of --model: a known name, or a folder that exists."""
    def check(value: str) -> str:
        if value in BUILTIN_MODELS or (presets and value in TRANSFORMER_PRESETS):
            return value
        if value in TRANSFORMER_PRESETS:
            raise argparse.ArgumentTypeError(
                f"{value!r} is a transformer alone ({TRANSFORMER_PRESETS[value]}): `info` and `doctor` take it; "
                f"here pass {' or '.join(BUILTIN_MODELS)}, or PATH to the release's model folders")
        if not Path(value).expanduser().is_dir():
            raise argparse.ArgumentTypeError(
                f"{value!r}: not a model name ({', '.join(model_names(presets))}) and no such folder")
        return value

    check.__name__ = "model"  # argparse names the type in its messages
    return check


def add_argument(parser: argparse.ArgumentParser, presets: bool = False) -> None:
    """Add ``--model`` (default DEFAULT_MODEL). ``presets``: the command runs a transformer alone (info, doctor),
    so the transformer-only presets are accepted too."""
    parser.add_argument("--model", default=DEFAULT_MODEL, type=model_type(presets), metavar="NAME|PATH",
                        help=model_help(presets))
