"""The CPU thread policy of a ``framepack-rt`` process: OpenMP's wait policy and torch's intra-op threads.

With OpenMP's default policy an idle worker thread spins for a while before it sleeps, holding its core. On a
machine whose cores are shared (the server's event loop and video encoders, the decode-ahead thread, other
processes) the spinning threads take the cores the working ones need; ``OMP_WAIT_POLICY=PASSIVE`` makes them
sleep at once. OpenMP reads the variable once, when torch loads it, so it has to be in the environment before
the first ``import torch``: :func:`prefer_passive_wait` runs first thing in ``framepack-rt``'s main(). A
program that imports the library sets it itself (``OMP_WAIT_POLICY=PASSIVE python my_app.py``). Measured on
2 cores, README "Threads".

This module imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import MutableMapping

WAIT_POLICY = "PASSIVE"


def prefer_passive_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; True when set here. Does nothing once torch
    is imported (its OpenMP has read the environment already), so call it before anything imports torch."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return False
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"threads must be at least 1, got {value}")
    return value


def add_argument(parser: argparse.ArgumentParser) -> None:
    """--threads N: torch's intra-op threads for this process (default: torch's own, one per core)."""
    parser.add_argument(
        "--threads", type=_thread_count, default=None, metavar="N",
        help="CPU threads per torch op (default: one per core). OpenMP threads sleep when idle "
             "(OMP_WAIT_POLICY=PASSIVE, set unless you set it)")


def apply(threads: int | None) -> None:
    """Give torch ``threads`` intra-op threads (None: leave torch's default). Once, at startup."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
