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
from typing import NamedTuple, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_rt.model.blocks import DoubleStreamBlock, SingleStreamBlock
from framepack_rt.model.checkpoint import load_transformer, save_transformer
from framepack_rt.model.config import FramePackConfig
from framepack_rt.kernels.dispatch import KernelPlan, kernel_plan  # Triton kernels on CUDA, torch elsewhere
from framepack_rt.model.attention import attention_for
from framepack_rt.model.layers import ConditionEmbedding, ImageProjection, TokenRefiner, layer_norm
from framepack_rt.model.packing import JointPacking, Segments
from framepack_rt.model.rope import replicate_pad_to_multiple, rope_table
from framepack_rt.model.step_plan import RopeTables, StepPlan, TextPlan


class StepCache(Protocol):
    """A block-skipping policy (TeaCache and kin), passed to ``forward(step_cache=...)``.

    The model shows it the probe (the first block's modulated video input); if ``should_run`` says no, the
    model adds ``residual()`` instead of running the blocks, otherwise it runs them and hands the new
    residual (blocks' output minus their input, video tokens) to ``remember``.
    """

    def should_run(self, probe: torch.Tensor) -> bool: ...

    def residual(self) -> torch.Tensor: ...

    def remember(self, residual: torch.Tensor) -> None: ...


class StepBranch(NamedTuple):
    """One branch of :meth:`FramePackTransformer.step_branches`: step()'s arguments."""

    plan: StepPlan
    hidden_states: torch.Tensor
    timestep: torch.Tensor
    guidance: torch.Tensor | None = None
    step_cache: StepCache | None = None


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

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.linear(F.silu(temb).to(x.dtype)))

    @staticmethod
    def modulated(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """layer_norm(x) modulated by ``emb`` = linear(silu(temb)) (the fp32 head computes emb itself)."""
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
        quantize: str | None = None,
    ) -> "FramePackTransformer":
        """Load a diffusers-format folder (config.json + sharded safetensors with index, or one file).

        Built on the meta device; weights are memory-mapped and assigned, so a bf16 checkpoint loaded as bf16
        on the CPU is never copied into RAM, and never exists as a full fp32 copy. ``dtype=None`` keeps the
        file's dtype. ``quantize="fp8"`` stores the 60 blocks' linear weights as float8_e4m3fn with a scale per
        output channel, computed in ``dtype`` (the 13B: about 13 GB instead of 26); see model/quantize.py.
        """
        return load_transformer(cls, Path(path), dtype=dtype, device=device, fp32_output_head=fp32_output_head,
                                quantize=quantize)

    def save_pretrained(self, path: str | Path, *, max_shard_size: int = 5 * 1024**3) -> None:
        """Write config.json + safetensors (sharded with an index json beyond ``max_shard_size`` bytes)."""
        save_transformer(self, Path(path), max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # -- one section's constant inputs -----------------------------------------------------------------------
    def _rope(self, indices: torch.Tensor, height: int, width: int, pool: tuple[int, int, int], batch: int):
        cfg = self.config
        per_sample = _indices_per_sample(indices.to(self.device), batch)
        samples = per_sample if isinstance(per_sample, list) else [per_sample]
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        tables = [rope_table(idx, gh, gw, cfg.rope_axes_dim, cfg.rope_theta, pool) for idx in samples]
        return torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])

    def _video_layout(
        self,
        latent_shape: tuple[int, int, int, int],
        indices_latents: torch.Tensor | None,
        context: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
        ops: KernelPlan,
    ) -> tuple[torch.Tensor | None, RopeTables, int]:
        """The clean latents' tokens [4x | 2x | clean 1x] (embedded once), RoPE over [clean | noisy], noisy_len."""
        batch, frames, height, width = latent_shape
        if indices_latents is None:
            indices_latents = torch.arange(frames)
        pieces = []
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
                    f"{(batch, self.config.in_channels, frames, height, width)} in batch or height/width"
                )
            pieces.insert(0, (getattr(self.clean_x_embedder, name), latents.to(self.device)))
            ropes.insert(0, self._rope(indices, height, width, pools[name], batch))
        rope_batch = max(r[0].shape[0] for r in ropes)  # B when some indices differ per sample, else 1
        cos = torch.cat([r[0].expand(rope_batch, -1, -1) for r in ropes], dim=1)
        sin = torch.cat([r[1].expand(rope_batch, -1, -1) for r in ropes], dim=1)
        clean = ops.patch_embed(pieces) if pieces else None
        return clean, (cos, sin), noisy_len

    def _text_layout(self, text: torch.Tensor, mask: torch.Tensor | None) -> TextPlan:
        """The real text tokens packed (one host read of the mask, here), projected in, and their pooled mean."""
        batch, text_len = text.shape[:2]
        text = text.to(device=self.device, dtype=self.dtype)
        if mask is None:
            mask = torch.ones(batch, text_len, dtype=torch.bool)
        mask = mask.bool().cpu()
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        if min(lengths) == 0:
            raise ValueError("a sample has no text tokens: encoder_attention_mask must keep at least one")
        flat_index = mask.flatten().nonzero().squeeze(1).to(self.device)
        mask_f = mask.to(device=self.device, dtype=torch.float32).unsqueeze(-1)
        pooled = ((text * mask_f).sum(dim=1) / mask_f.sum(dim=1)).to(text.dtype)  # masked mean
        tokens = self.context_embedder.proj_in(text.flatten(0, 1).index_select(0, flat_index))
        sample = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths)).to(self.device)
        return TextPlan(tokens, pooled, sample, Segments.of(lengths, self.device))

    def prepare(
        self,
        latent_shape: tuple[int, int, int, int],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        indices_latents: torch.Tensor | None = None,
        latents_clean: torch.Tensor | None = None,
        indices_latents_clean: torch.Tensor | None = None,
        latents_history_2x: torch.Tensor | None = None,
        indices_latents_history_2x: torch.Tensor | None = None,
        latents_history_4x: torch.Tensor | None = None,
        indices_latents_history_4x: torch.Tensor | None = None,
    ) -> StepPlan:
        """Everything a section's steps share, for noisy latents of ``latent_shape`` (B, T, H, W): see
        :class:`StepPlan`. The keywords are forward()'s; the engine calls this once per section and branch."""
        cfg = self.config
        batch, frames, height, width = latent_shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"latent height/width {height}x{width} must be multiples of {cfg.patch_size}")
        if pooled_projections is None:
            raise ValueError("pooled_projections (the CLIP pooled text vector, (B, 768)) is required")
        context_inputs = {}
        for name, latents, indices in (
            ("proj", latents_clean, indices_latents_clean),
            ("proj_2x", latents_history_2x, indices_latents_history_2x),
            ("proj_4x", latents_history_4x, indices_latents_history_4x),
        ):
            if (latents is None) != (indices is None):
                raise ValueError(f"clean latents and their frame indices come in pairs ({name}: one is missing)")
            context_inputs[name] = (latents, indices)
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, latents {batch}")

        device, dtype = self.device, self.dtype
        ops = kernel_plan(device, dtype, head_dim=cfg.attention_head_dim, dim=cfg.inner_dim,
                          in_channels=cfg.in_channels)  # cached: decided at the first section, then looked up
        clean, rope, noisy_len = self._video_layout(latent_shape, indices_latents, context_inputs, ops)
        text = self._text_layout(encoder_hidden_states, encoder_attention_mask)
        image = context_order = None
        context_lengths = text.segments.lengths
        if image_embeds is not None:
            if self.image_projection is None:
                raise ValueError("this config has has_image_proj=False: it takes no image_embeds")
            image = self.image_projection(image_embeds.to(device=device, dtype=dtype))
            context_order = _interleave_order(image.shape[1], context_lengths).to(device)
            context_lengths = [image.shape[1] + n for n in context_lengths]
        video_len = noisy_len + (clean.shape[1] if clean is not None else 0)
        packing = JointPacking(batch, video_len, context_lengths, device)
        head_dim = cfg.attention_head_dim
        head = None
        if cfg.fp32_output_head:
            head = tuple(t.detach().float() for t in (self.norm_out.linear.weight, self.norm_out.linear.bias,
                                                      self.proj_out.weight, self.proj_out.bias))
        return StepPlan(
            batch=batch, frames=frames, height=height, width=width, noisy_len=noisy_len, clean_tokens=clean,
            rope=rope, pooled=pooled_projections.to(device=device, dtype=dtype), text=text, image_tokens=image,
            context_order=context_order, packing=packing, ops=ops,
            attention=attention_for(device, dtype, head_dim, packing.joint.max_len).fn,
            text_attention=attention_for(device, dtype, head_dim, text.segments.max_len).fn,
            head_fp32=head,
        )

    def compile_blocks(self, **compile_kwargs) -> "FramePackTransformer":
        """torch.compile each transformer block in place (as the ecosystem does for HunyuanVideo: one graph per
        block class, reused by all 60; the plan's host-side layout keeps the graphs free of syncs). Compiles
        lazily, at the first step; returns self."""
        for block in (*self.transformer_blocks, *self.single_transformer_blocks):
            block.compile(**compile_kwargs)
        return self

    # -- one step --------------------------------------------------------------------------------------------
    def run_blocks(self, video: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """All 20 + 40 blocks; returns the video tokens (the context stream is not needed after them)."""
        for block in self.transformer_blocks:
            video, context = block(video, context, temb, plan)
        for block in self.single_transformer_blocks:
            video, context = block(video, context, temb, plan)
        return video

    def step(
        self,
        plan: StepPlan,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None = None,
        step_cache: StepCache | None = None,
    ) -> torch.Tensor:
        """The velocity for ``hidden_states`` (B, 16, T, H, W) at ``timestep`` (B,) = sigma * 1000, with the
        section's constant inputs from :meth:`prepare`. No host sync, no dispatch decision (a step cache
        decides on the host by nature: it is the one exception)."""
        return self.step_branches([StepBranch(plan, hidden_states, timestep, guidance, step_cache)])[0]

    def step_branches(self, branches: Sequence[StepBranch]) -> list[torch.Tensor]:
        """:meth:`step` for several branches at once (CFG's two branches when each keeps its own step cache),
        running each block for every branch before the next block: the same velocities as one step() per
        branch, and in low-VRAM mode (model/offload.py) each streamed block is copied in once for all."""
        inputs, running = [], []
        for branch in branches:
            plan, x = branch.plan, branch.hidden_states
            if (x.shape[0], *x.shape[2:]) != plan.latent_shape:
                raise ValueError(f"hidden_states {tuple(x.shape)} do not match the plan's latents "
                                 f"(B, T, H, W) = {plan.latent_shape}: prepare a plan for this shape")
            tokens, context, temb = self._step_inputs(branch)
            cache = branch.step_cache
            run = cache is None or cache.should_run(self.transformer_blocks[0].modulated_input(tokens, temb))
            inputs.append([tokens, context, temb, run])
            if run:
                running.append(len(inputs) - 1)
        if len(running) <= 1:
            outs = {i: self.run_blocks(*inputs[i][:3], branches[i].plan) for i in running}
        else:  # block by block, every running branch in turn
            video = {i: inputs[i][0] for i in running}
            context = {i: inputs[i][1] for i in running}
            for block in (*self.transformer_blocks, *self.single_transformer_blocks):
                for i in running:
                    video[i], context[i] = block(video[i], context[i], inputs[i][2], branches[i].plan)
            outs = video
        velocities = []
        for i, (branch, (tokens, _, temb, run)) in enumerate(zip(branches, inputs)):
            if not run:
                tokens = tokens + branch.step_cache.residual()
            else:
                if branch.step_cache is not None:
                    branch.step_cache.remember(outs[i] - tokens)
                tokens = outs.pop(i)
            velocities.append(self._step_output(branch.plan, tokens, temb))
        return velocities

    def _step_inputs(self, branch: StepBranch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The video tokens [clean | noisy], the refined context tokens and temb of one step."""
        plan, device = branch.plan, self.device
        timestep = _per_sample(branch.timestep, plan.batch, device)
        guidance = None if branch.guidance is None else _per_sample(branch.guidance, plan.batch, device)
        noisy = plan.ops.patch_embed([(self.x_embedder.proj, branch.hidden_states.to(device))])
        tokens = noisy if plan.clean_tokens is None else torch.cat([plan.clean_tokens, noisy], dim=1)
        temb = self.time_text_embed(timestep, plan.pooled, guidance)
        context = self.context_embedder(plan.text, timestep, plan.text_attention)
        if plan.image_tokens is not None:
            context = torch.cat([plan.image_tokens.flatten(0, 1), context]).index_select(0, plan.context_order)
        return tokens, context, temb

    def _step_output(self, plan: StepPlan, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The output head on the noisy tokens: the velocity (B, 16, T, H, W)."""
        patches = self.output_head(plan, tokens[:, -plan.noisy_len :], temb)
        return unpatchify(patches, plan.frames, plan.height, plan.width, self.config)

    def output_head(self, plan: StepPlan, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """norm_out and proj_out on video tokens (B, L, C) -> patches (B, L, pt*p*p*16), token by token (so a
        sequence-parallel step runs it on its shard: model/parallel.py)."""
        if plan.head_fp32 is not None:
            norm_w, norm_b, proj_w, proj_b = plan.head_fp32
            tokens = self.norm_out.modulated(tokens.float(), F.linear(F.silu(temb.float()), norm_w, norm_b))
            return F.linear(tokens, proj_w, proj_b)
        return self.proj_out(self.norm_out(tokens, temb))

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
        """Predict the flow-matching velocity for the noisy latents: ``step(prepare(...), ...)`` in one call.

        Shapes: hidden_states (B, 16, T, H, W) latents; timestep (B,) = sigma * 1000; encoder_hidden_states
        (B, L, 4096) LLaMA features with encoder_attention_mask (B, L) (None: all real); pooled_projections
        (B, 768) CLIP; image_embeds (B, 729, 1152) SigLIP; guidance (B,) = distilled scale * 1000;
        latents_clean (B, 16, Tc, H, W), latents_history_2x / _4x likewise; indices_* (T,) or (B, T) frame
        positions. Returns the velocity (B, 16, T, H, W): fp32 when the fp32 output head is on, else the model
        dtype. ``return_dict=False`` gives a 1-tuple, as diffusers pipelines expect. Samplers that call the
        model many times with one context should prepare once and call :meth:`step`.
        """
        if attention_kwargs:
            raise ValueError("attention_kwargs (LoRA scale) is not supported by FramePackTransformer")
        batch, _, frames, height, width = hidden_states.shape
        plan = self.prepare(
            (batch, frames, height, width), encoder_hidden_states, encoder_attention_mask, pooled_projections,
            image_embeds, indices_latents, latents_clean, indices_latents_clean, latents_history_2x,
            indices_latents_history_2x, latents_history_4x, indices_latents_history_4x,
        )
        velocity = self.step(plan, hidden_states, timestep, guidance, step_cache)
        if return_dict is False:
            return (velocity,)
        return velocity


def _interleave_order(image_len: int, text_lengths: list[int]) -> torch.Tensor:
    """Rows of cat([image (B*Li), text (sum Lt)]) in the order [img_0; txt_0; img_1; txt_1; ...]."""
    pieces, text_start = [], len(text_lengths) * image_len
    for i, n in enumerate(text_lengths):
        pieces.append(torch.arange(i * image_len, (i + 1) * image_len))
        pieces.append(torch.arange(text_start, text_start + n))
        text_start += n
    return torch.cat(pieces)


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
