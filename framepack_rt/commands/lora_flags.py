"""``--lora FILE[:SCALE]`` (repeatable) and ``--fuse-lora`` for ``generate`` and ``serve`` (model/lora.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (diffusers/PEFT or kohya/musubi .safetensors)")
    g.add_argument("--lora", action="append", type=lora_spec, default=None, metavar="FILE[:SCALE]",
                   help="a LoRA and its scale (default 1, range -4..4), repeatable; applied unmerged, so `serve` "
                        "sessions can change each scale live")
    g.add_argument("--fuse-lora", action="store_true",
                   help="merge the LoRAs into the weights at load (no per-step cost; fp8 weights are requantized); "
                        "their scales are then fixed")


def lora_spec(text: str) -> tuple[str, float]:
    """argparse type: FILE[:SCALE] -> (path, scale); a missing file or a bad scale is a usage error."""
    from framepack_rt.model.lora import LoraError, parse_lora_spec

    try:
        path, scale = parse_lora_spec(text)
    except LoraError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(path), scale


def specs(args: argparse.Namespace) -> tuple[tuple[str, float], ...]:
    """The (path, scale) pairs given; ValueError for --fuse-lora without any --lora."""
    loras = tuple(args.lora or ())
    if args.fuse_lora and not loras:
        raise ValueError("--fuse-lora needs at least one --lora FILE[:SCALE]")
    return loras
