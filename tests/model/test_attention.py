"""The attention dispatch point: packed varlen attention, segment by segment against dense attention."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.kernels import use_kernels
from framepack_rt.model.attention import (
    AttentionSelector,
    Candidate,
    attention_choices,
    attention_for,
    available_backends,
    length_bucket,
    packed_attention,
    reference_attention,
    select_backend,
)
from framepack_rt.model.packing import JointPacking, cu_seqlens_of


def dense_reference(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        scores = torch.einsum("qhd,khd->hqk", q[s].double(), k[s].double()) * q.shape[-1] ** -0.5
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s].double()))
        start += n
    return torch.cat(outs).to(q.dtype)


@pytest.mark.parametrize(
    "lengths", [[1], [7], [1, 1, 1], [5, 1, 9], [16, 16], [3, 64, 2]],
    ids=lambda ls: "segs-" + "-".join(map(str, ls)),
)
def test_sdpa_varlen_segment_by_segment(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    total, heads, dim = sum(lengths), 3, 16
    q, k, v = (torch.randn(total, heads, dim, generator=g) for _ in range(3))
    out = packed_attention(q, k, v, cu_seqlens_of(lengths, q.device), max(lengths), lengths)
    torch.testing.assert_close(out, dense_reference(q, k, v, lengths), atol=1e-5, rtol=1e-5)


def test_cpu_uses_sdpa_and_forcing_an_unusable_backend_explains(monkeypatch):
    q = torch.zeros(4, 1, 8, dtype=torch.bfloat16)
    assert available_backends(q.device) == ["sdpa"]
    assert select_backend(q) == "sdpa"
    monkeypatch.setenv("FRAMEPACK_ATTENTION", "triton")
    with pytest.raises(RuntimeError, match="usable here are"):
        select_backend(q)
    monkeypatch.setenv("FRAMEPACK_ATTENTION", "xformers")
    with pytest.raises(ValueError, match="choose one of"):
        select_backend(q)


def test_joint_packing_round_trip_and_order():
    video = torch.arange(2 * 3).reshape(2, 3, 1).float()  # samples 0: 0,1,2  1: 3,4,5
    context = torch.tensor([10.0, 11.0, 20.0]).reshape(3, 1)  # sample 0: 10, 11; sample 1: 20
    packing = JointPacking(2, 3, [2, 1], torch.device("cpu"))
    joint = packing.join(video, context)
    assert joint.flatten().tolist() == [0, 1, 2, 10, 11, 3, 4, 5, 20]
    assert packing.joint.cu_seqlens.tolist() == [0, 5, 9]
    v, c = packing.split(joint)
    assert torch.equal(v, video) and torch.equal(c, context)
    per_token = packing.per_context_token(torch.tensor([[1.0], [2.0]]))
    assert per_token.flatten().tolist() == [1, 1, 2]


# -- attention chosen by measurement ------------------------------------------------------------------------
class Clock:
    """Fake time: each fake backend advances it by its known cost per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def timer(self, fn) -> float:
        start = self.now
        fn()
        return self.now - start


def fake(name, cost, clock, calls, *, error=0.0, raises=None, approximate=False, available=True):
    """A backend of known cost (ms per call) whose output is the exact result times (1 + error)."""

    def fn(q, k, v, cu_seqlens, max_seqlen, seqlens, scale=None):
        calls[name] = calls.get(name, 0) + 1
        clock.now += cost
        if raises is not None:
            raise raises
        return (reference_attention(q, k, v, seqlens, scale) * (1 + error)).to(q.dtype)

    if not available:
        return Candidate(name, None, f"{name} is not installed")
    return Candidate(name, fn, approximate=approximate)


@pytest.fixture
def measured(monkeypatch):
    """A selector that measures on the CPU, over fake backends: (selector, calls per backend, clock)."""
    monkeypatch.delenv("FRAMEPACK_ATTENTION", raising=False)
    monkeypatch.delenv("FRAMEPACK_ALLOW_APPROX_ATTENTION", raising=False)
    monkeypatch.delenv("FRAMEPACK_KERNELS", raising=False)
    clock, calls = Clock(), {}

    def candidates(device, kernels):
        return [
            fake("wrong", 0.5, clock, calls, error=0.05),  # fastest, but wrong: must be rejected
            fake("crashes", 0.2, clock, calls, raises=RuntimeError("No available kernel. Aborting execution.")),
            fake("absent", 0.1, clock, calls, available=False),
            fake("approx", 0.3, clock, calls, error=0.01, approximate=True),  # within APPROX_REL_L1 when allowed
            fake("triton", 0.8, clock, calls),
            fake("fast", 1.0, clock, calls),
            fake("slow", 4.0, clock, calls),
            fake("sdpa", 2.0, clock, calls),
        ]

    return AttentionSelector(candidates, clock.timer, measured=("cpu",), timing_heads=2), calls, clock


def test_measurement_keeps_the_fastest_candidate_that_passes(measured):
    selector, calls, _ = measured
    with use_kernels(False):  # the kernels forced off: "triton" (faster than "fast") does not compete
        choice = selector.choose(torch.device("cpu"), torch.bfloat16, 16, 100)
    assert choice.name == "fast" and choice.fn is not None
    results = {r.name: r for r in choice.candidates}
    names = ["wrong", "crashes", "absent", "approx", "triton", "fast", "slow", "sdpa"]
    assert [r.name for r in choice.candidates] == names
    assert results["wrong"].reason.startswith("max error") and results["wrong"].error > results["wrong"].tolerance
    assert results["crashes"].reason == "RuntimeError: No available kernel. Aborting execution."
    assert results["absent"].reason == "absent is not installed"
    assert "FRAMEPACK_ALLOW_APPROX_ATTENTION=1" in results["approx"].reason and "approx" not in calls
    assert results["triton"].reason == "kernels forced off" and "triton" not in calls
    assert [n for n, r in results.items() if r.ok] == ["fast", "slow", "sdpa"]
    assert [results[n].ms for n in ("fast", "slow", "sdpa")] == pytest.approx([1.0, 4.0, 2.0])
    flops = 4 * 100 * 100 * 2 * 16  # one segment of 100 tokens, 2 timing heads, head_dim 16
    assert choice.tflops == pytest.approx(flops / 1e-3 / 1e12)
    assert "fast" in choice.summary() and "TFLOP/s" in choice.summary()
    assert (choice.device, choice.dtype, choice.head_dim, choice.length_bucket) == ("cpu", torch.bfloat16, 16, 128)
    q = torch.randn(70, 2, 16).to(torch.bfloat16)
    out = choice.fn(q, q, q, cu_seqlens_of([70], q.device), 70, [70], None)
    assert out.shape == q.shape


def test_measured_once_per_length_bucket(measured):
    selector, calls, _ = measured
    first = selector.choose(torch.device("cpu"), torch.bfloat16, 16, 100)
    assert first.name == "triton"  # the kernels' switch on auto: the Triton candidate competes and wins
    seen = dict(calls)
    assert seen["fast"] >= 2  # probed, then timed
    assert selector.choose(torch.device("cpu"), torch.bfloat16, 16, 120) is first  # same bucket (128): no probing
    assert calls == seen
    selector.choose(torch.device("cpu"), torch.bfloat16, 16, 300)  # bucket 512: measured again
    assert calls["fast"] > seen["fast"]
    selector.choose(torch.device("cpu"), torch.bfloat16, 32, 100)  # another head_dim: measured again
    assert len(selector.choices()) == 3


def test_approximate_backend_only_when_allowed(measured, monkeypatch):
    selector, _, _ = measured
    assert selector.choose(torch.device("cpu"), torch.bfloat16, 16, 64, allow_approx=True).name == "approx"
    monkeypatch.setenv("FRAMEPACK_ALLOW_APPROX_ATTENTION", "1")
    assert selector.choose(torch.device("cpu"), torch.bfloat16, 16, 64).name == "approx"
    monkeypatch.setenv("FRAMEPACK_ALLOW_APPROX_ATTENTION", "0")
    assert selector.choose(torch.device("cpu"), torch.bfloat16, 16, 64).name == "triton"


def test_environment_forces_a_backend(measured, monkeypatch):
    selector, calls, _ = measured
    cpu = torch.device("cpu")
    monkeypatch.setenv("FRAMEPACK_ATTENTION", "slow")
    choice = selector.choose(cpu, torch.bfloat16, 16, 64)
    assert choice.name == "slow" and "FRAMEPACK_ATTENTION" in choice.reason
    assert "fast" not in calls  # forced: nothing else probed or timed
    monkeypatch.setenv("FRAMEPACK_ATTENTION", "wrong")
    with pytest.raises(RuntimeError, match="failed its correctness probe.*unset FRAMEPACK_ATTENTION"):
        selector.choose(cpu, torch.bfloat16, 16, 64)
    monkeypatch.setenv("FRAMEPACK_ATTENTION", "absent")
    with pytest.raises(RuntimeError, match="absent is not installed.*usable here are"):
        selector.choose(cpu, torch.bfloat16, 16, 64)
    monkeypatch.setenv("FRAMEPACK_ATTENTION", "xformers")
    with pytest.raises(ValueError, match="choose one of wrong, crashes, absent"):
        selector.choose(cpu, torch.bfloat16, 16, 64)


def test_fp32_and_the_cpu_need_no_measurement(monkeypatch):
    monkeypatch.delenv("FRAMEPACK_ATTENTION", raising=False)
    monkeypatch.delenv("FRAMEPACK_KERNELS", raising=False)
    calls = {}
    clock = Clock()
    backends = [fake("fast", 1.0, clock, calls), fake("sdpa", 2.0, clock, calls)]
    selector = AttentionSelector(lambda device, kernels: backends, clock.timer, measured=("cpu",))
    choice = selector.choose(torch.device("cpu"), torch.float32, 16, 64)
    assert choice.name == "sdpa" and choice.reason.startswith("fp32") and not calls
    default = attention_for(torch.device("cpu"), torch.bfloat16, 16, 64)  # the process's selector: CPU, no CUDA
    assert default.name == "sdpa" and default.tflops is None and "no measurement on cpu" in default.reason
    assert attention_for(torch.device("cpu"), torch.bfloat16, 16, 40) is default
    assert default in attention_choices()


def test_length_bucket():
    assert [length_bucket(n) for n in (0, 1, 16, 17, 18400, 32768)] == [16, 16, 16, 32, 32768, 32768]
