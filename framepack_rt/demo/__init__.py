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

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where ``python -m framepack_rt.demo.train export`` writes the shipped weights (published layout)."""
