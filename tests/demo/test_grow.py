"""Growing a trained transformer deeper (demo/grow.py): the same function, new blocks that learn."""

from __future__ import annotations

import pytest
import torch

from framepack_rt.demo import train as T
from framepack_rt.demo.grow import deepen, old_positions
from framepack_rt.model.transformer import FramePackTransformer


def _trained_like(tiny_config) -> FramePackTransformer:
    """Random weights, with every gate non-zero (a trained model's are): deepening must keep them."""
    model = FramePackTransformer.from_config(tiny_config, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_old_blocks_spread_evenly_with_the_first_one_first():
    assert old_positions(3, 6) == [0, 2, 4]
    assert old_positions(2, 5) == [0, 2]
    assert old_positions(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least as many"):
        old_positions(3, 2)


@pytest.mark.parametrize("double, single", [(4, 4), (3, 2), (2, 5)])
def test_deepened_model_computes_what_the_trained_one_computes(tiny_config, make_inputs, double, single):
    model = _trained_like(tiny_config)
    grown = deepen(model, double, single).eval()
    assert (len(grown.transformer_blocks), len(grown.single_transformer_blocks)) == (double, single)
    assert grown.config.num_layers == double and grown.config.num_single_layers == single
    inputs = make_inputs(tiny_config, text_lengths=(7, 10))
    with torch.no_grad():
        expected, got = model(**inputs), grown(**inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the new blocks are not copies: their weights are their own (random), only their gates are zero
    for name in ("transformer_blocks", "single_transformer_blocks"):
        old_blocks, new_blocks = getattr(model, name), getattr(grown, name)
        kept = old_positions(len(old_blocks), len(new_blocks))
        for i, block in enumerate(new_blocks):
            q = block.attn.to_q.weight
            if i in kept:  # a trained block, as it was
                assert torch.equal(q, old_blocks[kept.index(i)].attn.to_q.weight)
            else:
                assert not any(torch.equal(q, old.attn.to_q.weight) for old in old_blocks)


def test_new_blocks_learn_from_the_first_step(tiny_config, make_inputs):
    grown = deepen(_trained_like(tiny_config), 4, 4)
    inputs = make_inputs(tiny_config)
    grown(**inputs).pow(2).mean().backward()
    new_block = grown.transformer_blocks[1]  # between the trained blocks 0 and 1
    dim = new_block.norm1.linear.out_features // 6
    gate_rows = new_block.norm1.linear.weight.grad[2 * dim : 3 * dim]
    assert gate_rows.abs().sum() > 0  # the zero gates get gradients, so the block switches itself on
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    grown(**inputs).pow(2).mean().backward()
    assert new_block.attn.to_q.weight.grad.abs().sum() > 0  # and after one step its inner weights learn too


def test_deepen_refuses_a_model_that_differs_outside_its_blocks(tiny_config):
    model = _trained_like(tiny_config)
    model.image_projection = None  # its config still says it has one, so the grown model would miss weights
    with pytest.raises(ValueError, match="missing .*image_projection"):
        deepen(model, 4, 4)


def test_deepen_needs_a_trained_model_and_sane_counts(tmp_path):
    with pytest.raises(SystemExit):
        T.parser().parse_args(["transformer", "--out", str(tmp_path), "--deepen", "6"])
    args = T.parser().parse_args(["transformer", "--out", str(tmp_path), "--deepen", "6,6"])
    with pytest.raises(ValueError, match="--init"):
        T.build_transformer(args, None)


def test_train_command_deepens_the_init_and_resumes(tmp_path, tiny_config):
    from tests.demo.test_train import _args, _log, _tiny_cache

    init = tmp_path / "init"
    cfg = T.build_transformer(T.parser().parse_args(["transformer", "--out", str(tmp_path), "--tiny"]), None).config
    start = FramePackTransformer.from_config(cfg, seed=1)
    start.save_pretrained(init)
    _tiny_cache(tmp_path)
    T.train_transformer(_args(tmp_path, "--init", str(init), "--deepen", "3,4", "--steps", "2"))
    T.train_transformer(_args(tmp_path, "--init", str(init), "--deepen", "3,4", "--steps", "3"))  # resumes
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]
    out = FramePackTransformer.from_pretrained(tmp_path / "transformer")
    assert (out.config.num_layers, out.config.num_single_layers) == (3, 4)
