"""The model sets that ship with the package, by name: "demo" and "tiny".

* ``demo``: the trained demo model (framepack_rt/demo makes it) in the published folder layout under
  ``DEMO_WEIGHTS_DIR``, with the settings it was trained and evaluated with. Only its location and settings live
  here; the synthetic world and the training code sit above the pipeline, in ``framepack_rt.demo``.
* ``tiny``: random weights built in code (tiny_models.py): every code path, fast, for tests.

Any model folder may carry ``example/start.png`` and ``example/prompt.txt``: the start a server opens with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from framepack_rt.engine.sampling import GuidanceConfig

DEFAULT_MODEL = "demo"  # what every command (serve, generate, info, doctor, bench) loads without --model
# The names --model takes besides a PATH, one line each for the commands' help. The pipeline sets run in every
# command; the transformer presets have no encoders or VAE, so only info and doctor (one transformer step) take them.
BUILTIN_MODELS = {"demo": "the trained demo model (3.7 M parameters, shipped)",
                  "tiny": "random weights built in code: coloured noise, fast, for tests"}
TRANSFORMER_PRESETS = {"framepack-13b": "the release's 13B transformer, random weights, no encoders or VAE"}
DEMO_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "demo" / "weights"
DEMO_SIZE = 96  # frame side in pixels: 12 x 12 latents; the "demo" bucket of media.py
DEMO_STEPS = 8  # default sampling steps of the demo model
DEMO_CFG = 2.0  # real classifier-free guidance scale (1.0: off), against zero text: trained with 10% text dropout
DEMO_CFG_MIN_SIGMA = 0.6  # guide only the steps with sigma >= this (5 of the 8): they set the motion
# The first section with a new prompt must undo the history's motion; 4 overshot (demo/TRAINING.md).
DEMO_CFG_AFTER_CHANGE = 2.5
# Fresh noise at every step, not the ODE path: measured on the transformer shipped then, one intact ball in 57% of
# frames over 16 turns against 38% with UniPC, at the same cost (demo/TRAINING.md, issue 19).
DEMO_SOLVER = "euler_stochastic"
EXAMPLE_DIR = "example"  # <model folder>/example/start.png + prompt.txt


def demo_weights_dir() -> Path:
    """The shipped weights folder; a FileNotFoundError that says how to make it when it is missing."""
    if not (DEMO_WEIGHTS_DIR / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo weights are missing from {DEMO_WEIGHTS_DIR} (a source checkout without them?): reinstall "
            "framepack-rt, or train them with `python -m framepack_rt.demo.train all --out runs/demo`, "
            "or use --model tiny (random weights)")
    return DEMO_WEIGHTS_DIR


def demo_guidance(cfg: float | None = None) -> "GuidanceConfig":
    """How the demo samples: distilled guidance 10 (as trained) and real CFG at ``cfg`` (default DEMO_CFG), at
    DEMO_CFG_AFTER_CHANGE in the first section after a prompt change (when that is stronger; none at cfg 1)."""
    from framepack_rt.engine.sampling import GuidanceConfig

    scale = DEMO_CFG if cfg is None else cfg
    after = DEMO_CFG_AFTER_CHANGE if scale != 1.0 and DEMO_CFG_AFTER_CHANGE > scale else None
    return GuidanceConfig(cfg=scale, cfg_min_sigma=DEMO_CFG_MIN_SIGMA, cfg_after_change=after)


def read_example(root: str | Path) -> tuple[np.ndarray, str] | None:
    """A model folder's example start (image (H, W, 3) uint8, prompt), or None when it has none."""
    folder = Path(root) / EXAMPLE_DIR
    image_path, prompt_path = folder / "start.png", folder / "prompt.txt"
    if not (image_path.is_file() and prompt_path.is_file()):
        return None
    from PIL import Image

    with Image.open(image_path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return rgb, prompt_path.read_text(encoding="utf-8").strip()


def write_example(root: str | Path, image: np.ndarray, prompt: str) -> None:
    """Store an example start in a model folder (lossless PNG: read_example gives the same pixels back)."""
    from PIL import Image

    folder = Path(root) / EXAMPLE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(folder / "start.png")
    (folder / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
