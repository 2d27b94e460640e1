"""FramePackTransformer: the 13B HunyuanVideo DiT as FramePack packs it.

Drop-in for diffusers' ``HunyuanVideoFramepackTransformer3DModel`` (same config, parameter names and forward
keywords), with three differences that matter for serving:
  * batches run packed: samples with different prompt lengths form one varlen sequence, no padding computed;
  * every context input (clean 1x / 2x / 4x latents, image embeddings) is optional;
  * a step cache (TeaCache) can be passed per call as a policy object; the model keeps no cache state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_rt.model.blocks import DoubleStreamBlock, SingleStreamBlock
from framepack_rt.model.checkpoint import load_transformer, save_transformer
from framepack_rt.model.config import FramePackConfig
from framepack_rt.kernels import dispatch as kernel_dispatch  # Triton kernels on CUDA, torch elsewhere
from framepack_rt.model.layers import ConditionEmbedding, ImageProjection, TokenRefiner, layer_norm
from framepack_rt.model.packing import JointPacking, Segments
from framepack_rt.model.rope import replicate_pad_to_multiple, rope_table


class StepCache(Protocol):
    """A block-skipping policy (TeaCache and kin), passed to ``forward(step_cache=...)``.

    The model shows it the probe (the first block's modulated video input); if ``should_run`` says no, the
    model adds ``residual()`` instead of running the blocks, otherwise it runs them and hands the new
    residual (blocks' output minus their input, video tokens) to ``remember``.
    """

    def should_run(self, probe: torch.Tensor) -> bool: ...

    def residual(self) -> torch.Tensor: ...

    def remember(self, residual: torch.Tensor) -> None: ...


class CleanLatentEmbedder(nn.Module):
    """``clean_x_embedder``: context latents at 1x (1,2,2), 2x (2,4,4) and 4x (4,8,8), kernel = stride."""

    KERNELS = {"proj": (1, 2, 2), "proj_2x": (2, 4, 4), "proj_4x": (4, 8, 8)}

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        for name, kernel in self.KERNELS.items():
            setattr(self, name, nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel))


class PatchEmbed(nn.Module):
    """``x_embedder``: noisy latents, Conv3d (1,2,2)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))


class OutputNorm(nn.Module):
    """``norm_out``: AdaLayerNormContinuous (scale first, then shift)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, fp32: bool) -> torch.Tensor:
        if fp32:
            emb = F.linear(F.silu(temb.float()), self.linear.weight.float(), self.linear.bias.float())
            x = x.float()
        else:
            emb = self.linear(F.silu(temb).to(x.dtype))
        scale, shift = emb.chunk(2, dim=-1)
        return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def patchify(conv: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> tokens (B, N, dim): the Conv3d with kernel = stride, as a GEMM over gathered patches.

    Latents are replicate-padded to a multiple of the kernel first (the 2x / 4x history). Token order is the
    conv's (t, y, x) raster order; each patch is flattened (C, kt, kh, kw) like the conv weight.
    """
    kt, kh, kw = conv.kernel_size
    x = replicate_pad_to_multiple(latents, conv.kernel_size).to(conv.weight.dtype)
    b, c, t, h, w = x.shape
    patches = x.reshape(b, c, t // kt, kt, h // kh, kh, w // kw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return F.linear(patches.reshape(b, -1, c * kt * kh * kw), conv.weight.flatten(1), conv.bias)


@dataclass
class VideoTokens:
    tokens: torch.Tensor  # (B, Lv, C) in packed order [4x | 2x | clean 1x | noisy]
    rope: tuple[torch.Tensor, torch.Tensor]  # (1 or B, Lv, head_dim) fp32 each
    noisy_len: int


def _indices_per_sample(indices: torch.Tensor, batch: int) -> list[torch.Tensor] | torch.Tensor:
    """(T,) or (B, T) frame indices -> one shared (T,) tensor, or a list of B when samples differ."""
    if indices.ndim == 1:
        return indices
    if indices.shape[0] not in (1, batch):
        raise ValueError(f"frame indices of shape {tuple(indices.shape)} do not match batch size {batch}")
    if indices.shape[0] == 1 or bool((indices == indices[:1]).all()):
        return indices[0]
    return list(indices)


class FramePackTransformer(nn.Module):
    def __init__(self, config: FramePackConfig) -> None:
        super().__init__()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.x_embedder = PatchEmbed(config.in_channels, dim)
        self.clean_x_embedder = CleanLatentEmbedder(config.in_channels, dim) if config.has_clean_x_embedder else None
        self.context_embedder = TokenRefiner(
            config.text_embed_dim, dim, heads, config.num_refiner_layers, config.mlp_ratio
        )
        self.image_projection = ImageProjection(config.image_proj_dim, dim) if config.has_image_proj else None
        self.time_text_embed = ConditionEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(
            [DoubleStreamBlock(dim, heads, head_dim, config.mlp_ratio) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, heads, head_dim, config.mlp_ratio) for _ in range(config.num_single_layers)]
        )
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, config.patch_size_t * config.patch_size**2 * config.out_channels)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: str | FramePackConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = 0,
    ) -> "FramePackTransformer":
        """Random weights from a preset name ("framepack-13b", "tiny") or a config.

        ``device="meta"`` builds the structure without memory (parameter counting, or before assigning
        loaded weights); so does ``with torch.device("meta"):`` around the call, as accelerate's
        init_empty_weights does: None means torch's current default device. ``seed`` makes the random weights
        reproducible; None leaves torch's RNG alone.
        """
        if isinstance(config, str):
            config = FramePackConfig.preset(config)
        device = torch.get_default_device() if device is None else torch.device(device)
        if device.type == "meta":
            with torch.device("meta"):
                return cls(config).to(dtype)
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(config)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        fp32_output_head: bool = True,
    ) -> "FramePackTransformer":
        """Load a diffusers-format folder (config.json + sharded safetensors with index, or one file).

        Built on the meta device; weights are memory-mapped and assigned, so a bf16 checkpoint loaded as bf16
        on the CPU is never copied into RAM, and never exists as a full fp32 copy. ``dtype=None`` keeps the
        file's dtype.
        """
        return load_transformer(cls, Path(path), dtype=dtype, device=device, fp32_output_head=fp32_output_head)

    def save_pretrained(self, path: str | Path, *, max_shard_size: int = 5 * 1024**3) -> None:
        """Write config.json + safetensors (sharded with an index json beyond ``max_shard_size`` bytes)."""
        save_transformer(self, Path(path), max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # -- forward pieces --------------------------------------------------------------------------------------
    def _rope(self, indices: torch.Tensor, height: int, width: int, pool: tuple[int, int, int], batch: int):
        cfg = self.config
        per_sample = _indices_per_sample(indices.to(self.device), batch)
        samples = per_sample if isinstance(per_sample, list) else [per_sample]
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        tables = [rope_table(idx, gh, gw, cfg.rope_axes_dim, cfg.rope_theta, pool) for idx in samples]
        return torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])

    def embed_video(
        self,
        hidden_states: torch.Tensor,
        indices_latents: torch.Tensor | None,
        context: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    ) -> VideoTokens:
        """Patchify noisy and clean latents into one token sequence [4x | 2x | clean 1x | noisy] with RoPE."""
        batch, _, frames, height, width = hidden_states.shape
        if indices_latents is None:
            indices_latents = torch.arange(frames)
        # (conv, latents) per scale, embedded together into one packed buffer by kernel_dispatch.patch_embed.
        pieces = [(self.x_embedder.proj, hidden_states)]
        ropes = [self._rope(indices_latents, height, width, (1, 1, 1), batch)]
        kt, kh, kw = self.x_embedder.proj.kernel_size
        noisy_len = -(-frames // kt) * -(-height // kh) * -(-width // kw)  # patches of the padded grid
        pools = {"proj": (1, 1, 1), "proj_2x": (2, 2, 2), "proj_4x": (4, 4, 4)}
        for name in ("proj", "proj_2x", "proj_4x"):  # each is prepended: the oldest (4x) ends up first
            latents, indices = context[name]
            if latents is None:
                continue
            if self.clean_x_embedder is None:
                raise ValueError("this config has has_clean_x_embedder=False: it takes no clean latents")
            if latents.shape[0] != batch or latents.shape[-2:] != (height, width):
                raise ValueError(
                    f"clean latents of shape {tuple(latents.shape)} do not match hidden_states "
                    f"{tuple(hidden_states.shape)} in batch or height/width"
                )
            pieces.insert(0, (getattr(self.clean_x_embedder, name), latents))
            ropes.insert(0, self._rope(indices, height, width, pools[name], batch))
        rope_batch = max(r[0].shape[0] for r in ropes)  # B when some indices differ per sample, else 1
        cos = torch.cat([r[0].expand(rope_batch, -1, -1) for r in ropes], dim=1)
        sin = torch.cat([r[1].expand(rope_batch, -1, -1) for r in ropes], dim=1)
        video = kernel_dispatch.patch_embed(pieces)
        return VideoTokens(video, (cos, sin), noisy_len)

    def embed_context(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        timestep: torch.Tensor,
    ) -> tuple[torch.Tensor, list[int]]:
        """Image tokens then the prompt's real text tokens, per sample, packed: ((Tc, C), lengths)."""
        batch, text_len = encoder_hidden_states.shape[:2]
        if encoder_attention_mask is None:
            mask = torch.ones(batch, text_len, dtype=torch.bool, device=encoder_hidden_states.device)
        else:
            mask = encoder_attention_mask.to(encoder_hidden_states.device).bool()
        text_lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        if min(text_lengths) == 0:
            raise ValueError("a sample has no text tokens: encoder_attention_mask must keep at least one")
        text = self.context_embedder(
            encoder_hidden_states.to(self.dtype), timestep, mask, Segments.of(text_lengths, self.device)
        )
        if image_embeds is None:
            return text, text_lengths
        if self.image_projection is None:
            raise ValueError("this config has has_image_proj=False: it takes no image_embeds")
        image = self.image_projection(image_embeds.to(self.dtype))
        texts = text.split(text_lengths)
        packed = torch.cat([piece for i in range(batch) for piece in (image[i], texts[i])])
        return packed, [image.shape[1] + n for n in text_lengths]

    def run_blocks(
        self, video: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, rope, packing: JointPacking
    ) -> torch.Tensor:
        """All 20 + 40 blocks; returns the video tokens (the context stream is not needed after them)."""
        for block in self.transformer_blocks:
            video, context = block(video, context, temb, rope, packing)
        for block in self.single_transformer_blocks:
            video, context = block(video, context, temb, rope, packing)
        return video

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        indices_latents: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        latents_clean: torch.Tensor | None = None,
        indices_latents_clean: torch.Tensor | None = None,
        latents_history_2x: torch.Tensor | None = None,
        indices_latents_history_2x: torch.Tensor | None = None,
        latents_history_4x: torch.Tensor | None = None,
        indices_latents_history_4x: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool | None = None,
        step_cache: StepCache | None = None,
    ):
        """Predict the flow-matching velocity for the noisy latents.

        Shapes: hidden_states (B, 16, T, H, W) latents; timestep (B,) = sigma * 1000; encoder_hidden_states
        (B, L, 4096) LLaMA features with encoder_attention_mask (B, L) (None: all real); pooled_projections
        (B, 768) CLIP; image_embeds (B, 729, 1152) SigLIP; guidance (B,) = distilled scale * 1000;
        latents_clean (B, 16, Tc, H, W), latents_history_2x / _4x likewise; indices_* (T,) or (B, T) frame
        positions. Returns the velocity (B, 16, T, H, W): fp32 when the fp32 output head is on, else the model
        dtype. ``return_dict=False`` gives a 1-tuple, as diffusers pipelines expect.
        """
        if attention_kwargs:
            raise ValueError("attention_kwargs (LoRA scale) is not supported by FramePackTransformer")
        cfg = self.config
        batch, _, frames, height, width = hidden_states.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"latent height/width {height}x{width} must be multiples of {cfg.patch_size}")
        if pooled_projections is None:
            raise ValueError("pooled_projections (the CLIP pooled text vector, (B, 768)) is required")
        device = self.device
        timestep = _per_sample(timestep, batch, device)
        guidance = None if guidance is None else _per_sample(guidance, batch, device)

        context_inputs = {}
        for name, latents, indices in (
            ("proj", latents_clean, indices_latents_clean),
            ("proj_2x", latents_history_2x, indices_latents_history_2x),
            ("proj_4x", latents_history_4x, indices_latents_history_4x),
        ):
            if (latents is None) != (indices is None):
                raise ValueError(f"clean latents and their frame indices come in pairs ({name}: one is missing)")
            context_inputs[name] = (latents, indices)

        video = self.embed_video(hidden_states, indices_latents, context_inputs)
        temb = self.time_text_embed(timestep, pooled_projections.to(self.dtype), guidance)
        context, context_lengths = self.embed_context(
            encoder_hidden_states, encoder_attention_mask, image_embeds, timestep
        )
        packing = JointPacking(batch, video.tokens.shape[1], context_lengths, device)

        tokens = video.tokens
        if step_cache is not None and not step_cache.should_run(
            self.transformer_blocks[0].modulated_input(tokens, temb)
        ):
            tokens = tokens + step_cache.residual()
        else:
            out = self.run_blocks(tokens, context, temb, video.rope, packing)
            if step_cache is not None:
                step_cache.remember(out - tokens)
            tokens = out

        tokens = self.norm_out(tokens[:, -video.noisy_len :], temb, fp32=cfg.fp32_output_head)
        if cfg.fp32_output_head:
            tokens = F.linear(tokens, self.proj_out.weight.float(), self.proj_out.bias.float())
        else:
            tokens = self.proj_out(tokens)
        velocity = unpatchify(tokens, frames, height, width, cfg)
        if return_dict is False:
            return (velocity,)
        return velocity


def unpatchify(tokens: torch.Tensor, frames: int, height: int, width: int, cfg: FramePackConfig) -> torch.Tensor:
    """(B, T*h*w, C*pt*p*p) -> (B, C, T, H, W)."""
    p, pt = cfg.patch_size, cfg.patch_size_t
    x = tokens.reshape(tokens.shape[0], frames // pt, height // p, width // p, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"expected a scalar or one value per sample ({batch}), got shape {tuple(value.shape)}")
    return value
