"""fp8 weights for the transformer blocks: float8_e4m3fn with one scale per output channel.

The 60 blocks hold 97% of the 13B's parameters, all in nn.Linear layers. Each becomes an :class:`Fp8Linear`:
the weight stored as float8_e4m3fn (1 byte) with an fp32 scale per output row (``amax / 448``, the format's
largest normal value), computed in the activations' dtype. A per-output-channel scale commutes with the
matmul, so it is applied to the output: ``y = (x @ w8ᵀ) * scale + bias`` (the fp8 weight is upcast once per
call; no scaled copy of it is made). Embedders, the token refiner and the output head stay in the model dtype:
they are small and the output head is kept at full precision on purpose (FramePack's fp32 head).

``FramePackTransformer.from_pretrained(path, dtype=torch.bfloat16, quantize="fp8")`` quantizes while loading,
one layer at a time, so the full-precision weights are never all resident.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE_CHOICES = ("fp8",)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (float8_e4m3fn weight, fp32 scale per output row), on the weight's device."""
    w32 = weight.float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear layers that quantize_blocks replaces (the 60 blocks' linears)."""
    names = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for name, module in getattr(model, prefix).named_modules():
            if isinstance(module, nn.Linear):
                names.append(f"{prefix}.{name}")
    return names


class Fp8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with a per-output-channel fp32 scale.

    State dict: ``weight`` (out, in) float8_e4m3fn, ``weight_scale`` (out,) fp32, ``bias`` (out,) in the
    compute dtype, the layout fp8 checkpoints of other tools use (weight plus weight_scale)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "Fp8Linear":
        """Quantize ``linear``'s weight (rows scaled to the fp8 range); the bias is kept in ``compute_dtype``."""
        weight = linear.weight.detach()
        compute_dtype = compute_dtype or weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, weight.device)
        w8, scale = quantize_weight(weight)
        layer.weight, layer.weight_scale = w8, scale
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().to(compute_dtype))
        return layer

    def dequantized(self) -> torch.Tensor:
        """The weight in the compute dtype (for checks and for merging adapters)."""
        return (self.weight.float() * self.weight_scale[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3fn, per-channel scale"


def quantize_blocks(model: nn.Module, method: str = "fp8") -> int:
    """Replace every nn.Linear inside ``model.transformer_blocks`` and ``model.single_transformer_blocks`` by
    its fp8 form, in place, one layer at a time; returns how many were replaced."""
    if method not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={method!r}: choose one of {', '.join(QUANTIZE_CHOICES)} (or None: no quantization)")
    names = quantized_linear_names(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child)))
    return len(names)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (fp8 weights count one byte each)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
