"""Where the pipeline's models come from: built in (tiny) or local folders, kept loaded or loaded per use.

Both providers answer the same calls: encode_text, encode_pooled, encode_image, encode_latent, transformer(),
vae(). The low-VRAM folder provider loads each encoder only for the call that needs it and streams the
transformer's blocks from CPU memory (framepack_rt.model.offload).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from framepack_rt.pipeline.encoders import CLIPTextEncoder, ImageEncoder, TextEncoder
from framepack_rt.pipeline.vae import VideoVAE

if TYPE_CHECKING:
    from framepack_rt.pipeline.model_folders import ModelPaths


@dataclass(frozen=True)
class TransformerOptions:
    """How the transformer is loaded and run: fp8 weights (``quantize="fp8"``) and torch.compile of its blocks."""

    quantize: str | None = None
    compile: bool = False

    def apply(self, model: torch.nn.Module, quantized: bool) -> torch.nn.Module:
        """Quantize (unless loading already did) and compile ``model`` as asked; returns it."""
        if self.quantize is not None and not quantized:
            from framepack_rt.model.quantize import quantize_blocks

            quantize_blocks(model, self.quantize)
        if self.compile:
            model.compile_blocks()
        return model


class TinyParts:
    """The built-in tiny model set (framepack_rt.pipeline.tiny_models), seeded, in memory, fp32."""

    DEFAULT_STEPS = 8  # few steps: the built-in model is meant to stream in real time on a CPU

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0,
                 options: TransformerOptions = TransformerOptions()) -> None:
        from framepack_rt.pipeline.tiny_models import build_tiny_models

        self.device = torch.device(device)
        tiny = build_tiny_models(seed)
        self.text = TextEncoder(tiny.text_encoder.to(self.device), tiny.tokenizer)
        self.clip = CLIPTextEncoder(tiny.text_encoder_2.to(self.device), tiny.tokenizer_2)
        self.image = ImageEncoder(tiny.image_encoder.to(self.device), tiny.feature_extractor)
        self._vae = VideoVAE(tiny.vae.to(self.device))
        self._transformer = options.apply(tiny.transformer.to(self.device), quantized=False)

    @functools.lru_cache(maxsize=64)  # prompts repeat (a server's sessions, prompt timelines): encode once
    def encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.encode(prompt)

    @functools.lru_cache(maxsize=64)
    def encode_pooled(self, prompt: str) -> torch.Tensor:
        return self.clip.encode(prompt)

    def encode_image(self, fitted: np.ndarray) -> torch.Tensor:
        return self.image.encode(fitted)

    def encode_latent(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._vae.encode(pixels)

    def transformer(self) -> torch.nn.Module:
        return self._transformer

    def vae(self) -> VideoVAE:
        return self._vae


class FolderParts:
    """Parts read from local folders in the published layouts (framepack_rt.pipeline.model_folders)."""

    def __init__(self, paths: ModelPaths, *, device: torch.device | str, dtype: torch.dtype | None,
                 low_vram: bool, budget_bytes: int | None, options: TransformerOptions = TransformerOptions(),
                 encoders_on_cpu: bool = False) -> None:
        """paths: the parts' folders (model_folders.resolve_model_paths); dtype None: each part's default on
        the device (devices.part_dtype). budget_bytes: low-VRAM mode's weight budget for the transformer's
        blocks (memory.MemoryEstimate.streamer_budget_bytes). encoders_on_cpu: run the encoders on the CPU (low-VRAM
        mode when the largest does not fit the budget beside the rest); their outputs move to the device."""
        from framepack_rt.pipeline.model_folders import ModelLoader

        self.device = torch.device(device)
        self.loader = ModelLoader(paths, device=self.device, dtype=dtype, spatial_tiling=low_vram,
                                  encoder_device=torch.device("cpu") if encoders_on_cpu else None)
        self.low_vram, self.budget_bytes, self.options = low_vram, budget_bytes, options
        self._loaded: dict[str, object] = {}
        self._transformer = None
        self._vae = None

    def _part(self, name: str):
        """Kept loaded normally; in low-VRAM mode loaded for this one use and freed (a context manager)."""
        if self.low_vram:
            return self.loader.using(name)
        if name not in self._loaded:
            self._loaded[name] = getattr(self.loader, name)()
        return _Borrowed(self._loaded[name])

    @functools.lru_cache(maxsize=64)
    def encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        with self._part("text_encoder") as encoder:
            return encoder.encode(prompt)

    @functools.lru_cache(maxsize=64)
    def encode_pooled(self, prompt: str) -> torch.Tensor:
        with self._part("clip_text_encoder") as encoder:
            return encoder.encode(prompt)

    def encode_image(self, fitted: np.ndarray) -> torch.Tensor:
        with self._part("image_encoder") as encoder:
            return encoder.encode(fitted)

    def encode_latent(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae().encode(pixels)

    def vae(self) -> VideoVAE:
        if self._vae is None:
            self._vae = self.loader.vae()  # used every section: kept (tiled in low-VRAM mode)
        return self._vae

    def transformer(self) -> torch.nn.Module:
        if self._transformer is None:
            if self.low_vram:
                from framepack_rt.model.transformer import FramePackTransformer
                from framepack_rt.model.offload import BlockStreamer

                model = FramePackTransformer.from_pretrained(self.loader.paths.transformer, device="cpu",
                                                             dtype=self.loader.dtype_for("transformer"),
                                                             quantize=self.options.quantize)
                self.streamer = BlockStreamer(model, self.device, self.budget_bytes)
            else:
                model = self.loader.transformer(quantize=self.options.quantize)
            self._transformer = self.options.apply(model, quantized=True).eval()
        return self._transformer


class _Borrowed:
    """A kept part used in a ``with`` block like a loaded-for-one-use part, but not freed after."""

    def __init__(self, part: object) -> None:
        self.part = part

    def __enter__(self):
        return self.part

    def __exit__(self, *exc) -> None:
        return None
