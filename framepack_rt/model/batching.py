"""One packed forward for the steps of many sections: the model side of continuous batching.

Every sample of a step is independent in our blocks: the timestep, distilled guidance and pooled text embed
per sample (temb is (B, C)), the AdaLN modulation is per sample (broadcast over video tokens, gathered per
context token), and attention runs over per-sample segments of the packed layout. So the StepPlans of
different sections (different sessions, prompts, CFG branches) concatenate into one plan with a larger batch,
as long as their video streams have the same shape (latent frames, height, width, context tokens): text and
image tokens are packed and may differ in length. :func:`merge_plans` builds that plan; :class:`PackedStepper`
runs one forward over many :class:`~framepack_rt.model.transformer.StepBranch` es at their own timesteps,
each with its own step cache (TeaCache): a branch whose cache skips the blocks leaves the packed forward and
takes its cached residual instead, exactly as in ``FramePackTransformer.step_branches``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import torch

from framepack_rt.model.attention import attention_for
from framepack_rt.model.packing import JointPacking, Segments
from framepack_rt.model.step_plan import StepPlan, TextPlan
from framepack_rt.model.transformer import FramePackTransformer, StepBranch, _interleave_order


def plan_key(plan: StepPlan) -> Hashable:
    """Plans with equal keys can share one packed forward (video streams of one shape; context may differ)."""
    clean = 0 if plan.clean_tokens is None else plan.clean_tokens.shape[1]
    image = None if plan.image_tokens is None else plan.image_tokens.shape[1]
    return (plan.frames, plan.height, plan.width, plan.noisy_len, clean, image, plan.head_fp32 is None)


def merge_plans(model: FramePackTransformer, plans: Sequence[StepPlan]) -> StepPlan:
    """The plans' samples as one batch, in order (plan 0's samples first). Raises ValueError when their video
    streams differ in shape (see :func:`plan_key`)."""
    if len(plans) == 1:
        return plans[0]
    keys = {plan_key(p) for p in plans}
    if len(keys) > 1:
        raise ValueError(f"plans of different video layouts cannot share a forward: {sorted(map(str, keys))}")
    first, device, dtype = plans[0], model.device, model.dtype
    batch = sum(p.batch for p in plans)
    head_dim = model.config.attention_head_dim

    def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if tensors[0] is None else torch.cat(tensors)

    cos, sin = _merge_rope(plans)
    text = _merge_text([p.text for p in plans], device)
    image = cat([p.image_tokens for p in plans])
    context_lengths = list(text.segments.lengths)
    context_order = None
    if image is not None:
        context_order = _interleave_order(image.shape[1], context_lengths).to(device)
        context_lengths = [image.shape[1] + n for n in context_lengths]
    clean = cat([p.clean_tokens for p in plans])
    video_len = first.noisy_len + (0 if clean is None else clean.shape[1])
    packing = JointPacking(batch, video_len, context_lengths, device)
    return StepPlan(
        batch=batch, frames=first.frames, height=first.height, width=first.width, noisy_len=first.noisy_len,
        clean_tokens=clean, rope=(cos, sin), pooled=torch.cat([p.pooled for p in plans]), text=text,
        image_tokens=image, context_order=context_order, packing=packing, ops=first.ops,
        attention=attention_for(device, dtype, head_dim, packing.joint.max_len).fn,
        text_attention=attention_for(device, dtype, head_dim, text.segments.max_len).fn,
        head_fp32=first.head_fp32,
    )


def _merge_rope(plans: Sequence[StepPlan]) -> tuple[torch.Tensor, torch.Tensor]:
    """One shared (1, Lv, D) table pair when every plan has the same one (sessions at the same context layout:
    the usual case, and broadcasting is cheaper), else per-sample tables (B, Lv, D). The comparison reads the
    device once per new set of plans (merged plans are cached), never per step."""
    first = plans[0].rope
    if all(p.rope[0].shape[0] == 1 and torch.equal(p.rope[0], first[0]) and torch.equal(p.rope[1], first[1])
           for p in plans):
        return first
    return (torch.cat([p.rope[0].expand(p.batch, -1, -1) for p in plans]),
            torch.cat([p.rope[1].expand(p.batch, -1, -1) for p in plans]))


def _merge_text(texts: list[TextPlan], device: torch.device) -> TextPlan:
    total, samples = 0, []
    for t in texts:
        samples.append(t.token_sample + total)
        total += t.pooled.shape[0]
    lengths = [n for t in texts for n in t.segments.lengths]
    return TextPlan(torch.cat([t.tokens for t in texts]), torch.cat([t.pooled for t in texts]), torch.cat(samples),
                    Segments.of(lengths, device))


class PackedStepper:
    """Runs many branches' steps as one packed forward; merged plans are kept for the recent compositions
    (sessions step in lockstep, so the same set of plans usually repeats for a whole section)."""

    def __init__(self, model: FramePackTransformer, cache_size: int = 16) -> None:
        self.model = model
        self.cache_size = cache_size
        self._merged: OrderedDict[tuple[int, ...], tuple[list[StepPlan], StepPlan]] = OrderedDict()

    def merged(self, plans: Sequence[StepPlan]) -> StepPlan:
        """merge_plans, cached by the plans' identities (the cache holds them, so an id is never reused)."""
        key = tuple(id(p) for p in plans)
        hit = self._merged.get(key)
        if hit is not None:
            self._merged.move_to_end(key)
            return hit[1]
        plan = merge_plans(self.model, plans)
        self._merged[key] = (list(plans), plan)
        while len(self._merged) > self.cache_size:
            self._merged.popitem(last=False)
        return plan

    def step(self, branches: Sequence[StepBranch]) -> list[torch.Tensor]:
        """The velocity of every branch (each (B_i, 16, T, H, W)): ``model.step`` of each, in one forward."""
        model = self.model
        plans = [b.plan for b in branches]
        sizes = [p.batch for p in plans]
        for b in branches:
            if (b.hidden_states.shape[0], *b.hidden_states.shape[2:]) != b.plan.latent_shape:
                raise ValueError(f"hidden_states {tuple(b.hidden_states.shape)} do not match the plan's latents "
                                 f"(B, T, H, W) = {b.plan.latent_shape}")
        guided = [b.guidance is not None for b in branches]
        if any(guided) and not all(guided):
            raise ValueError("either every branch passes distilled guidance or none does")
        whole = self.merged(plans)
        device = model.device

        def per_sample(value: torch.Tensor, n: int) -> torch.Tensor:
            value = torch.as_tensor(value, device=device)
            return value.expand(n) if value.ndim == 0 else value

        x = torch.cat([b.hidden_states.to(device) for b in branches])
        t = torch.cat([per_sample(b.timestep, n) for b, n in zip(branches, sizes)])
        g = torch.cat([per_sample(b.guidance, n) for b, n in zip(branches, sizes)]) if guided[0] else None
        tokens, context, temb = model._step_inputs(StepBranch(whole, x, t, g))
        starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        run = [True] * len(branches)
        if any(b.step_cache is not None for b in branches):
            probe = model.transformer_blocks[0].modulated_input(tokens, temb)
            for i, b in enumerate(branches):
                if b.step_cache is not None:
                    run[i] = b.step_cache.should_run(probe[starts[i] : starts[i + 1]])
        out = self._run_blocks(whole, plans, run, starts, tokens, context, temb)
        final = []
        for i, b in enumerate(branches):
            before = tokens[starts[i] : starts[i + 1]]
            if not run[i]:
                final.append(before + b.step_cache.residual())
                continue
            after = out[starts[i] : starts[i + 1]]
            if b.step_cache is not None:
                b.step_cache.remember(after - before)
            final.append(after)
        velocity = model._step_output(whole, torch.cat(final) if len(final) > 1 else final[0], temb)
        return list(velocity.split(sizes))

    def _run_blocks(self, whole: StepPlan, plans: list[StepPlan], run: list[bool], starts: list[int],
                    tokens: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The blocks over the running branches only; rows of skipped branches in the result are unused."""
        model = self.model
        if all(run):
            return model.run_blocks(tokens, context, temb, whole)
        running = [i for i, r in enumerate(run) if r]
        if not running:
            return tokens
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in running]).to(tokens.device)
        lengths = whole.packing.context.lengths  # host lists: no device sync
        cu = [sum(lengths[:s]) for s in range(len(lengths) + 1)]
        ctx_rows = torch.cat([torch.arange(cu[s], cu[s + 1]) for i in running
                              for s in range(starts[i], starts[i + 1])]).to(tokens.device)
        part = self.merged([plans[i] for i in running])
        video = model.run_blocks(tokens.index_select(0, rows), context.index_select(0, ctx_rows),
                                 temb.index_select(0, rows), part)
        return tokens.index_copy(0, rows, video)
