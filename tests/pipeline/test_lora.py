"""LoRA in the pipeline: load_lora, per-stream scales on one shared model, live changes, fusing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack_rt.model.lora import LoraError
from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

PROMPT = "a red ball moves right"


def write_peft(path, transformer, seed=0, size=0.5, rank=4):
    """A PEFT-layout LoRA on every linear of the first double- and single-stream block, written by hand."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if name.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.")) and hasattr(module, "in_features"):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * size
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * size
    save_file(state, str(path))
    return path


def frames(stream, n):
    return [next(stream).frames for _ in range(n)]


@pytest.fixture(scope="module")
def lora_pipe(tmp_path_factory, start_picture):
    """The tiny pipeline with one LoRA ("style", scale 1), and its frames before the LoRA was loaded."""
    img = start_picture
    pipe = FramePackPipeline.from_pretrained("tiny")
    plain = frames(pipe.stream(img, PROMPT, steps=2), 3)
    path = write_peft(tmp_path_factory.mktemp("lora") / "style.safetensors", pipe.parts.transformer())
    assert pipe.load_lora(path) == "style"
    return pipe, plain


def test_scale_zero_equals_no_lora_and_scale_one_differs(lora_pipe, image):
    pipe, plain = lora_pipe
    assert pipe.lora_info() == [{"name": "style", "scale": 1.0, "format": "peft", "layers": 20, "fused": False}]
    off = pipe.stream(image, PROMPT, steps=2)
    assert off.set_lora_scale("style", 0.0) == 0
    for got, want in zip(frames(off, 2), plain):
        assert np.array_equal(got, want)
    on = frames(pipe.stream(image, PROMPT, steps=2), 1)[0]
    assert np.abs(on.astype(int) - plain[0]).mean() > 1.0


def test_streams_keep_their_own_scales_on_the_shared_model(lora_pipe, image):
    """Two sessions' streams interleaved section by section, as the server's device worker runs them."""
    pipe, plain = lora_pipe
    solo_on = frames(pipe.stream(image, PROMPT, steps=2), 2)
    a, b = pipe.stream(image, PROMPT, steps=2), pipe.stream(image, PROMPT, steps=2)
    b.set_lora_scale("style", 0.0)
    got_a, got_b = [], []
    for _ in range(2):
        got_a.append(next(a).frames)
        got_b.append(next(b).frames)
    assert all(np.array_equal(x, y) for x, y in zip(got_a, solo_on))
    assert all(np.array_equal(x, y) for x, y in zip(got_b, plain))
    assert pipe.lora_scales() == {"style": 1.0}  # the pipeline's default for new streams is untouched


def test_a_scale_set_mid_stream_applies_from_the_section_it_names(lora_pipe, image):
    pipe, plain = lora_pipe
    stream = pipe.stream(image, PROMPT, steps=2)
    stream.set_lora_scale("style", 0.0)
    first = next(stream).frames
    section = stream.set_lora_scale("style", 1.0)
    rest = [next(stream) for _ in range(section)]  # sections 1 .. section
    assert np.array_equal(first, plain[0])
    for s in rest:
        if s.index < section:
            assert np.array_equal(s.frames, plain[s.index])
        else:
            assert s.index == section and np.abs(s.frames.astype(int) - plain[s.index]).mean() > 1.0
    assert stream.lora_scales == {"style": 1.0}


def test_bad_requests_say_what_is_wrong(lora_pipe, image):
    pipe, _ = lora_pipe
    stream = pipe.stream(image, PROMPT, steps=2)
    with pytest.raises(LoraError, match="no LoRA named 'nope'; loaded: style"):
        stream.set_lora_scale("nope", 1.0)
    with pytest.raises(LoraError, match="out of range"):
        stream.set_lora_scale("style", 5.0)
    stream.stop()


def test_fused_pipeline_matches_unmerged_and_fixes_scales(tmp_path, image):
    pipe = FramePackPipeline.from_pretrained("tiny")
    with pytest.raises(LoraError, match="no LoRA is loaded"):
        pipe.check_lora_scale("style", 1.0)
    path = write_peft(tmp_path / "style.safetensors", pipe.parts.transformer())
    with pytest.raises(LoraError, match="--fuse-lora needs at least one --lora"):
        pipe.load_loras([], fuse=True)
    assert pipe.load_loras([(path, 0.5)]) == ["style"]  # what --lora FILE:0.5 does
    unmerged = frames(pipe.stream(image, PROMPT, steps=2), 1)[0]
    pipe.fuse_lora()
    assert pipe.lora_info()[0]["fused"] is True
    stream = pipe.stream(image, PROMPT, steps=2)
    fused = next(stream).frames
    assert np.abs(fused.astype(int) - unmerged).max() <= 2  # fp32 rounding of the merged weights
    assert stream.set_lora_scale("style", 0.5) >= 1  # unchanged: allowed
    with pytest.raises(LoraError, match="fused into the weights.*fixed at 0.5"):
        stream.set_lora_scale("style", 1.0)
    stream.stop()


def test_cli_lora_flags_fail_early_and_clearly(tmp_path, capsys):
    from framepack_rt.commands.cli import main

    out = str(tmp_path / "out.mp4")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--seconds", "1", "--out", out, "--lora", f"{tmp_path / 'missing.safetensors'}:0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --lora" in err and "no file" in err and "missing.safetensors" in err
    save_file({}, str(tmp_path / "a.safetensors"))
    with pytest.raises(SystemExit):
        main(["generate", "--seconds", "1", "--out", out, "--lora", f"{tmp_path / 'a.safetensors'}:7"])
    assert "out of range" in capsys.readouterr().err
    assert main(["serve", "--fuse-lora"]) == 2
    assert "--fuse-lora needs at least one --lora" in capsys.readouterr().err
    assert main(["generate", "--seconds", "1", "--out", out, "--lora", str(tmp_path / "a.safetensors"),
                 "--sequence-parallel", "2"]) == 2
    assert "not supported yet" in capsys.readouterr().err
