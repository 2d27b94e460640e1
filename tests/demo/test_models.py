"""The demo model set: real classes at demo size, saved small, loaded by the pipeline, encoded consistently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack_rt.demo.data import encode_clip, encode_prompts, encode_video
from framepack_rt.demo.models import (
    DEMO_SIZE,
    InMemoryParts,
    build_demo_models,
    parameter_counts,
    save_demo_models,
)
from framepack_rt.demo.world import all_prompts, frames_for_latents, make_clip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    models = build_demo_models(0)
    root = tmp_path_factory.mktemp("demo_weights")
    return models, root, save_demo_models(models, root)


def test_sizes_and_parameter_counts(saved):
    models, _, sizes = saved
    counts = parameter_counts(models)
    assert 2e6 < counts["transformer"] < 6e6  # "a few million"
    assert sum(sizes.values()) < 15 * 2**20  # what the package may carry, all parts and tokenizers
    assert models.vae.config.temporal_compression_ratio == 4 and models.vae.config.spatial_compression_ratio == 8


def test_every_world_prompt_tokenizes_without_unknown_words(saved):
    models = saved[0]
    for tok in (models.tokenizer, models.tokenizer_2):
        for prompt in all_prompts():
            assert tok.unk_token_id not in tok(prompt)["input_ids"], prompt


def test_pipeline_loads_the_saved_set_with_the_features_training_used(saved):
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    models, root, _ = saved
    pipe = FramePackPipeline.from_pretrained(root, buckets="tiny")
    memory = InMemoryParts(models)
    prompt = "the blue square bounces"
    # The encoders are fp16-representable: the shipped files give the very features the cache was built with.
    assert torch.equal(pipe.parts.encode_text(prompt)[0], memory.encode_text(prompt)[0])
    assert torch.equal(pipe.parts.encode_pooled(prompt), memory.encode_pooled(prompt))
    image = make_clip(0, 1).frames[0]
    assert torch.equal(pipe.parts.encode_image(image), memory.encode_image(image))
    section = next(pipe.stream(image, prompt, steps=1))
    assert section.frames.shape == (25, *image.shape)  # a world frame (64 px) is one of the tiny buckets


def test_clip_latents_start_with_the_start_image_latent(saved):
    """Latent 0 of an encoded clip is what the pipeline computes for its first frame (the start latent), and
    the others are the video encode of the whole clip."""
    models = saved[0]
    parts = InMemoryParts(models)
    clip = make_clip(3, frames_for_latents(6))  # 21 frames: diffusers' temporal tiles (17, stride 12)
    prompts = [clip.prompt_at_latent(j) for j in range(clip.num_latents)]
    encoded = encode_clip(parts, clip.frames, prompts)
    assert encoded.latents.shape == (6, 16, 8, 8) and encoded.latents.dtype == torch.float16
    assert encoded.image_embeds.shape == (16, 64) and encoded.prompts == prompts
    pixels = torch.from_numpy(clip.frames[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    start = parts.encode_latent(pixels)[0, :, 0]
    assert torch.equal(encoded.latents[0], start.half())
    video = encode_video(parts.vae().live, clip.frames, parts.vae().scaling_factor)
    assert torch.equal(encoded.latents[1:], video[1:].half())
    table = encode_prompts(parts, ["a red ball moves right"])
    feats, pooled = table["a red ball moves right"]
    assert feats.shape[1] == 64 and pooled.shape == (64,) and feats.shape[0] >= 5
    with pytest.raises(ValueError):
        encode_clip(parts, clip.frames[:20], prompts)
    assert np.isfinite(feats.numpy()).all()


def test_from_pretrained_demo_reads_the_weights_folder_with_demo_settings(saved, monkeypatch):
    from framepack_rt import demo
    from framepack_rt.pipeline import builtin
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    monkeypatch.setattr(builtin, "DEMO_WEIGHTS_DIR", saved[1])
    pipe = FramePackPipeline.from_pretrained("demo")
    assert pipe.default_steps == demo.DEMO_STEPS and pipe.buckets == ((DEMO_SIZE, DEMO_SIZE),)
    assert pipe.default_guidance.cfg == demo.DEMO_CFG
    assert pipe.default_solver == demo.DEMO_SOLVER == "euler_stochastic"
    # --cfg changes the scale only: the demo's sigma interval stays.
    assert pipe.guidance(3.0).cfg == 3.0 and pipe.guidance(3.0).cfg_min_sigma == demo.DEMO_CFG_MIN_SIGMA
    assert pipe.guidance() == pipe.default_guidance
    # The first section after a prompt change is guided harder; --cfg 1 turns real CFG off there too, and a
    # --cfg above that scale is not lowered after a change.
    assert pipe.default_guidance.cfg_after_change == demo.DEMO_CFG_AFTER_CHANGE > demo.DEMO_CFG
    between = (demo.DEMO_CFG + demo.DEMO_CFG_AFTER_CHANGE) / 2
    assert pipe.guidance(between).cfg_after_change == demo.DEMO_CFG_AFTER_CHANGE
    assert pipe.guidance(demo.DEMO_CFG_AFTER_CHANGE + 0.5).cfg_after_change is None
    assert pipe.guidance(1.0).cfg_after_change is None and not pipe.guidance(1.0).may_guide
    assert pipe.guidance(6.0).cfg_after_change is None
    assert demo.demo_guidance(1.0).cfg_after_change is None and demo.demo_guidance(5.0).cfg_after_change is None
    image, prompt = pipe.example
    assert image.shape == (DEMO_SIZE, DEMO_SIZE, 3) and prompt == "a red ball moves right"
    assert (np.abs(image.astype(int) - (220, 40, 40)).sum(-1) < 30).sum() > 20  # the red ball is in it
    wide = np.zeros((90, 160, 3), np.uint8)  # any start image is fitted to the one square size it knows
    section = next(pipe.stream(wide, prompt, steps=1))
    assert section.frames.shape == (25, DEMO_SIZE, DEMO_SIZE, 3)


def test_from_pretrained_demo_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    from framepack_rt import demo
    from framepack_rt.pipeline import builtin
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    monkeypatch.setattr(builtin, "DEMO_WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="framepack_rt.demo.train all.*--model tiny"):
        FramePackPipeline.from_pretrained("demo")


def test_the_vae_can_tell_plain_backgrounds_apart():
    """Why the demo VAE uses one norm group: with the release's grouping at 8 channels (2 per group) a plain
    (uniform) frame normalizes to a sign pattern, so every plain latent decodes to the same colour and the
    world's backgrounds collapse into one. With one group the channel pattern, and so the colour, survives."""
    from framepack_rt.demo.models import VAE_CONFIG, build_vae

    assert VAE_CONFIG["norm_num_groups"] == 1

    def plain_decode_gap(groups: int) -> float:
        torch.manual_seed(0)
        vae = build_vae(norm_num_groups=groups).eval()
        with torch.no_grad():
            a, b = (vae.decode(torch.full((1, 16, 1, 8, 8), v)).sample for v in (0.2, 0.9))
        return float((a - b).abs().max())

    assert plain_decode_gap(4) < 0.01 < 0.1 < plain_decode_gap(1)
