"""Low-VRAM block streaming: exact outputs, the copy / event schedule, the arena's bytes, one copy per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

from framepack_rt import FramePackTransformer
from framepack_rt.engine.teacache import TeaCache, TeaCacheConfig
from framepack_rt.model.offload import (
    ALIGN, BlockStreamer, CpuTransfer, all_blocks, module_bytes, plan_residency, probe_module, region_bytes,
)
from framepack_rt.model.transformer import StepBranch

STEP_KEYS = ("hidden_states", "timestep", "guidance")


class RecordingTransfer(CpuTransfer):
    """The CPU as the device (real copies, so the math is untouched) with a log of the schedule: copies on
    the "side stream" with the event each waits for, events recorded on the "compute stream", and waits."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.log: list[tuple] = []
        self.events = 0
        self.streamer: BlockStreamer | None = None

    def _event(self) -> int:
        self.events += 1
        return self.events

    def copy(self, dst, src, after):
        dst.copy_(src)
        s = self.streamer
        block = next(j for j, b in enumerate(s.blocks) if src.data_ptr() == s.arena.data_ptr() + b.arena_offset)
        slot = next(k for k, buf in enumerate(s.slots) if dst.data_ptr() == buf.data_ptr())
        event = self._event()
        self.log.append(("copy", block, slot, after, event))
        return event

    def record(self):
        event = self._event()
        self.log.append(("record", event))
        return event

    def wait(self, event):
        self.log.append(("wait", event))


def config_with(tiny_config, layers=3, singles=4):
    return dataclasses.replace(tiny_config, num_layers=layers, num_single_layers=singles)


def split(inputs: dict) -> tuple[tuple, dict, tuple]:
    x = inputs["hidden_states"]
    prepare = {k: v for k, v in inputs.items() if k not in STEP_KEYS}
    return (x.shape[0], *x.shape[2:]), prepare, (x, inputs["timestep"], inputs["guidance"])


def budget_for(model: FramePackTransformer, resident: int, prefetch: int) -> int:
    """A weight budget with room for ``prefetch + 1`` slots of the largest block plus ``resident`` largest
    blocks (the plan may then trade: e.g. keep every double block and stream single ones in smaller slots)."""
    probe = probe_module(model)
    blocks = all_blocks(model)
    base = plan_residency(model, 10**12, prefetch=prefetch).base_bytes
    regions = [region_bytes(b, probe if i == 0 else None) for i, b in enumerate(blocks)]
    return base + (prefetch + 1) * max(regions) + resident * max(module_bytes(b) for b in blocks)


def attach(model, resident, prefetch, transfer=None):
    streamer = BlockStreamer(model, "cpu", budget_for(model, resident, prefetch), prefetch=prefetch,
                             transfer=transfer)
    if transfer is not None:
        transfer.streamer = streamer
    return streamer


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (0, 0), (1, 2)], ids=["all-streamed", "no-prefetch",
                                                                          "some-resident-prefetch2"])
@torch.no_grad()
def test_streamed_model_gives_exactly_the_all_resident_output(tiny_config, make_inputs, resident, prefetch):
    config = config_with(tiny_config)
    inputs = make_inputs(config, text_lengths=(10, 6))
    model = FramePackTransformer.from_config(config).eval()
    expected = model(**inputs)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    streamer = attach(model, resident, prefetch)
    n = len(streamer.streamed)
    assert n == len(all_blocks(model)) - len(streamer.plan.resident)
    assert n == 7 if resident == 0 else 0 < n < 7
    for step in range(3):
        streamer.stats.reset_traffic()
        torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)
        # Each streamed block is copied once per step; the first step also starts the next one's first
        # ``prefetch`` blocks (the wrap-around prefetch), which the later steps then find in flight.
        assert streamer.stats.blocks_streamed == n + (prefetch if step == 0 else 0)
        if step > 0:
            assert streamer.stats.streamed_bytes == streamer.plan.streamed_bytes
    # Cyclic prefetch: from the second step on, nothing waits for a block that was not on its way.
    assert streamer.stats.stalls == (n if prefetch == 0 else 0)
    streamer.detach()
    for name, tensor in model.state_dict().items():  # the weights went through the arena unchanged
        assert torch.equal(tensor, weights[name]), name
    torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)


@torch.no_grad()
def test_one_host_arena_holds_exactly_the_streamed_weights(tiny_config):
    model = FramePackTransformer.from_config(config_with(tiny_config)).eval()
    streamer = attach(model, resident=1, prefetch=1)
    streamed = [b.module for b in streamer.blocks]
    probe = probe_module(model)
    weights = sum(module_bytes(b) - (module_bytes(probe) if b is model.transformer_blocks[0] else 0)
                  for b in streamed)
    tensors = sum(len(b.entries) for b in streamer.blocks)
    s = streamer.stats
    assert weights <= s.arena_bytes < weights + ALIGN * tensors  # alignment aside, arena bytes = weight bytes
    assert streamer.arena.numel() == s.arena_bytes  # one buffer, no per-tensor copies
    lo, hi = streamer.arena.data_ptr(), streamer.arena.data_ptr() + s.arena_bytes
    for b in streamer.blocks:  # every streamed tensor lives in the arena, each block a contiguous region
        ptrs = [t.data_ptr() for t in b.host_views]
        assert all(lo <= p < hi for p in ptrs) and all(p % ALIGN == 0 for p in ptrs)
        assert all(e.get().data_ptr() == v.data_ptr() for e, v in zip(b.entries, b.host_views))  # idle: host
    assert len(streamer.slots) == 2 and s.slot_bytes == 2 * max(b.nbytes for b in streamer.blocks)
    assert s.peak_bytes == s.resident_bytes + s.slot_bytes <= streamer.budget_bytes


@pytest.mark.parametrize("prefetch", [1, 2])
@torch.no_grad()
def test_schedule_prefetches_in_order_and_orders_copies_by_events(tiny_config, make_inputs, prefetch):
    config = config_with(tiny_config)
    inputs = make_inputs(config)
    model = FramePackTransformer.from_config(config).eval()
    transfer = RecordingTransfer()
    streamer = attach(model, resident=0, prefetch=prefetch, transfer=transfer)
    n, slots = len(streamer.blocks), prefetch + 1
    for j, b in enumerate(streamer.blocks):  # logs the compute of each block, after the streamer's own hook
        b.module.register_forward_pre_hook(lambda _m, _a, j=j: transfer.log.append(("run", j)))
    steps = 3
    for _ in range(steps):
        model(**inputs)
    log = transfer.log

    runs = [i for i, e in enumerate(log) if e[0] == "run"]
    assert [log[i][1] for i in runs] == list(range(n)) * steps
    copies = [e for e in log if e[0] == "copy"]
    # Blocks are copied in execution order, cyclically, into the slots of a ring, once each per step (the
    # first steps' next blocks are already in flight at the end).
    assert [c[1] for c in copies] == [j % n for j in range(len(copies))]
    assert [c[2] for c in copies] == [j % slots for j in range(len(copies))]
    assert steps * n <= len(copies) <= steps * n + prefetch

    last_copy: dict[int, int] = {}  # block -> event of its latest copy
    recorded_after_run: dict[int, int] = {}  # block -> compute event recorded after it ran (its release)
    occupant: dict[int, int] = {}  # slot -> block
    ran: list[int] = []
    for i, entry in enumerate(log):
        kind = entry[0]
        if kind == "copy":
            _, block, slot, after, event = entry
            previous = occupant.get(slot)
            if previous is None:
                assert after is None
            else:  # the copy waits until the compute released the slot's previous block
                assert after == recorded_after_run[previous] and previous in ran
            occupant[slot] = block
            last_copy[block] = event
        elif kind == "record":
            recorded_after_run[ran[-1]] = entry[1]  # released: the block that ran last
        elif kind == "run":
            block = entry[1]
            assert log[i - 1 - _prefetch_entries(log, i)] == ("wait", last_copy[block])  # compute waits for it
            ran.append(block)
    # Prefetch: when block j starts, the copies of blocks j+1 .. j+prefetch (cyclically) are on their way.
    for i in runs:
        j = log[i][1]
        for ahead in range(1, prefetch + 1):
            assert _in_flight(log, i, (j + ahead) % n), (i, j, ahead)
    assert streamer.stats.stalls == 1  # only the very first block, cold


def _prefetch_entries(log: list[tuple], run_index: int) -> int:
    """Entries between the compute's wait for a block and its run: the prefetch copies issued right after."""
    k = 0
    while log[run_index - 1 - k][0] == "copy":
        k += 1
    return k


def _in_flight(log: list[tuple], run_index: int, block: int) -> bool:
    """Whether ``block``'s latest copy before ``run_index`` came after its latest run (it is resident again)."""
    last_copy = max((i for i, e in enumerate(log[:run_index]) if e[0] == "copy" and e[1] == block), default=-1)
    last_run = max((i for i, e in enumerate(log[:run_index]) if e[0] == "run" and e[1] == block), default=-1)
    return last_copy > last_run


class HostReads(TorchFunctionMode):
    """Fails any op (views and the streamer's own copies aside) that reads the host arena: on a GPU that is
    the device-mismatch crash (weights used where they are not)."""

    HARMLESS = {"__getitem__", "view", "copy_", "__set__", "__get__", "data_ptr", "detach", "numel"}

    def __init__(self, arena: torch.Tensor) -> None:
        super().__init__()
        self.lo, self.hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in self.HARMLESS:
            for a in [*args, *kwargs.values()]:
                if isinstance(a, torch.Tensor) and a.device.type == "cpu" and self.lo <= a.data_ptr() < self.hi:
                    self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@torch.no_grad()
def test_teacache_probe_and_cfg_branches_share_one_residency(tiny_config, make_inputs):
    """Everything streamed, block 0 too (the release crashed below ~2.2 GiB here: TeaCache's probe read block
    0 outside the hooks). Two CFG branches, each with its own TeaCache, run block by block: every streamed
    block is copied once per step, no op reads host weights, and the velocities equal the all-resident
    model's, branch by branch."""
    config = config_with(tiny_config)
    model = FramePackTransformer.from_config(config).eval()
    reference = FramePackTransformer.from_config(config).eval()
    pos = make_inputs(config, text_lengths=(10,), seed=1)
    neg = {**pos, "encoder_hidden_states": torch.zeros_like(pos["encoder_hidden_states"]),
           "pooled_projections": torch.zeros_like(pos["pooled_projections"])}
    shape, prep_pos, (x, t, g) = split(pos)
    prep_neg = split(neg)[1]
    steps = 4
    caches = [TeaCache(TeaCacheConfig(threshold=0.05)) for _ in range(4)]
    for cache in caches:
        cache.start(steps)

    streamer = attach(model, resident=0, prefetch=1)
    assert model.transformer_blocks[0] in streamer.streamed
    probe = probe_module(model)
    assert all(not (streamer.arena.data_ptr() <= p.data_ptr() < streamer.arena.data_ptr() + streamer.arena.numel())
               for p in probe.parameters())  # the probe's weights are resident, not in the arena
    plans = [model.prepare(shape, **prep_pos), model.prepare(shape, **prep_neg)]
    ref_plans = [reference.prepare(shape, **prep_pos), reference.prepare(shape, **prep_neg)]
    n = len(streamer.blocks)
    for step in range(steps):
        timestep = t * (1 - step / steps)
        x = x + 0.01 * step
        streamer.stats.reset_traffic()
        before = [c.steps_run for c in caches[:2]]
        with HostReads(streamer.arena) as reads:
            v = model.step_branches([StepBranch(p, x, timestep, g, c) for p, c in zip(plans, caches[:2])])
        assert reads.reads == []
        expected = [reference.step(p, x, timestep, g, c) for p, c in zip(ref_plans, caches[2:])]
        for got, want in zip(v, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        ran = [c.steps_run - b for c, b in zip(caches[:2], before)]
        # Each streamed block is copied once for the step, however many branches run it (the first step also
        # starts the next step's first block: the wrap-around prefetch).
        assert streamer.stats.blocks_streamed == (n if any(ran) else 0) + (1 if step == 0 else 0), (step, ran)
        assert step > 0 or ran == [1, 1]  # TeaCache always runs the first step: both branches share the copies
    assert [c.steps_run for c in caches[:2]] == [c.steps_run for c in caches[2:]]

    # The same two branches as two step() calls (what the engine does without step_branches): twice the copies.
    streamer.stats.reset_traffic()
    for p in plans:
        model.step(p, x, t, g)
    assert streamer.stats.blocks_streamed == 2 * n


@torch.no_grad()
def test_a_budget_with_room_for_one_slot_streams_without_prefetch(tiny_config, make_inputs, caplog):
    config = config_with(tiny_config)
    inputs = make_inputs(config)
    model = FramePackTransformer.from_config(config).eval()
    expected = model(**inputs)
    budget = budget_for(model, resident=0, prefetch=0)  # one slot of the largest block: not two
    streamer = BlockStreamer(model, "cpu", budget, prefetch=1)
    assert "room for 1 device slot(s) instead of 2" in caplog.text
    assert streamer.plan.slots == 1 and streamer.prefetch == 0 and len(streamer.streamed) == 7
    assert streamer.stats.peak_bytes <= budget
    torch.testing.assert_close(model(**inputs), expected, rtol=0, atol=0)


def test_budget_too_small_explains(tiny_config):
    model = FramePackTransformer.from_config(tiny_config)
    with pytest.raises(ValueError, match="raise the budget"):
        BlockStreamer(model, "cpu", budget_bytes=1024)


def test_13b_at_6_gib_streams_most_blocks():
    """The release's 6 GB laptop case, planned on the meta device: bf16 13B weights vs a 6 GiB budget."""
    model = FramePackTransformer.from_config("framepack-13b", device="meta", dtype=torch.bfloat16)
    plan = plan_residency(model, budget_bytes=6 * 2**30, prefetch=1)
    assert module_bytes(model) == 2 * 12_874_314_816  # 24 GiB of bf16 weights
    assert plan.device_bytes <= 6 * 2**30
    assert len(plan.resident) + len(plan.streamed) == 60 and 0 < len(plan.resident) < len(plan.streamed)
    assert plan.slots == 2 and plan.slot_bytes == max(region_bytes(b) for b in plan.streamed)
    # The budget is used up to less than one block, and what is not resident streams (alignment aside).
    assert 6 * 2**30 - plan.device_bytes < min(module_bytes(b) for b in all_blocks(model))
    assert 0 <= plan.streamed_bytes - (module_bytes(model) - plan.resident_bytes) < 2**20
