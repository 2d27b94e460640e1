"""Double-stream and single-stream DiT blocks on the packed layout.

Video tokens are (B, Lv, C) and context tokens (image + text) are (Tc, C), packed with no padding. Per-sample
AdaLN vectors broadcast over the video tokens and are gathered per context token. RoPE rotates video q/k only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_rt.model.layers import FeedForward, RMSNorm, heads, modulate
from framepack_rt.model.step_plan import StepPlan

# The ops that may run fused (``plan.ops``: Triton kernels on CUDA, the torch lines elsewhere) and the attention
# backend (``plan.attention``) were chosen once per section, in the transformer's prepare().


class AdaLNZero(nn.Module):
    """``norm1`` / ``norm1_context`` / ``norm``: temb -> ``chunks`` modulation vectors of (B, C)."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.chunks, dim=-1)


def joint_attention(
    q: tuple[torch.Tensor, torch.Tensor],
    k: tuple[torch.Tensor, torch.Tensor],
    v: tuple[torch.Tensor, torch.Tensor],
    plan: StepPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each argument is (video (B, Lv, H, D), context (Tc, H, D)); returns the outputs flattened to (.., H*D)."""
    packing = plan.packing
    joint = packing.joint
    out = plan.attention(
        packing.join(*q), packing.join(*k), packing.join(*v), joint.cu_seqlens, joint.max_len, joint.lengths
    )
    video, context = packing.split(out)
    return video.flatten(-2), context.flatten(-2)


class DoubleStreamAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        n, norm_rope = self.num_heads, plan.ops.norm_rope
        q = norm_rope(heads(self.to_q(x), n), self.norm_q, plan.rope)
        k = norm_rope(heads(self.to_k(x), n), self.norm_k, plan.rope)
        v = heads(self.to_v(x), n)
        cq = norm_rope(heads(self.add_q_proj(c), n), self.norm_added_q)
        ck = norm_rope(heads(self.add_k_proj(c), n), self.norm_added_k)
        cv = heads(self.add_v_proj(c), n)
        out_x, out_c = joint_attention((q, cq), (k, ck), (v, cv), plan)
        return self.to_out[0](out_x), self.to_add_out(out_c)


class DoubleStreamBlock(nn.Module):
    """``transformer_blocks.N``: separate weights for video and context, one joint attention."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = AdaLNZero(dim, 6)
        self.norm1_context = AdaLNZero(dim, 6)
        self.attn = DoubleStreamAttention(dim, num_heads, head_dim)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), "gelu_tanh")
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio), "gelu_tanh")

    def modulated_input(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """norm1's output for the video stream: the TeaCache probe."""
        shift, scale = self.norm1(temb)[:2]
        return modulate(x, shift[:, None], scale[:, None])

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops, packing = plan.ops, plan.packing
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (m[:, None] for m in self.norm1(temb))
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
            packing.per_context_token(m) for m in self.norm1_context(temb)
        )
        attn_x, attn_c = self.attn(ops.modulate(x, shift, scale), ops.modulate(c, c_shift, c_scale), plan)
        x, mx = ops.residual_gate_modulate(x, attn_x, gate, shift_mlp, scale_mlp)  # x + attn_x * gate, modulated
        c, mc = ops.residual_gate_modulate(c, attn_c, c_gate, c_shift_mlp, c_scale_mlp)
        x = x + gate_mlp * self.ff(mx)
        c = c + c_gate_mlp * self.ff_context(mc)
        return x, c


class SingleStreamAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)

    def qkv(
        self, x: torch.Tensor, plan: StepPlan, rope: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k normalized (and rotated when ``rope``: the video tokens), v."""
        n, norm_rope, tables = self.num_heads, plan.ops.norm_rope, plan.rope if rope else None
        q = norm_rope(heads(self.to_q(x), n), self.norm_q, tables)
        k = norm_rope(heads(self.to_k(x), n), self.norm_k, tables)
        return q, k, heads(self.to_v(x), n)


class SingleStreamBlock(nn.Module):
    """``single_transformer_blocks.N``: shared weights over video and context, attention parallel to the MLP."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.attn = SingleStreamAttention(dim, num_heads, head_dim)
        self.norm = AdaLNZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops, packing = plan.ops, plan.packing
        shift, scale, gate = self.norm(temb)
        nx = ops.modulate(x, shift[:, None], scale[:, None])
        nc = ops.modulate(c, packing.per_context_token(shift), packing.per_context_token(scale))
        q, k, v = self.attn.qkv(nx, plan, rope=True)
        cq, ck, cv = self.attn.qkv(nc, plan, rope=False)
        attn_x, attn_c = joint_attention((q, cq), (k, ck), (v, cv), plan)
        mlp_x = F.gelu(self.proj_mlp(nx), approximate="tanh")
        mlp_c = F.gelu(self.proj_mlp(nc), approximate="tanh")
        x = x + gate[:, None] * self.proj_out(torch.cat([attn_x, mlp_x], dim=-1))
        c = c + packing.per_context_token(gate) * self.proj_out(torch.cat([attn_c, mlp_c], dim=-1))
        return x, c
