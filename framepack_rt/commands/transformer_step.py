"""One transformer step at a model's shapes, for ``framepack-rt info`` and ``framepack-rt doctor``.

The model by name: ``tiny`` and ``framepack-13b`` (presets), ``demo`` (the shipped weights) or a folder (a
transformer folder, or a root holding ``transformer/``). Inputs are the F1 layout the pipeline feeds each
step: a window of noisy latents, the start + newest latent at 1x, 2 latents at 2x and 16 at 4x, text and
image tokens. The timing is one warm-up call, then timed calls with the device synchronised around them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from framepack_rt.model.config import PRESETS, FramePackConfig
from framepack_rt.pipeline import builtin
from framepack_rt.pipeline.devices import Placement
from framepack_rt.pipeline.media import BUCKET_SETS, nearest_bucket

RELEASE_STEPS = 25  # the release's default sampling steps (folders and the 13B preset)
RELEASE_IMAGE_TOKENS = 729  # SigLIP at 384 px with 14 px patches: 27 x 27
TYPICAL_PROMPT_TOKENS = 64  # LLaMA tokens of a prompt of a sentence or two, after the template's crop
SMALL_TOKENS = 16  # text and image tokens of the small built-in models
HISTORY = {"clean": 2, "2x": 2, "4x": 16}  # latents per context scale in the default [16, 2, 1] F1 layout
KERNELS = {"clean": (1, 2, 2), "2x": (2, 4, 4), "4x": (4, 8, 8)}  # the clean-latent embedders' patch kernels


@dataclass(frozen=True)
class StepShapes:
    """What one step sees: latent size, window, text and image tokens; plus the model's sampling steps."""

    latent_height: int
    latent_width: int
    text_tokens: int
    image_tokens: int
    steps: int
    window: int = 9

    @property
    def frames_per_section(self) -> int:
        """Video frames each F1 section adds once streaming (4 per latent)."""
        return 4 * self.window

    def tokens(self, config: FramePackConfig) -> int:
        """Tokens of one sample's attention sequence: video, context latents, text and image."""
        h, w = self.latent_height, self.latent_width
        p = config.patch_size
        video = self.window * math.ceil(h / p) * math.ceil(w / p)
        context = 0
        if config.has_clean_x_embedder:
            for key, (kt, kh, kw) in KERNELS.items():
                context += math.ceil(HISTORY[key] / kt) * math.ceil(h / kh) * math.ceil(w / kw)
        return video + context + self.text_tokens + (self.image_tokens if config.has_image_proj else 0)

    def describe(self, config: FramePackConfig) -> str:
        return (f"latents {self.latent_height}x{self.latent_width}, window {self.window}, {self.text_tokens} text + "
                f"{self.image_tokens} image tokens: {self.tokens(config)} tokens")


def transformer_folder(spec: str) -> Path | None:
    """The transformer folder of a model name (None for presets)."""
    if spec in PRESETS:
        return None
    if spec == "demo":
        return builtin.demo_weights_dir() / "transformer"
    path = Path(spec).expanduser()
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"--model {spec}: not a preset ({', '.join(PRESETS)}), not demo, and no transformer "
                            "config.json in that folder or its transformer/")


def model_config(spec: str) -> FramePackConfig:
    folder = transformer_folder(spec)
    return FramePackConfig.preset(spec) if folder is None else FramePackConfig.from_file(folder / "config.json")


def shapes_for(spec: str) -> StepShapes:
    """The shapes the model runs at: the demo and tiny sets' own frame size, the release's 640 bucket (a
    square start image) for the 13B and folders."""
    if spec in ("demo", "tiny"):
        bucket = "demo" if spec == "demo" else "tiny"
        h, w = nearest_bucket(64, 64, BUCKET_SETS[bucket])
        if spec == "demo":
            steps = builtin.DEMO_STEPS
        else:
            from framepack_rt.pipeline.parts import TinyParts

            steps = TinyParts.DEFAULT_STEPS
        return StepShapes(h // 8, w // 8, SMALL_TOKENS, SMALL_TOKENS, steps)
    h, w = nearest_bucket(640, 640, BUCKET_SETS["640"])
    return StepShapes(h // 8, w // 8, TYPICAL_PROMPT_TOKENS, RELEASE_IMAGE_TOKENS, RELEASE_STEPS)


def load_transformer(spec: str, placement: Placement, *, random_on_device: bool = True,
                     quantize: str | None = None, compile: bool = False) -> torch.nn.Module:
    """The transformer on ``placement``. ``framepack-13b`` (no weights) is random: built on the meta device and
    initialised on the device itself (no host copy), or left on the meta device when ``random_on_device`` is
    off or the device is the CPU. ``quantize`` / ``compile``: as --quantize / --compile."""
    from framepack_rt.model.quantize import quantize_blocks
    from framepack_rt.model.transformer import FramePackTransformer

    dtype = placement.compute_dtype
    if spec == "tiny":
        model = FramePackTransformer.from_config("tiny", device=placement.device, dtype=dtype)
    elif spec in PRESETS:
        model = FramePackTransformer.from_config(spec, device="meta", dtype=dtype)
        if placement.device.type == "cpu" or not random_on_device:
            return model.eval()
        model = model.to_empty(device=placement.device)
        generator = torch.Generator(device=placement.device).manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02, generator=generator)
    else:
        model = FramePackTransformer.from_pretrained(transformer_folder(spec), dtype=dtype, device=placement.device,
                                                     quantize=quantize)
        quantize = None  # done while loading
    if quantize is not None:
        quantize_blocks(model, quantize)
    if compile:
        model.compile_blocks()
    return model.eval()


def example_inputs(config: FramePackConfig, shapes: StepShapes, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, *, seed: int = 0, timestep: float = 500.0) -> dict:
    """Seeded inputs of one F1 step at ``shapes`` (batch 1), on ``device``: what info and doctor time, and what
    the 13B-width benchmarks (benchmarks/lora.py, quantization.py) feed their blocks."""
    g = torch.Generator().manual_seed(seed)
    h, w, c, window = shapes.latent_height, shapes.latent_width, config.in_channels, shapes.window

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    first_noisy = sum(HISTORY.values())  # frame 0 is the start (in "clean"), then the history, oldest first
    return dict(
        hidden_states=randn(1, c, window, h, w),
        timestep=torch.tensor([timestep], device=device),
        encoder_hidden_states=randn(1, shapes.text_tokens, config.text_embed_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        image_embeds=randn(1, shapes.image_tokens, config.image_proj_dim),
        guidance=torch.tensor([10_000.0], device=device),
        indices_latents=torch.arange(first_noisy, first_noisy + window, device=device),
        latents_clean=randn(1, c, HISTORY["clean"], h, w),
        indices_latents_clean=torch.tensor([0, first_noisy - 1], device=device),
        latents_history_2x=randn(1, c, HISTORY["2x"], h, w),
        indices_latents_history_2x=torch.arange(first_noisy - 3, first_noisy - 1, device=device),
        latents_history_4x=randn(1, c, HISTORY["4x"], h, w),
        indices_latents_history_4x=torch.arange(1, 1 + HISTORY["4x"], device=device),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_forward(model: torch.nn.Module, inputs: dict, *, repeats: int = 1) -> tuple[float, torch.Tensor]:
    """(ms per sampling step after one warm-up step, the output): the section's constant inputs are prepared
    once (StepPlan) and each step is ``model.step``, as the engine runs it."""
    device = next(model.parameters()).device
    x, timestep, guidance = inputs["hidden_states"], inputs["timestep"], inputs.get("guidance")
    context = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep", "guidance")}
    with torch.no_grad():
        plan = model.prepare((x.shape[0], *x.shape[2:]), **context)
        model.step(plan, x, timestep, guidance)  # warm-up: first-call allocations, kernel compiles, backend choices
        synchronize(device)
        began = time.perf_counter()
        for _ in range(repeats):
            out = model.step(plan, x, timestep, guidance)
        synchronize(device)
    return (time.perf_counter() - began) * 1000 / repeats, out
