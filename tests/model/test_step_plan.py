"""The prepared step: StepPlan built once per section, then steps with no host sync and one graph."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from framepack_rt import FramePackConfig, FramePackTransformer

STEP_KEYS = ("hidden_states", "timestep", "guidance")


@pytest.fixture(scope="module")
def model() -> FramePackTransformer:
    return FramePackTransformer.from_config("tiny").eval()


def split(inputs: dict) -> tuple[tuple, dict, tuple]:
    """forward() keywords -> (latent shape, prepare() keywords, step() arguments)."""
    x = inputs["hidden_states"]
    prepare = {k: v for k, v in inputs.items() if k not in STEP_KEYS}
    return (x.shape[0], *x.shape[2:]), prepare, (x, inputs["timestep"], inputs["guidance"])


@contextlib.contextmanager
def no_host_reads():
    """Fail on the calls that copy device values to the host (the syncs a CUDA step must not make)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def refuse(name):
        def call(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} in the steady-state step: a host sync on CUDA")
        return call

    for name in saved:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("layout", ["f1", "inverted"])
@pytest.mark.parametrize("text_lengths", [(10,), (4, 10, 7)], ids=["batch1", "ragged3"])
def test_prepare_then_step_equals_forward(model, make_inputs, layout, text_lengths):
    inputs = make_inputs(model.config, text_lengths=text_lengths, layout=layout)
    shape, prepare, (x, t, g) = split(inputs)
    with torch.no_grad():
        plan = model.prepare(shape, **prepare)
        assert torch.equal(model.step(plan, x, t, g), model(**inputs))
        # The same plan serves every step of the section: new noise and timesteps, same constant inputs.
        x2, t2 = torch.randn_like(x), t * 0.5
        assert torch.equal(model.step(plan, x2, t2, g), model(**{**inputs, "hidden_states": x2, "timestep": t2}))


def test_step_with_image_tokens_and_fp32_head_off(make_inputs):
    config = dataclasses.replace(FramePackConfig.preset("tiny"), fp32_output_head=False)
    model = FramePackTransformer.from_config(config).eval()
    inputs = make_inputs(config, text_lengths=(3, 8))
    shape, prepare, (x, t, g) = split(inputs)
    with torch.no_grad():
        plan = model.prepare(shape, **prepare)
        assert plan.head_fp32 is None and plan.image_tokens is not None
        assert torch.equal(model.step(plan, x, t, g), model(**inputs))


def test_steady_state_step_makes_no_host_read(model, make_inputs):
    inputs = make_inputs(model.config, text_lengths=(5, 9))
    shape, prepare, (x, t, g) = split(inputs)
    with torch.no_grad():
        plan = model.prepare(shape, **prepare)
        with no_host_reads():
            model.step(plan, x, t, g)


def test_the_host_read_guard_catches_one(model, make_inputs):
    """The guard itself: forward() reads the mask on the host (in prepare), so it must trip."""
    inputs = make_inputs(model.config, text_lengths=(5, 9))
    with torch.no_grad(), no_host_reads(), pytest.raises(AssertionError, match="host sync"):
        model(**inputs)


def test_steady_state_step_traces_as_one_graph(model, make_inputs):
    """The call the engine makes at every step, as torch.compile would see it: 0 graph breaks."""
    inputs = make_inputs(model.config, text_lengths=(6, 11), layout="f1")
    shape, prepare, (x, t, g) = split(inputs)
    with torch.no_grad():
        plan = model.prepare(shape, **prepare)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.step)(plan, x, t, g)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_a_plan_refuses_latents_of_another_shape(model, make_inputs):
    inputs = make_inputs(model.config)
    shape, prepare, (x, t, g) = split(inputs)
    plan = model.prepare(shape, **prepare)
    with pytest.raises(ValueError, match="prepare a plan for this shape"):
        model.step(plan, x[..., :-2], t, g)


def test_plan_decides_kernels_and_attention_once(model, make_inputs, monkeypatch):
    """After prepare, steps never ask the kernel switch or the attention rule again: a switch that would now
    raise, and an attention override that is invalid, change nothing."""
    from framepack_rt.kernels import dispatch

    inputs = make_inputs(model.config)
    shape, prepare, (x, t, g) = split(inputs)
    with torch.no_grad():
        plan = model.prepare(shape, **prepare)
        want = model.step(plan, x, t, g)

        def asked():
            raise AssertionError("the kernel switch was asked during a step")

        monkeypatch.setattr(dispatch, "kernels_forced", asked)
        monkeypatch.setenv("FRAMEPACK_KERNELS", "not-a-choice")
        monkeypatch.setenv("FRAMEPACK_ATTENTION", "not-a-backend")
        assert torch.equal(model.step(plan, x, t, g), want)
        with pytest.raises((AssertionError, ValueError)):
            model.prepare(shape, **prepare)  # a new plan does ask: the guard above would have caught a step


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_equal_eager(make_inputs, backend):
    """--compile: torch.compile of each block within fp32 tolerance of eager. The default run captures the
    graphs (aot_eager: dynamo and AOTAutograd, seconds); -m slow compiles them with inductor (about 2 min on
    2 cores), as --compile does."""
    eager = FramePackTransformer.from_config("tiny").eval()
    compiled = FramePackTransformer.from_config("tiny").eval().compile_blocks(backend=backend)
    inputs = make_inputs(eager.config, text_lengths=(4, 9))
    shape, prepare, (x, t, g) = split(inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        want = eager.step(eager.prepare(shape, **prepare), x, t, g)
        plan = compiled.prepare(shape, **prepare)
        got = compiled.step(plan, x, t, g)
        again = compiled.step(plan, x * 0.5, t, g)  # the second step reuses the compiled graphs
        want_again = eager.step(eager.prepare(shape, **prepare), x * 0.5, t, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want_again, rtol=1e-5, atol=1e-5)
