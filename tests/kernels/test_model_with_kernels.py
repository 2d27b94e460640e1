"""The tiny transformer with every kernel forced on (interpreted) against its own torch path."""

from __future__ import annotations

import copy

import pytest
import torch

from framepack_rt import FramePackConfig, FramePackTransformer
from framepack_rt.kernels import adaln, dispatch, packed_attention, patchify, qk_norm_rope, use_kernels
from framepack_rt.model import attention

KERNELS = {  # name: (module, the jitted kernel the launcher calls)
    "attention": (packed_attention, "_packed_attention_fwd"),
    "patchify": (patchify, "_patch_embed_kernel"),
    "qk_norm_rope": (qk_norm_rope, "_qk_norm_rope_kernel"),
    "adaln": (adaln, "_adaln_kernel"),
}


class Launches:
    """Stands in for a jitted kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> dict[str, Launches]:
    counters = {}
    for name, (module, attr) in KERNELS.items():
        counters[name] = Launches(getattr(module, attr))
        monkeypatch.setattr(module, attr, counters[name])
    return counters


# One self-check per kernel (framepack_rt.kernels.selfcheck): patchify probes its 3 patch sizes in one call
# each, q/k norm with and without RoPE, AdaLN modulate and residual+modulate on a video and a context shape.
PROBE_LAUNCHES = {"attention": 1, "patchify": 3, "qk_norm_rope": 2, "adaln": 4}


def expected_launches(cfg: FramePackConfig) -> dict[str, int]:
    double, single, refiner = cfg.num_layers, cfg.num_single_layers, cfg.num_refiner_layers
    return {
        "attention": refiner + double + single,  # every attention call, the text refiner's included
        "patchify": 4,  # 4x, 2x, clean 1x, noisy: one launch each
        "qk_norm_rope": 4 * double + 4 * single,  # q and k of video (rope) and context (norm only)
        "adaln": 4 * double + 2 * single,  # double: 2 modulate + 2 residual+modulate; single: 2 modulate
    }


@torch.no_grad()
def test_fp32_kernels_match_the_torch_path(check, launches, make_inputs, tiny_config):
    model = FramePackTransformer.from_config(tiny_config).eval()
    kwargs = make_inputs(tiny_config, text_lengths=(10, 6))  # batch 2, ragged text: per-token context rows
    reference = model(**kwargs)
    assert all(c.count == 0 for c in launches.values()), "the CPU default must be the torch path"
    dispatch.reset_decisions()  # so that this forward is every kernel's first use: its self-check probes it
    attention.SELECTOR.clear()
    with use_kernels(True):
        got = model(**kwargs)
    expected = expected_launches(tiny_config)
    assert {name: c.count for name, c in launches.items()} == {n: expected[n] + PROBE_LAUNCHES[n] for n in expected}
    with use_kernels(True):
        model(**kwargs)  # decided: no probe runs again, every launch is the model's own
    assert {name: c.count for name, c in launches.items()} == {n: 2 * expected[n] + PROBE_LAUNCHES[n] for n in expected}
    check(got, reference, scale=max(1.0, reference.abs().max().item()))


@torch.no_grad()
def test_bf16_kernels_within_torch_bf16_error(check, make_inputs):
    config = FramePackConfig.preset("tiny")  # fp32 output head on, as served
    model = FramePackTransformer.from_config(config).eval()
    truth = model(**make_inputs(config, text_lengths=(10, 6), layout="inverted"))
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    kwargs_bf16 = make_inputs(config, text_lengths=(10, 6), layout="inverted", dtype=torch.bfloat16)
    torch_bf16 = model_bf16(**kwargs_bf16)
    with use_kernels(True):
        kernels_bf16 = model_bf16(**kwargs_bf16)
    assert (torch_bf16.float() - truth).abs().max() > 0  # bf16 is really lossy here, so the bound means something
    check(kernels_bf16, truth, torch_bf16, scale=10.0)
