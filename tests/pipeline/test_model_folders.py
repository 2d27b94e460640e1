"""Model folders: the tiny set saved in the published layouts, found, checked and loaded back."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loading must never reach a hub

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack_rt.pipeline.encoders import CLIPTextEncoder, ImageEncoder, TextEncoder
from framepack_rt.pipeline.model_folders import (
    OPTIONAL_PARTS,
    PARTS,
    MissingModelPart,
    ModelLoader,
    ModelPaths,
    resolve_model_paths,
    with_overrides,
)
from framepack_rt.pipeline.tiny_models import write_tiny_models
from framepack_rt.pipeline.vae import VideoVAE

HUNYUAN = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
REDUX = ("image_encoder", "feature_extractor")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, write_tiny_models(root, seed=0)


def copy_parts(src: Path, dst: Path, parts) -> Path:
    for part in parts:
        shutil.copytree(src / part, dst / part)
    return dst


def test_root_layout_resolves_every_part(saved):
    root, _ = saved
    paths = resolve_model_paths(root)
    assert set(vars(paths)) == set(PARTS) | set(OPTIONAL_PARTS)
    assert all(getattr(paths, p) == root / p for p in PARTS)
    assert paths.fast_decoder is None  # optional, and this folder has none


def test_separate_downloads_and_per_part_paths(saved, tmp_path):
    root, _ = saved
    # The three published downloads as separate folders; the transformer passed as its own folder.
    hunyuan = copy_parts(root, tmp_path / "HunyuanVideo", HUNYUAN)
    redux = copy_parts(root, tmp_path / "flux_redux_bfl", REDUX)
    framepack = shutil.copytree(root / "transformer", tmp_path / "FramePack_F1_I2V_HY_20250503")
    paths = resolve_model_paths(hunyuan, redux, transformer=framepack)
    assert paths.vae == hunyuan / "vae" and paths.image_encoder == redux / "image_encoder"
    assert paths.transformer == framepack


def test_per_part_path_overrides_the_root(saved, tmp_path):
    root, _ = saved
    other_vae = shutil.copytree(root / "vae", tmp_path / "my_vae")
    paths = resolve_model_paths(root, vae=other_vae)
    assert paths.vae == other_vae and paths.text_encoder == root / "text_encoder"
    # An override is used even when the root has a good copy: a bad override is an error, not a fallback.
    (other_vae / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingModelPart, match="my_vae"):
        resolve_model_paths(root, vae=other_vae)
    assert with_overrides(paths, vae=root / "vae").vae == root / "vae"


def test_missing_weights_name_the_folder_and_the_files(saved, tmp_path):
    root, _ = saved
    broken = copy_parts(root, tmp_path / "models", list(PARTS))
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingModelPart) as err:
        resolve_model_paths(broken)
    message = str(err.value)
    assert str(broken / "vae") in message
    assert "config.json and diffusion_pytorch_model.safetensors of AutoencoderKLHunyuanVideo" in message


@pytest.mark.parametrize("part, expected", [
    ("image_encoder", "SiglipVisionModel"),
    ("feature_extractor", "preprocessor_config.json"),
    ("tokenizer", "tokenizer.json"),
    ("transformer", "FramePack transformer"),
])
def test_missing_folder_is_named(saved, tmp_path, part, expected):
    root, _ = saved
    partial = copy_parts(root, tmp_path / "models", [p for p in PARTS if p != part])
    with pytest.raises(MissingModelPart) as err:
        resolve_model_paths(partial)
    assert str(partial / part) in str(err.value) and expected in str(err.value)


def test_no_root_and_unknown_parts_are_errors():
    with pytest.raises(MissingModelPart, match="pass a root folder"):
        resolve_model_paths()
    with pytest.raises(ValueError, match="unknown model parts"):
        resolve_model_paths("/nonexistent", textencoder="/x")


def test_loaded_parts_match_the_in_memory_ones(saved):
    root, tiny = saved
    loader = ModelLoader(resolve_model_paths(root), device="cpu")
    prompts = ["a dog runs on the beach", "a cat"]
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)

    with loader.using("text_encoder") as te:
        assert isinstance(te, TextEncoder) and te.dtype == torch.float32
        features, mask = te.encode(prompts)
    ref_features, ref_mask = TextEncoder(tiny.text_encoder, tiny.tokenizer).encode(prompts)
    assert te.model is None  # freed on leaving the block
    assert torch.equal(features, ref_features) and torch.equal(mask, ref_mask)

    with loader.using("clip_text_encoder") as clip:
        pooled = clip.encode(prompts)
    assert torch.equal(pooled, CLIPTextEncoder(tiny.text_encoder_2, tiny.tokenizer_2).encode(prompts))

    with loader.using("image_encoder") as ie:
        image_tokens = ie.encode(image)
    assert torch.equal(image_tokens, ImageEncoder(tiny.image_encoder, tiny.feature_extractor).encode(image))

    latents = torch.randn(1, 16, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    with loader.using("vae") as vae:
        frames = vae.decode_frames(latents)
        image_latent = vae.encode(torch.zeros(1, 3, 16, 16))
    assert torch.equal(frames, VideoVAE(tiny.vae).decode_frames(latents))
    assert torch.equal(image_latent, VideoVAE(tiny.vae).encode(torch.zeros(1, 3, 16, 16)))

    # The encoders' outputs are exactly what the tiny transformer takes.
    inputs = dict(
        hidden_states=torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1)),
        timestep=torch.tensor([900.0, 500.0]), encoder_hidden_states=features, encoder_attention_mask=mask,
        pooled_projections=pooled, image_embeds=image_tokens.expand(2, -1, -1), guidance=torch.full((2,), 10_000.0),
    )
    with loader.using("transformer") as transformer, torch.no_grad():
        velocity = transformer(**inputs)
    with torch.no_grad():
        assert torch.equal(velocity, tiny.transformer(**inputs))
    assert velocity.shape == (2, 16, 3, 4, 4)


def test_loader_dtype_defaults(saved):
    root, _ = saved
    paths: ModelPaths = resolve_model_paths(root)
    assert ModelLoader(paths)._dtype(torch.float16, None) == torch.float32  # CPU: fp32 whatever the release used
    assert ModelLoader(paths, device="cuda")._dtype(torch.bfloat16, None) == torch.bfloat16
    assert ModelLoader(paths, dtype=torch.float64)._dtype(torch.float16, None) == torch.float64
    with ModelLoader(paths).using("vae", dtype=torch.float64) as vae:
        assert vae.dtype == torch.float64
