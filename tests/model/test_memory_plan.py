"""The memory plan: activations against torch's profiler, weights against real models, presets, budgets.

Measuring on the CPU: torch.profiler with ``profile_memory=True`` reports every allocation and free of the CPU
allocator (temporaries inside ops included) as ``[memory]`` events with their byte counts; their running sum,
in time order, peaks at the most bytes the step held at once beyond what existed before it (the weights and
the StepPlan). That is what ``torch.cuda.max_memory_allocated`` measures on a GPU after a reset, so it is the
quantity the plan's activation figure stands for. A TorchDispatchMode tracking op outputs would miss
temporaries allocated inside ops, which the profiler sees.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from framepack_rt import FramePackConfig, FramePackTransformer
from framepack_rt.model.memory_plan import (
    GiB, MEMORY_PRESETS_GB, Tokens, count_weights, memory_presets, plan_memory, presets_table, section_tokens,
    step_activations, weight_budget, with_budget,
)
from framepack_rt.model.offload import all_blocks, module_bytes, plan_residency, probe_module, region_bytes
from framepack_rt.model.quantize import quantize_blocks

THIRTEEN_B = FramePackConfig.preset("framepack-13b")


def model_at(config: FramePackConfig, dtype: torch.dtype, quantize: str | None) -> FramePackTransformer:
    """Real tensors, filled fast (the values do not change what a step allocates)."""
    model = FramePackTransformer.from_config(config, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for t in model.parameters():
            t.fill_(0.01)
    model = model.to(dtype).eval()
    if quantize:
        quantize_blocks(model)
    return model


def measured_step_peak(model: FramePackTransformer, batch: int, latent: int = 8, text: int = 20,
                       image: int = 16) -> tuple[int, Tokens]:
    """Peak bytes the CPU allocator held during one step beyond what existed before, and the step's tokens."""
    dtype = model.dtype
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    mask = torch.ones(batch, text, dtype=torch.long)
    if batch > 1:
        mask[1, text // 2 :] = 0  # ragged prompts: the packed layout's index maps and per-token vectors
    h = w = latent
    plan = model.prepare(
        (batch, 9, h, w), randn(batch, text, model.config.text_embed_dim), mask,
        randn(batch, model.config.pooled_projection_dim), randn(batch, image, model.config.image_proj_dim),
        torch.arange(20, 29), randn(batch, 16, 2, h, w), torch.tensor([0, 19]), randn(batch, 16, 2, h, w),
        torch.tensor([17, 18]), randn(batch, 16, 16, h, w), torch.arange(1, 17),
    )
    x, t, guidance = randn(batch, 16, 9, h, w), torch.full((batch,), 500.0), torch.full((batch,), 1e4)
    # oneDNN off: on CPUs with AVX512-BF16/AMX its bf16 matmuls allocate weight reorder buffers that a GPU step
    # never holds (measured 9.48 MiB against the plan's 6.78 at bf16, batch 2, on an AMX Xeon; 0.999 of the
    # plan without oneDNN, and on CPUs without bf16 units either way). The plan is of the step's own tensors.
    with torch.backends.mkldnn.flags(enabled=False), profile(activities=[ProfilerActivity.CPU],
                                                              profile_memory=True) as prof:
        model.step(plan, x, t, guidance)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    context = sum(plan.packing.context.lengths) // batch  # per sample, as the plan counts (ragged: the mean)
    return peak, Tokens(plan.noisy_len, plan.clean_tokens.shape[1], context - image, image)


def check_activation_plan(config: FramePackConfig, dtype: torch.dtype, batch: int, quantize: str | None) -> float:
    model = model_at(config, dtype, quantize)
    with torch.no_grad():
        measured, tokens = measured_step_peak(model, batch)
    planned = step_activations(config, tokens, batch=batch, dtype=dtype, quantize=quantize, attention="sdpa")
    ratio = planned.peak / measured
    assert 0.75 <= ratio <= 1.25, f"planned {planned.peak / 2**20:.2f} MiB vs measured {measured / 2**20:.2f} MiB"
    return ratio


SMALL = dataclasses.replace(THIRTEEN_B, num_attention_heads=4, num_layers=1, num_single_layers=1)  # dim 512


@pytest.mark.parametrize("dtype,batch,quantize", [(torch.float32, 1, None), (torch.bfloat16, 2, None),
                                                  (torch.bfloat16, 1, "fp8")], ids=["fp32", "bf16-batch2", "fp8"])
def test_step_activations_match_the_profiler_at_small_widths(dtype, batch, quantize):
    """The 13B's block structure at width 512 (4 heads x 128), one double and one single block."""
    check_activation_plan(SMALL, dtype, batch, quantize)


def test_step_activations_match_the_profiler_at_13b_widths():
    """24 heads x 128 (dim 3072, MLP 12288), one double and one single block, fp32, a 64x64-pixel section:
    about 25 s on 2 cores."""
    began = time.perf_counter()
    config = dataclasses.replace(THIRTEEN_B, num_layers=1, num_single_layers=1)
    check_activation_plan(config, torch.float32, 1, None)
    assert time.perf_counter() - began < 120


@pytest.mark.slow
@pytest.mark.parametrize("batch,quantize", [(1, None), (2, None), (1, "fp8")])
def test_step_activations_match_the_profiler_at_13b_widths_bf16(batch, quantize):
    config = dataclasses.replace(THIRTEEN_B, num_layers=1, num_single_layers=1)
    check_activation_plan(config, torch.bfloat16, batch, quantize)


# -- tokens and weights -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(64, 64), (96, 160), (640, 640), (544, 704)])
def test_section_tokens_are_the_models(tiny_config, make_inputs, height, width):
    model = FramePackTransformer.from_config(tiny_config)
    inputs = make_inputs(tiny_config, height=height // 8, width=width // 8)
    x = inputs.pop("hidden_states")
    for key in ("timestep", "guidance"):
        inputs.pop(key)
    plan = model.prepare((1, *x.shape[2:]), **inputs)
    tokens = section_tokens(tiny_config, height, width, 9, text_tokens=10, image_tokens=7)
    assert (tokens.noisy, tokens.clean) == (plan.noisy_len, plan.clean_tokens.shape[1])
    assert tokens.context == plan.packing.context.lengths[0]


@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_weights_count_what_the_loaded_model_holds(tiny_config, quantize):
    """Counted from the config (meta device) = the real model's bytes, block by block, regions included."""
    config = dataclasses.replace(tiny_config, num_layers=3, num_single_layers=2)
    model = FramePackTransformer.from_config(config, dtype=torch.bfloat16)
    if quantize:
        quantize_blocks(model)
    weights = count_weights(config, torch.bfloat16, quantize)
    assert weights.total == module_bytes(model)
    probe = probe_module(model)
    blocks = all_blocks(model)
    assert list(weights.block_sizes) == [module_bytes(b) - (module_bytes(probe) if i == 0 else 0)
                                         for i, b in enumerate(blocks)]
    assert list(weights.block_regions) == [region_bytes(b, probe if i == 0 else None) for i, b in enumerate(blocks)]
    assert sum(weights.by_dtype.values()) == weights.total
    if quantize:
        fp8 = sum(t.numel() for t in model.buffers() if t.dtype == torch.float8_e4m3fn)
        assert weights.by_dtype["float8_e4m3fn"] == fp8
    # Under a budget the plan keeps the blocks BlockStreamer keeps.
    budget = weights.base + 2 * max(weights.block_regions) + sum(sorted(weights.block_sizes)[-2:])
    planned = with_budget(weights, budget)
    streamer_plan = plan_residency(model, budget)
    assert [blocks[i] for i in planned.resident_blocks] == streamer_plan.resident
    assert planned.device_bytes == streamer_plan.device_bytes
    assert planned.streamed_bytes == streamer_plan.streamed_bytes


def test_13b_weights():
    bf16 = count_weights(THIRTEEN_B, torch.bfloat16)
    fp8 = count_weights(THIRTEEN_B, torch.bfloat16, "fp8")
    assert bf16.total == 2 * 12_874_314_816
    assert 0.45 < fp8.total / bf16.total < 0.55  # about 13 GB instead of 26
    assert fp8.by_dtype["float8_e4m3fn"] > 0.9 * fp8.total


# -- the plan under a budget ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize,budget_gb", [("fp8", 6), (None, 8), ("fp8", 12)])
def test_13b_plan_under_a_budget(quantize, budget_gb):
    plan = plan_memory(THIRTEEN_B, height=640, width=640, window=9, quantize=quantize, budget_bytes=budget_gb * GiB)
    assert plan.fits() and plan.peak_bytes <= budget_gb * GiB
    w = plan.weights
    assert 0 < len(w.streamed_blocks) < 60
    # The budget is used to within one block: streaming less would not fit.
    assert budget_gb * GiB - plan.peak_bytes < max(w.block_sizes)
    # BlockStreamer given the plan's weight budget keeps the same blocks (meta device: no memory).
    if quantize is None:
        model = FramePackTransformer.from_config(THIRTEEN_B, device="meta", dtype=torch.bfloat16)
        residency = plan_residency(model, plan.streamer_weight_budget)
        assert len(residency.streamed) == len(w.streamed_blocks)
        assert residency.device_bytes == w.device_bytes
    assert weight_budget(THIRTEEN_B, budget_gb * GiB, quantize=quantize) == plan.streamer_weight_budget
    text = plan.table()
    assert "activations" in text and "VAE decode" in text and ("fits" in text)


def test_cfg_and_batch_cost_more_activations():
    base = dict(height=640, width=640, window=9)
    one = plan_memory(THIRTEEN_B, **base)
    batched = plan_memory(THIRTEEN_B, cfg=True, teacache=False, **base)  # both branches in one call
    branches = plan_memory(THIRTEEN_B, cfg=True, teacache=True, **base)  # two calls, block by block
    assert 1.9 < batched.activations.peak / one.activations.peak < 2.3
    assert one.activations.peak < branches.activations.peak < batched.activations.peak
    assert branches.teacache_bytes == 2 * one.teacache_bytes


def test_budget_too_small_says_what_is_needed():
    with pytest.raises(ValueError, match="at least .* GiB"):
        plan_memory(THIRTEEN_B, height=640, width=640, window=9, quantize="fp8", budget_bytes=3 * GiB)


def test_presets_by_memory():
    presets = memory_presets(THIRTEEN_B, height=640, width=640, window=9)
    assert [p.budget_gb for p in presets] == list(MEMORY_PRESETS_GB)
    moved = [p.plan.streamed_bytes for p in presets]
    assert moved == sorted(moved, reverse=True) and moved[0] > 0 and moved[-1] == 0
    for p in presets:
        assert p.plan.peak_bytes <= p.budget_gb * GiB
    assert all(p.fp8 for p in presets)  # the bf16 13B (24 GiB) fits none of them whole, and moves more
    table = presets_table(presets)
    assert table.count("\n") == len(presets) + 1 and "| 6 GB | fp8 |" in table


def test_vae_decode_estimate_matches_the_profiler():
    """The VAE decoder's tensors for one temporal tile, at a quarter of the real widths (fp32 on the CPU)."""
    diffusers = pytest.importorskip("diffusers")
    from framepack_rt.model.memory_plan import VaeSpec

    channels = (32, 64, 128, 128)
    vae = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=channels, layers_per_block=2).eval()
    z = torch.randn(1, 16, 5, 8, 8)  # one tile: 5 latents -> 17 frames of 64x64
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        vae.decoder(z)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    spec = VaeSpec(block_out_channels=channels, itemsize=4, spatial_tile=None)
    planned = spec.decode_bytes(64, 64) - 17 * 64 * 64 * 3 * 4  # the decoder alone, without the blending
    assert 0.75 <= planned / peak <= 1.25, (planned, peak)
