"""FramePackPipeline.from_pretrained(quantize=, compile=): fp8 blocks and compiled blocks, built in and from folders."""

from __future__ import annotations

import torch

from framepack_rt.model.quantize import Fp8Linear
from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
from framepack_rt.pipeline.parts import TransformerOptions


def fp8_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, Fp8Linear) for m in model.modules())


def test_tiny_with_fp8_blocks_streams():
    pipe = FramePackPipeline.from_pretrained("tiny", quantize="fp8")
    assert fp8_layers(pipe.parts.transformer()) == 40  # every linear of the 2 + 2 blocks
    section = next(pipe.stream(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy(), "a ball", steps=1))
    assert section.frames.shape[1:] == (64, 64, 3)


def test_compile_option_compiles_every_block_lazily():
    model = FramePackPipeline.from_pretrained("tiny").parts.transformer()
    TransformerOptions(compile=True).apply(model, quantized=False)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def test_options_do_nothing_by_default():
    model = FramePackPipeline.from_pretrained("tiny").parts.transformer()
    TransformerOptions().apply(model, quantized=False)
    assert fp8_layers(model) == 0
    assert getattr(model.transformer_blocks[0], "_compiled_call_impl", None) is None


def test_folder_with_fp8_blocks_equals_quantizing_the_built_in_set(tmp_path):
    """From a folder, quantize="fp8" goes through the loader (quantized one tensor at a time while loading):
    the frames equal the built-in set quantized in memory."""
    import numpy as np

    from framepack_rt.pipeline.tiny_models import write_tiny_models

    write_tiny_models(tmp_path)  # the built-in tiny set's weights
    folder = FramePackPipeline.from_pretrained(tmp_path, buckets="tiny", quantize="fp8")
    built_in = FramePackPipeline.from_pretrained("tiny", quantize="fp8")
    assert fp8_layers(folder.parts.transformer()) == 40
    image = np.zeros((64, 64, 3), np.uint8)
    a = next(folder.stream(image, "a ball", steps=2, seed=3)).frames
    b = next(built_in.stream(image, "a ball", steps=2, seed=3)).frames
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # fp32 reassociation at most
