"""Error recycling: train on histories that carry the model's own kind of mistakes, banked as it trains.

Running free, the transformer reads its own sections back as history, and the errors it made there (a ball
turned yellow, lost contrast, a second blob) are unlike anything in the clean clips it learned from, nor like
Gaussian noise (``--history-noise``). DAgger (demo/onpolicy.py) records such histories by running the model,
which costs seconds a window. Error recycling (after Stable Video Infinity's error-recycling fine-tuning, Li et
al., 2025) gets them from the training step itself: every step already predicts the target's velocity, so
``x0_hat = x_sigma - sigma v`` is the model's one-step guess of the clean window and ``x0_hat - x0`` its error.
Those errors go into a bank, preallocated and overwritten in turn, and a fraction of later samples read a
history with banked errors added, while their target stays the clean continuation.

    bank = ErrorBank(capacity=256, window=9)
    history = bank.corrupt(history, probability=0.5, generator=g)   # before packing the context
    ...
    bank.put(x0_hat - x0, sigma)                                     # after the forward, detached

The bank lives in one process (not checkpointed: a resumed run refills it within a few steps).
"""

from __future__ import annotations

import torch

from framepack_rt.demo.data import latent_slots


class ErrorBank:
    """A ring of ``capacity`` error windows (C, window, h, w), filled from training steps whose sigma is at
    most ``max_sigma`` (at high noise the one-step guess is a blur, not the kind of mistake a sampled section
    keeps). Nothing is drawn from it before it holds ``min_fill`` windows."""

    def __init__(self, capacity: int = 256, window: int = 9, max_sigma: float = 0.5, min_fill: int = 32) -> None:
        if capacity < 1 or window < 1:
            raise ValueError(f"capacity and window must be >= 1, got {capacity} and {window}")
        if not 0.0 < max_sigma <= 1.0:
            raise ValueError(f"max_sigma must be in (0, 1], got {max_sigma}")
        self.capacity, self.window, self.max_sigma = capacity, window, max_sigma
        self.min_fill = min(min_fill, capacity)
        self.errors: torch.Tensor | None = None  # allocated on the first put, when the latent shape is known
        self.count = 0  # windows put so far (the ring's write position is count % capacity)

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    @torch.no_grad()
    def put(self, errors: torch.Tensor, sigma: torch.Tensor) -> None:
        """errors (B, C, window, h, w), sigma (B,): bank the samples with sigma <= max_sigma (in place)."""
        if errors.ndim != 5 or errors.shape[2] != self.window:
            raise ValueError(f"expected errors (B, C, {self.window}, h, w), got {tuple(errors.shape)}")
        keep = errors[sigma.to(errors.device) <= self.max_sigma].detach().float()
        if self.errors is None:  # on the training device: no copy to the host and back every step
            self.errors = torch.zeros((self.capacity, *errors.shape[1:]), device=errors.device)
        elif keep.shape[1:] != self.errors.shape[1:]:
            raise ValueError(f"errors of shape {tuple(keep.shape[1:])} do not fit a bank of "
                             f"{tuple(self.errors.shape[1:])}")
        for e in keep:
            self.errors[self.count % self.capacity] = e
            self.count += 1

    def corrupt(self, history: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
        """history (B, C, K, h, w), oldest first: each sample, with ``probability``, plus banked errors laid
        end to end over its K slots (newest slots from one banked window, older ones from others), each sample
        scaled by a factor drawn uniformly in [0, 1]. Slots that are all zero (before a clip's start) stay
        exactly zero, as the stream holds them. Returns a new tensor; the input is not changed."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        b, _, k = history.shape[:3]
        # Drawn whatever the bank holds, so the rest of the step's noise does not depend on how full it is.
        chosen = torch.rand(b, generator=generator) < probability
        scale = torch.rand(b, generator=generator)
        pieces = -(-k // self.window)
        picks = torch.randint(0, max(len(self), 1), (b, pieces), generator=generator)
        if len(self) < self.min_fill or not probability or not chosen.any():
            return history
        errors = self.errors[picks.flatten().to(self.errors.device)]
        errors = errors.view(b, pieces, *self.errors.shape[1:])  # (B, P, C, w, h, w)
        errors = errors.permute(0, 2, 1, 3, 4, 5).flatten(2, 3)[:, :, -k:]  # (B, C, P w -> K, h, w)
        if errors.shape[-2:] != history.shape[-2:] or errors.shape[1] != history.shape[1]:
            raise ValueError(f"banked errors {tuple(self.errors.shape[1:])} do not fit history "
                             f"{tuple(history.shape[1:])}")
        weight = (chosen.float() * scale).view(b, 1, 1, 1, 1).to(history.device)
        return history + (weight * errors.to(history.device) * latent_slots(history)).to(history.dtype)
