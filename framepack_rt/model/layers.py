"""Building blocks of the FramePack HunyuanVideo DiT.

Module and parameter names follow the released checkpoint exactly (``attn.to_out.0``, ``ff.net.0.proj``,
``norm1.linear`` ...), so its state dict loads with no renaming. Blocks work on the packed layout of
:mod:`framepack_rt.model.packing`: video (B, Lv, C) and context (Tc, C), joined only for attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_rt.model.packing import Segments

if TYPE_CHECKING:
    from framepack_rt.model.step_plan import TextPlan

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, cu_seqlens, max_seqlen, seqlens, scale) -> out

LN_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) fp32, cos half first (flip_sin_to_cos, no frequency shift)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, as every AdaLN in the model uses."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale) + shift


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedding(nn.Module):
    """Timestep (+ distilled guidance) (+ pooled text) -> the conditioning vector ``temb`` (B, C)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None

    def forward(
        self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model embeds distilled guidance: pass guidance= (gs * 1000, one per sample)")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype) * self.weight


class Projection(nn.Module):
    """Holds ``proj`` so that the FeedForward's first layer is named ``net.0.proj``."""

    def __init__(self, dim_in: int, dim_out: int, activation: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return F.silu(x) if self.activation == "silu" else F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        # net.1 is the (parameter-free) dropout slot of the checkpoint's layout.
        self.net = nn.ModuleList([Projection(dim, hidden, activation), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n*d) -> (..., n, d)."""
    return x.unflatten(-1, (n, -1))


# -- text path ---------------------------------------------------------------------------------------------
class RefinerAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, segments: Segments, attend: AttentionFn) -> torch.Tensor:
        q, k, v = (heads(proj(x), self.num_heads) for proj in (self.to_q, self.to_k, self.to_v))
        out = attend(q, k, v, segments.cu_seqlens, segments.max_len, segments.lengths)
        return self.to_out[0](out.flatten(-2))


class AdaGates(nn.Module):
    """The refiner block's ``norm_out``: temb -> (gate_msa, gate_mlp)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_msa, gate_mlp = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return gate_msa, gate_mlp


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = RefinerAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), "silu")
        self.norm_out = AdaGates(dim)

    def forward(
        self, x: torch.Tensor, temb_per_token: torch.Tensor, segments: Segments, attend: AttentionFn
    ) -> torch.Tensor:
        gate_msa, gate_mlp = self.norm_out(temb_per_token)
        x = x + self.attn(self.norm1(x), segments, attend) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class TokenRefiner(nn.Module):
    """``context_embedder``: text tokens (B, L, text_dim) + mask -> refined, packed tokens (T_text, C)."""

    class _Blocks(nn.Module):  # gives the checkpoint's ``token_refiner.refiner_blocks.N`` names
        def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float) -> None:
            super().__init__()
            self.refiner_blocks = nn.ModuleList([RefinerBlock(dim, num_heads, mlp_ratio) for _ in range(num_layers)])

    def __init__(self, text_dim: int, dim: int, num_heads: int, num_layers: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.time_text_embed = ConditionEmbedding(dim, text_dim, guidance=False)
        self.proj_in = nn.Linear(text_dim, dim)
        self.token_refiner = self._Blocks(dim, num_heads, num_layers, mlp_ratio)

    def forward(self, text: "TextPlan", timestep: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """The prompt's real tokens, packed and already projected in (``text.tokens``, (T_text, C), built once
        per section by the transformer's prepare), refined for this timestep."""
        temb = self.time_text_embed(timestep, text.pooled)
        temb_per_token = temb.index_select(0, text.token_sample)
        x = text.tokens
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb_per_token, text.segments, attend)
        return x


class ImageProjection(nn.Module):
    """SigLIP features (B, 729, 1152) -> image tokens (B, 729, C), placed before the text tokens."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(in_dim, dim * 3)
        self.down = nn.Linear(dim * 3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))
