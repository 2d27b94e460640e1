"""ContextRing against the released demos' torch.cat history, and its constant memory."""

from __future__ import annotations

import dataclasses
import gc
import pytest
import torch

from framepack_rt.engine.context import ContextInputs, ContextRing
from framepack_rt.engine.schedules import (
    F1_PATTERN,
    GEOMETRIC_PATTERN,
    VANILLA_PATTERN,
    CompressionPattern,
    Order,
    Schedule,
    SectionLayout,
    custom_schedule,
    f1_schedule,
    inverted_layout,
    inverted_schedule,
    vanilla_schedule,
)

B, C, H, W = 2, 16, 3, 5
KEYS = [f.name for f in dataclasses.fields(ContextInputs)]


# ---------------------------------------------------------------------------- naive reference (demos)
class DemoHistory:
    """The released demos' bookkeeping: a history that grows with torch.cat every section.

    Forward (F1 / vanilla / custom): history = cat(zeros(K), start); inputs slice history[-K:] split
    [n4, n2, n1]; new latents appended. Inverted: history = zeros(K) (end latent at 0); inputs slice
    history[:K] split [n1, n2, n4]; new latents (with the start latent on the last section) prepended.
    """

    def __init__(self, pattern: CompressionPattern, order: Order, window: int, start, end=None):
        self.p, self.order, self.w, self.start = pattern, order, window, start
        K = pattern.num_history
        zeros = torch.zeros(B, C, K, H, W)
        if order is Order.FORWARD:
            self.history = torch.cat([zeros, start], dim=2)
        else:
            self.history = zeros
            if end is not None:
                self.history[:, :, 0:1] = end

    def inputs(self, latent_padding: int = 0) -> dict:
        p, w = self.p, self.w
        s, n1, n2, n4, K = int(p.start_full_resolution), p.num_1x, p.num_2x, p.num_4x, p.num_history
        if self.order is Order.FORWARD:
            idx = torch.arange(0, s + n4 + n2 + n1 + w)
            i_start, i4, i2, i1, noisy = idx.split([s, n4, n2, n1, w])
            L = self.history.shape[2]
            h4, h2, h1 = self.history[:, :, L - K :].split([n4, n2, n1], dim=2)
        else:
            pad = latent_padding * w
            idx = torch.arange(0, s + pad + w + n1 + n2 + n4)
            i_start, _blank, noisy, i1, i2, i4 = idx.split([s, pad, w, n1, n2, n4])
            h1, h2, h4 = self.history[:, :, :K].split([n1, n2, n4], dim=2)
        clean = torch.cat([self.start, h1], dim=2) if s else h1
        return {
            "latents_clean": clean if clean.shape[2] else None,
            "indices_latents_clean": torch.cat([i_start, i1]) if clean.shape[2] else None,
            "latents_history_2x": h2 if n2 else None,
            "indices_latents_history_2x": i2 if n2 else None,
            "latents_history_4x": h4 if n4 else None,
            "indices_latents_history_4x": i4 if n4 else None,
            "indices_latents": noisy,
        }

    def push(self, new, is_last: bool = False) -> None:
        if self.order is Order.FORWARD:
            self.history = torch.cat([self.history, new], dim=2)
        else:
            if is_last:
                new = torch.cat([self.start, new], dim=2)
            self.history = torch.cat([new, self.history], dim=2)

    def window(self) -> torch.Tensor:
        K = self.p.num_history
        L = self.history.shape[2]
        return self.history[:, :, L - K :] if self.order is Order.FORWARD else self.history[:, :, :K]


def assert_same_inputs(got: ContextInputs, expected: dict, where: str) -> None:
    for key in KEYS:
        g, e = getattr(got, key), expected[key]
        if e is None:
            assert g is None, f"{where}: {key} should be None"
            continue
        assert g is not None, f"{where}: {key} is None"
        assert g.shape == e.shape, f"{where}: {key} shape {tuple(g.shape)} != {tuple(e.shape)}"
        if key.startswith("indices"):
            assert g.dtype == torch.int64 and g.dim() == 1, f"{where}: {key} dtype/dim"
        assert torch.equal(g, e.to(g.dtype)), f"{where}: {key} differs"


def latent(gen: torch.Generator, m: int) -> torch.Tensor:
    return torch.randn(B, C, m, H, W, generator=gen)


def tensors_of(inputs: ContextInputs) -> dict:
    return {k: v for k, v in inputs.as_kwargs().items() if v is not None}


# --------------------------------------------------------------------------------- parity over sections
CASES = {
    "f1": (f1_schedule(9, num_sections=40), False),
    "vanilla": (vanilla_schedule(9, num_sections=40), False),
    "geometric-forward": (custom_schedule(GEOMETRIC_PATTERN, 4, num_sections=40), False),
    "flat-no-2x-forward": (custom_schedule(CompressionPattern(3, 0, 5), 2, num_sections=30), False),
    "start-only": (custom_schedule(CompressionPattern(0, 0, 0), 3, num_sections=5), False),
    "history-only-no-clean": (custom_schedule(CompressionPattern(0, 2, 4, False), 3, num_sections=12), False),
    "inverted-n1": (inverted_schedule(1, 9), False),
    "inverted-n4-end": (inverted_schedule(4, 9, has_end_frame=True), True),
    "inverted-n12": (inverted_schedule(12, 9), False),
    "inverted-n12-end": (inverted_schedule(12, 9, has_end_frame=True), True),
    "geometric-inverted-n7-end": (custom_schedule(GEOMETRIC_PATTERN, 5, "inverted", 7, True), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ring_matches_demo_history(case):
    schedule, with_end = CASES[case]
    gen = torch.Generator().manual_seed(0)
    start = latent(gen, 1)
    end = latent(gen, 1) if with_end else None
    ring = ContextRing.for_schedule(schedule, height=H, width=W, batch_size=B)
    ring.reset(start, end)
    demo = DemoHistory(schedule.pattern, schedule.order, schedule.window, start, end)
    first_shapes = None
    first_ptrs = None
    for k, layout in enumerate(schedule.layouts()):
        got = ring.inputs(layout)
        assert_same_inputs(got, demo.inputs(layout.latent_padding), f"section {k}")
        assert torch.equal(ring.window_latents(), demo.window())
        shapes = {key: tuple(t.shape) for key, t in tensors_of(got).items()}
        ptrs = {key: t.data_ptr() for key, t in tensors_of(got).items()}
        if first_shapes is None:
            first_shapes, first_ptrs = shapes, ptrs
        assert shapes == first_shapes and ptrs == first_ptrs, f"section {k}"
        assert ring.sections_seen == k
        new = latent(gen, schedule.window)
        prepend = schedule.prepends_start(k)
        ring.push(torch.cat([start, new], dim=2) if prepend else new)
        demo.push(new, is_last=prepend)
    assert ring.sections_seen == schedule.num_sections


def test_end_frame_feeds_first_inverted_section():
    gen = torch.Generator().manual_seed(1)
    start, end = latent(gen, 1), latent(gen, 1)
    ring = ContextRing(F1_PATTERN, "inverted", window=9, height=H, width=W, batch_size=B)
    ring.reset(start, end)
    got = ring.inputs(inverted_layout(3))
    assert torch.equal(got.latents_clean[:, :, 0:1], start)
    assert torch.equal(got.latents_clean[:, :, 1:2], end)
    assert got.indices_latents_clean.tolist() == [0, 37]
    assert not got.latents_history_2x.any() and not got.latents_history_4x.any()
    ring.reset(start)  # without an end frame the post slot is zeros
    assert not ring.inputs(inverted_layout(3)).latents_clean[:, :, 1:].any()


def test_f1_first_section_holds_start_as_newest_history():
    gen = torch.Generator().manual_seed(2)
    start = latent(gen, 1)
    ring = ContextRing(window=9, height=H, width=W, batch_size=B)
    ring.reset(start)
    got = ring.inputs(f1_schedule(9).layout(0))
    assert torch.equal(got.latents_clean, torch.cat([start, start], dim=2))
    assert not got.latents_history_2x.any() and not got.latents_history_4x.any()


# ------------------------------------------------------------------------------------------ odd sizes
PUSH_SIZES = [1, 1, 1, 25, 3, 19, 1, 40, 2, 18, 20, 5]
ODD_CASES = {
    "f1": (F1_PATTERN, Order.FORWARD),
    "vanilla": (VANILLA_PATTERN, Order.FORWARD),
    "geometric-forward": (GEOMETRIC_PATTERN, Order.FORWARD),
    "inverted": (F1_PATTERN, Order.INVERTED),
    "geometric-inverted": (GEOMETRIC_PATTERN, Order.INVERTED),
}


@pytest.mark.parametrize("case", sorted(ODD_CASES))
def test_odd_push_sizes(case):
    pattern, order = ODD_CASES[case]
    window = 4
    layout = SectionLayout(order, pattern, window, 1 if order is Order.INVERTED else 0)
    gen = torch.Generator().manual_seed(3)
    start = latent(gen, 1)
    ring = ContextRing(pattern, order, window=window, height=H, width=W, batch_size=B)
    ring.reset(start)
    demo = DemoHistory(pattern, order, window, start)
    for i, m in enumerate(PUSH_SIZES):
        new = latent(gen, m)
        ring.push(new)
        demo.push(new)
        assert_same_inputs(ring.inputs(layout), demo.inputs(layout.latent_padding), f"push {i} of {m}")
        assert torch.equal(ring.window_latents(), demo.window())
    assert ring.sections_seen == len(PUSH_SIZES)
    assert ring.latents_seen == sum(PUSH_SIZES)


def test_four_dim_latents_accepted():
    gen = torch.Generator().manual_seed(4)
    start = latent(gen, 1)
    ring = ContextRing(window=9, height=H, width=W, batch_size=B)
    ring.reset(start[:, :, 0])
    ring.push(latent(gen, 3)[:, :, 0])  # a single latent given as (B, C, H, W)
    assert torch.equal(ring.start, start)
    assert ring.latents_seen == 1


# ------------------------------------------------------------------------------------ constant memory
def reachable_tensor_bytes(root) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``root``'s attributes."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}

    def visit(obj) -> None:
        if id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                visit(v)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for v in vars(obj).values():
                visit(v)

    visit(root)
    return sum(storages.values())


def live_tensor_count() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class LeakyRing(ContextRing):
    """A ring that keeps every pushed section: what the memory checks must catch."""

    def push(self, new_latents):
        super().push(new_latents)
        self.__dict__.setdefault("kept", []).append(new_latents.clone())


def test_reachable_bytes_detects_a_leak():
    ring = LeakyRing(window=2, height=H, width=W, batch_size=B)
    ring.reset(torch.zeros(B, C, 1, H, W))
    ring.push(torch.ones(B, C, 2, H, W))
    before_bytes, before_count = reachable_tensor_bytes(ring), live_tensor_count()
    for _ in range(3):
        ring.push(torch.ones(B, C, 2, H, W))
    assert reachable_tensor_bytes(ring) > before_bytes
    assert live_tensor_count() > before_count


MEMORY_CASES = {
    "f1": f1_schedule(9, num_sections=200),
    "inverted-n200-end": inverted_schedule(200, 9, has_end_frame=True),
    "geometric-forward": custom_schedule(GEOMETRIC_PATTERN, 9, num_sections=200),
}


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_buffers_fixed_over_200_sections(case):
    schedule: Schedule = MEMORY_CASES[case]
    gen = torch.Generator().manual_seed(5)
    start = latent(gen, 1)
    ring = ContextRing.for_schedule(schedule, height=H, width=W, batch_size=B)
    ring.reset(start, latent(gen, 1) if schedule.has_end_frame else None)

    def snapshot() -> dict:
        got = ring.inputs(schedule.layout(min(ring.sections_seen, schedule.num_sections - 1)))
        ptrs = {k: v.data_ptr() for k, v in tensors_of(got).items()}
        ptrs["history"], ptrs["start"] = ring.history.data_ptr(), ring.start.data_ptr()
        return ptrs

    ptrs = snapshot()
    ring.push(latent(gen, schedule.window))
    snapshot()
    bytes_before, count_before = reachable_tensor_bytes(ring), live_tensor_count()
    assert bytes_before == ring.nbytes
    for k in range(1, schedule.num_sections):
        got = ring.inputs(schedule.layout(k))
        assert {k_: v.data_ptr() for k_, v in tensors_of(got).items()} == {
            k_: v for k_, v in ptrs.items() if k_ not in ("history", "start")
        }
        new = latent(gen, schedule.window)
        ring.push(torch.cat([start, new], dim=2) if schedule.prepends_start(k) else new)
    del got, new
    assert ring.sections_seen == schedule.num_sections
    assert snapshot() == ptrs
    assert reachable_tensor_bytes(ring) == bytes_before == ring.nbytes
    assert live_tensor_count() == count_before


def test_inputs_hand_out_the_same_buffers():
    gen = torch.Generator().manual_seed(6)
    ring = ContextRing(window=9, height=H, width=W, batch_size=B)
    ring.reset(latent(gen, 1))
    layout = f1_schedule(9).layout(0)
    first = ring.inputs(layout)
    kept = first.clone()
    ring.push(latent(gen, 9))
    second = ring.inputs(layout)
    for key in KEYS:
        assert getattr(second, key) is getattr(first, key)  # the very same buffers ...
    assert not torch.equal(first.latents_history_2x, kept.latents_history_2x)  # ... so they were overwritten
    assert kept.latents_history_2x.data_ptr() != first.latents_history_2x.data_ptr()


# ------------------------------------------------------------------------------------ misc behaviour
def test_bf16_storage_equals_demo_cast():
    gen = torch.Generator().manual_seed(7)
    start = latent(gen, 1)
    schedule = f1_schedule(9, num_sections=4)
    ring = ContextRing.for_schedule(schedule, height=H, width=W, batch_size=B, dtype=torch.bfloat16)
    ring.reset(start)
    demo = DemoHistory(F1_PATTERN, Order.FORWARD, 9, start)
    for k, layout in enumerate(schedule.layouts()):
        got = ring.inputs(layout)
        assert got.latents_clean.dtype == torch.bfloat16
        assert_same_inputs(got, demo.inputs(), f"section {k}")  # demo values cast to bf16 at use
        new = latent(gen, 9)
        ring.push(new)
        demo.push(new)


def test_reset_starts_over():
    gen = torch.Generator().manual_seed(8)
    schedule = inverted_schedule(3, 9)
    ring = ContextRing.for_schedule(schedule, height=H, width=W, batch_size=B)
    ring.reset(latent(gen, 1), latent(gen, 1))
    for _ in range(5):
        ring.push(latent(gen, 7))
    start = latent(gen, 1)
    ring.reset(start)
    assert ring.sections_seen == 0 and ring.latents_seen == 0
    demo = DemoHistory(F1_PATTERN, Order.INVERTED, 9, start)
    assert_same_inputs(ring.inputs(schedule.layout(0)), demo.inputs(2), "after reset")


def test_as_kwargs_names_match_model_forward():
    ring = ContextRing(window=9, height=H, width=W, batch_size=B)
    ring.reset(torch.zeros(B, C, 1, H, W))
    assert list(ring.inputs(f1_schedule(9).layout(0)).as_kwargs()) == [
        "latents_clean",
        "indices_latents_clean",
        "latents_history_2x",
        "indices_latents_history_2x",
        "latents_history_4x",
        "indices_latents_history_4x",
        "indices_latents",
    ]


def _ring(order="forward", pattern=F1_PATTERN) -> ContextRing:
    return ContextRing(pattern, order, window=9, height=H, width=W, batch_size=B)


ERROR_CASES = {
    "inputs-before-reset": lambda: _ring().inputs(f1_schedule(9).layout(0)),
    "push-before-reset": lambda: _ring().push(torch.zeros(B, C, 9, H, W)),
    "end-latent-forward": lambda: _ring().reset(torch.zeros(B, C, 1, H, W), torch.zeros(B, C, 1, H, W)),
    "start-two-frames": lambda: _ring().reset(torch.zeros(B, C, 2, H, W)),
    "wrong-spatial-size": lambda: _ring().reset(torch.zeros(B, C, 1, H + 1, W)),
    "wrong-batch": lambda: _ring().reset(torch.zeros(B + 1, C, 1, H, W)),
    "layout-order-mismatch": lambda: _reset(_ring()).inputs(inverted_layout(1)),
    "layout-pattern-mismatch": lambda: _reset(_ring()).inputs(vanilla_schedule(9).layout(0)),
    "layout-window-mismatch": lambda: _reset(_ring()).inputs(f1_schedule(8).layout(0)),
    "inverted-without-start-slot": lambda: _ring("inverted", VANILLA_PATTERN),
}


def _reset(ring: ContextRing) -> ContextRing:
    ring.reset(torch.zeros(B, C, 1, H, W))
    return ring


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors(case):
    with pytest.raises((ValueError, RuntimeError)):
        ERROR_CASES[case]()


def test_empty_push_rejected():
    ring = _reset(_ring())
    with pytest.raises(ValueError):
        ring.push(torch.zeros(B, C, 0, H, W))
    assert ring.sections_seen == 0
