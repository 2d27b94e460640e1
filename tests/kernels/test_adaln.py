"""Fused gated residual + AdaLN modulate (interpreted) against the double-stream block's torch lines."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.kernels.adaln import modulate, residual_gate_modulate, residual_gate_modulate_reference
from framepack_rt.model.layers import modulate as torch_modulate

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vectors(rows: int, dim: int, g: torch.Generator) -> list[torch.Tensor]:
    """gate, shift, scale as the model makes them: chunks of one (rows, 3 * dim) projection (strided views)."""
    return list((torch.randn(rows, 3 * dim, generator=g) * 0.5).chunk(3, dim=-1))


def case_video(dim, g):  # x (B, L, C); per-sample vectors m[:, None]
    x, y = torch.randn(2, 37, dim, generator=g) * 2 + 1, torch.randn(2, 37, dim, generator=g)
    return x, y, [v[:, None] for v in vectors(2, dim, g)]


def case_context_per_token(dim, g):  # packed context (Tc, C), batch > 1: one gathered row per token
    x, y = torch.randn(37, dim, generator=g) * 2 + 1, torch.randn(37, dim, generator=g)
    return x, y, vectors(37, dim, g)


def case_context_one_sample(dim, g):  # batch 1: (1, C) rows broadcast over every token
    x, y = torch.randn(37, dim, generator=g) * 2 + 1, torch.randn(37, dim, generator=g)
    return x, y, vectors(1, dim, g)


CASES = {"video": case_video, "context-per-token": case_context_per_token, "context-batch1": case_context_one_sample}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_residual_then_modulate(check, make, dtype):
    x, y, (gate, shift, scale) = make(48, torch.Generator().manual_seed(0))  # 48: no power of two
    args = [t.to(dtype) for t in (x, y, gate, shift, scale)]
    new_x, mod = residual_gate_modulate(*args)
    assert new_x.dtype == mod.dtype == dtype and new_x.shape == mod.shape == x.shape
    ref_x, ref_mod = residual_gate_modulate_reference(*[t.float() for t in args])
    low_x, low_mod = (None, None) if dtype == torch.float32 else residual_gate_modulate_reference(*args)
    check(new_x, ref_x, low_x)
    check(mod, ref_mod, low_mod)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modulate_without_residual(check, dtype):
    x, _, (_, shift, scale) = case_video(48, torch.Generator().manual_seed(1))
    x, shift, scale = (t.to(dtype) for t in (x, shift, scale))
    out = modulate(x, shift, scale)
    ref32 = torch_modulate(x.float(), shift.float(), scale.float())
    check(out, ref32, None if dtype == torch.float32 else torch_modulate(x, shift, scale))


def test_model_width_3072(check):
    """The 13B width: one 4096-wide (masked) row per program."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 3, 3072, generator=g), torch.randn(1, 3, 3072, generator=g)
    gate, shift, scale = (v[:, None] for v in vectors(1, 3072, g))
    args = [t.to(torch.bfloat16) for t in (x, y, gate, shift, scale)]
    new_x, mod = residual_gate_modulate(*args)
    ref_x, ref_mod = residual_gate_modulate_reference(*[t.float() for t in args])
    low_x, low_mod = residual_gate_modulate_reference(*args)
    check(new_x, ref_x, low_x)
    check(mod, ref_mod, low_mod)


def test_rejects_vectors_that_do_not_broadcast_per_row():
    x = torch.zeros(2, 5, 8)
    ok = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        residual_gate_modulate(x, x, ok, torch.zeros(1, 5, 8), ok)  # per-position, not per-sample
    with pytest.raises(ValueError, match="same way"):
        residual_gate_modulate(x, x, ok, torch.zeros(1, 1, 8), ok)  # shift shared, scale per sample
