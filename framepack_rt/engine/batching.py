"""Continuous batching of sections: many sessions' sampling steps as one packed forward per step.

A :class:`SectionRun` is one section's sampling made resumable: it holds the section's latents, the UniPC
history (inside the solver generator, :func:`~framepack_rt.engine.sampling.sampling_steps`), the TeaCache
state per branch, the StepPlans and the step index. ``branches()`` says what it needs next (the velocity of
each guidance branch at the current point); ``deliver()`` takes those velocities, applies the same CFG and
solver code as a solo section (``sampling.guided_x0`` and the same generator), and moves on. A
:class:`StepBatcher` advances several runs by one step each: it gathers their branches, groups them by video
layout (and by any ``batch_key`` the caller sets, e.g. LoRA scales applied to the shared model), and runs each
group, up to ``max_batch`` sections, as one :class:`~framepack_rt.model.batching.PackedStepper` forward with
per-sample timesteps, prompts and guidance. Sections join (a new run) or leave (done, abandoned) between steps.

Equality: a section's latents batched equal its solo ``next(generator)`` up to float rounding (the tests
check <= 1e-5 in fp32): the noise, the plans and every line of sampler math are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from framepack_rt.engine.generator import SectionGenerator, SectionLatents, _sync
from framepack_rt.engine.sampling import guided_x0, model_inputs, sampling_steps
from framepack_rt.model.batching import PackedStepper, plan_key
from framepack_rt.model.transformer import StepBranch


class SectionRun:
    """One section of ``generator``, sampled a step at a time. Opening it takes the section (and any pending
    prompt) from the generator and draws its noise, as ``next(generator)`` would."""

    def __init__(self, generator: SectionGenerator, batch_key: Hashable = ()) -> None:
        """batch_key: runs share a forward only when their keys are equal (beside their video layouts)."""
        self.generator = generator
        self.batch_key = batch_key
        k, conditioning = generator.open_section()
        try:
            self.setup = generator.section_setup(k, conditioning)
            self._plan = generator._branch_plans(self.setup.context)
            sigmas = generator.sigmas.to(generator.device)
            self._steps = sampling_steps(self.setup.x, sigmas, generator.sampler.solver,
                                         generator.step_info_callback(k), generator.step_noise)
            self._point = next(self._steps)  # (x, sigma): where the next model evaluation is
        except BaseException:
            generator.close_section()
            raise
        self._inputs: tuple | None = None
        self.steps_done = 0
        self.result: SectionLatents | None = None
        self.closed = False
        _sync(generator.device)
        self._began = time.perf_counter()

    @property
    def index(self) -> int:
        return self.setup.index

    @property
    def done(self) -> bool:
        return self.result is not None

    def branches(self) -> list[StepBranch]:
        """The model calls this step needs: the positive branch, and the negative one on real-CFG steps."""
        if self.closed:
            raise RuntimeError("this section run is closed")
        x, sigma = self._point
        sigma, timestep, g, guide = model_inputs(self.setup.guidance, x, sigma)
        self._inputs = (x, sigma, guide)
        setup, batch = self.setup, x.shape[0]
        names = [setup.positive] + ([setup.negative] if guide else [])
        return [StepBranch(self._plan(branch, batch), x, timestep, g, setup.caches.get(branch[0]))
                for branch in names]

    def key(self) -> Hashable:
        """Runs with equal keys can share a packed forward."""
        return (self.batch_key, plan_key(self._plan(self.setup.positive, self.generator.batch)))

    def deliver(self, velocities: Sequence[torch.Tensor]) -> None:
        """The velocities of :meth:`branches`, in order: one solver step; the result is set after the last."""
        assert self._inputs is not None, "deliver() without branches()"
        x, sigma, guide = self._inputs
        self._inputs = None
        v_neg = velocities[1] if guide else None
        x0 = guided_x0(self.setup.guidance, x, sigma, velocities[0], v_neg)
        self.steps_done += 1
        try:
            self._point = self._steps.send(x0)
        except StopIteration as finished:
            _sync(self.generator.device)
            ms = (time.perf_counter() - self._began) * 1000
            self.result = self.generator.section_result(self.setup, finished.value, ms)
            self.close()

    def close(self) -> None:
        """Leave: the generator's section is no longer in flight (a finished run closes itself)."""
        if not self.closed:
            self.closed = True
            self._steps.close()
            self.generator.close_section()


@dataclass
class StepReport:
    """What one :meth:`StepBatcher.step` did: forwards run, samples in each, and the runs that failed."""

    forwards: int = 0
    samples: list[int] = field(default_factory=list)
    failed: list[tuple[SectionRun, Exception]] = field(default_factory=list)


class StepBatcher:
    """Advances runs one step each, their model calls packed into as few forwards as their layouts allow."""

    def __init__(self, model: torch.nn.Module, max_batch: int = 8,
                 before_forward: Callable[[Hashable], None] | None = None) -> None:
        """max_batch: sections per packed forward (a CFG step of a section is 2 samples). before_forward:
        called with a group's batch_key before its forward (e.g. to apply that group's LoRA scales)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.stepper = PackedStepper(model)
        self.max_batch = max_batch
        self.before_forward = before_forward

    def step(self, runs: Sequence[SectionRun]) -> StepReport:
        """One step of every run not done. A run whose step raises (e.g. its stream was stopped from its step
        callback) is closed and reported in ``failed``; the others go on."""
        report = StepReport()
        groups: dict[Hashable, list[SectionRun]] = {}
        for run in runs:
            if not run.done and not run.closed:
                try:
                    groups.setdefault(run.key(), []).append(run)
                except Exception as exc:  # noqa: BLE001 -- its plan failed to build: that run fails alone
                    run.close()
                    report.failed.append((run, exc))
        with torch.no_grad():
            for key, members in groups.items():
                for start in range(0, len(members), self.max_batch):
                    self._forward(key, members[start : start + self.max_batch], report)
        return report

    def _forward(self, key: Hashable, runs: list[SectionRun], report: StepReport) -> None:
        wanted = []
        for run in runs:
            try:
                wanted.append((run, run.branches()))
            except Exception as exc:  # noqa: BLE001 -- this run fails alone
                run.close()
                report.failed.append((run, exc))
        runs = [run for run, _ in wanted]
        flat = [branch for _, branches in wanted for branch in branches]
        if self.before_forward is not None:
            self.before_forward(key[0])
        try:
            velocities = self.stepper.step(flat)
        except Exception as exc:  # noqa: BLE001 -- a failed forward fails its runs, never the batcher's caller
            for run in runs:
                run.close()
                report.failed.append((run, exc))
            return
        report.forwards += 1
        report.samples.append(sum(b.plan.batch for b in flat))
        at = 0
        for run, branches in wanted:
            mine, at = velocities[at : at + len(branches)], at + len(branches)
            try:
                run.deliver(mine)
            except Exception as exc:  # noqa: BLE001 -- e.g. the stream's stop signal from the step callback
                run.close()
                report.failed.append((run, exc))
