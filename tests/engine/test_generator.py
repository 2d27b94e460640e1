"""The section generator on the tiny transformer: O(1) sections, prompt changes, TeaCache, timings."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch

from framepack_rt import FramePackTransformer
from framepack_rt.engine.generator import Conditioning, SamplerConfig, SectionGenerator, StepEvent
from framepack_rt.engine.sampling import GuidanceConfig
from framepack_rt.engine.schedules import f1_schedule, inverted_schedule, vanilla_schedule
from framepack_rt.engine.teacache import TeaCache, TeaCacheConfig


@pytest.fixture(scope="module")
def model():
    return FramePackTransformer.from_config("tiny").eval()


def conditioning(model, prompt: str, seed: int = 0, text_len: int = 6) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return Conditioning(
        prompt=prompt,
        text=torch.randn(1, text_len, cfg.text_embed_dim, generator=g),
        pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        image_embeds=torch.randn(1, 4, cfg.image_proj_dim, generator=g),
    )


def start_latent(height=4, width=4, seed=1):
    return torch.randn(1, 16, 1, height, width, generator=torch.Generator().manual_seed(seed))


def live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) and not obj.is_meta:
                total += obj.untyped_storage().nbytes()
        except Exception:  # objects that die or refuse inspection mid-walk are not ours
            continue
    return total


def test_200_sections_constant_inputs_and_memory(model):
    """Every section prepares the model's constant inputs once (StepPlan) with the same shapes, and nothing
    is kept beyond the ring's fixed buffers."""
    shapes: list[tuple] = []
    original_prepare = model.prepare
    parameters = inspect.signature(original_prepare).parameters

    def recording_prepare(*args, **kwargs):
        named = {**dict(zip(parameters, args)), **kwargs}
        shapes.append(tuple((k, tuple(v.shape)) for k, v in sorted(named.items()) if isinstance(v, torch.Tensor)))
        return original_prepare(*args, **kwargs)

    model.prepare = recording_prepare
    try:
        gen = SectionGenerator(
            model, f1_schedule(window=2), start_latent(), conditioning(model, "a ball"),
            sampler=SamplerConfig(steps=1, solver="euler"),
        )
        baseline = None
        for section in gen:
            if section.index == 9:
                baseline = live_tensor_bytes()
            if section.index == 199:
                break
        final = live_tensor_bytes()
    finally:
        del model.prepare
    assert len(shapes) == 200
    assert len(set(shapes)) == 1, "model input shapes changed between sections"
    # Everything kept is the ring's fixed buffers: no growth between section 10 and 200 (a few hundred
    # bytes of slack for allocator bookkeeping tensors torch may create lazily).
    assert final - baseline <= 1024, (baseline, final)


def test_prompt_change_applies_from_the_next_section(model):
    changed_at = {}
    gen = None

    def on_step(event: StepEvent):
        if event.section == 1 and event.step == 0 and "ack" not in changed_at:
            changed_at["ack"] = gen.set_conditioning(conditioning(model, "a ball moves left", seed=5))

    gen = SectionGenerator(
        model, f1_schedule(window=2), start_latent(), conditioning(model, "a ball moves right"),
        sampler=SamplerConfig(steps=2), step_callback=on_step,
    )
    prompts = [next(gen).prompt for _ in range(4)]
    assert changed_at["ack"] == 2
    assert prompts == ["a ball moves right", "a ball moves right", "a ball moves left", "a ball moves left"]


@pytest.mark.parametrize("solver", ["unipc_bh1", "euler_stochastic"])
def test_same_seed_same_video_and_noise_carries_across_sections(model, solver):
    def run(seed):
        gen = SectionGenerator(model, f1_schedule(window=2), start_latent(), conditioning(model, "x"),
                               sampler=SamplerConfig(steps=3, solver=solver), seed=seed)
        return [next(gen).latents for _ in range(3)]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[1], a[2])


def test_sampler_config_refuses_an_unknown_solver_and_zero_steps():
    with pytest.raises(ValueError, match="euler_stochastic"):
        SamplerConfig(solver="dpm++")
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)


def test_section_reports_timings_and_steps(model):
    gen = SectionGenerator(model, f1_schedule(window=2), start_latent(), conditioning(model, "x"),
                           sampler=SamplerConfig(steps=3))
    s = next(gen)
    assert s.ms > 0 and s.ms_per_step == pytest.approx(s.ms / 3)
    assert (s.steps_run, s.steps_skipped) == (3, 0)
    assert s.latents.shape == (1, 16, 2, 4, 4)


def test_teacache_threshold_zero_is_bit_identical(model):
    def run(teacache):
        gen = SectionGenerator(model, f1_schedule(window=3), start_latent(), conditioning(model, "x"),
                               sampler=SamplerConfig(steps=6, teacache=teacache))
        return [next(gen) for _ in range(2)]

    plain, zero = run(None), run(TeaCacheConfig(threshold=0.0))
    for p, z in zip(plain, zero):
        assert torch.equal(p.latents, z.latents)
        assert (z.steps_run, z.steps_skipped) == (6, 0)


def test_teacache_positive_threshold_skips_steps(model):
    gen = SectionGenerator(model, f1_schedule(window=3), start_latent(), conditioning(model, "x"),
                           sampler=SamplerConfig(steps=12, teacache=TeaCacheConfig(threshold=0.5)))
    s = next(gen)
    assert s.steps_skipped > 0 and s.steps_run >= 2 and s.steps_run + s.steps_skipped == 12
    assert torch.isfinite(s.latents).all()


def test_teacache_first_and_last_steps_always_run():
    cache = TeaCache(TeaCacheConfig(threshold=1e9))  # would skip everything it is allowed to
    cache.start(5)
    decisions = []
    for i in range(5):
        run = cache.should_run(torch.full((2, 3), float(i + 1)))
        decisions.append(run)
        if run:
            cache.remember(torch.zeros(2, 3))
    assert decisions == [True, False, False, False, True]
    assert (cache.steps_run, cache.steps_skipped) == (2, 3)


def test_real_cfg_runs_the_negative_branch_only_when_asked_batched_with_the_positive(model):
    calls = []  # per model call: the batch rows of each branch it computes
    original_branches = model.step_branches
    model.step_branches = lambda branches: calls.append([b.hidden_states.shape[0] for b in branches]) or \
        original_branches(branches)
    try:
        for cfg, expected in ((1.0, [[1]] * 3), (3.0, [[2]] * 3)):
            calls.clear()
            gen = SectionGenerator(model, f1_schedule(window=2), start_latent(), conditioning(model, "x"),
                                   sampler=SamplerConfig(steps=3, guidance=GuidanceConfig(cfg=cfg, cfg_rescale=0.5)))
            next(gen)
            assert calls == expected
        # TeaCache keeps one cache per branch: the two branches go through the blocks together, one cache each.
        calls.clear()
        gen = SectionGenerator(model, f1_schedule(window=2), start_latent(), conditioning(model, "x"),
                               sampler=SamplerConfig(steps=3, guidance=GuidanceConfig(cfg=3.0),
                                                     teacache=TeaCacheConfig(threshold=0.0)))
        next(gen)
        assert calls == [[1, 1]] * 3
    finally:
        del model.step_branches


def test_stronger_guidance_only_in_the_first_section_after_a_prompt_change(model):
    """cfg 1 with cfg_after_change 3: the negative branch runs in the one section that begins with a new prompt,
    not before, not after, and not when the same prompt is set again."""
    calls = []
    original_branches = model.step_branches
    model.step_branches = lambda branches: calls.append(sum(b.hidden_states.shape[0] for b in branches)) or \
        original_branches(branches)
    try:
        gen = SectionGenerator(model, f1_schedule(window=2), start_latent(), conditioning(model, "left"),
                               sampler=SamplerConfig(steps=2, guidance=GuidanceConfig(cfg=1.0, cfg_after_change=3.0)))
        rows = []
        for k in range(5):
            if k == 1:
                gen.set_conditioning(conditioning(model, "left"))  # the same prompt again: no change
            if k == 2:
                gen.set_conditioning(conditioning(model, "right", seed=3))
            calls.clear()
            next(gen)
            rows.append(calls[:])
        assert rows == [[1, 1], [1, 1], [2, 2], [1, 1], [1, 1]]
    finally:
        del model.step_branches


@pytest.mark.parametrize("negative_text_len", [None, 3, 6, 9], ids=lambda n: f"neg_text_{n or 'zeros'}")
def test_batched_cfg_equals_two_calls(model, monkeypatch, negative_text_len):
    """One batch of [positive; negative] gives the same sections as two calls, also when the negative prompt
    is shorter or longer than the positive one (padded and masked)."""
    import framepack_rt.engine.generator as engine

    negative = None if negative_text_len is None else conditioning(model, "n", seed=4, text_len=negative_text_len)

    def sections() -> torch.Tensor:
        gen = SectionGenerator(model, f1_schedule(window=2), start_latent(), conditioning(model, "x"),
                               negative=negative, sampler=SamplerConfig(steps=3, guidance=GuidanceConfig(cfg=3.0)))
        return torch.cat([next(gen).latents for _ in range(3)])

    batched = sections()
    monkeypatch.setattr(engine, "_batchable", lambda a, b: False)
    two_calls = sections()
    torch.testing.assert_close(batched, two_calls, rtol=1e-4, atol=1e-4)


def test_inverted_schedule_is_finite_and_ends_with_the_start_frame(model):
    start = start_latent()
    gen = SectionGenerator(model, inverted_schedule(3, window=2, has_end_frame=True), start,
                           conditioning(model, "x"), sampler=SamplerConfig(steps=2), end_latent=start_latent(seed=9))
    sections = list(gen)
    assert [s.index for s in sections] == [0, 1, 2] and sections[-1].is_last
    assert torch.equal(sections[-1].output_latents[:, :, :1], start)
    assert sections[-1].output_latents.shape[2] == 3 and sections[0].output_latents.shape[2] == 2


def test_vanilla_schedule_runs(model):
    gen = SectionGenerator(model, vanilla_schedule(window=2), start_latent(), conditioning(model, "x"),
                           sampler=SamplerConfig(steps=2))
    assert [next(gen).index for _ in range(3)] == [0, 1, 2]


def test_context_scaling_benchmark_runs_and_only_naive_context_grows():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "context_scaling.py"
    spec = importlib.util.spec_from_file_location("context_scaling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(sections=4, height=4, width=4, steps=1, window=2)
    rows = result["rows"]
    assert len({r["packed_context_tokens"] for r in rows}) == 1
    naive = [r["naive_context_tokens"] for r in rows]
    assert naive == sorted(naive) and naive[-1] > naive[0]
    assert all(r["packed_ms"] > 0 and r["naive_ms"] > 0 for r in rows)
    assert "packed" in bench.summarize(result)
