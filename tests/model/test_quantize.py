"""fp8 weights: bytes, error against fp32 next to bf16's, loading quantizes one tensor at a time."""

from __future__ import annotations

import pytest
import torch

from framepack_rt import FramePackTransformer
from framepack_rt.model.quantize import FP8, Fp8Linear, quantize_blocks, quantize_weight, weight_bytes


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_quantize_weight_scales_each_row_to_the_fp8_range():
    w = torch.randn(5, 7) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 1e4])[:, None]
    w8, scale = quantize_weight(w)
    assert w8.dtype == FP8 and scale.shape == (5,)
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((5,), 448.0))  # every row uses the range
    back = w8.float() * scale[:, None]
    assert ((back - w).abs() <= w.abs() * 2**-3 + 1e-12).all()  # e4m3: 3 mantissa bits, relative 1/16 rounding


def test_fp8_linear_equals_the_dequantized_linear():
    linear = torch.nn.Linear(24, 40)
    q = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 24)
    want = torch.nn.functional.linear(x, q.dequantized(), linear.bias)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)


def test_blocks_are_fp8_and_the_rest_stays(make_inputs):
    model = FramePackTransformer.from_config("tiny").to(torch.bfloat16)
    before = weight_bytes(model)
    replaced = quantize_blocks(model)
    # double: 8 attention + 2 per FF x 2 + 2 AdaLN = 14; single: q, k, v, proj_mlp, proj_out, AdaLN = 6
    linears_in_blocks = 2 * 14 + 2 * 6
    assert replaced == linears_in_blocks
    assert all(isinstance(m, Fp8Linear) for b in model.transformer_blocks for m in b.modules()
               if isinstance(m, (torch.nn.Linear, Fp8Linear)))
    assert isinstance(model.proj_out, torch.nn.Linear) and model.proj_out.weight.dtype == torch.bfloat16
    assert weight_bytes(model) < before


@pytest.mark.parametrize("layout", ["f1", "inverted"])
def test_fp8_error_against_fp32_is_bounded_and_larger_than_bf16s(make_inputs, layout):
    fp32 = FramePackTransformer.from_config("tiny").eval()
    bf16 = FramePackTransformer.from_config("tiny").to(torch.bfloat16).eval()
    fp8 = FramePackTransformer.from_config("tiny").to(torch.bfloat16).eval()
    quantize_blocks(fp8)
    inputs = make_inputs(fp32.config, text_lengths=(5, 9), layout=layout)
    with torch.no_grad():
        want = fp32(**inputs)
        err_bf16 = relative_error(bf16(**inputs), want)
        err_fp8 = relative_error(fp8(**inputs), want)
    assert err_bf16 < err_fp8 < 0.1, (err_bf16, err_fp8)


def test_from_pretrained_quantizes_while_loading(tmp_path, make_inputs):
    model = FramePackTransformer.from_config("tiny").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = FramePackTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16, quantize="fp8")
    quantize_blocks(model)  # the same layers quantized after loading in full precision
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].view(torch.uint8) if tensor.dtype == FP8 else
                           loaded.state_dict()[name], tensor.view(torch.uint8) if tensor.dtype == FP8 else tensor), name
    inputs = make_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs), model.eval()(**inputs))


def test_an_unknown_quantization_says_what_exists(tmp_path):
    FramePackTransformer.from_config("tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="choose one of fp8"):
        FramePackTransformer.from_pretrained(tmp_path, quantize="int3")
