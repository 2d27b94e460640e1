"""The kernels' switch: auto on CUDA only, forced on/off by use_kernels() or FRAMEPACK_KERNELS."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.model import attention
from framepack_rt.kernels import _common, dispatch, kernels_forced, use_kernels
from framepack_rt.model.layers import RMSNorm, modulate
from framepack_rt.model.rope import apply_rope


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("FRAMEPACK_ATTENTION", raising=False)


def test_environment_and_context_manager(monkeypatch):
    assert kernels_forced() is None
    monkeypatch.setenv(dispatch.ENV_VAR, "1")
    assert kernels_forced() is True
    with use_kernels(False):
        assert kernels_forced() is False
        with use_kernels(None):  # back to the environment's choice
            assert kernels_forced() is True
        assert kernels_forced() is False
    monkeypatch.setenv(dispatch.ENV_VAR, "0")
    assert kernels_forced() is False
    monkeypatch.setenv(dispatch.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="FRAMEPACK_KERNELS"):
        kernels_forced()


def test_cpu_defaults_to_torch_and_forcing_needs_the_interpreter(monkeypatch):
    x = torch.zeros(2, 3)
    assert dispatch.wants_kernels(x) is False
    with use_kernels(True):
        assert dispatch.wants_kernels(x) is True  # this process runs the interpreter (conftest)
        monkeypatch.setattr(_common, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.wants_kernels(x)


def test_attention_follows_the_switch_unless_its_own_variable_is_set(monkeypatch):
    q = torch.zeros(4, 1, 16, dtype=torch.bfloat16)
    assert attention.select_backend(q) == "sdpa"
    with use_kernels(True):
        assert attention.select_backend(q) == "triton"
        assert "triton" in attention.available_backends(q.device)
        monkeypatch.setenv("FRAMEPACK_ATTENTION", "sdpa")
        assert attention.select_backend(q) == "sdpa"
    with use_kernels(False):
        assert attention.select_backend(q) == "sdpa"


def test_forced_attention_runs_the_kernel(check):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 50]
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 53], dtype=torch.int32)
    expected = attention.sdpa_varlen(q, k, v, lengths)
    with use_kernels(True):
        check(attention.packed_attention(q, k, v, cu, 50, lengths), expected)


def test_off_is_exactly_the_model_lines():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    gate, shift, scale = (torch.randn(2, 1, 8, generator=g) for _ in range(3))
    with use_kernels(False):
        new_x, mod = dispatch.residual_gate_modulate(x, y, gate, shift, scale)
        assert torch.equal(new_x, x + y * gate) and torch.equal(mod, modulate(x + y * gate, shift, scale))
        assert torch.equal(dispatch.modulate(x, shift, scale), modulate(x, shift, scale))
        norm = RMSNorm(16)
        q = torch.randn(1, 6, 2, 16, generator=g)
        cos, sin = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
        assert torch.equal(dispatch.norm_rope(q, norm, (cos, sin)), apply_rope(norm(q), cos, sin))
        assert torch.equal(dispatch.norm_rope(q, norm), norm(q))
