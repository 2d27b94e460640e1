"""Find the model parts in local folders laid out as published, and load them one at a time.

Published layouts (nothing is ever downloaded; paths are local folders):
  hunyuanvideo-community/HunyuanVideo      text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ vae/
  lllyasviel/flux_redux_bfl                image_encoder/ feature_extractor/
  lllyasviel/FramePackI2V_HY or            config.json + diffusion_pytorch_model*.safetensors
  lllyasviel/FramePack_F1_I2V_HY_20250503  (found as transformer/ under a root, or given directly)

``resolve_model_paths(root, ...)`` looks for each part as ``<root>/<part>`` in every root given (the three
downloads may be separate folders), and a path given per part overrides the roots.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from framepack_rt.pipeline.devices import part_dtype

PathLike = str | Path


def _any(*names: str) -> Callable[[Path], bool]:
    return lambda folder: any(any(folder.glob(name)) for name in names)


def _all(*checks: Callable[[Path], bool]) -> Callable[[Path], bool]:
    return lambda folder: all(check(folder) for check in checks)


_CONFIG = _any("config.json")
_HF_WEIGHTS = _any("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
_DIFFUSERS_WEIGHTS = _any("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_TOKENIZER = _all(_any("tokenizer_config.json"), _any("tokenizer.json", "vocab.json"))

# part -> (what must be in its folder, in words; the check)
PARTS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "text_encoder": ("config.json and model*.safetensors of LlamaModel (llava-llama-3-8b)", _all(_CONFIG, _HF_WEIGHTS)),
    "tokenizer": ("tokenizer_config.json and tokenizer.json of the LLaMA tokenizer", _TOKENIZER),
    "text_encoder_2": ("config.json and model.safetensors of CLIPTextModel (CLIP-L)", _all(_CONFIG, _HF_WEIGHTS)),
    "tokenizer_2": ("tokenizer_config.json and tokenizer.json (or vocab.json + merges.txt) of the CLIP tokenizer",
                    _TOKENIZER),
    "vae": ("config.json and diffusion_pytorch_model.safetensors of AutoencoderKLHunyuanVideo",
            _all(_CONFIG, _DIFFUSERS_WEIGHTS)),
    "image_encoder": ("config.json and model.safetensors of SiglipVisionModel (flux_redux_bfl)",
                      _all(_CONFIG, _HF_WEIGHTS)),
    "feature_extractor": ("preprocessor_config.json of SiglipImageProcessor (flux_redux_bfl)",
                          _any("preprocessor_config.json")),
    "transformer": ("config.json and diffusion_pytorch_model*.safetensors (+ index) of the FramePack transformer",
                    _all(_CONFIG, _any("diffusion_pytorch_model*.safetensors", "*.safetensors.index.json"))),
}


# Parts a model folder may have; used when present. A fast decoder belongs to one VAE: found beside vae/ only.
OPTIONAL_PARTS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "fast_decoder": ("config.json and diffusion_pytorch_model.safetensors of FastVideoDecoder (fast_decoder.py)",
                     _all(_CONFIG, _DIFFUSERS_WEIGHTS)),
}


class MissingModelPart(FileNotFoundError):
    """A part's folder is absent or lacks its files; the message names the folder and what belongs there."""


@dataclass(frozen=True)
class ModelPaths:
    text_encoder: Path
    tokenizer: Path
    text_encoder_2: Path
    tokenizer_2: Path
    vae: Path
    image_encoder: Path
    feature_extractor: Path
    transformer: Path
    fast_decoder: Path | None = None


def check_part(part: str, folder: PathLike) -> Path:
    """``folder`` if it holds ``part`` in its published layout; MissingModelPart otherwise."""
    expected, check = {**PARTS, **OPTIONAL_PARTS}[part]
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingModelPart(f"{folder}: no such folder; expected {expected} ({part})")
    if not check(folder):
        raise MissingModelPart(f"{folder}: expected {expected} ({part})")
    return folder


def resolve_part(part: str, roots: list[PathLike], override: PathLike | None = None) -> Path:
    """One part: the override if given, else ``<root>/<part>`` in the first root that has it."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; parts are {sorted(PARTS)}")
    if override is not None:
        return check_part(part, override)
    if not roots:
        raise MissingModelPart(f"no folder given for {part}: pass a root folder or {part}=<folder>")
    errors = []
    for root in roots:
        try:
            return check_part(part, Path(root).expanduser() / part)
        except MissingModelPart as err:
            errors.append(str(err))
    raise MissingModelPart("; ".join(errors))


def resolve_model_paths(*roots: PathLike, **parts: PathLike | None) -> ModelPaths:
    """All parts: ``resolve_model_paths("/models")`` or per part, e.g. ``vae="/x/vae"``; both may mix."""
    unknown = sorted(set(parts) - set(PARTS) - set(OPTIONAL_PARTS))
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; parts are {sorted(PARTS)}, optional {sorted(OPTIONAL_PARTS)}")
    found = {p: resolve_part(p, list(roots), parts.get(p)) for p in PARTS}
    if parts.get("fast_decoder") is not None:  # asked for: must be right
        found["fast_decoder"] = check_part("fast_decoder", parts["fast_decoder"])
    else:  # the one beside the VAE in use, when complete (another VAE's latents would decode to nonsense)
        beside = found["vae"].parent / "fast_decoder"
        found["fast_decoder"] = beside if OPTIONAL_PARTS["fast_decoder"][1](beside) else None
    return ModelPaths(**found)


class ModelLoader:
    """Instantiates each part on demand, one at a time, on a device/dtype (None: each part's default,
    :func:`framepack_rt.pipeline.devices.part_dtype`: fp32 on the CPU; on GPUs the transformer in bf16, or fp16
    where the GPU lacks bf16, and the encoders and VAE in fp16).

    The low-VRAM mode wraps each use in ``using``: ``with loader.using("text_encoder") as te: te.encode(p)``
    loads the part, and frees it on exit.
    """

    def __init__(self, paths: ModelPaths, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 spatial_tiling: bool = False, encoder_device: torch.device | None = None) -> None:
        """encoder_device: where the three encoders run (None: ``device``). On the CPU beside a GPU they keep
        the GPU's dtype (an 8 B LLaMA in fp32 would double its host RAM)."""
        self.paths, self.device, self.dtype, self.spatial_tiling = paths, torch.device(device), dtype, spatial_tiling
        self.encoder_device = self.device if encoder_device is None else torch.device(encoder_device)

    def _dtype(self, gpu_default: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is not None or self.dtype is not None:
            return dtype if dtype is not None else self.dtype
        return gpu_default if self.device.type in ("cuda", "mps") else torch.float32

    def dtype_for(self, part: str, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype ``part`` ("transformer", "text_encoder", ...) loads in: ``dtype``, else the loader's, else
        the part's default on this device."""
        if dtype is not None or self.dtype is not None:
            return self._dtype(torch.float32, dtype)
        return self._dtype(part_dtype(part, self.device), None)

    def _encoder_dtype(self, part: str, dtype: torch.dtype | None) -> torch.dtype:
        chosen = self.dtype_for(part, dtype)
        # fp16 kernels on the CPU are slow or missing; bf16 has the same size and a wider range
        moved = self.encoder_device.type == "cpu" and self.device.type != "cpu"
        return torch.bfloat16 if moved and chosen == torch.float16 else chosen

    def text_encoder(self, dtype: torch.dtype | None = None):
        """LLaMA features: framepack_rt.pipeline.encoders.TextEncoder (fp16 on CUDA, as released)."""
        from framepack_rt.pipeline.encoders import TextEncoder

        return TextEncoder.from_pretrained(self.paths.text_encoder, self.paths.tokenizer, device=self.encoder_device,
                                           dtype=self._encoder_dtype("text_encoder", dtype))

    def clip_text_encoder(self, dtype: torch.dtype | None = None):
        from framepack_rt.pipeline.encoders import CLIPTextEncoder

        return CLIPTextEncoder.from_pretrained(self.paths.text_encoder_2, self.paths.tokenizer_2,
                                               device=self.encoder_device,
                                               dtype=self._encoder_dtype("text_encoder_2", dtype))

    def image_encoder(self, dtype: torch.dtype | None = None):
        from framepack_rt.pipeline.encoders import ImageEncoder

        return ImageEncoder.from_pretrained(self.paths.image_encoder, self.paths.feature_extractor,
                                            device=self.encoder_device,
                                            dtype=self._encoder_dtype("image_encoder", dtype))

    def vae(self, dtype: torch.dtype | None = None):
        from framepack_rt.pipeline.vae import VideoVAE

        return VideoVAE.from_pretrained(self.paths.vae, device=self.device, dtype=self.dtype_for("vae", dtype),
                                        spatial_tiling=self.spatial_tiling, fast_decoder=self.paths.fast_decoder)

    def transformer(self, dtype: torch.dtype | None = None, quantize: str | None = None):
        from framepack_rt.model.transformer import FramePackTransformer

        return FramePackTransformer.from_pretrained(self.paths.transformer, device=self.device,
                                                    dtype=self.dtype_for("transformer", dtype), quantize=quantize)

    @contextlib.contextmanager
    def using(self, part: str, dtype: torch.dtype | None = None) -> Iterator[object]:
        """Load ``part`` ("text_encoder", "clip_text_encoder", "image_encoder", "vae", "transformer"), free on exit."""
        loaded = getattr(self, part)(dtype)
        try:
            yield loaded
        finally:
            if hasattr(loaded, "release"):
                loaded.release()
            else:  # the transformer: drop every reference we hold and the CUDA cache
                loaded.to("meta")
            del loaded
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def with_overrides(paths: ModelPaths, **parts: PathLike) -> ModelPaths:
    """A copy of ``paths`` with some parts replaced (each checked)."""
    return dataclasses.replace(paths, **{p: check_part(p, f) for p, f in parts.items()})
