"""The attention dispatch point: packed varlen attention, segment by segment against dense attention."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.model.attention import available_backends, packed_attention, select_backend
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
