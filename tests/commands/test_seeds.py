"""Seeds reproduce: the same `framepack-rt generate` command run twice gives identical frames.

Each run is its own process, as a user runs it, with the hash seed (set and dict order, allocation patterns)
varied on purpose. The frames are compared after decoding the MP4s, exactly. A different seed must change them
(the comparison can fail).

The thread count is not varied: the CPU's BLAS splits small matrix products across threads, so 1 and 2
threads round differently (the demo's latents differ by up to 3e-6 after a section, from the text embedder's
first Linear on). The demo's fast decoder (then at 128 px) turned that into 1-level pixel differences in a few
frames, and the MP4 encoder into up to 13/255 (measured 2026-12-02). README says so.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import subprocess
import sys

import numpy as np
import torch

RUN_TIMEOUT = 420  # seconds per generate run on a loaded 2-core machine (about 10 s idle)


def generate(image, out, seed: int, read, *, hash_seed: str, threads: str) -> np.ndarray:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": threads}
    cmd = [sys.executable, "-m", "framepack_rt.commands.cli", "generate", "--model", "demo", "--device", "cpu",
           "--image", str(image), "--prompt", "a red ball moves right", "--seconds", "0.8", "--seed", str(seed),
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-2000:]
    return read(out)


def test_the_cli_reproduces_its_seed(tmp_path, start_image, mp4_frames):
    runs = [("a.mp4", 3, "1", "1"), ("b.mp4", 3, "2", "1"), ("c.mp4", 4, "1", "1")]  # out, seed, hash seed, threads
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:  # three processes at once: they share no state
        first, second, other = pool.map(
            lambda run: generate(start_image, tmp_path / run[0], run[1], mp4_frames, hash_seed=run[2], threads=run[3]),
            runs)
    assert first.shape == second.shape == (37, 192, 192, 3)  # the demo's fast decoder draws 192 px from 96 px's latents
    assert np.array_equal(first, second), f"max difference {np.abs(first.astype(int) - second).max()}/255"
    assert np.abs(first.astype(int) - other).max() > 30  # another seed is another video


def test_generate_draws_nothing_from_the_global_generators(tmp_path, start_image):
    """torch seeds its global generator from the OS in every process: a draw from it anywhere on the generate
    path (here or in a library) would make runs differ. Sampling noise comes only from the seeded NoiseSource."""
    from framepack_rt.commands.cli import main

    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert main(["generate", "--model", "demo", "--device", "cpu", "--image", str(start_image), "--prompt",
                 "a red ball moves right", "--seconds", "0.8", "--steps", "2", "--out", str(tmp_path / "o.mp4")]) == 0
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])
    assert python_state == random.getstate()
