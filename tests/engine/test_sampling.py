"""Tests for framepack_rt.engine.sampling: schedule, solvers (on an exactly solvable flow), guidance, noise."""

from __future__ import annotations

import math

import pytest
import torch

from framepack_rt.engine.sampling import (
    SOLVERS,
    STOCHASTIC_SOLVERS,
    GuidanceConfig,
    NoiseSource,
    StepInfo,
    flow_seq_len,
    flow_shift,
    flow_sigmas,
    guided_denoiser,
    sample,
)

UNIPC = ("unipc_bh1", "unipc_bh2")
ODE_SOLVERS = tuple(s for s in SOLVERS if s not in STOCHASTIC_SOLVERS)  # those that integrate the ODE

# ------------------------------------------------------------------------------------------- schedule


def test_flow_shift_anchor_points():
    assert flow_shift(256) == pytest.approx(math.exp(0.5), rel=1e-12)
    assert flow_shift(4096) == pytest.approx(math.exp(1.15), rel=1e-12)
    # Linear in mu between (and beyond) the anchors.
    assert flow_shift(2176) == pytest.approx(math.exp(0.825), rel=1e-12)
    assert flow_shift(0) == pytest.approx(math.exp(0.5 - 256 * 0.65 / 3840), rel=1e-12)


def test_flow_shift_caps_at_7_for_the_640_bucket():
    seq_len = flow_seq_len(9, 80, 80)
    assert seq_len == 14400
    assert flow_shift(seq_len) == pytest.approx(7.0, rel=1e-12)
    assert flow_shift(10**6) == pytest.approx(7.0, rel=1e-12)
    # Just under the cap (mu = ln 7 at seq_len ~ 7621) the shift is still below 7.
    assert flow_shift(7000) < 7.0


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0], ids=lambda s: f"shift{s:g}")
@pytest.mark.parametrize("steps", [1, 4, 25], ids=lambda n: f"{n}steps")
def test_flow_sigmas_shape_endpoints_monotone(steps, shift):
    sig = flow_sigmas(steps, shift)
    assert sig.dtype == torch.float32 and sig.shape == (steps + 1,)
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
    assert bool((sig[1:] < sig[:-1]).all())
    lin = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    torch.testing.assert_close(sig.double(), shift * lin / (1 + (shift - 1) * lin), rtol=0, atol=1e-7)


def test_flow_sigmas_shift_one_is_linspace_and_shift_pushes_up():
    torch.testing.assert_close(flow_sigmas(10, 1.0), torch.linspace(1, 0, 11))
    assert bool((flow_sigmas(10, 7.0)[1:-1] > flow_sigmas(10, 1.0)[1:-1]).all())


def test_flow_sigmas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, 0.0)


# ------------------------------------------------------------------- exact test problem (Gaussian data)
#
# Data x0 ~ N(mu, s^2) per element, path x_t = (1-t) x0 + t eps. Then x_t ~ N((1-t) mu, (1-t)^2 s^2 + t^2)
# and Cov(x0, x_t) = (1-t) s^2, so E[x0 | x_t] = mu + (1-t) s^2 / ((1-t)^2 s^2 + t^2) * (x_t - (1-t) mu).
# The probability-flow ODE from x_1 = eps follows x_t = (1-t) mu + sqrt((1-t)^2 s^2 + t^2) eps and ends at
# x_0 = mu + s eps.


class Gaussian:
    def __init__(self, mu: torch.Tensor, s: torch.Tensor):
        self.mu, self.s = mu, s
        self.calls = 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * self.s**2 + t**2
        return self.mu + (1 - t) * self.s**2 / var * (x - (1 - t) * self.mu)

    def velocity(self, x, timestep, guidance, cond):
        """The same flow as a velocity model, in the transformer's calling convention."""
        t = (timestep.double() / 1000).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self.denoise(x, t)) / t

    def trajectory(self, eps: torch.Tensor, t: float) -> torch.Tensor:
        return (1 - t) * self.mu + ((1 - t) ** 2 * self.s**2 + t**2) ** 0.5 * eps


def _problem(shape=(2, 4, 3, 5), seed=1234):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)  # per-element std in [0.5, 1.5]
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return Gaussian(mu, s), eps


def test_gaussian_trajectory_solves_the_ode():
    """Sanity of the test problem itself: the closed-form path has velocity (x - E[x0|x]) / t."""
    prob, eps = _problem()
    for t in (0.9, 0.5, 0.1):
        dt = 1e-5
        dxdt = (prob.trajectory(eps, t + dt) - prob.trajectory(eps, t - dt)) / (2 * dt)
        x = prob.trajectory(eps, t)
        v = (x - prob.denoise(x, torch.tensor(t, dtype=torch.float64))) / t
        torch.testing.assert_close(dxdt, v, rtol=1e-7, atol=1e-7)


STEPS = (10, 20, 40, 80, 160, 320)
SHIFTS = (1.0, 3.0, 7.0)


@pytest.fixture(scope="module")
def errors() -> dict[tuple[str, float], list[float]]:
    """RMS error of the final x0 vs the exact ODE endpoint, per (solver, shift), over STEPS."""
    prob, eps = _problem()
    target = prob.mu + prob.s * eps
    table = {}
    for shift in SHIFTS:
        for solver in ODE_SOLVERS:
            errs = []
            for n in STEPS:
                out = sample(prob.denoise, eps.clone(), flow_sigmas(n, shift).double(), solver)
                errs.append((out - target).pow(2).mean().sqrt().item())
            table[solver, shift] = errs
            print(f"{solver:10s} shift {shift:g}: " + " ".join(f"{n}:{e:.2e}" for n, e in zip(STEPS, errs)))
    return table


def _slope(steps, errs) -> float:
    """Least-squares order p in err ~ C * steps^-p."""
    x = torch.tensor(steps, dtype=torch.float64).log()
    y = torch.tensor(errs, dtype=torch.float64).log()
    x = x - x.mean()
    return -float((x * (y - y.mean())).sum() / (x * x).sum())


CASES = [(solver, shift) for solver in ODE_SOLVERS for shift in SHIFTS]
CASE_IDS = [f"{solver}-shift{shift:g}" for solver, shift in CASES]


@pytest.mark.parametrize("solver,shift", CASES, ids=CASE_IDS)
def test_error_shrinks_with_steps(errors, solver, shift):
    errs = errors[solver, shift]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.02


@pytest.mark.parametrize("solver,shift", CASES, ids=CASE_IDS)
def test_convergence_order(errors, solver, shift):
    # Fit over the asymptotic range: with shift 7 the last nonzero sigma is ~7/steps, so small step
    # counts are far from it. UniPC's measured order is 2, not 3: the sampler returns the x0 prediction at
    # the last nonzero sigma, whose error is O(sigma_last^2) on this problem, and the last steps toward
    # sigma = 0 are O(1) in lambda = -log(sigma).
    order = _slope(STEPS[-3:], errors[solver, shift][-3:])
    print(f"{solver} shift {shift:g}: order {order:.2f}")
    if solver == "euler":
        assert 0.9 < order < 1.1
    else:
        assert 1.8 < order < 2.5


@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift{s:g}")
@pytest.mark.parametrize("solver", UNIPC)
def test_unipc_beats_euler(errors, solver, shift):
    euler, unipc = errors["euler", shift], errors[solver, shift]
    assert all(u < e for u, e in zip(unipc, euler)), (unipc, euler)
    assert unipc[STEPS.index(160)] < 0.25 * euler[STEPS.index(160)]


@pytest.mark.parametrize(
    "solver,expected",
    [
        # Reference values from the released FramePack flow-matching UniPC algorithm (fp64, 6 steps, shift 3).
        ("unipc_bh1", [0.8964662911686596, -1.7263010232676599, 0.2685027467585858]),
        ("unipc_bh2", [0.8964408153612233, -1.7262483791940615, 0.268500821934768]),
    ],
)
def test_unipc_matches_released_values(solver, expected):
    f64 = dict(dtype=torch.float64)
    prob = Gaussian(torch.tensor([[0.3, -1.2, 0.0]], **f64), torch.tensor([[0.7, 1.4, 0.3]], **f64))
    eps = torch.tensor([[1.1, -0.4, 2.0]], **f64)
    out = sample(prob.denoise, eps, flow_sigmas(6, 3.0).double(), solver)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-12)


def test_euler_is_the_plain_velocity_step():
    prob, eps = _problem(shape=(2, 3))
    sig = flow_sigmas(7, 3.0).double()
    x = eps.clone()
    for i in range(7):
        v = (x - prob.denoise(x, sig[i])) / sig[i]
        x = x + (sig[i + 1] - sig[i]) * v
    torch.testing.assert_close(sample(prob.denoise, eps, sig, "euler"), x, rtol=1e-12, atol=1e-12)


def test_euler_stochastic_renoises_the_x0_prediction_at_every_step():
    """Each step after the first is (1 - sigma) * x0_prev + sigma * fresh noise, the noise drawn in step order
    from the source it is given; one model call per step; the last x0 prediction is the result."""
    prob, eps = _problem(shape=(2, 3))
    sig = flow_sigmas(6, 3.0).double()
    calls, draws = [], NoiseSource(7)
    x, x0 = eps.clone(), None
    for i in range(6):
        if i:
            x = (1 - sig[i]) * x0 + sig[i] * draws.noise(x.shape, dtype=torch.float64)
        x0 = prob.denoise(x, sig[i])

    def denoise(x, sigma):
        calls.append(float(sigma[0]))
        return prob.denoise(x, sigma[0])

    out = sample(denoise, eps, sig, "euler_stochastic", noise=NoiseSource(7).noise)
    torch.testing.assert_close(out, x0, rtol=1e-12, atol=1e-12)
    assert calls == pytest.approx(sig[:-1].tolist())
    # Its own noise: another seed lands elsewhere; the ODE's Euler step is not what it does.
    assert not torch.allclose(out, sample(prob.denoise, eps, sig, "euler_stochastic", noise=NoiseSource(8).noise))
    assert not torch.allclose(out, sample(prob.denoise, eps, sig, "euler"))


def test_euler_stochastic_lands_on_a_data_point_the_model_is_sure_of():
    """Fresh noise at every step does not leak into the result: a denoiser that always predicts the same x0
    (a point-mass data distribution) gives exactly that x0, whatever the noise."""
    target = torch.tensor([[0.25, -1.5, 2.0]], dtype=torch.float64)
    out = sample(lambda x, sigma: target.expand_as(x), torch.randn(1, 3, dtype=torch.float64),
                 flow_sigmas(8, 3.0).double(), "euler_stochastic", noise=NoiseSource(0).noise)
    torch.testing.assert_close(out, target, rtol=0, atol=0)


def test_euler_stochastic_needs_a_noise_source():
    with pytest.raises(ValueError, match="noise="):
        sample(lambda x, sigma: x, torch.zeros(1, 2), flow_sigmas(4, 1.0), "euler_stochastic")


@pytest.mark.parametrize("solver", UNIPC)
def test_unipc_first_order_step_is_euler(solver):
    prob, eps = _problem(shape=(2, 3))
    sig = flow_sigmas(8, 3.0).double()
    seen = []
    sample(lambda x, s: seen.append(x.clone()) or prob.denoise(x, s), eps, sig, solver)
    # The second model input is UniPC's order-1 prediction: (t/t_prev) x + (1 - t/t_prev) x0_prev.
    x0 = prob.denoise(eps, sig[0])
    v = (eps - x0) / sig[0]
    torch.testing.assert_close(seen[1], eps + (sig[1] - sig[0]) * v, rtol=1e-12, atol=1e-12)
    # With 2 steps UniPC is order 1 and returns the x0 at that predicted point: exactly Euler.
    sig2 = flow_sigmas(2, 3.0).double()
    euler = sample(prob.denoise, eps, sig2, "euler")
    torch.testing.assert_close(sample(prob.denoise, eps, sig2, solver), euler)


def test_gaussian_through_guided_denoiser_matches_exact_denoiser():
    """The velocity convention (timestep = 1000 sigma, x0 = x - v sigma) round-trips."""
    prob, eps = _problem(shape=(2, 3, 4))
    denoise = guided_denoiser(prob.velocity, GuidanceConfig(), positive="pos")
    sig = flow_sigmas(25, 7.0)
    exact = sample(prob.denoise, eps, sig)
    torch.testing.assert_close(sample(denoise, eps, sig), exact, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ solver contract


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 25], ids=lambda n: f"{n}steps")
@pytest.mark.parametrize("solver", SOLVERS)
def test_one_model_call_per_step_and_callbacks(solver, steps):
    prob, eps = _problem(shape=(2, 3))
    sig = flow_sigmas(steps, 3.0)
    infos: list[StepInfo] = []
    sigmas_seen = []

    def denoise(x, s):
        assert s.shape == (2,)
        sigmas_seen.append(s[0].item())
        return prob.denoise(x, s)

    out = sample(denoise, eps, sig, solver, callback=infos.append, noise=NoiseSource(0).noise)  # used if stochastic
    assert len(sigmas_seen) == steps
    assert 0.0 not in sigmas_seen  # sigma = 0 is never evaluated
    assert sigmas_seen == sig[:-1].tolist()
    assert [i.step for i in infos] == list(range(steps))
    assert all(i.steps == steps for i in infos)
    assert [i.sigma for i in infos] == sig[:-1].tolist()
    assert infos[-1].denoised is out  # the last x0 prediction is the result
    assert out.shape == eps.shape and out.dtype == eps.dtype


def test_one_step_returns_first_prediction():
    prob, eps = _problem(shape=(2, 3))
    out = sample(prob.denoise, eps, flow_sigmas(1, 3.0))
    torch.testing.assert_close(out, prob.denoise(eps, torch.ones(2)))


def test_sample_keeps_fp32():
    prob, eps = _problem(shape=(2, 3))
    out = sample(lambda x, s: prob.denoise(x.double(), s).float(), eps.float(), flow_sigmas(10, 3.0))
    assert out.dtype == torch.float32


def test_sample_rejects_bad_input():
    prob, eps = _problem(shape=(2, 3))
    with pytest.raises(ValueError, match="unipc_bh1, unipc_bh2, euler"):
        sample(prob.denoise, eps, flow_sigmas(4, 1.0), "dpmpp")
    with pytest.raises(ValueError, match="end at exactly 0"):
        sample(prob.denoise, eps, torch.tensor([1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="1-D"):
        sample(prob.denoise, eps, torch.tensor([1.0]))


# ------------------------------------------------------------------------------------------- guidance


class AffineVelocity:
    """v = a[cond] * x + b[cond]; records every call."""

    def __init__(self):
        self.a = {"pos": 0.7, "neg": -0.3}
        self.b = {"pos": 0.2, "neg": 1.5}
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, timestep, guidance, cond):
        self.calls.append((cond, timestep, guidance))
        return self.v(x, cond)

    def v(self, x, cond):
        return self.a[cond] * x + self.b[cond] * torch.linspace(-1, 1, x[0].numel()).reshape(x[0].shape)


def _x(seed=0, shape=(3, 4, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_cfg_one_never_calls_negative():
    vel, x = AffineVelocity(), _x()
    denoise = guided_denoiser(vel, GuidanceConfig(distilled=6.0), positive="pos", negative="neg")
    sig = torch.tensor([0.9, 0.5, 0.2])
    x0 = denoise(x, sig)
    assert [c for c, _, _ in vel.calls] == ["pos"]
    _, timestep, guidance = vel.calls[0]
    assert timestep.dtype == guidance.dtype == torch.float32 and timestep.shape == guidance.shape == (3,)
    torch.testing.assert_close(timestep, sig * 1000)
    torch.testing.assert_close(guidance, torch.full((3,), 6000.0))
    torch.testing.assert_close(x0, x - vel.v(x, "pos") * sig.reshape(3, 1, 1))
    # A 0-d sigma is broadcast over the batch.
    denoise(x, torch.tensor(0.5))
    torch.testing.assert_close(vel.calls[1][1], torch.full((3,), 500.0))
    # And the whole sampler runs with one call per step.
    vel.calls.clear()
    sample(denoise, x, flow_sigmas(5, 3.0))
    assert [c for c, _, _ in vel.calls] == ["pos"] * 5


def test_cfg_formula():
    vel, x = AffineVelocity(), _x()
    denoise = guided_denoiser(vel, GuidanceConfig(cfg=4.0), positive="pos", negative="neg")
    sig = torch.tensor([0.9, 0.5, 0.2])
    x0 = denoise(x, sig)
    assert sorted(c for c, _, _ in vel.calls) == ["neg", "pos"]
    v_pos, v_neg = vel.v(x, "pos"), vel.v(x, "neg")
    torch.testing.assert_close(x0, x - (v_neg + 4.0 * (v_pos - v_neg)) * sig.reshape(3, 1, 1))


def test_cfg_pair_fn_computes_both_branches_in_one_call_only_when_cfg_is_on():
    vel, x, sig = AffineVelocity(), _x(), torch.tensor([0.9, 0.5, 0.2])
    pairs = []

    def pair(x, timestep, guidance, positive, negative):
        pairs.append((positive, negative))
        return vel.v(x, positive), vel.v(x, negative)

    x0 = guided_denoiser(vel, GuidanceConfig(cfg=4.0), "pos", "neg", pair_fn=pair)(x, sig)
    assert pairs == [("pos", "neg")] and vel.calls == []
    expected = guided_denoiser(vel, GuidanceConfig(cfg=4.0), "pos", "neg")(x, sig)
    torch.testing.assert_close(x0, expected)
    pairs.clear()
    guided_denoiser(vel, GuidanceConfig(cfg=1.0), "pos", "neg", pair_fn=pair)(x, sig)
    assert pairs == [] and [c for c, _, _ in vel.calls][-1] == "pos"


def test_cfg_min_sigma_guides_only_the_noisy_steps():
    vel, x = AffineVelocity(), _x()
    denoise = guided_denoiser(vel, GuidanceConfig(cfg=4.0, cfg_min_sigma=0.5), positive="pos", negative="neg")
    x0 = denoise(x, torch.tensor(0.3))  # below the interval: the positive branch alone, as at cfg 1
    assert [c for c, _, _ in vel.calls] == ["pos"]
    torch.testing.assert_close(x0, x - vel.v(x, "pos") * 0.3)
    vel.calls.clear()
    x0 = denoise(x, torch.tensor(0.8))
    assert sorted(c for c, _, _ in vel.calls) == ["neg", "pos"]
    v_pos, v_neg = vel.v(x, "pos"), vel.v(x, "neg")
    torch.testing.assert_close(x0, x - (v_neg + 4.0 * (v_pos - v_neg)) * 0.8)
    with pytest.raises(ValueError, match="cfg_min_sigma"):
        GuidanceConfig(cfg_min_sigma=1.5)


def test_cfg_rescale():
    vel, x = AffineVelocity(), _x()
    sig = torch.tensor([0.9, 0.5, 0.2])
    v_of = {}
    for r in (0.0, 0.5, 1.0):
        denoise = guided_denoiser(vel, GuidanceConfig(cfg=4.0, cfg_rescale=r), positive="pos", negative="neg")
        v_of[r] = (x - denoise(x, sig)) / sig.reshape(3, 1, 1)
    v_pos = vel.v(x, "pos")
    std = lambda v: v.flatten(1).std(dim=1)  # noqa: E731
    assert not torch.allclose(v_of[0.0], v_of[1.0], atol=1e-3)
    torch.testing.assert_close(std(v_of[1.0]), std(v_pos), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(std(v_of[0.0]), std(v_pos), atol=1e-2)  # the case is not trivially equal
    torch.testing.assert_close(v_of[0.5], 0.5 * (v_of[0.0] + v_of[1.0]), rtol=1e-5, atol=1e-5)


def test_guidance_config_errors():
    with pytest.raises(ValueError, match="negative"):
        guided_denoiser(AffineVelocity(), GuidanceConfig(cfg=3.0), positive="pos")
    with pytest.raises(ValueError, match="cfg_rescale"):
        GuidanceConfig(cfg_rescale=1.5)


# ---------------------------------------------------------------------------------------------- noise


def test_noise_source_is_deterministic_and_carries_state():
    shape = (1, 16, 9, 8, 10)
    a, b = NoiseSource(42), NoiseSource(42)
    a1, a2 = a.noise(shape), a.noise(shape)
    b1, b2 = b.noise(shape), b.noise(shape)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(NoiseSource(43).noise(shape), a1)
    g = torch.Generator(device="cpu").manual_seed(42)
    assert torch.equal(a1, torch.randn(shape, generator=g))
    assert torch.equal(a2, torch.randn(shape, generator=g))


def test_noise_source_dtype_and_replay():
    src = NoiseSource(7)
    state = src.get_state()
    first = src.noise((2, 3))
    src.set_state(state)
    half = src.noise((2, 3), dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    assert torch.equal(half, first.to(torch.bfloat16))  # drawn in fp32, then cast


def test_guidance_for_the_section_after_a_prompt_change():
    plain = GuidanceConfig(cfg=2.0, cfg_min_sigma=0.6)
    assert plain.for_section(prompt_changed=True) is plain and plain.may_guide
    boosted = GuidanceConfig(cfg=2.0, cfg_min_sigma=0.6, cfg_after_change=4.0)
    assert boosted.for_section(prompt_changed=False) is boosted
    assert boosted.for_section(prompt_changed=True) == GuidanceConfig(cfg=4.0, cfg_min_sigma=0.6, cfg_after_change=4.0)
    assert not GuidanceConfig().may_guide and GuidanceConfig(cfg_after_change=3.0).may_guide
    with pytest.raises(ValueError, match="cfg_after_change must be > 0"):
        GuidanceConfig(cfg_after_change=0.0)
