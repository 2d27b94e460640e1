"""Ulysses sequence parallelism for :class:`FramePackTransformer`: one step spread over the N ranks of a group.

Each rank holds 1/N of every sample's video tokens and 1/N of the packed context tokens through the 60 blocks.
Every per-token op (modulation, q/k norm, RoPE, MLPs, the output head) runs on the shard; the joint attention
regroups by heads with two all-to-alls (DeepSpeed-Ulysses, Jacobs et al. 2023):

    q, k, v of my tokens, all H heads  --all_to_all-->  q, k, v of all tokens, my H/N heads
    varlen attention over the whole packed joint sequence [video_0; ctx_0; video_1; ctx_1; ...], H/N heads
    out of all tokens, my H/N heads    --all_to_all-->  out of my tokens, all H heads

so the attention itself is the single-device one (the plan's backend, over the global cu_seqlens) and the
result equals the single-device step up to reduction order. Balance: each sample's video tokens are padded to
a multiple of N and split into N equal runs (rank r holds run r of every sample), the packed context to a
multiple of N and split likewise; padding rows never enter the attention (the gathered rows are reordered
into the joint layout by an index that skips them) and are dropped at the end. The heads must divide by N
(24 heads: N in 2, 3, 4, 6, 8, 12, 24; the tiny config's 2 heads: N = 2).

Only torch.distributed's collectives, on the process group given (a DeviceMesh dimension's group): one
all_to_all for q, k and v together and one for the output, per block, and one all_gather of the output
patches per step. What is replicated on every rank: the step's inputs (the noisy latents' patch embedding,
temb and the token refiner over the text: small next to the blocks) and the velocity, gathered at the end.

    sp = SequenceParallel(model, group)
    plan = sp.prepare(latent_shape, **context)     # model.prepare, then this rank's shard of it, once a section
    velocity = sp.step(plan, x, timestep, guidance) # the full velocity on every rank of the group

yunchang (Ulysses + ring attention) was considered: it is not installable here, and its attention wrappers
take dense (B, L, H, D) batches, not our packed varlen joint layout, so the two all-to-alls are written here
directly on torch.distributed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from framepack_rt.model.packing import JointPacking, Segments
from framepack_rt.model.step_plan import AttentionFn, StepPlan
from framepack_rt.model.transformer import StepBranch, unpatchify


def shard_size(total: int, world: int) -> int:
    """Rows per rank when ``total`` rows are padded to a multiple of ``world`` and split evenly."""
    return -(-total // world)


def check_world(num_heads: int, world: int) -> None:
    """Ulysses splits the heads over the ranks: raise, saying which sizes work, unless ``world`` divides them."""
    if world < 1 or num_heads % world:
        sizes = ", ".join(str(n) for n in range(1, num_heads + 1) if num_heads % n == 0)
        raise ValueError(f"sequence parallelism over {world} ranks needs the {num_heads} attention heads to split "
                         f"evenly: use one of {sizes} ranks per sequence-parallel group")


class ShardedPacking:
    """:class:`JointPacking`'s interface (``joint``, ``per_context_token``, ``join``, ``split``) on one rank's shard.

    Local rows are [video (B * video_local), context (context_local)]; every rank has the same number. After the
    attention's all-to-all the rows of ranks 0..N-1 lie back to back: ``order`` picks the joint layout out of
    them (padding skipped) and ``inverse`` puts the attention output back (padding rows read a zero row)."""

    def __init__(self, full: JointPacking, world: int, rank: int, device: torch.device) -> None:
        batch, video_len, context = full.batch, full.video_len, full.context
        self.batch, self.world, self.rank = batch, world, rank
        self.joint: Segments = full.joint  # the global segments: what the attention runs over
        self.video_len = video_len
        self.video_local = shard_size(video_len, world)
        self.context_len = context.total
        self.context_local = shard_size(context.total, world)
        self.rows = batch * self.video_local + self.context_local
        sample = torch.repeat_interleave(torch.arange(batch), torch.tensor(context.lengths))
        sample = F.pad(sample, (0, self.context_local * world - context.total))  # padding rows: sample 0
        self.context_sample = sample[rank * self.context_local : (rank + 1) * self.context_local].to(device)

        order = []
        ctx_start = 0
        for i, n in enumerate(context.lengths):
            t = torch.arange(video_len)
            order.append((t // self.video_local) * self.rows + i * self.video_local + t % self.video_local)
            g = torch.arange(ctx_start, ctx_start + n)
            order.append((g // self.context_local) * self.rows + batch * self.video_local + g % self.context_local)
            ctx_start += n
        order = torch.cat(order)
        inverse = torch.full((world * self.rows,), len(order), dtype=torch.long)  # padding: the zero row
        inverse[order] = torch.arange(len(order))
        self.order, self.inverse = order.to(device), inverse.to(device)

    def per_context_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(B, C) -> one row per local context token (broadcasts against (context_local, C))."""
        if self.batch == 1:
            return per_sample
        return per_sample.index_select(0, self.context_sample)

    def join(self, video: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Local video (B, video_local, *rest) and context (context_local, *rest) -> local rows (rows, *rest)."""
        return torch.cat([video.flatten(0, 1), context], dim=0)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_video = self.batch * self.video_local
        return rows[:n_video].unflatten(0, (self.batch, self.video_local)), rows[n_video:]

    # -- sharding the step's inputs and gathering its output ----------------------------------------------------
    def shard_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, Lv, ...) on every rank -> this rank's run of each sample, (B, video_local, ...)."""
        pad = self.video_local * self.world - self.video_len
        if pad:
            video = torch.cat([video, video.new_zeros(video.shape[0], pad, *video.shape[2:])], dim=1)
        return video[:, self.rank * self.video_local : (self.rank + 1) * self.video_local]

    def shard_context(self, context: torch.Tensor) -> torch.Tensor:
        """(Tc, ...) packed context on every rank -> this rank's rows, (context_local, ...)."""
        pad = self.context_local * self.world - self.context_len
        if pad:
            context = torch.cat([context, context.new_zeros(pad, *context.shape[1:])])
        return context[self.rank * self.context_local : (self.rank + 1) * self.context_local]


class UlyssesAttention:
    """The joint attention fn of a sharded plan: all-to-all to heads, the single-device backend, all-to-all back.

    Called as every attention fn is, ``(q, k, v, cu_seqlens, max_seqlen, seqlens, scale)``, with q, k, v the
    local rows (rows, H, D) from :meth:`ShardedPacking.join` and the global segments."""

    def __init__(self, inner: AttentionFn, packing: ShardedPacking, group: dist.ProcessGroup | None) -> None:
        self.inner, self.packing, self.group = inner, packing, group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, seqlens: list[int], scale: float | None = None) -> torch.Tensor:
        n, p = self.packing.world, self.packing
        rows, heads, head_dim = q.shape
        local_heads = heads // n
        # (3, rows, H, D) -> (N, 3, rows, H/N, D): block j goes to rank j (its heads j*H/N ... (j+1)*H/N - 1).
        send = torch.stack([q, k, v]).unflatten(2, (n, local_heads)).permute(2, 0, 1, 3, 4).contiguous()
        received = torch.empty_like(send)  # block j: rank j's rows, my heads
        dist.all_to_all_single(received, send, group=self.group)
        q, k, v = (t.index_select(0, p.order) for t in received.permute(1, 0, 2, 3, 4).flatten(1, 2))
        out = self.inner(q, k, v, cu_seqlens, max_seqlen, seqlens, scale)  # (joint total, H/N, D)
        out = torch.cat([out, out.new_zeros(1, local_heads, head_dim)]).index_select(0, p.inverse)
        send = out.unflatten(0, (n, rows)).contiguous()  # block j: rank j's rows, my heads
        received = torch.empty_like(send)  # block j: my rows, heads of rank j
        dist.all_to_all_single(received, send, group=self.group)
        return received.permute(1, 0, 2, 3).flatten(1, 2)  # (rows, H, D)


@dataclass(frozen=True)
class ParallelPlan:
    """A section's plan for a sequence-parallel step on one rank: what the step's inputs are computed from
    (the single-device plan) and what the blocks see (the same plan on this rank's shard)."""

    base: StepPlan  # the model's own plan: patch embedding, refiner, image tokens, output head weights
    blocks: StepPlan  # base with the shard's RoPE tables, ShardedPacking and UlyssesAttention
    packing: ShardedPacking

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.base.latent_shape


class SequenceParallel:
    """``prepare`` / ``step`` with the model's signatures, each rank of ``group`` computing 1/N of the blocks.

    Every rank of the group calls both with the same arguments (collectives inside); ``step`` returns the full
    velocity on every rank."""

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self.model, self.group = model, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_world(model.config.num_attention_heads, self.world)

    def prepare(self, latent_shape: tuple[int, int, int, int], *args, **kwargs) -> ParallelPlan:
        """``model.prepare(latent_shape, ...)`` and this rank's shard of it (decided here, once a section)."""
        return self.shard(self.model.prepare(latent_shape, *args, **kwargs))

    def shard(self, plan: StepPlan) -> ParallelPlan:
        packing = ShardedPacking(plan.packing, self.world, self.rank, self.model.device)
        cos, sin = plan.rope
        rope = (packing.shard_video(cos), packing.shard_video(sin))
        blocks = dataclasses.replace(plan, rope=rope, packing=packing,
                                     attention=UlyssesAttention(plan.attention, packing, self.group))
        return ParallelPlan(plan, blocks, packing)

    def step(self, plan: ParallelPlan, hidden_states: torch.Tensor, timestep: torch.Tensor,
             guidance: torch.Tensor | None = None, step_cache: object | None = None) -> torch.Tensor:
        """The velocity (B, 16, T, H, W), equal to ``model.step(plan.base, ...)`` up to reduction order."""
        if step_cache is not None:
            raise ValueError("a step cache (TeaCache) cannot run sequence parallel yet: turn TeaCache off "
                             "(no --teacache) or run on one device")
        model, base, packing = self.model, plan.base, plan.packing
        if (hidden_states.shape[0], *hidden_states.shape[2:]) != base.latent_shape:
            raise ValueError(f"hidden_states {tuple(hidden_states.shape)} do not match the plan's latents "
                             f"(B, T, H, W) = {base.latent_shape}: prepare a plan for this shape")
        tokens, context, temb = model._step_inputs(StepBranch(base, hidden_states, timestep, guidance))
        video = model.run_blocks(packing.shard_video(tokens), packing.shard_context(context), temb, plan.blocks)
        patches = model.output_head(base, video, temb).contiguous()  # (B, video_local, P)
        gathered = [torch.empty_like(patches) for _ in range(self.world)]
        dist.all_gather(gathered, patches, group=self.group)
        patches = torch.cat(gathered, dim=1)[:, : packing.video_len][:, -base.noisy_len :]
        return unpatchify(patches, base.frames, base.height, base.width, model.config)
