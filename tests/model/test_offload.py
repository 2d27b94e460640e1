"""Low-VRAM block streaming: same output, budget respected, bytes accounted."""

from __future__ import annotations

import pytest
import torch

from framepack_rt import FramePackTransformer
from framepack_rt.model.offload import BlockStreamer, module_bytes, plan_residency


def blocks(model):
    return [*model.transformer_blocks, *model.single_transformer_blocks]


@pytest.fixture
def inputs(make_inputs, tiny_config):
    return make_inputs(tiny_config, text_lengths=(10, 6))


@pytest.mark.parametrize("resident_blocks", [0, 2], ids=["all-streamed", "two-resident"])
@torch.no_grad()
def test_streamed_model_gives_the_same_output_within_budget(tiny_config, inputs, resident_blocks):
    model = FramePackTransformer.from_config(tiny_config).eval()
    expected = model(**inputs)
    sizes = [module_bytes(b) for b in blocks(model)]
    base = module_bytes(model) - sum(sizes)
    budget = base + sum(sizes[:resident_blocks]) + max(sizes)
    streamer = BlockStreamer(model, "cpu", budget_bytes=budget)
    assert len(streamer.streamed) == len(sizes) - resident_blocks
    torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)
    s = streamer.stats
    assert s.blocks_streamed == len(streamer.streamed)  # each streamed block loaded once per forward
    assert s.streamed_bytes == sum(module_bytes(b) for b in streamer.streamed)
    assert s.in_flight_bytes == 0  # everything streamed in was dropped again
    assert s.peak_bytes <= budget
    # Streamed blocks' parameters are their CPU masters again between forwards.
    for block in streamer.streamed:
        assert all(p.data_ptr() == m.data_ptr() for p, (_, m) in zip(block.parameters(), streamer._masters[id(block)]))


def test_budget_too_small_explains(tiny_config):
    model = FramePackTransformer.from_config(tiny_config)
    with pytest.raises(ValueError, match="raise the budget"):
        BlockStreamer(model, "cpu", budget_bytes=1024)


def test_13b_at_6_gib_streams_most_blocks():
    """The release's 6 GB laptop case, planned on the meta device: bf16 13B weights vs a 6 GiB budget."""
    model = FramePackTransformer.from_config("framepack-13b", device="meta", dtype=torch.bfloat16)
    plan = plan_residency(model, budget_bytes=6 * 2**30)
    assert module_bytes(model) == 2 * 12_874_314_816  # 24 GiB of bf16 weights
    resident = plan.base_bytes + sum(module_bytes(b) for b in plan.resident)
    assert resident + max(module_bytes(b) for b in blocks(model)) <= 6 * 2**30
    assert len(plan.resident) + len(plan.streamed) == 60 and 0 < len(plan.resident) < len(plan.streamed)
