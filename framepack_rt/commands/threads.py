"""The CPU thread policy of a ``framepack-rt serve`` process: ``--threads N``, torch's intra-op threads.

Measured on the project's 2 shared cores (README, "Threads"): with the default decode overlap (the VAE decodes
section k on its own thread while k + 1 samples) torch's default of one thread per core and OpenMP's default
wait policy were as fast as or faster than 1 thread or ``OMP_WAIT_POLICY=PASSIVE``, so the defaults stay.
Without the overlap (``--no-decode-overlap``) OpenMP's spin-waiting threads made 2 threads 1.7-10x slower
under load, and PASSIVE fixed it. OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so it can only be
set in the environment (``OMP_WAIT_POLICY=PASSIVE framepack-rt serve --no-decode-overlap``), not by a flag.

This module imports torch only when --threads is given, after the arguments are parsed.
"""

from __future__ import annotations

import argparse

from framepack_rt.stream.options import at_least_one


def add_argument(parser: argparse.ArgumentParser) -> None:
    """--threads N: torch's intra-op threads for this process (default: torch's own, one per core)."""
    parser.add_argument(
        "--threads", type=at_least_one, default=None, metavar="N",
        help="CPU threads per torch op (default: torch's, one per core). On cores shared with other work "
             "without decode overlap, also set OMP_WAIT_POLICY=PASSIVE in the environment (README, Threads)")


def apply(threads: int | None) -> None:
    """Give torch ``threads`` intra-op threads (None: leave torch's default). Once, at startup."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
