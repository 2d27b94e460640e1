"""FramePackPipeline end to end on the tiny models: stream, prompt changes, modes, folders, low-VRAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline


def test_stream_f1_frames_and_prompt_change(pipe, image):
    # Decoded one after the other: with decode overlap section 1 samples before section 0 is handed over, so a
    # prompt set between the two applies from 2 (tests/pipeline/test_decode_ahead.py).
    stream = pipe.stream(image, "a red ball moves right", steps=2, decode_overlap=False)
    first = next(stream)
    assert first.frames.dtype == np.uint8 and first.frames.shape == (25, 64, 64, 3)  # 33 minus 8 held back
    assert first.first_frame == 0 and first.prompt == "a red ball moves right"
    assert stream.set_prompt("a red ball moves left") == 1
    second, third = next(stream), next(stream)
    assert (second.first_frame, len(second.frames)) == (25, 36)
    assert (third.first_frame, len(third.frames)) == (61, 36)
    assert second.prompt == third.prompt == "a red ball moves left"
    assert second.sample_ms > 0 and second.decode_ms > 0 and second.ms == pytest.approx(second.sample_ms + second.decode_ms)


def test_prompt_set_mid_section_applies_from_the_next(pipe, image):
    acks = []
    holder = {}

    def on_step(progress):
        assert progress.preview.dtype == np.uint8 and progress.preview.shape[-1] == 3
        if progress.section == 0 and progress.step == 0:
            acks.append(holder["s"].set_prompt("the ball stops"))

    holder["s"] = stream = pipe.stream(image, "a red ball moves right", steps=2, on_step=on_step)
    prompts = [next(stream).prompt for _ in range(2)]
    assert acks == [1] and prompts == ["a red ball moves right", "the ball stops"]


def test_prompt_set_while_decoding_applies_from_the_next(pipe, image):
    stream = pipe.stream(image, "a red ball moves right", steps=2, decode_overlap=False)
    decode = stream._decode
    acks = []

    def decode_and_set(latents):
        acks.append(stream.set_prompt("the ball stops"))  # section 0 is sampled, not yet decoded
        return decode(latents)

    stream._decode = decode_and_set
    first = next(stream)
    stream._decode = decode
    assert acks == [1] and first.prompt == "a red ball moves right"
    assert next(stream).prompt == "the ball stops"


@pytest.mark.parametrize("mode", ["f1", "inverted"])
def test_finite_clip_frame_count(pipe, image, mode):
    # 2 s -> round(60 / 36) = 2 sections of 9 latents + the start latent = 19 latents -> 73 frames
    frames = pipe.generate(image, "a ball", seconds=2, steps=2, mode=mode)
    assert frames.shape == (73, 64, 64, 3)


def test_inverted_with_end_image_and_sections_come_end_first(pipe, image):
    sections = list(pipe.stream(image, "a ball", seconds=2, steps=2, mode="inverted", end_image=image[::-1]))
    assert [s.index for s in sections] == [0, 1] and sections[-1].is_last
    assert sections[0].first_frame > sections[1].first_frame == 0


def test_stream_frames_equal_whole_clip_decode(pipe, image):
    """The joins are the decoder's own: streaming output equals decoding all latents at once."""
    latents = []
    stream = pipe.stream(image, "a ball", seconds=3, steps=2)
    gen = stream._gen
    original = gen._generate

    def recording(k, cond):
        out = original(k, cond)
        latents.append(out.output_latents)
        return out

    gen._generate = recording
    chunks = [s.frames for s in stream]
    clip = torch.cat([gen.start_latent] + latents, dim=2)
    whole = pipe.parts.vae().decode_frames(clip)[0].numpy()
    assert np.array_equal(np.concatenate(chunks), whole)


def test_pause_resume_and_stop(pipe, image):
    holder = {}

    def on_step(progress):
        if progress.section == 1:
            holder["s"].stop()

    holder["s"] = stream = pipe.stream(image, "a ball", steps=2, on_step=on_step)
    stream.pause()
    stream.resume()
    assert next(stream).index == 0
    with pytest.raises(StopIteration):  # stopped inside section 1's first step
        next(stream)
    assert stream.sections_done == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(mode="sideways"), "unknown mode"), (dict(seconds=0), "seconds must be > 0"),
     (dict(mode="inverted"), "pass seconds"), (dict(end_image=np.zeros((8, 8, 3), np.uint8)), "needs mode 'inverted'"),
     (dict(solver="dpm++"), "unknown solver 'dpm\\+\\+': choose one of")],
    ids=["bad-mode", "zero-seconds", "inverted-without-seconds", "end-image-in-f1", "bad-solver"],
)
def test_bad_arguments_explain(pipe, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.stream(image, "a ball", **kwargs)


@pytest.mark.parametrize("low_vram", [False, True], ids=["kept-loaded", "low-vram"])
def test_folder_layout_loads_through_the_real_path(tmp_path, pipe, image, low_vram):
    from framepack_rt.pipeline.tiny_models import write_tiny_models

    write_tiny_models(tmp_path)  # same seed as the built-in tiny set
    budget_gb = None
    if low_vram:  # the budget covers everything: what the tiny model's step, decode and VAE need, + 1 MiB of weights
        budget_gb = (_tiny_non_weight_bytes(tmp_path) + 2**20) / 2**30
    folder_pipe = FramePackPipeline.from_pretrained(tmp_path, buckets="tiny", low_vram=low_vram,
                                                    memory_budget_gb=budget_gb)
    if low_vram:
        folder_pipe.parts.transformer()
        streamer = folder_pipe.parts.streamer
        assert len(streamer.streamed) == 4  # ~1 MiB of weights: every tiny block streams
        assert 2**20 - 64 <= streamer.budget_bytes <= 2**20
    a = next(pipe.stream(image, "a ball", steps=2, seed=3)).frames
    b = next(folder_pipe.stream(image, "a ball", steps=2, seed=3)).frames
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # fp32 reassociation at most


def _tiny_non_weight_bytes(folder) -> int:
    from dataclasses import asdict

    from framepack_rt.pipeline.devices import Placement
    from framepack_rt.pipeline.media import BUCKET_SETS
    from framepack_rt.pipeline.memory import estimate_folders
    from framepack_rt.pipeline.model_folders import resolve_model_paths

    largest = max(BUCKET_SETS["tiny"], key=lambda hw: hw[0] * hw[1])
    estimate = estimate_folders(asdict(resolve_model_paths(folder)), Placement(torch.device("cpu")), low_vram=True,
                                budget_bytes=2**30, frame=largest)
    return estimate.plan.non_weight_bytes


def test_missing_part_names_the_folder(tmp_path):
    from framepack_rt.pipeline.model_folders import MissingModelPart
    from framepack_rt.pipeline.tiny_models import write_tiny_models

    write_tiny_models(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "vae")
    with pytest.raises(MissingModelPart, match="vae"):
        FramePackPipeline.from_pretrained(tmp_path)


def test_guidance_and_negative_prompt_reach_the_generator(pipe, image):
    """No guidance: the model's default (cfg 1: no negative is encoded). Real CFG: the negative prompt given,
    else none (the engine then uses zero embeddings)."""
    from framepack_rt.engine.sampling import GuidanceConfig

    plain = pipe.stream(image, "a ball", steps=1)
    assert plain._gen.sampler.guidance == pipe.default_guidance and plain._gen._negative is None
    guided = pipe.stream(image, "a ball", steps=1, guidance=GuidanceConfig(cfg=2.0), negative_prompt="a blur")
    assert guided._gen.sampler.guidance.cfg == 2.0 and guided._gen._negative.prompt == "a blur"
    assert next(guided).frames.shape[0] > 0
    assert pipe.stream(image, "a ball", steps=1, guidance=GuidanceConfig(cfg=2.0))._gen._negative is None
    assert pipe.stream(image, "a ball", steps=1, negative_prompt="a blur")._gen._negative is None  # cfg 1: unused
    # CFG only after a prompt change still needs the negative prompt for those sections.
    after = pipe.stream(image, "a ball", steps=1, guidance=GuidanceConfig(cfg_after_change=3.0), negative_prompt="a blur")
    assert after._gen._negative.prompt == "a blur"


def test_solver_default_and_override_reach_the_generator(pipe, image):
    """stream() samples with the pipeline's default_solver unless told; a seeded stochastic stream replays
    exactly and differs from the ODE solver's."""
    assert pipe.default_solver == "unipc_bh1"  # folders and tiny: the release's solver
    assert pipe.stream(image, "a ball", steps=2)._gen.sampler.solver == "unipc_bh1"

    def first_section(solver):
        stream = pipe.stream(image, "a ball", steps=3, seed=5, solver=solver)
        assert stream._gen.sampler.solver == solver
        frames = next(stream).frames
        stream.stop()
        return frames

    a, b = first_section("euler_stochastic"), first_section("euler_stochastic")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, first_section("unipc_bh1"))
