"""The trained demo model: a small FramePack that continues videos of a synthetic world of shapes.

* ``world``     -- the synthetic world: scenes, motions a prompt describes, clips with prompt timelines.
* ``models``    -- the demo's parts: the real classes at small sizes, built and saved in code.
* ``dist``      -- process group, FSDP wrapping, sharded checkpoints (train.py under torchrun).
* ``data``      -- clips -> latent caches -> FramePack F1 training batches (flow matching).
* ``train``     -- ``python -m framepack_rt.demo.train``: VAE, then transformer; single process or FSDP.
* ``evaluate``  -- ``python -m framepack_rt.demo.evaluate``: direction, prompt change, drift.

The trained weights live in ``WEIGHTS_DIR`` in the published folder layout (model_folders.py), so the
folder loader reads them like any other model set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from framepack_rt.sampling import GuidanceConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where ``python -m framepack_rt.demo.train export`` writes the shipped weights (published layout)."""
DEMO_SIZE = 64  # frame side in pixels: 8 x 8 latents; the "tiny" bucket (64, 64) of media.py
DEMO_STEPS = 8  # default sampling steps of the demo model
DEMO_CFG = 2.0  # real classifier-free guidance scale (1.0: off), against zero text: trained with 10% text dropout
DEMO_CFG_MIN_SIGMA = 0.6  # guide only the steps with sigma >= this (5 of the 8): they set the motion
EXAMPLE_PROMPT = "a red ball moves right"


def weights_dir() -> Path:
    """The shipped weights folder; a FileNotFoundError that says how to make it when it is missing."""
    if not (WEIGHTS_DIR / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo weights are missing from {WEIGHTS_DIR} (a source checkout without them?): reinstall "
            "framepack-rt, or train them with `python -m framepack_rt.demo.train all --out runs/demo`, "
            "or use --model tiny (random weights)")
    return WEIGHTS_DIR


def demo_guidance(cfg: float | None = None) -> "GuidanceConfig":
    """How the demo samples: distilled guidance 10 (as trained) and real CFG at ``cfg`` (default DEMO_CFG)."""
    from framepack_rt.sampling import GuidanceConfig

    return GuidanceConfig(cfg=DEMO_CFG if cfg is None else cfg, cfg_min_sigma=DEMO_CFG_MIN_SIGMA)


def example_start() -> tuple[np.ndarray, str]:
    """What the demo model opens with: a red ball alone on a plain dark green background, and the prompt that
    moves it. Of 16 scenes tried with the first run's weights (world seeds 1-8, one or two objects; right for 3
    sections, then left), this one kept the ball in view best at the server's default seed 0."""
    from framepack_rt.demo.world import WorldConfig, start_image

    image, _ = start_image(seed=3, prompt=EXAMPLE_PROMPT, cfg=WorldConfig(size=DEMO_SIZE), num_objects=1,
                           x=0.3, y=0.5)
    return image, EXAMPLE_PROMPT
