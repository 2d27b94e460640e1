"""The device memory a FramePack run needs, counted from configs: weights, activations, buffers, tiles.

    plan = plan_memory(FramePackConfig.preset("framepack-13b"), height=640, width=640, window=9,
                       quantize="fp8", budget_bytes=6 * 2**30)
    print(plan)                        # the breakdown; plan.streamer_weight_budget feeds BlockStreamer

What it counts (pure arithmetic on a meta-device model: no memory, no weights read):

* **weights** by dtype, as loaded (``quantize="fp8"``: the blocks' linear weights one byte each, an fp32
  scale per output channel), and under a budget which blocks stay resident and which stream through
  ``prefetch + 1`` device slots (:func:`framepack_rt.model.offload.choose_residency`, BlockStreamer's rule);
* **activations** of one step: the step's live tensors plus the peak inside the largest block, walked tensor
  by tensor in the order ``FramePackTransformer.step`` and blocks.py allocate them (the torch path: fp32
  upcasts in RMSNorm and RoPE, the joined q/k/v, the MLP's hidden states, fp8 weights dequantized per layer);
  batched CFG doubles the batch, TeaCache with CFG runs two branches block by block (``step_branches``);
* the **section's tensors** (StepPlan: RoPE tables, clean-latent and image tokens, the fp32 output head) and
  **TeaCache's buffers** (the previous probe and the cached residual, per branch);
* **VAE decode tiles** (an estimate from the decoder's widest full-resolution stage; see :class:`VaeSpec`),
  **encoders while loaded** (their weights, passed in: they come from the pipeline's folders), and a
  **workspace margin** (cuBLAS / Triton autotuning / allocator slack).

The phases do not overlap in time: a step's activations, the VAE decode and an encoder call each come on top
of what stays resident (the transformer's weights and slots, the VAE's weights, the margin). The CUDA context
lives outside torch's allocator and is not in these figures (typically 0.3-1 GiB more on the card).
Validated on the CPU against torch's profiler (tests/model/test_memory_plan.py): the activation peak of one
step at the 13B's widths within 25%.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from framepack_rt.model.config import FramePackConfig
from framepack_rt.model.offload import ALIGN, all_blocks, choose_residency, minimum_weight_budget, probe_module

GiB = 2**30
PCIE4_BYTES_PER_S = 25e9  # host -> device, pinned, PCIe 4.0 x16 in practice
DEFAULT_WORKSPACE = 512 * 2**20  # cuBLAS workspaces, Triton autotuning outputs, allocator slack
CONTEXT_FRAMES = (2, 2, 16)  # the F1 / inverted layouts: clean 1x (start + newest), 2x, 4x latents
IMAGE_TOKENS = 729  # SigLIP so400m at 384 px: 27 x 27
TEXT_TOKENS = 256  # the most prompt tokens the text encoder keeps (encoders.MAX_PROMPT_TOKENS)
MEMORY_PRESETS_GB = (6, 8, 12, 16, 24)


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _amount(nbytes: float) -> str:
    return gib(nbytes) if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- tokens -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokens:
    """Tokens per sample of one section at a resolution and window."""

    noisy: int
    clean: int  # the 1x / 2x / 4x context latents' tokens
    text: int
    image: int

    @property
    def video(self) -> int:
        return self.noisy + self.clean

    @property
    def context(self) -> int:
        return self.text + self.image


def section_tokens(config: FramePackConfig, height: int, width: int, window: int, *,
                   context_frames: tuple[int, int, int] = CONTEXT_FRAMES, text_tokens: int = TEXT_TOKENS,
                   image_tokens: int = IMAGE_TOKENS) -> Tokens:
    """Pixel ``height`` x ``width`` (multiples of 16), ``window`` noisy latents, ``context_frames`` clean
    latents at 1x / 2x / 4x (kernels (1,2,2), (2,4,4), (4,8,8), replicate-padded)."""
    if height % 16 or width % 16:
        raise ValueError(f"{height}x{width}: height and width must be multiples of 16 (8x VAE, 2x patches)")
    h, w = height // 8, width // 8
    p = config.patch_size
    noisy = window * (h // p) * (w // p)
    clean = 0
    for frames, (kt, kh, kw) in zip(context_frames, ((1, 2, 2), (2, 4, 4), (4, 8, 8))):
        if frames:
            clean += -(-frames // kt) * -(-h // kh) * -(-w // kw)
    image = image_tokens if config.has_image_proj else 0
    return Tokens(noisy, clean, text_tokens, image)


# -- weights ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _meta_model(config: FramePackConfig) -> nn.Module:
    from framepack_rt.model.transformer import FramePackTransformer

    return FramePackTransformer.from_config(config, device="meta")


def _tensor_bytes(module: nn.Module, dtype: torch.dtype, quantize: str | None) -> list[int]:
    """Bytes of each parameter / buffer of ``module`` as loaded: ``dtype``, or fp8 linears (weight 1 byte per
    element, fp32 scale per row, bias in ``dtype``) when quantized. In the order offload lays regions out."""
    out = []
    for m in module.modules():
        if quantize and isinstance(m, nn.Linear):
            if m.bias is not None:
                out.append(m.out_features * dtype.itemsize)
            out += [m.out_features * m.in_features, m.out_features * 4]
            continue
        for t in [*m._parameters.values(), *m._buffers.values()]:
            if t is not None:
                out.append(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()))
    return out


@dataclass(frozen=True)
class Weights:
    """The transformer's weights as loaded, and where they live under a budget."""

    total: int
    by_dtype: dict[str, int]
    base: int  # non-block modules + the TeaCache probe (block 0's norm1): always resident
    block_sizes: tuple[int, ...]  # per block, resident (block 0 without the probe)
    block_regions: tuple[int, ...]  # per block, as a streamed region (aligned)
    num_double: int  # blocks 0 .. num_double - 1 are double-stream, the rest single-stream
    resident_blocks: tuple[int, ...] = ()  # indices (execution order), all when there is no budget
    slots: int = 0
    slot_bytes: int = 0

    @property
    def streamed_blocks(self) -> tuple[int, ...]:
        keep = set(self.resident_blocks)
        return tuple(i for i in range(len(self.block_sizes)) if i not in keep)

    def kinds(self, blocks: tuple[int, ...]) -> str:
        """"20 double + 3 single" for block indices."""
        double = sum(i < self.num_double for i in blocks)
        return " + ".join(f"{n} {kind}" for n, kind in ((double, "double"), (len(blocks) - double, "single")) if n)

    @property
    def device_bytes(self) -> int:
        resident = self.base + sum(self.block_sizes[i] for i in self.resident_blocks)
        return resident + (self.slots * self.slot_bytes if self.streamed_blocks else 0)

    @property
    def streamed_bytes(self) -> int:
        """Copied host -> device per step (also the pinned host arena's size)."""
        return sum(self.block_regions[i] for i in self.streamed_blocks)


def count_weights(config: FramePackConfig, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None) -> Weights:
    """All blocks resident; :meth:`with_budget` gives the streaming split."""
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize={quantize!r}: choose 'fp8' or None")
    model = _meta_model(config)
    blocks, probe = all_blocks(model), probe_module(model)
    probe_sizes = _tensor_bytes(probe, dtype, quantize)
    sizes, regions = [], []
    for i, block in enumerate(blocks):
        tensors = _tensor_bytes(block, dtype, quantize)
        if i == 0:  # the probe's tensors come first in block 0's module order: drop them from its region
            tensors = tensors[len(probe_sizes):]
        sizes.append(sum(tensors))
        regions.append(sum(_align(n) for n in tensors))
    in_blocks = sum(sizes) + sum(probe_sizes)
    rest = sum(_tensor_bytes(model, dtype, None)) - sum(sum(_tensor_bytes(b, dtype, None)) for b in blocks)
    by_dtype = {_dtype_name(dtype): rest + (0 if quantize else in_blocks)}
    if quantize:
        linears = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
        fp8 = sum(m.out_features * m.in_features for m in linears)
        scales = sum(m.out_features * 4 for m in linears)
        by_dtype["float8_e4m3fn"] = fp8
        by_dtype["float32 (fp8 scales)"] = scales
        by_dtype[_dtype_name(dtype)] += in_blocks - fp8 - scales
    base = rest + sum(probe_sizes)
    return Weights(rest + in_blocks, by_dtype, base, tuple(sizes), tuple(regions), config.num_layers,
                   tuple(range(len(blocks))))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def with_budget(weights: Weights, budget_bytes: int, prefetch: int = 1) -> Weights:
    """The blocks BlockStreamer keeps under ``budget_bytes`` of weights (same rule, same numbers)."""
    keep, slot, _, slots = choose_residency(weights.base, list(weights.block_sizes), list(weights.block_regions),
                                            budget_bytes, prefetch + 1)
    return dataclasses.replace(weights, resident_blocks=tuple(keep), slots=slots, slot_bytes=slot)


# -- activations ----------------------------------------------------------------------------------------------------
class _Ledger:
    """Live bytes and their peak, tensor by tensor."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.live = self.peak = self.window_peak = 0

    def new(self, name: str, nbytes: int) -> None:
        assert name not in self.held, name
        self.held[name] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.window_peak = max(self.window_peak, self.live)

    def window(self) -> int:
        """Start a new window for ``window_peak``; returns the bytes live now."""
        self.window_peak = self.live
        return self.live

    def free(self, *names: str) -> None:
        for name in names:
            self.live -= self.held.pop(name)

    def rename(self, old: str, new: str) -> None:
        self.held[new] = self.held.pop(old)


@dataclass(frozen=True)
class _Walk:
    """One step's shapes, and the allocations of blocks.py's torch path over them."""

    video: int  # video rows, all samples (B * Lv)
    context: int  # context rows, packed (sum of the samples' context lengths)
    batch: int
    dim: int
    mlp: int
    heads: int
    itemsize: int  # the compute dtype's
    quantized: bool
    flash: bool  # attention backend: flash-attn style (out + lse) vs SDPA per segment (the CPU)

    def bytes(self, rows: int, cols: int | None = None, itemsize: int | None = None) -> int:
        return rows * (self.dim if cols is None else cols) * (itemsize or self.itemsize)

    def linear(self, a: _Ledger, name: str, rows: int, n_in: int, n_out: int) -> None:
        out = self.bytes(rows, n_out)
        if not self.quantized:
            a.new(name, out)
            return
        a.new("w8", n_out * n_in * self.itemsize)  # Fp8Linear: weight.to(x.dtype), for the one F.linear
        a.new("y", out)
        a.free("w8")
        a.new("y*scale", out)
        a.free("y")
        a.new(name, out)  # + bias
        a.free("y*scale")

    def modulate(self, a: _Ledger, name: str, rows: int, per_token: bool = False) -> None:
        """layer_norm(x) * (1 + scale) + shift; per-token scale (packed context of a batch > 1)."""
        if per_token:
            a.new("1+scale", self.bytes(rows))
        a.new("ln", self.bytes(rows))
        a.new("ln*", self.bytes(rows))
        a.free("ln", *(("1+scale",) if per_token else ()))
        a.new(name, self.bytes(rows))
        a.free("ln*")

    def rms_norm(self, a: _Ledger, name: str, rows: int) -> None:
        """x.float().pow(2).mean, then (x.float() * rsqrt).to(dtype) * weight (x.float() copies unless fp32)."""
        f32, up = self.bytes(rows, itemsize=4), self.itemsize != 4
        for step in ("sq", "normed"):
            if up:
                a.new("x32", f32)
            a.new(step, f32)
            if up:
                a.free("x32")
            if step == "sq":
                a.free("sq")
        if up:
            a.new("cast", self.bytes(rows))
            a.free("normed")
            a.new(name, self.bytes(rows))
            a.free("cast")
        else:
            a.new(name, f32)
            a.free("normed")

    def rope(self, a: _Ledger, name: str, rows: int) -> None:
        """apply_rope: rotated = stack([-x1, x0]); (x.float() * cos + rotated.float() * sin).to(dtype)."""
        f32, up = self.bytes(rows, itemsize=4), self.itemsize != 4
        a.new("-x1", self.bytes(rows) // 2)
        a.new("rotated", self.bytes(rows))
        a.free("-x1")
        for part in ("x*cos", "r*sin"):
            if up:
                a.new("x32", f32)
            a.new(part, f32)
            if up:
                a.free("x32")
        a.new("sum", f32)
        a.free("x*cos", "r*sin")
        if up:
            a.new(name, self.bytes(rows))
            a.free("sum")
        else:
            a.rename("sum", name)
        a.free("rotated")

    def projection(self, a: _Ledger, name: str, rows: int, norm: bool = True, rope: bool = False) -> None:
        """q / k / v of one stream: linear, then RMSNorm (+ RoPE) with the linear's output alive meanwhile."""
        self.linear(a, name + "0", rows, self.dim, self.dim)
        if not norm:
            a.rename(name + "0", name)
            return
        self.rms_norm(a, name + "n", rows)
        if rope:
            self.rope(a, name, rows)
            a.free(name + "n")
        else:
            a.rename(name + "n", name)
        a.free(name + "0")

    def attention(self, a: _Ledger) -> None:
        """joint_attention: join q, k, v (cat, + index_select when B > 1), attend, split; leaves "o"."""
        n = self.video + self.context
        for t in ("jq", "jk", "jv"):
            a.new("cat", self.bytes(n))
            if self.batch > 1:
                a.new(t, self.bytes(n))
                a.free("cat")
            else:
                a.rename("cat", t)
        if self.flash:
            a.new("o", self.bytes(n))
            a.new("lse", n * self.heads * 4)
            a.free("lse")
        else:  # SDPA per segment: (n, H, L, D) out, then transpose + flatten copies it to (L, H, D)
            a.new("sdpa", self.bytes(n))
            a.new("lse", n * self.heads * 4)
            a.new("o", self.bytes(n))
            a.free("sdpa", "lse")
        a.free("jq", "jk", "jv")
        if self.batch > 1:  # split: index_select back to [videos | contexts]
            a.new("o'", self.bytes(n))
            a.free("o")
            a.rename("o'", "o")

    def double_block(self, a: _Ledger, out: str) -> None:
        """DoubleStreamBlock.forward, its inputs already live; leaves ``out`` + x / c."""
        v, t, d, m = self.video, self.context, self.dim, self.mlp
        per_token = self.batch > 1
        if per_token:  # norm1_context's six vectors, one row per context token
            a.new("c-mod", 6 * self.bytes(t))
        self.modulate(a, "mx0", v)
        self.modulate(a, "mc0", t, per_token)
        self.projection(a, "q", v, rope=True)
        self.projection(a, "k", v, rope=True)
        self.projection(a, "v", v, norm=False)
        self.projection(a, "cq", t)
        self.projection(a, "ck", t)
        self.projection(a, "cv", t, norm=False)
        self.attention(a)
        self.linear(a, "attn_x", v, d, d)
        self.linear(a, "attn_c", t, d, d)
        a.free("q", "k", "v", "cq", "ck", "cv", "o", "mx0", "mc0")
        for s, rows, tok in (("x", v, False), ("c", t, per_token)):  # residual_gate_modulate
            a.new("y*gate", self.bytes(rows))
            a.new(s + "1", self.bytes(rows))
            a.free("y*gate")
            self.modulate(a, "m" + s, rows, tok)
        for s, rows in (("x", v), ("c", t)):  # x + gate_mlp * ff(mx)
            self.linear(a, "h", rows, d, m)
            a.new("gelu", self.bytes(rows, m))
            a.free("h")
            self.linear(a, "ff", rows, m, d)
            a.free("gelu")
            a.new("gated", self.bytes(rows))
            a.free("ff")
            a.new(s + "2", self.bytes(rows))
            a.free("gated", s + "1")
        a.free("attn_x", "attn_c", "mx", "mc", *(("c-mod",) if per_token else ()))
        a.rename("x2", out + "x")
        a.rename("c2", out + "c")

    def single_block(self, a: _Ledger, out: str) -> None:
        """SingleStreamBlock.forward, its inputs already live; leaves ``out`` + x / c."""
        v, t, d, m = self.video, self.context, self.dim, self.mlp
        per_token = self.batch > 1
        self.modulate(a, "nx", v)
        if per_token:
            a.new("c-mod", 2 * self.bytes(t))
        self.modulate(a, "nc", t, per_token)
        if per_token:
            a.free("c-mod")
        self.projection(a, "q", v, rope=True)
        self.projection(a, "k", v, rope=True)
        self.projection(a, "v", v, norm=False)
        self.projection(a, "cq", t)
        self.projection(a, "ck", t)
        self.projection(a, "cv", t, norm=False)
        self.attention(a)
        for s, rows in (("x", v), ("c", t)):  # gelu(proj_mlp(n)), the projection's output alive during gelu
            self.linear(a, "h", rows, d, m)
            a.new("mlp_" + s, self.bytes(rows, m))
            a.free("h")
        for s, rows in (("x", v), ("c", t)):  # x + gate * proj_out(cat([attn, mlp]))
            if per_token and s == "c":
                a.new("c-gate", self.bytes(t))
            a.new("cat", self.bytes(rows, d + m))
            self.linear(a, "po", rows, d + m, d)
            a.free("cat")
            a.new("gated", self.bytes(rows))
            a.free("po")
            a.new(out + s, self.bytes(rows))
            a.free("gated", *(("c-gate",) if per_token and s == "c" else ()))
        a.free("nx", "nc", "q", "k", "v", "cq", "ck", "cv", "o", "mlp_x", "mlp_c")


@dataclass(frozen=True)
class Activations:
    """Bytes of one step beyond the weights and the section's tensors."""

    peak: int  # the most live at once during the step
    step_locals: int  # video tokens + context kept by step() for the whole call (per branch, all branches)
    block_peak: int  # the largest block's own peak (its inputs, temporaries and outputs)
    head: int  # the output head's peak (fp32 head: the noisy tokens in fp32, a few times)


def step_activations(config: FramePackConfig, tokens: Tokens, *, batch: int = 1, branches: int = 1,
                     dtype: torch.dtype = torch.bfloat16, quantize: str | None = None,
                     attention: str = "flash") -> Activations:
    """The peak of one ``step`` (or ``step_branches`` over ``branches``) with ``batch`` samples per call.
    ``attention``: "flash" (flash-attn, cuDNN, Triton: out + log-sum-exp) or "sdpa" (torch SDPA per segment,
    the CPU's backend)."""
    walk = _Walk(video=batch * tokens.video, context=batch * tokens.context, batch=batch, dim=config.inner_dim,
                 mlp=config.mlp_dim, heads=config.num_attention_heads, itemsize=dtype.itemsize,
                 quantized=quantize is not None, flash=attention == "flash")
    a = _Ledger()
    for b in range(branches):  # step's tokens and context: alive until the step returns
        a.new(f"tokens{b}", walk.bytes(walk.video))
        a.new(f"context{b}", walk.bytes(walk.context))
    step_locals = a.live
    # Two blocks of each kind is the steady state: from the second on, a block's inputs are not step()'s.
    # With several branches, each branch's current tokens stay alive while another runs the same block.
    kinds = ["double"] * min(config.num_layers, 2) + ["single"] * min(config.num_single_layers, 2)
    inputs = {b: (f"tokens{b}", f"context{b}") for b in range(branches)}
    own_inputs = walk.bytes(walk.video) + walk.bytes(walk.context)
    block_peak = 0
    for k, kind in enumerate(kinds):
        for b in range(branches):
            x, c = inputs[b]
            before = a.window()
            getattr(walk, f"{kind}_block")(a, f"out{k}.{b}.")
            block_peak = max(block_peak, a.window_peak - before + own_inputs)
            a.free(*(name for name in (x, c) if not name.startswith(("tokens", "context"))))
            inputs[b] = (f"out{k}.{b}.x", f"out{k}.{b}.c")
    # The head: the video tokens out of the blocks, the noisy ones through norm_out / proj_out in fp32.
    noisy = batch * tokens.noisy
    out_channels = config.patch_size_t * config.patch_size**2 * config.out_channels
    head_item = 4 if config.fp32_output_head else dtype.itemsize
    head = walk.bytes(noisy, itemsize=head_item) * 3 + 2 * noisy * out_channels * head_item
    peak = max(a.peak, a.live + head)
    return Activations(peak=peak, step_locals=step_locals, block_peak=block_peak, head=head)


# -- the section's tensors, TeaCache, the VAE ---------------------------------------------------------------------
def section_bytes(config: FramePackConfig, tokens: Tokens, *, batch: int = 1, plans: int = 1,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """What a StepPlan holds for the section (``plans`` of them: one per CFG branch when they run apart)."""
    d, e = config.inner_dim, dtype.itemsize
    rows = batch * (tokens.video + tokens.context)
    items = {
        "RoPE tables (cos, sin; fp32)": 2 * tokens.video * config.attention_head_dim * 4,
        "clean-latent tokens": batch * tokens.clean * d * e,
        "image tokens": batch * tokens.image * d * e,
        "text tokens": batch * tokens.text * d * e,
        "packing indices": (rows * 2 + batch * tokens.context) * 8 if batch > 1 else batch * tokens.context * 8,
    }
    if config.fp32_output_head:
        out = config.patch_size_t * config.patch_size**2 * config.out_channels
        items["fp32 output head"] = (2 * d * d + 2 * d + out * d + out) * 4
    return {k: v * plans for k, v in items.items()}


def teacache_bytes(config: FramePackConfig, tokens: Tokens, *, batch: int = 1, branches: int = 1,
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """Per branch: the previous probe and the cached residual, each (B, Lv, dim)."""
    return branches * 2 * batch * tokens.video * config.inner_dim * dtype.itemsize


@dataclass(frozen=True)
class VaeSpec:
    """HunyuanVideo's causal VAE as the pipeline runs it (diffusers' AutoencoderKLHunyuanVideo defaults).

    Decoding one temporal tile (5 latents -> 17 frames, spatially tiled at 256 px in low-VRAM mode) holds at
    its peak about ``PLANES_PER_CHANNEL x block_out_channels[1]`` planes of one output frame set (frames x tile
    height x tile width), measured with torch's profiler on the CPU in fp32 for two channel widths (5.71 and
    5.72; tests/model/test_memory_plan.py checks it): the tensors only. cuDNN's convolution workspace on a GPU
    comes on top and is not measured here (the workspace margin is meant to absorb it).
    """

    weights_bytes: int = 2 * 246_478_803  # diffusers' default config, fp16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    tile_latents: int = 5  # temporal tile: 5 latents -> 17 frames
    spatial_tile: int | None = 256  # pixels, when spatial tiling is on (low-VRAM mode); None: whole frames
    itemsize: int = 2  # fp16
    PLANES_PER_CHANNEL = 5.8

    def decode_bytes(self, height: int, width: int) -> int:
        frames = 4 * self.tile_latents - 3
        th = min(height, self.spatial_tile) if self.spatial_tile else height
        tw = min(width, self.spatial_tile) if self.spatial_tile else width
        tile = frames * th * tw * self.itemsize
        decoded = frames * height * width * 3 * 4  # the section's decoded tiles, blended in fp32
        return int(self.PLANES_PER_CHANNEL * self.block_out_channels[1] * tile) + decoded


# -- the plan ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Device memory of a FramePack run, by part and phase. ``peak_bytes`` compares with
    ``torch.cuda.max_memory_allocated``; ``budget_bytes`` (when given) is what it must stay under."""

    height: int
    width: int
    window: int
    batch: int
    cfg: bool
    teacache: bool
    dtype: torch.dtype
    quantize: str | None
    tokens: Tokens
    weights: Weights
    activations: Activations
    section: dict[str, int]
    teacache_bytes: int
    vae_weights: int
    vae_decode: int
    encoder_bytes: int
    workspace: int
    budget_bytes: int | None = None
    prefetch: int = 1
    notes: tuple[str, ...] = ()
    flops_per_step: float = 0.0

    @property
    def steady_bytes(self) -> int:
        """Resident the whole run: the transformer's weights on the device, the VAE's, the workspace margin."""
        return self.weights.device_bytes + self.vae_weights + self.workspace

    @property
    def step_bytes(self) -> int:
        """On top of the steady bytes while sampling."""
        return self.activations.peak + sum(self.section.values()) + self.teacache_bytes

    @property
    def non_weight_bytes(self) -> int:
        """Everything but the transformer's weights, at the worst phase (encoders excluded when they run
        elsewhere)."""
        return self.vae_weights + self.workspace + max(self.step_bytes, self.vae_decode, self.encoder_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.weights.device_bytes + self.non_weight_bytes

    @property
    def streamed_bytes(self) -> int:
        return self.weights.streamed_bytes

    @property
    def copy_seconds(self) -> float:
        """Host -> device time per step for the streamed blocks at PCIe 4 speed (hidden behind compute when the
        compute of a step takes longer)."""
        return self.streamed_bytes / PCIE4_BYTES_PER_S

    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    def rows(self) -> list[tuple[str, int]]:
        w = self.weights
        rows = [(f"transformer weights ({', '.join(f'{k} {gib(v)}' for k, v in w.by_dtype.items())})", w.total)]
        if w.streamed_blocks:
            rows += [
                (f"  resident: non-block + probe + {w.kinds(w.resident_blocks) or 'no'} blocks",
                 w.base + sum(w.block_sizes[i] for i in w.resident_blocks)),
                (f"  streamed: {w.kinds(w.streamed_blocks)} blocks through {w.slots} slots", w.slots * w.slot_bytes),
            ]
        rows += [
            (f"step activations (batch {self.batch}{', CFG' if self.cfg else ''}, "
             f"{self.tokens.video} video + {self.tokens.context} context tokens)", self.activations.peak),
            *((f"  {k}", v) for k, v in self.section.items()),
            ("TeaCache buffers", self.teacache_bytes),
            ("VAE weights", self.vae_weights),
            ("VAE decode tiles (estimate)", self.vae_decode),
            ("largest encoder while loaded" if self.encoder_bytes else "encoders (not on the device)",
             self.encoder_bytes),
            ("workspace margin", self.workspace),
        ]
        return rows

    def table(self) -> str:
        q = f", {self.quantize}" if self.quantize else ""
        lines = [f"memory plan: {self.height}x{self.width}, window {self.window}, {_dtype_name(self.dtype)}{q}"]
        lines += [f"  {name:<64} {_amount(n):>11}" for name, n in self.rows()]
        lines.append(f"  {'device peak (weights on the device + the worst phase)':<64} {gib(self.peak_bytes):>11}")
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"  budget {gib(self.budget_bytes)}: {verdict}")
        if self.weights.streamed_blocks:
            lines.append(f"  per step: {gib(self.streamed_bytes)} copied, {self.copy_seconds:.2f} s at PCIe 4 "
                         f"(25 GB/s); {self.flops_per_step / 1e12:.0f} TFLOP of compute to hide it behind")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table

    @property
    def streamer_weight_budget(self) -> int:
        """The ``budget_bytes`` to give BlockStreamer: the budget less everything that is not its weights."""
        if self.budget_bytes is None:
            raise ValueError("this plan has no budget: pass budget_bytes to plan_memory")
        return self.budget_bytes - self.non_weight_bytes


def plan_for_resolution(config: FramePackConfig, resolution: int, *, window: int = 9, quantize: str | None = None,
                        budget_gb: float | None = None, dtype: torch.dtype = torch.bfloat16,
                        **plan_kwargs) -> MemoryPlan:
    """``framepack-rt info --resolution PX``: the plan at PX x PX pixels (rounded to a multiple of 16; the
    square bucket is the largest of a resolution's bucket set), ``budget_gb`` GiB if given."""
    side = max(16, round(resolution / 16) * 16)
    budget = None if budget_gb is None else int(budget_gb * GiB)
    return plan_memory(config, height=side, width=side, window=window, quantize=quantize, dtype=dtype,
                       budget_bytes=budget, **plan_kwargs)


def weight_budget(config: FramePackConfig, budget_bytes: int, *, height: int = 640, width: int = 640,
                  window: int = 9, **plan_kwargs) -> int:
    """Low-VRAM mode's weight budget for BlockStreamer: ``budget_bytes`` less the plan's non-weight parts at
    the largest resolution it will run (default: the release's 640 bucket, window 9), so every bucket fits.
    Raises ValueError (saying what is needed) when even streaming cannot fit."""
    plan = plan_memory(config, height=height, width=width, window=window, budget_bytes=budget_bytes, **plan_kwargs)
    return plan.streamer_weight_budget


def step_flops(config: FramePackConfig, tokens: Tokens, batch: int = 1) -> float:
    """Multiply-adds x 2 of one step's blocks: linears over every token, attention over each sample."""
    d, m = config.inner_dim, config.mlp_dim
    n = tokens.video + tokens.context
    double = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d  # q, k, v, out and the MLP, each stream
    single = 2 * n * (3 * d * d + d * m + (d + m) * d) + 4 * n * n * d  # q, k, v, proj_mlp, proj_out
    return float(batch * (config.num_layers * double + config.num_single_layers * single))


def plan_memory(config: FramePackConfig, *, height: int, width: int, window: int, batch: int = 1,
                cfg: bool = False, teacache: bool = True, dtype: torch.dtype = torch.bfloat16,
                quantize: str | None = None, budget_bytes: int | None = None, prefetch: int = 1,
                vae: VaeSpec | None = VaeSpec(), encoder_bytes: int = 0, workspace_bytes: int = DEFAULT_WORKSPACE,
                text_tokens: int = TEXT_TOKENS, attention: str = "flash") -> MemoryPlan:
    """The plan for sampling at pixel ``height`` x ``width`` with ``window`` latents per section.

    ``cfg``: real classifier-free guidance (two branches: batched into one call of batch 2B, or with
    ``teacache`` two calls run block by block); ``vae=None``: no VAE on the device; ``encoder_bytes``: the
    largest encoder's weights when encoders are loaded on the device (0: they run elsewhere). With
    ``budget_bytes``, the transformer's blocks that do not fit beside everything else stream (BlockStreamer);
    a budget too small for even that raises ValueError saying what is needed."""
    tokens = section_tokens(config, height, width, window, text_tokens=text_tokens)
    batched = cfg and not teacache
    call_batch, branches = (2 * batch if batched else batch), (2 if cfg and teacache else 1)
    acts = step_activations(config, tokens, batch=call_batch, branches=branches, dtype=dtype, quantize=quantize,
                            attention=attention)
    section = section_bytes(config, tokens, batch=call_batch, plans=branches, dtype=dtype)
    tea = teacache_bytes(config, tokens, batch=batch, branches=2 if cfg else 1, dtype=dtype) if teacache else 0
    weights = count_weights(config, dtype, quantize)
    notes = []
    if vae is None:
        vae_weights = vae_decode = 0
    else:
        vae_weights, vae_decode = vae.weights_bytes, vae.decode_bytes(height, width)
    plan = MemoryPlan(height, width, window, batch, cfg, teacache, dtype, quantize, tokens, weights, acts, section,
                      tea, vae_weights, vae_decode, encoder_bytes, workspace_bytes, budget_bytes, prefetch,
                      flops_per_step=step_flops(config, tokens, call_batch * branches))
    if budget_bytes is not None:
        room = budget_bytes - plan.non_weight_bytes
        try:
            weights = with_budget(weights, room, prefetch) if room < weights.total else weights
        except ValueError:
            least = minimum_weight_budget(weights.base, list(weights.block_sizes), list(weights.block_regions), 1)
            raise ValueError(
                f"a budget of {gib(budget_bytes)} cannot run this: everything but the transformer's weights needs "
                f"{gib(plan.non_weight_bytes)} (activations {gib(acts.peak)}, VAE, workspace), and streaming needs "
                f"{gib(least)} of weights on top: at least {gib(plan.non_weight_bytes + least)}; lower the "
                f"resolution or window{'' if quantize else ', use fp8 weights (--quantize fp8)'}, or raise the "
                "budget"
            ) from None
        if encoder_bytes and encoder_bytes > plan.step_bytes:
            notes.append("the largest encoder sets the peak: running encoders on the CPU frees "
                         f"{gib(encoder_bytes - max(plan.step_bytes, plan.vae_decode))}")
    notes.append("the CUDA context (typically 0.3-1 GiB) comes on top, outside torch's allocator")
    return dataclasses.replace(plan, weights=weights, notes=tuple(notes))


# -- presets by memory ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    budget_gb: int
    plan: MemoryPlan

    @property
    def fp8(self) -> bool:
        return self.plan.quantize == "fp8"

    def row(self) -> str:
        w, p = self.plan.weights, self.plan
        resident = f"all {len(w.block_sizes)} blocks" if not w.streamed_blocks else w.kinds(w.resident_blocks)
        streams = "nothing" if not w.streamed_blocks else (
            f"{w.kinds(w.streamed_blocks)} ({gib(p.streamed_bytes)} a step)")
        return (f"| {self.budget_gb} GB | {'fp8' if self.fp8 else 'bf16'} | {resident} | {streams} | "
                f"{gib(p.peak_bytes)} | {p.copy_seconds:.2f} s |")


def memory_presets(config: FramePackConfig | str = "framepack-13b", *, height: int = 640, width: int = 640,
                   window: int = 9, budgets_gb: tuple[int, ...] = MEMORY_PRESETS_GB, **plan_kwargs) -> list[Preset]:
    """Per ``--memory-budget-gb``: bf16 if it moves no more bytes per step than fp8 (no quantization error),
    else fp8; what is resident, what streams, and the copy time per step at PCIe 4 speed."""
    if isinstance(config, str):
        config = FramePackConfig.preset(config)
    presets = []
    for gb in budgets_gb:
        options = []
        for quantize in (None, "fp8"):
            try:
                options.append(plan_memory(config, height=height, width=width, window=window, quantize=quantize,
                                           budget_bytes=gb * GiB, **plan_kwargs))
            except ValueError:
                continue
        if not options:
            raise ValueError(f"{gb} GB cannot run {height}x{width} window {window} even with fp8 streaming")
        best = min(options, key=lambda p: (p.streamed_bytes, p.quantize is not None))
        presets.append(Preset(gb, best))
    return presets


def presets_table(presets: list[Preset]) -> str:
    head = ("| --memory-budget-gb | weights | resident | streams | planned peak | copies per step (PCIe 4) |\n"
            "|---|---|---|---|---|---|")
    return "\n".join([head, *(p.row() for p in presets)])
