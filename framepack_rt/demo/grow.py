"""Grow a trained transformer deeper without changing what it computes, then train on from there.

The demo transformer's quality within a section stopped rising with more steps at its size (TRAINING.md, issue 19),
and training a bigger one from scratch costs the hours the first one took. Inserting new blocks whose residual
gates are zero (the adaLN-Zero initialisation of DiT) keeps the trained function exactly: each new block adds
``gate * f(x) = 0`` at first, and its gates get gradients from the first step, so training continues from the
trained model's quality with twice the depth.
"""

from __future__ import annotations

import dataclasses

import torch

from framepack_rt.model.blocks import AdaLNZero
from framepack_rt.model.transformer import FramePackTransformer

DOUBLE_GATES = (2, 5)  # norm1 / norm1_context chunks: shift, scale, gate, shift_mlp, scale_mlp, gate_mlp
SINGLE_GATES = (2,)  # norm chunks: shift, scale, gate


def zero_gates(norm: AdaLNZero, gates: tuple[int, ...]) -> None:
    """Zero the rows of ``norm``'s linear that make the given modulation chunks: those gates are then 0."""
    dim = norm.linear.out_features // norm.chunks
    with torch.no_grad():
        for g in gates:
            norm.linear.weight[g * dim : (g + 1) * dim].zero_()
            norm.linear.bias[g * dim : (g + 1) * dim].zero_()


def old_positions(old: int, new: int) -> list[int]:
    """Where the ``old`` trained blocks go among ``new``: spread evenly, the first one first (TeaCache probes
    block 0's input modulation, so block 0 stays the trained one)."""
    if new < old:
        raise ValueError(f"cannot grow {old} blocks into {new}: give at least as many blocks as the model has")
    return [i * new // old for i in range(old)]


def deepen(model: FramePackTransformer, num_layers: int, num_single_layers: int,
           seed: int = 0) -> FramePackTransformer:
    """A transformer with ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks that
    computes exactly what ``model`` computes: its blocks spread evenly, new blocks between them (random weights,
    seeded, with zero residual gates). Everything outside the blocks is copied."""
    cfg = dataclasses.replace(model.config, num_layers=num_layers, num_single_layers=num_single_layers)
    grown = FramePackTransformer.from_config(cfg, dtype=model.dtype, seed=seed)
    for name, gates, norms in (("transformer_blocks", DOUBLE_GATES, ("norm1", "norm1_context")),
                               ("single_transformer_blocks", SINGLE_GATES, ("norm",))):
        old_blocks, new_blocks = getattr(model, name), getattr(grown, name)
        keep = old_positions(len(old_blocks), len(new_blocks))
        for i, block in enumerate(new_blocks):
            if i in keep:
                block.load_state_dict(old_blocks[keep.index(i)].state_dict())
            else:
                for norm in norms:
                    zero_gates(getattr(block, norm), gates)
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks)}
    loaded = grown.load_state_dict(rest, strict=False)  # the blocks' keys are the only ones left out
    missing = [k for k in loaded.missing_keys if not k.startswith(blocks)]
    if loaded.unexpected_keys or missing:
        raise ValueError(f"the model's modules outside its blocks do not match its config (unexpected "
                         f"{loaded.unexpected_keys[:4]}, missing {missing[:4]}): deepen a transformer loaded "
                         "from its own folder (FramePackTransformer.from_pretrained), not one changed after loading")
    return grown
