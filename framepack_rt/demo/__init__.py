"""The trained demo model: a small FramePack that continues videos of a synthetic world of shapes.

* ``world``     -- the synthetic world: scenes, motions a prompt describes, clips with prompt timelines.
* ``models``    -- the demo's parts: the real classes at small sizes, built and saved in code.
* ``dist``      -- process group, FSDP wrapping, sharded checkpoints (train.py under torchrun).
* ``data``      -- clips -> latent caches -> FramePack F1 training batches (flow matching).
* ``train``     -- ``python -m framepack_rt.demo.train``: VAE, then transformer; single process or FSDP.
* ``evaluate``  -- ``python -m framepack_rt.demo.evaluate``: direction, prompt change, drift.
* ``onpolicy``  -- ``python -m framepack_rt.demo.onpolicy``: training windows from the model's own histories,
  the world's continuations as targets (DAgger); ``train transformer --onpolicy`` mixes them in.

The trained weights live in ``WEIGHTS_DIR`` in the published folder layout (model_folders.py), with the
example start in ``example/``, so the folder loader reads them like any other model set.
"""

from __future__ import annotations

import numpy as np

from framepack_rt.pipeline.builtin import (  # noqa: F401  (the demo's settings live with the pipeline that loads it)
    DEMO_CFG,
    DEMO_CFG_AFTER_CHANGE,
    DEMO_CFG_MIN_SIGMA,
    DEMO_SIZE,
    DEMO_SOLVER,
    DEMO_STEPS,
    DEMO_WEIGHTS_DIR as WEIGHTS_DIR,
    demo_guidance,
    demo_weights_dir as weights_dir,
)

EXAMPLE_PROMPT = "a red ball moves right"


def example_start() -> tuple[np.ndarray, str]:
    """What the demo model opens with: a red ball alone on a plain dark green background, and the prompt that
    moves it. Of 16 scenes tried with the first run's weights (world seeds 1-8, one or two objects; right for 3
    sections, then left), this one kept the ball in view best at the server's default seed 0. The export stores
    it in the weights folder (example/), where the pipeline reads it."""
    from framepack_rt.demo.world import WorldConfig, start_image

    image, _ = start_image(seed=3, prompt=EXAMPLE_PROMPT, cfg=WorldConfig(size=DEMO_SIZE), num_objects=1,
                           x=0.3, y=0.5)
    return image, EXAMPLE_PROMPT
