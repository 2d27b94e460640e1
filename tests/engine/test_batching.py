"""Continuous batching (engine/batching.py, model/batching.py) on the tiny transformer in fp32: a section's
latents batched with other sessions (other steps, prompts, guidance, step counts, TeaCache) equal its solo run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from framepack_rt import FramePackTransformer
from framepack_rt.engine.batching import SectionRun, StepBatcher
from framepack_rt.engine.generator import Conditioning, SamplerConfig, SectionGenerator
from framepack_rt.engine.sampling import GuidanceConfig
from framepack_rt.engine.schedules import f1_schedule
from framepack_rt.engine.teacache import TeaCacheConfig
from framepack_rt.model.batching import PackedStepper, merge_plans

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return FramePackTransformer.from_config("tiny").eval()


def conditioning(model, prompt: str, seed: int, text_len: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return Conditioning(prompt=prompt, text=torch.randn(1, text_len, cfg.text_embed_dim, generator=g),
                        pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                        image_embeds=torch.randn(1, 4, cfg.image_proj_dim, generator=g))


def generator(model, seed: int, *, steps: int = 4, cfg: float = 1.0, text_len: int = 6, min_sigma: float = 0.0,
              teacache: float | None = None, solver: str = "unipc_bh1") -> SectionGenerator:
    start = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(100 + seed))
    sampler = SamplerConfig(steps=steps, guidance=GuidanceConfig(distilled=3.0 + seed, cfg=cfg, cfg_min_sigma=min_sigma),
                            teacache=None if teacache is None else TeaCacheConfig(teacache), solver=solver)
    return SectionGenerator(model, f1_schedule(window=3), start, conditioning(model, f"prompt {seed}", seed, text_len),
                            sampler=sampler, seed=seed)


def solo(model, sections: int, **kwargs) -> list[torch.Tensor]:
    gen = generator(model, **kwargs)
    return [next(gen).latents for _ in range(sections)]


def test_merged_plan_step_equals_each_plans_step(model):
    """Three plans (ragged text, different timesteps) as one packed forward give each plan's own velocity."""
    gens = [generator(model, s, text_len=n) for s, n in ((0, 3), (1, 7), (2, 5))]
    runs = [SectionRun(g) for g in gens]
    branches = [run.branches()[0] for run in runs]
    branches = [b._replace(timestep=torch.tensor([100.0 + 300 * i])) for i, b in enumerate(branches)]
    assert merge_plans(model, [b.plan for b in branches]).rope[0].shape[0] == 1  # one layout: tables shared
    for rope_differs in (False, True):
        if rope_differs:  # another layout's frame positions: the merged plan keeps per-sample tables
            plan = branches[2].plan
            rolled = replace(plan, rope=tuple(t.roll(3, dims=1) for t in plan.rope))
            branches[2] = branches[2]._replace(plan=rolled)
            assert merge_plans(model, [b.plan for b in branches]).rope[0].shape[0] == 3
        solo_v = [model.step(b.plan, b.hidden_states, b.timestep, b.guidance) for b in branches]
        packed = PackedStepper(model).step(branches)
        for a, b in zip(solo_v, packed):
            assert (a - b).abs().max() <= TOL
    for run in runs:
        run.close()


def test_batched_section_equals_solo_with_other_sessions_at_other_steps(model):
    """Session A (CFG on its noisy steps) batched with B (no CFG, 6 steps, other prompt length, the stochastic
    solver: its per-step noise from its own source) and C (CFG on every step, joining two steps later): each
    session's latents over its sections equal its solo run."""
    expect_a = solo(model, 2, seed=0, cfg=2.0, min_sigma=0.6)
    expect_b = solo(model, 2, seed=1, steps=6, text_len=9, solver="euler_stochastic")
    expect_c = solo(model, 1, seed=2, cfg=1.5, text_len=4)
    gen_a = generator(model, 0, cfg=2.0, min_sigma=0.6)
    gen_b = generator(model, 1, steps=6, text_len=9, solver="euler_stochastic")
    gen_c = generator(model, 2, cfg=1.5, text_len=4)
    batcher = StepBatcher(model, max_batch=8)
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    runs = {"a": SectionRun(gen_a), "b": SectionRun(gen_b)}
    samples = []
    for tick in range(40):
        if tick == 2:
            runs["c"] = SectionRun(gen_c)  # joins between steps
        report = batcher.step(list(runs.values()))
        assert not report.failed
        samples += report.samples
        for name, run in list(runs.items()):
            if run.done:
                got[name].append(run.result.latents)
                del runs[name]  # leaves between steps
                if len(got[name]) < (1 if name == "c" else 2):
                    runs[name] = SectionRun(run.generator)
        if not runs:
            break
    assert not runs
    for name, expect in (("a", expect_a), ("b", expect_b), ("c", expect_c)):
        for e, g in zip(expect, got[name], strict=True):
            assert (e - g).abs().max() <= TOL, name
    assert max(samples) == 5  # a and c with both CFG branches, b with one: one forward of 5 samples
    assert len(samples) < 4 + 4 + 6 + 6 + 4  # fewer forwards than the sessions' steps


def test_a_prompt_change_with_its_own_guidance_batched_equals_solo(model):
    """A session whose second section has a new prompt and a stronger CFG (cfg_after_change) beside one at a
    steady prompt: batched, both equal their solo runs (the section's guidance travels with its setup)."""
    def make(seed):
        start = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(100 + seed))
        sampler = SamplerConfig(steps=3, guidance=GuidanceConfig(cfg=1.0, cfg_after_change=2.5), solver="euler_stochastic")
        return SectionGenerator(model, f1_schedule(window=3), start, conditioning(model, "a", seed, 5),
                                sampler=sampler, seed=seed)

    def solo_run(seed):
        gen = make(seed)
        first = next(gen).latents
        if seed == 0:
            gen.set_conditioning(conditioning(model, "b", 9, 7))
        return [first, next(gen).latents]

    expect = {0: solo_run(0), 1: solo_run(1)}
    gens = {0: make(0), 1: make(1)}
    batcher, got = StepBatcher(model, max_batch=8), {0: [], 1: []}
    runs = {s: SectionRun(g) for s, g in gens.items()}
    for _ in range(20):
        assert not batcher.step(list(runs.values())).failed
        for s, run in list(runs.items()):
            if run.done:
                got[s].append(run.result.latents)
                del runs[s]
                if len(got[s]) < 2:
                    if s == 0:
                        gens[0].set_conditioning(conditioning(model, "b", 9, 7))
                    runs[s] = SectionRun(gens[s])
        if not runs:
            break
    for s in (0, 1):
        for e, g in zip(expect[s], got[s], strict=True):
            assert (e - g).abs().max() <= TOL
    assert not torch.equal(got[0][1], got[1][1])


def test_teacache_skip_leaves_the_batch(model):
    """With TeaCache, a branch whose cache skips leaves the packed forward; results equal the solo runs, and the
    skipping session really skipped steps while the other one (threshold 0) ran every step."""
    expect_a = solo(model, 1, seed=3, steps=8, teacache=0.5)
    expect_b = solo(model, 1, seed=4, steps=8, cfg=2.0, teacache=0.0)
    runs = [SectionRun(generator(model, 3, steps=8, teacache=0.5)),
            SectionRun(generator(model, 4, steps=8, cfg=2.0, teacache=0.0))]
    batcher = StepBatcher(model)
    samples = []
    while not all(r.done for r in runs):
        report = batcher.step(runs)
        assert not report.failed
        samples += report.samples
    a, b = (r.result for r in runs)
    assert a.steps_skipped > 0 and b.steps_skipped == 0
    assert (a.latents - expect_a[0]).abs().max() <= TOL
    assert (b.latents - expect_b[0]).abs().max() <= TOL


def test_max_batch_and_failures_stay_per_run(model):
    """max_batch splits a group into several forwards; a run whose step callback raises fails alone."""
    gens = [generator(model, s) for s in range(3)]

    def stop(event):
        raise RuntimeError("stopped")

    gens[1].step_callback = stop
    runs = [SectionRun(g) for g in gens]
    report = StepBatcher(model, max_batch=2).step(runs)
    assert report.forwards == 2 and report.samples == [2, 1]
    assert [r for r, _ in report.failed] == [runs[1]] and runs[1].closed
    assert gens[1].set_conditioning(conditioning(model, "next", 9, 3)) == 0  # nothing in flight any more
    with pytest.raises(ValueError, match="max_batch"):
        StepBatcher(model, max_batch=0)
