"""Error recycling (demo/recycling.py): the bank of one-step errors and the histories it corrupts."""

from __future__ import annotations

import json

import pytest
import torch

from framepack_rt.demo import train as T
from framepack_rt.demo.data import WindowDataset, collate
from framepack_rt.demo.recycling import ErrorBank
from framepack_rt.engine.schedules import f1_layout

from tests.demo.test_train import _args, _log, _tiny_cache, synthetic_cache


def _history(batch: int = 6, k: int = 19, empty: int = 7) -> torch.Tensor:
    """(B, 2, K, 2, 2) history: ``empty`` all-zero slots before the clip start, then ones."""
    history = torch.ones(batch, 2, k, 2, 2)
    history[:, :, :empty] = 0.0
    return history


def test_the_bank_keeps_only_low_sigma_errors_and_overwrites_the_oldest():
    bank = ErrorBank(capacity=3, window=9, max_sigma=0.5, min_fill=1)
    errors = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 9, 2, 2)
    bank.put(errors, torch.tensor([0.1, 0.7, 0.5, 0.2]))  # the second is too noisy to bank
    assert len(bank) == 3 and bank.count == 3
    assert [float(e[0, 0, 0, 0]) for e in bank.errors] == [0.0, 2.0, 3.0]
    bank.put(errors[:1] + 10.0, torch.tensor([0.0]))
    assert len(bank) == 3 and float(bank.errors[0, 0, 0, 0, 0]) == 10.0  # the ring wrapped onto the oldest


def test_corrupt_changes_nothing_until_the_bank_is_filled_or_when_off():
    bank = ErrorBank(capacity=8, window=9, min_fill=4)
    history, g = _history(), torch.Generator().manual_seed(0)
    assert bank.corrupt(history, 1.0, g) is history  # empty
    bank.put(torch.ones(3, 2, 9, 2, 2), torch.zeros(3))
    assert bank.corrupt(history, 1.0, g) is history  # 3 < min_fill
    bank.put(torch.ones(3, 2, 9, 2, 2), torch.zeros(3))
    assert bank.corrupt(history, 0.0, g) is history  # off
    assert not torch.equal(bank.corrupt(history, 1.0, g), history)


def test_corrupt_adds_scaled_banked_errors_to_real_slots_only():
    bank = ErrorBank(capacity=16, window=9, min_fill=1)
    bank.put(torch.full((16, 2, 9, 2, 2), 0.5), torch.zeros(16))
    history = _history(batch=400)
    before = history.clone()
    out = bank.corrupt(history, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(history, before)  # a new tensor: the batch is not changed in place
    assert torch.equal(out[:, :, :7], history[:, :, :7])  # slots before the clip start stay exact zeros
    added = (out - history)[:, :, 7:]
    per_sample = added.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one scale a sample over its whole history
    scale = per_sample[:, 0] / 0.5
    assert scale.min() >= 0.0 and scale.max() <= 1.0
    touched = (scale > 0).float().mean().item()
    assert 0.4 < touched < 0.6  # about half the samples, as asked
    assert scale[scale > 0].mean().item() == pytest.approx(0.5, abs=0.08)  # uniform in [0, 1]


def test_corrupt_refuses_errors_that_do_not_fit_the_history():
    bank = ErrorBank(capacity=4, window=9, min_fill=1)
    bank.put(torch.ones(4, 2, 9, 3, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="do not fit history"):
        bank.corrupt(_history(), 1.0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="probability"):
        bank.corrupt(_history(), 1.5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not fit a bank"):
        bank.put(torch.ones(1, 2, 9, 2, 2), torch.zeros(1))


class _HalfInput(torch.nn.Module):
    """A stand-in transformer whose velocity is half its input, so the one-step guess is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, hidden_states: torch.Tensor, **_) -> torch.Tensor:
        return 0.5 * hidden_states * self.weight


def test_the_loss_banks_the_steps_one_step_errors_and_is_unchanged_when_not_recycling():
    cache = synthetic_cache(text_dim=32)
    ds = WindowDataset(cache)
    batch = collate([ds[i] for i in range(8)], cache.prompts)
    model, layout = _HalfInput(), f1_layout(9)
    plain = T.flow_matching_loss(model, batch, layout, torch.Generator().manual_seed(3), shift=1.0)
    bank = ErrorBank(capacity=8, window=9, max_sigma=1.0, min_fill=1)
    banked = T.flow_matching_loss(model, batch, layout, torch.Generator().manual_seed(3), shift=1.0, bank=bank)
    assert torch.equal(plain, banked)  # recycle 0: the same step
    g = torch.Generator().manual_seed(3)  # the loss's own draws, in its order: sigma, then the noise
    sigma = torch.rand(8, generator=g).view(8, 1, 1, 1, 1)
    noise = torch.randn(batch["target"].shape, generator=g)
    x = (1 - sigma) * batch["target"] + sigma * noise
    guess = x - sigma * 0.5 * x
    assert len(bank) == 8
    torch.testing.assert_close(bank.errors, guess - batch["target"])


def test_train_transformer_with_error_recycling(tmp_path):
    _tiny_cache(tmp_path)
    T.train_transformer(_args(tmp_path, "--steps", "3", "--error-recycling", "0.5"))
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _log(tmp_path))
    with pytest.raises(ValueError, match="--error-recycling"):
        T.train_transformer(_args(tmp_path, "--steps", "4", "--error-recycling", "2"))
    with pytest.raises(ValueError, match="--error-max-sigma"):
        T.train_transformer(_args(tmp_path, "--steps", "4", "--error-recycling", "0.5", "--error-max-sigma", "0"))
    assert json.loads((tmp_path / "transformer_log.jsonl").read_text().splitlines()[-1])["step"] == 3
