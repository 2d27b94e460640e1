"""Transformer configuration: one dataclass, named presets.

Field names are those of diffusers' ``HunyuanVideoFramepackTransformer3DModel`` config.json, so a released
checkpoint's config loads as it is and ``save_pretrained`` writes a file diffusers reads back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What diffusers writes as the class name; kept so our folders load in diffusers too.
DIFFUSERS_CLASS_NAME = "HunyuanVideoFramepackTransformer3DModel"


@dataclass(frozen=True)
class FramePackConfig:
    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    image_condition_type: str | None = None
    has_image_proj: bool = True
    image_proj_dim: int = 1152
    has_clean_x_embedder: bool = True
    # Not part of config.json: run norm_out + proj_out in fp32 ("high quality fp32 output" of the release).
    fp32_output_head: bool = field(default=True, metadata={"runtime": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim {self.rope_axes_dim} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"every rope axis needs an even size, got {self.rope_axes_dim}")
        if self.qk_norm != "rms_norm":
            raise ValueError(f"only qk_norm='rms_norm' exists in FramePack checkpoints, got {self.qk_norm!r}")
        if self.image_condition_type is not None:
            raise ValueError(
                f"image_condition_type={self.image_condition_type!r} belongs to HunyuanVideo-I2V, not FramePack"
            )
        if (self.patch_size_t, self.patch_size) != (1, 2):
            # The clean-latent embedders (1x/2x/4x kernels) are defined for this patch size only.
            raise ValueError("FramePack packs latents with patch_size=2, patch_size_t=1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    # -- presets -----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "FramePackConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    # -- config.json ---------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME}
        for f in dataclasses.fields(self):
            if f.metadata.get("runtime"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], **overrides: Any) -> "FramePackConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # "_class_name", "_diffusers_version" and similar bookkeeping keys are not architecture.
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"config.json has keys this model does not know: {unknown}")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "FramePackConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; is this a FramePack transformer folder?") from None
        return cls.from_json_dict(data, **overrides)


PRESETS: dict[str, FramePackConfig] = {
    # The released FramePackI2V_HY / FramePack_F1_I2V_HY config: 12,874,314,816 parameters.
    "framepack-13b": FramePackConfig(),
    # Same architecture, every block kind present, a few hundred thousand parameters: CPU tests and the
    # built-in default. head_dim 16 = rope axes (4, 6, 6).
    "tiny": FramePackConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
        image_proj_dim=32,
    ),
}
