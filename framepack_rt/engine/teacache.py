"""TeaCache step skipping as a policy object (the model keeps no cache state).

Per step the model shows the policy its probe, the first double-stream block's modulated video input. The
policy accumulates the rescaled relative L1 change of the probe; while the sum stays below the threshold the
blocks are skipped and the cached residual (blocks' output minus input) is reused. First and last steps
always run. Coefficients are those released for HunyuanVideo / FramePack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HUNYUAN_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


@dataclass(frozen=True)
class TeaCacheConfig:
    """threshold: rel-L1 budget between full runs (0 disables skipping; 0.15 is the release default, ~2x,
    not lossless). coefficients: rescaling polynomial, highest power first."""

    threshold: float = 0.15
    coefficients: tuple[float, ...] = HUNYUAN_COEFFICIENTS

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"TeaCache threshold must be >= 0 (0 turns skipping off), got {self.threshold}")


class TeaCache:
    """One denoising branch's cache for one section; implements the model's ``StepCache`` protocol.

    Call :meth:`start` before each section's ``steps`` model calls; each ``should_run`` is one step.
    """

    def __init__(self, config: TeaCacheConfig) -> None:
        self.config = config
        self.steps = 0
        self.step = 0
        self.steps_run = 0
        self.steps_skipped = 0
        self._accumulated = 0.0
        self._previous_probe: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None

    def start(self, steps: int) -> None:
        """Begin a section of ``steps`` steps: counters and cached tensors are cleared."""
        self.steps, self.step = steps, 0
        self.steps_run = self.steps_skipped = 0
        self._accumulated = 0.0
        self._previous_probe = self._residual = None

    def _rescaled_change(self, probe: torch.Tensor) -> float:
        previous = self._previous_probe
        # Computed on the probe's device; only the scalar comes back to decide.
        rel = ((probe - previous).abs().mean() / previous.abs().mean()).float()
        value = torch.zeros((), dtype=torch.float32, device=rel.device)
        for c in self.config.coefficients:  # Horner
            value = value * rel + c
        return float(value)

    def should_run(self, probe: torch.Tensor) -> bool:
        if self.steps == 0:
            raise RuntimeError("TeaCache.start(steps) must be called before the section's first step")
        edge = self.step == 0 or self.step >= self.steps - 1
        if edge or self.config.threshold == 0 or self._residual is None:
            run = True
        else:
            self._accumulated += self._rescaled_change(probe)
            run = self._accumulated >= self.config.threshold
        if run:
            self._accumulated = 0.0
        self._previous_probe = probe
        self.step += 1
        if run:
            self.steps_run += 1
        else:
            self.steps_skipped += 1
        return run

    def residual(self) -> torch.Tensor:
        assert self._residual is not None, "should_run() said run before any residual existed"
        return self._residual

    def remember(self, residual: torch.Tensor) -> None:
        self._residual = residual
