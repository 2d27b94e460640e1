"""Flow-matching sampling for FramePack: sigma schedule, solvers, guidance and seeded noise.

Conventions (as released): the latent path is x_sigma = (1 - sigma) * x0 + sigma * noise, sigma in [1, 0].
The transformer predicts the velocity v = noise - x0 at timestep sigma * 1000; solvers work on the x0
(data) prediction x0 = x - v * sigma.

Solvers make exactly one model call per step, at sigmas[0..steps-1]; sigma = 0 is never evaluated: the
last step returns the x0 prediction made at the last nonzero sigma. "euler_stochastic" is the one solver that
draws noise of its own (diffusers' FlowMatchEulerDiscreteScheduler with stochastic_sampling=True): each step
puts the x0 prediction back on the path at the next sigma with fresh noise instead of following the ODE, so an
error of one step's velocity is not carried into the next. The demo model, small and imperfect, keeps its
objects' colours far better that way (demo/TRAINING.md, issue 19).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Optional, Sequence

import torch
from torch import Tensor

# denoise(x: (B, ...), sigma: 0-d or (B,)) -> x0 prediction, shaped like x.
Denoiser = Callable[[Tensor, Tensor], Tensor]
# velocity_fn(x: (B, ...), timestep: (B,) fp32, guidance: (B,) fp32, cond) -> v, shaped like x.
VelocityFn = Callable[[Tensor, Tensor, Tensor, Any], Tensor]
# pair_fn(x, timestep, guidance, positive, negative) -> (v_pos, v_neg): both CFG branches in one model call.
PairedVelocityFn = Callable[[Tensor, Tensor, Tensor, Any, Any], "tuple[Tensor, Tensor]"]

SOLVERS = ("unipc_bh1", "unipc_bh2", "euler", "euler_stochastic")
STOCHASTIC_SOLVERS = ("euler_stochastic",)  # they need a noise source: sample(..., noise=NoiseSource(seed).noise)
# noise(shape) -> standard normal Tensor of that shape (fp32 on the CPU is fine: the solver casts and moves it).
NoiseFn = Callable[[Sequence[int]], Tensor]


# --------------------------------------------------------------------------------------------- schedule


def flow_seq_len(latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Token count that sets the shift: T*H*W/4 in latent sizes (2x2 patches)."""
    return latent_frames * latent_height * latent_width // 4


def flow_shift(seq_len: int) -> float:
    """Flux-style resolution-dependent shift s = exp(mu).

    mu goes linearly through (256, 0.5) and (4096, 1.15), extrapolated both ways, capped at ln 7.
    """
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = min(0.5 + slope * (seq_len - 256), math.log(7.0))
    return math.exp(mu)


def flow_sigmas(steps: int, shift: float, device: Optional[torch.device | str] = None) -> Tensor:
    """(steps + 1,) fp32 sigmas from 1 to 0: linspace shifted by sigma' = s*sigma / (1 + (s-1)*sigma)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 means no shift), got {shift}")
    # fp64 then one rounding, so the endpoints are exactly 1 and 0.
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return s.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- solvers


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after step `step` (0-based) of `steps`.

    x: (B, ...) the latent at `sigma` (for UniPC: after the corrector); denoised: (B, ...) the model's x0
    prediction at `sigma` (for UniPC: made at the predicted point, before the correction).
    """

    step: int
    steps: int
    sigma: float
    x: Tensor
    denoised: Tensor


def _unipc_coeffs(
    ts: Sequence[float], t: float, order: int, variant: str
) -> tuple[float, list[float], list[float], float]:
    """Scalar coefficients of one UniPC step (data prediction, lambda = -log sigma) from ts[-1] to t.

    ts: previous sigmas, oldest first, len >= order. Returns (ratio, pred_w, corr_w, corr_new) such that,
    with base = ratio*x + (1 - ratio)*x0[-1] and d_k = x0[-1-k] - x0[-1] (k = 1..order-1):
        predictor  x_pred = base - sum_k pred_w[k-1] * d_k
        corrector  x_corr = base - sum_k corr_w[k-1] * d_k - corr_new * (x0(x_pred, t) - x0[-1])
    Computed in fp64 on the host: the phi recursion cancels catastrophically in fp32 for small h.
    """
    lam0 = -math.log(ts[-1])
    h = -math.log(t) - lam0
    hh = -h  # data-prediction form integrates in -h
    h_phi_1 = math.expm1(hh)  # = t/t_prev - 1: the order-1 (Euler) update
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: 'bh1', 'bh2'")

    rks = [(-math.log(ts[-1 - k]) - lam0) / h for k in range(1, order)] + [1.0]
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1.0
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, bv = torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)

    # Fixed 0.5 weights for the low orders, as in the paper's reference code.
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bv[:-1]).tolist()
        rhos_c = torch.linalg.solve(R, bv).tolist()
    # Fold D1_k = d_k / r_k and B(h) into the weights.
    pred_w = [b_h * rho / r for rho, r in zip(rhos_p, rks)]
    corr_w = [b_h * rho / r for rho, r in zip(rhos_c[:-1], rks)]
    return math.exp(hh), pred_w, corr_w, b_h * rhos_c[-1]


def sample(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    solver: str = "unipc_bh1",
    callback: Optional[Callable[[StepInfo], None]] = None,
    noise: Optional[NoiseFn] = None,
) -> Tensor:
    """Integrate the flow ODE from sigmas[0] to sigmas[-1] = 0; returns x0, shaped like x.

    x: (B, ...) noisy latent at sigmas[0]. sigmas: (steps + 1,) decreasing, ending at 0.
    denoise is called exactly `steps` times, with sigma as a (B,) tensor in sigmas' dtype.
    solver: "unipc_bh1" (default), "unipc_bh2" (UniPC, order min(3, steps - 1), warm-up orders 1, 2, ...)
    or "euler" (the first-order flow step x + (sigma_next - sigma) * v); "euler_stochastic" (the x0 prediction
    re-noised to sigma_next: (1 - sigma_next) * x0 + sigma_next * noise(x.shape)) needs ``noise``.
    """
    steps = sampling_steps(x, sigmas, solver, callback, noise)
    try:
        request = next(steps)
        while True:
            request = steps.send(denoise(*request))
    except StopIteration as done:
        return done.value


def sampling_steps(
    x: Tensor,
    sigmas: Tensor,
    solver: str = "unipc_bh1",
    callback: Optional[Callable[[StepInfo], None]] = None,
    noise: Optional[NoiseFn] = None,
) -> Generator[tuple[Tensor, Tensor], Tensor, Tensor]:
    """:func:`sample` as a resumable generator: it yields each model evaluation it needs, ``(x, sigma (B,))``,
    is sent the x0 prediction there, and returns the final x0. :func:`sample` drives it with a denoiser; the
    continuous batcher (engine/batching.py) drives many at once, so both run exactly this solver code."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if solver in STOCHASTIC_SOLVERS and noise is None:
        raise ValueError(f"solver {solver!r} draws fresh noise at every step: pass noise= (e.g. NoiseSource(seed).noise)")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with steps + 1 >= 2 values, got shape {tuple(sigmas.shape)}")
    ts = sigmas.tolist()  # one host sync; the coefficients are host math
    if ts[-1] != 0.0 or min(ts[:-1]) <= 0.0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError("sigmas must decrease strictly and end at exactly 0 (e.g. from flow_sigmas)")
    return _sampling_steps(x, sigmas, ts, solver, callback, noise)


def _sampling_steps(x: Tensor, sigmas: Tensor, ts: list[float], solver: str,
                    callback: Optional[Callable[[StepInfo], None]],
                    noise: Optional[NoiseFn] = None) -> Generator[tuple[Tensor, Tensor], Tensor, Tensor]:
    """The solver loop of :func:`sampling_steps`, after its checks (which so raise at the call, not at next())."""
    sigmas = sigmas.to(x.device)
    steps, batch = len(ts) - 1, x.shape[0]
    order = 1 if solver.startswith("euler") else max(1, min(3, steps - 1))
    variant = solver.removeprefix("unipc_")
    x0_hist: list[Tensor] = []  # the last `order` x0 predictions, oldest first
    for i in range(steps):
        sigma = sigmas[i].expand(batch)
        if i == 0:
            x0 = yield x, sigma
        elif solver == "euler":
            ratio = ts[i] / ts[i - 1]
            x = ratio * x + (1.0 - ratio) * x0_hist[-1]
            x0 = yield x, sigma
        elif solver == "euler_stochastic":
            fresh = noise(x.shape).to(device=x.device, dtype=x.dtype)
            x = (1.0 - ts[i]) * x0_hist[-1] + ts[i] * fresh
            x0 = yield x, sigma
        else:
            p = min(i, order)  # warm-up: not enough history yet for the full order
            ratio, pred_w, corr_w, corr_new = _unipc_coeffs(ts[i - p : i], ts[i], p, variant)
            prev = x0_hist[-1]
            diffs = [x0_hist[-1 - k] - prev for k in range(1, p)]
            base = ratio * x + (1.0 - ratio) * prev
            x_pred = base
            for w, d in zip(pred_w, diffs):
                x_pred = x_pred - w * d
            x0 = yield x_pred, sigma
            # UniC: correct x with the evaluation just made at x_pred (no extra model call).
            x = base - corr_new * (x0 - prev)
            for w, d in zip(corr_w, diffs):
                x = x - w * d
        x0_hist = (x0_hist + [x0])[-order:]
        if callback is not None:
            callback(StepInfo(step=i, steps=steps, sigma=ts[i], x=x, denoised=x0))
    # The step to sigma = 0 lands exactly on the last x0 prediction (ratio 0).
    return x0


# --------------------------------------------------------------------------------------------- guidance


@dataclass(frozen=True)
class GuidanceConfig:
    """distilled: embedded guidance scale (fed as distilled*1000); cfg: real CFG scale, 1 = off (one
    model call per step); cfg_rescale: 0..1, CFG-rescale blend (Lin et al. 2023); cfg_min_sigma: real CFG
    only at steps with sigma >= this (guidance in a limited interval, Kynkaanniemi et al. 2024: the noisy steps
    decide layout and motion, guiding the clean ones mostly oversaturates), 0 = every step.
    cfg_after_change: the real CFG scale of the first section sampled with a new prompt, which has to pull the
    video away from the motion its history carries; None: ``cfg`` there too."""

    distilled: float = 10.0
    cfg: float = 1.0
    cfg_rescale: float = 0.0
    cfg_min_sigma: float = 0.0
    cfg_after_change: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.cfg_rescale <= 1.0:
            raise ValueError(f"cfg_rescale must be in [0, 1], got {self.cfg_rescale}")
        if not 0.0 <= self.cfg_min_sigma <= 1.0:
            raise ValueError(f"cfg_min_sigma must be in [0, 1], got {self.cfg_min_sigma}")
        if self.cfg_after_change is not None and self.cfg_after_change <= 0.0:
            raise ValueError(f"cfg_after_change must be > 0 (or None), got {self.cfg_after_change}")

    def for_section(self, prompt_changed: bool) -> "GuidanceConfig":
        """The guidance of one section: ``cfg_after_change`` as its scale when it is the first with a new prompt."""
        if not prompt_changed or self.cfg_after_change is None:
            return self
        return replace(self, cfg=self.cfg_after_change)

    @property
    def may_guide(self) -> bool:
        """Whether any section can run real CFG (and so needs a negative conditioning)."""
        return self.cfg != 1.0 or self.cfg_after_change not in (None, 1.0)


def _cfg_rescale(v_cfg: Tensor, v_pos: Tensor, rescale: float) -> Tensor:
    """Match v_cfg's per-sample std (over all non-batch dims) to v_pos's, blended by `rescale`."""
    dims = list(range(1, v_cfg.ndim))
    ratio = v_pos.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
    return torch.lerp(v_cfg, v_cfg * ratio, rescale)


def guided_denoiser(
    velocity_fn: VelocityFn, guidance: GuidanceConfig, positive: Any, negative: Any = None,
    pair_fn: PairedVelocityFn | None = None,
) -> Denoiser:
    """Wrap a velocity model as a Denoiser: x0 = x - v * sigma, with real CFG when guidance.cfg != 1.

    positive / negative are opaque conditionings passed through to velocity_fn; negative is only
    evaluated (and only required) when cfg != 1. ``pair_fn``, when given, computes both CFG branches at once
    (one batched model call instead of two: small models are bound by per-call overhead). Math runs in at
    least fp32; x0 is returned in x's dtype.
    """
    use_cfg = guidance.cfg != 1.0
    if use_cfg and negative is None:
        raise ValueError(
            f"cfg={guidance.cfg} needs a negative conditioning: pass negative=... or set cfg=1.0"
        )

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma, timestep, g, guide = model_inputs(guidance, x, sigma)
        if guide and pair_fn is not None:
            v_pos, v_neg = pair_fn(x, timestep, g, positive, negative)
        else:
            v_pos = velocity_fn(x, timestep, g, positive)
            v_neg = velocity_fn(x, timestep, g, negative) if guide else None
        return guided_x0(guidance, x, sigma, v_pos, v_neg)

    return denoise


def model_inputs(guidance: GuidanceConfig, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """For an evaluation at ``sigma`` (0-d or (B,)): sigma (B,), the model's timestep (B,) and distilled guidance
    (B,) in fp32, and whether this step runs real CFG (the negative branch too)."""
    batch = x.shape[0]
    sigma = sigma.to(x.device).reshape(-1).expand(batch)  # 0-d or (B,) -> (B,)
    timestep = sigma.float() * 1000.0
    g = torch.full((batch,), guidance.distilled * 1000.0, dtype=torch.float32, device=x.device)
    # The interval test reads sigma on the host: only when there is an interval (a device sync otherwise).
    guide = guidance.cfg != 1.0 and (guidance.cfg_min_sigma == 0.0 or float(sigma.max()) >= guidance.cfg_min_sigma)
    return sigma, timestep, g, guide


def guided_x0(guidance: GuidanceConfig, x: Tensor, sigma: Tensor, v_pos: Tensor, v_neg: Tensor | None) -> Tensor:
    """The x0 prediction x - v * sigma from the branches' velocities (real CFG when ``v_neg`` is given); math in
    at least fp32, returned in x's dtype. sigma: (B,) from :func:`model_inputs`."""
    batch, work = x.shape[0], torch.promote_types(x.dtype, torch.float32)
    v = v_pos = v_pos.to(work)
    if v_neg is not None:
        v = v_neg.to(work) + guidance.cfg * (v_pos - v_neg.to(work))
        if guidance.cfg_rescale > 0.0:
            v = _cfg_rescale(v, v_pos, guidance.cfg_rescale)
    s = sigma.to(work).reshape(batch, *([1] * (x.ndim - 1)))
    return (x.to(work) - v * s).to(x.dtype)


# ------------------------------------------------------------------------------------------------ noise


class NoiseSource:
    """Seeded noise for one job: a single CPU generator whose state carries across sections.

    Drawing on the CPU (always fp32, then cast and moved) makes the noise identical on every device.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed)

    def noise(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Standard normal noise of `shape` (e.g. (B, 16, T, H/8, W/8)); advances the generator."""
        n = torch.randn(tuple(shape), generator=self._gen, dtype=torch.float32)
        return n.to(device=device, dtype=dtype)

    def get_state(self) -> Tensor:
        """Generator state, e.g. to replay a section."""
        return self._gen.get_state()

    def set_state(self, state: Tensor) -> None:
        self._gen.set_state(state)
