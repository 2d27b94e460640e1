"""The latent-level section generator: one section of latents per step of the outer loop, O(1) each.

A :class:`SectionGenerator` owns a context ring, a seeded noise source and the schedule; each ``next()`` packs
the context, samples one window of latents and pushes it into the ring. Conditioning (a new prompt) can be
swapped from any thread at any time and applies from the next section. The pipeline and the server drive it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import torch

from framepack_rt.engine.context import ContextInputs, ContextRing
from framepack_rt.engine.sampling import (
    GuidanceConfig,
    SOLVERS,
    NoiseSource,
    StepInfo,
    flow_seq_len,
    flow_shift,
    flow_sigmas,
    guided_denoiser,
    sample,
)
from framepack_rt.engine.schedules import Schedule
from framepack_rt.engine.teacache import TeaCache, TeaCacheConfig
from framepack_rt.model.transformer import StepBranch


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompt (and start image) for the transformer.

    text (B, L, text_dim) with text_mask (B, L) (None: all real); pooled (B, pooled_dim); image_embeds
    (B, N, image_dim) or None. ``prompt`` is the text it came from, reported with each section.
    """

    prompt: str
    text: torch.Tensor
    pooled: torch.Tensor
    text_mask: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> "Conditioning":
        def move(t: torch.Tensor | None, cast: bool = True) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype if cast else t.dtype)

        return replace(
            self, text=move(self.text), pooled=move(self.pooled), text_mask=move(self.text_mask, cast=False),
            image_embeds=move(self.image_embeds),
        )


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 25
    solver: str = "unipc_bh1"
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    teacache: TeaCacheConfig | None = None
    shift: float | None = None  # None: the resolution-dependent flow shift

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class StepEvent:
    """Passed to the per-step callback: where sampling is, and the current x0 prediction (B, 16, w, H, W)."""

    section: int
    step: int
    steps: int
    sigma: float
    denoised: torch.Tensor


@dataclass
class SectionLatents:
    """One sampled section.

    latents: (B, 16, w, H, W), the window just generated. output_latents: what this section adds to the clip,
    in clip order (for the last inverted section the start latent is put in front).
    """

    index: int
    latents: torch.Tensor
    output_latents: torch.Tensor
    prompt: str
    ms: float
    ms_per_step: float
    steps_run: int
    steps_skipped: int
    is_last: bool


@dataclass
class SectionSetup:
    """What sampling one section starts from: guidance branches are (name, Conditioning), the negative one
    None without real CFG; caches are the branches' TeaCaches by name (empty without TeaCache); x is the
    initial noise (B, 16, w, H, W); guidance: this section's (GuidanceConfig.for_section)."""

    index: int
    conditioning: Conditioning
    context: ContextInputs
    caches: dict[str, TeaCache]
    positive: tuple[str, Conditioning]
    negative: tuple[str, Conditioning] | None
    x: torch.Tensor
    guidance: GuidanceConfig


class SectionGenerator:
    """Yields :class:`SectionLatents` one section at a time; endless for an open-ended F1 schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Schedule,
        start_latent: torch.Tensor,
        conditioning: Conditioning,
        *,
        sampler: SamplerConfig = SamplerConfig(),
        seed: int = 0,
        end_latent: torch.Tensor | None = None,
        negative: Conditioning | None = None,
        step_callback: Callable[[StepEvent], None] | None = None,
    ) -> None:
        """start_latent / end_latent: (B, 16, 1, H, W) or (B, 16, H, W) VAE latents (already scaled)."""
        self.model, self.schedule, self.sampler = model, schedule, sampler
        self.device, self.dtype = model.device, model.dtype
        start = start_latent if start_latent.ndim == 5 else start_latent.unsqueeze(2)
        self.batch, _, _, self.height, self.width = start.shape
        self.ring = ContextRing.for_schedule(
            schedule, height=self.height, width=self.width, batch_size=self.batch, dtype=self.dtype, device=self.device
        )
        self.ring.reset(start.to(self.device), None if end_latent is None else end_latent.to(self.device))
        self.start_latent = start.to(device=self.device, dtype=torch.float32)
        self.noise = NoiseSource(seed)
        self.step_callback = step_callback
        self.sections_done = 0
        self._lock = threading.Lock()
        self._conditioning = conditioning.to(self.device, self.dtype)
        self._negative = None if negative is None else negative.to(self.device, self.dtype)
        self._pending: Conditioning | None = None
        self._in_flight: int | None = None  # the section being sampled right now, if any
        self._changed_at: int | None = None  # the last section that began with a new prompt
        seq_len = flow_seq_len(schedule.window, self.height, self.width)
        self.shift = sampler.shift if sampler.shift is not None else flow_shift(seq_len)
        self.sigmas = flow_sigmas(sampler.steps, self.shift)

    # -- control, callable from any thread --------------------------------------------------------------------
    def set_conditioning(self, conditioning: Conditioning) -> int:
        """Use ``conditioning`` from the next section on; returns that section's index."""
        with self._lock:
            self._pending = conditioning
            return self.sections_done if self._in_flight is None else self._in_flight + 1

    @property
    def prompt(self) -> str:
        with self._lock:
            return (self._pending or self._conditioning).prompt

    @property
    def finished(self) -> bool:
        n = self.schedule.num_sections
        return n is not None and self.sections_done >= n

    # -- generation ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[SectionLatents]:
        return self

    def __next__(self) -> SectionLatents:
        k, conditioning = self.open_section()
        try:
            return self._generate(k, conditioning)
        finally:
            self.close_section()

    def open_section(self) -> tuple[int, Conditioning]:
        """The next section's index and conditioning (a pending prompt applies from here); the section counts
        as in flight until :meth:`close_section`. StopIteration when the schedule is done. ``next()`` samples
        the section in one call; continuous batching (engine/batching.py) opens it and drives it step by step."""
        if self.finished:
            raise StopIteration
        with self._lock:
            k = self._in_flight = self.sections_done
            if self._pending is not None:
                if self._pending.prompt != self._conditioning.prompt:
                    self._changed_at = k
                self._conditioning = self._pending.to(self.device, self.dtype)
                self._pending = None
            conditioning = self._conditioning
        return k, conditioning

    def close_section(self) -> None:
        """The section opened last is done (or abandoned): a prompt set from now on is for the next one."""
        with self._lock:
            self._in_flight = None

    def section_setup(self, k: int, conditioning: Conditioning) -> SectionSetup:
        """Section ``k``'s context, TeaCache state, guidance branches and initial noise (drawn here)."""
        context = self.ring.inputs(self.schedule.layout(k))
        caches = {}
        if self.sampler.teacache is not None:
            caches = {"pos": TeaCache(self.sampler.teacache), "neg": TeaCache(self.sampler.teacache)}
            for cache in caches.values():
                cache.start(self.sampler.steps)
        guidance = self.sampler.guidance.for_section(prompt_changed=k == self._changed_at)
        negative = None
        if guidance.cfg != 1.0:  # real CFG only: at cfg 1 the negative branch never runs
            negative = ("neg", self._negative or _zeros_like(conditioning))
        shape = (self.batch, self.model.config.in_channels, self.schedule.window, self.height, self.width)
        x = self.noise.noise(shape, device=self.device)
        return SectionSetup(k, conditioning, context, caches, ("pos", conditioning), negative, x, guidance)

    def step_noise(self, shape: Sequence[int]) -> torch.Tensor:
        """Fresh noise for the stochastic solvers' steps, from the job's seeded source (after the section's
        initial noise), so that a seed replays a stream exactly, sampled solo or batched."""
        return self.noise.noise(shape, device=self.device)

    def step_info_callback(self, k: int) -> Callable[[StepInfo], None] | None:
        """The sampler's per-step callback for section ``k``: the generator's step_callback, as a StepEvent."""
        if self.step_callback is None:
            return None

        def callback(info: StepInfo) -> None:
            self.step_callback(StepEvent(k, info.step, info.steps, info.sigma, info.denoised))

        return callback

    def _generate(self, k: int, conditioning: Conditioning) -> SectionLatents:
        setup = self.section_setup(k, conditioning)
        context, caches, positive, negative = setup.context, setup.caches, setup.positive, setup.negative
        velocity = self._velocity_fn(context, caches)
        pair = None
        if negative is not None and not caches and _batchable(conditioning, negative[1]):
            pair = self._paired_velocity_fn(context, conditioning, negative[1])  # TeaCache keeps one per branch
        elif negative is not None and caches:
            pair = self._branched_velocity_fn(context, caches)  # one cache per branch, blocks visited once
        denoise = guided_denoiser(velocity, setup.guidance, positive, negative, pair_fn=pair)
        callback = self.step_info_callback(k)
        _sync(self.device)
        began = time.perf_counter()
        with torch.no_grad():
            latents = sample(denoise, setup.x, self.sigmas.to(self.device), self.sampler.solver, callback,
                             noise=self.step_noise)
        _sync(self.device)
        return self.section_result(setup, latents, (time.perf_counter() - began) * 1000)

    def section_result(self, setup: SectionSetup, latents: torch.Tensor, ms: float) -> SectionLatents:
        """Section ``setup.index`` sampled to ``latents`` in ``ms``: pushed into the ring, reported."""
        k, conditioning, caches = setup.index, setup.conditioning, setup.caches
        self.ring.push(latents)
        self.sections_done = k + 1
        output = latents
        if self.schedule.prepends_start(k):
            output = torch.cat([self.start_latent, latents], dim=2)  # the clip begins at the start frame
        steps = self.sampler.steps
        pos_cache = caches.get("pos")
        return SectionLatents(
            index=k,
            latents=latents,
            output_latents=output,
            prompt=conditioning.prompt,
            ms=ms,
            ms_per_step=ms / steps,
            steps_run=pos_cache.steps_run if pos_cache else steps,
            steps_skipped=pos_cache.steps_skipped if pos_cache else 0,
            is_last=self.schedule.is_last(k),
        )

    def _latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.schedule.window, self.height, self.width)

    def _branch_plans(self, context: ContextInputs):
        """plan(branch, batch): each guidance branch's StepPlan, prepared once, at its first step."""
        model, context_kwargs, plans = self.model, context.as_kwargs(), {}

        def plan(branch, batch: int):
            name, cond = branch
            if name not in plans:
                plans[name] = model.prepare(self._latent_shape(batch), cond.text, cond.text_mask, cond.pooled,
                                            cond.image_embeds, **context_kwargs)
            return plans[name]

        return plan

    def _velocity_fn(self, context: ContextInputs, caches: dict[str, TeaCache]):
        """One model call per branch and step."""
        model, plan = self.model, self._branch_plans(context)

        def velocity(x: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor, branch) -> torch.Tensor:
            return model.step(plan(branch, x.shape[0]), x, timestep, guidance, step_cache=caches.get(branch[0]))

        return velocity

    def _branched_velocity_fn(self, context: ContextInputs, caches: dict[str, TeaCache]):
        """CFG with TeaCache: both branches in one step_branches call, each with its own cache (each block runs
        for both branches before the next: in low-VRAM mode a streamed block is copied in once per step)."""
        model, plan = self.model, self._branch_plans(context)

        def pair(x: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor, pos, neg):
            branches = [StepBranch(plan(b, x.shape[0]), x, timestep, guidance, caches[b[0]]) for b in (pos, neg)]
            return tuple(model.step_branches(branches))

        return pair

    def _paired_velocity_fn(self, context: ContextInputs, positive: Conditioning, negative: Conditioning):
        """Both CFG branches as one batch of 2B: the context is repeated and prepared once per section."""
        model, both = self.model, _stacked(positive, negative)
        context_kwargs = {k: v if v is None or v.ndim == 1 else torch.cat([v, v]) for k, v in context.as_kwargs().items()}
        plan = model.prepare(self._latent_shape(2 * self.batch), both.text, both.text_mask, both.pooled,
                             both.image_embeds, **context_kwargs)

        def pair(x: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor, _pos, _neg):
            v = model.step(plan, torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([guidance, guidance]))
            return v.chunk(2)

        return pair


def _batchable(a: Conditioning, b: Conditioning) -> bool:
    """Can the two CFG branches share one model call? (Text lengths may differ: the shorter is masked.)"""
    if (a.image_embeds is None) != (b.image_embeds is None):
        return False
    return a.text.shape[0] == b.text.shape[0] and (a.image_embeds is None or a.image_embeds.shape == b.image_embeds.shape)


def _stacked(a: Conditioning, b: Conditioning) -> Conditioning:
    """a then b along the batch; text padded to the longer length, padding masked out."""
    length = max(a.text.shape[1], b.text.shape[1])

    def text_and_mask(c: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n = c.text.shape[:2]
        mask = c.text_mask if c.text_mask is not None else torch.ones(batch, n, dtype=torch.bool, device=c.text.device)
        pad = length - n
        return (torch.nn.functional.pad(c.text, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad)))

    (ta, ma), (tb, mb) = text_and_mask(a), text_and_mask(b)
    images = None if a.image_embeds is None else torch.cat([a.image_embeds, b.image_embeds])
    return Conditioning(prompt=a.prompt, text=torch.cat([ta, tb]), pooled=torch.cat([a.pooled, b.pooled]),
                        text_mask=torch.cat([ma.to(mb.dtype), mb]), image_embeds=images)


def _zeros_like(cond: Conditioning) -> Conditioning:
    """The release's negative prompt for real CFG when none is given: zero embeddings."""
    return replace(
        cond, prompt="", text=torch.zeros_like(cond.text), pooled=torch.zeros_like(cond.pooled)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
