"""The demo's model set: every part is the class the 13B release uses, at a small size, built in code.

* transformer: ``FramePackTransformer`` (dim 128 = 4 heads x 32, 3 + 3 blocks): about 3.6 M parameters;
* vae: ``AutoencoderKLHunyuanVideo``, 16 latent channels, 8x spatial and 4x temporal compression kept,
  channels (8, 16, 32, 64): full-resolution stages stay 8 channels wide because CPU decode time is spent there;
* text encoders: ``LlamaModel`` (features 64 wide) and ``CLIPTextModel`` (pooled 64), word-level tokenizers
  over the tiny set's vocabulary plus the world's words;
* image encoder: ``SiglipVisionModel`` (64 px input, 16 px patches: 16 tokens 64 wide).

The encoders keep their seeded random weights (frozen, as the release keeps its encoders frozen): a random
network is a fixed, deterministic featurizer, and the transformer's token refiner learns to read it. Only the
VAE and the transformer are trained. ``save_demo_models`` writes the published folder layout in fp16 (the
loader casts back to fp32 on the CPU), which keeps the whole set far below the 15 MB the package may carry.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from framepack_rt.model.config import FramePackConfig
from framepack_rt.demo import DEMO_SIZE, DEMO_STEPS  # noqa: F401  (re-exported: the demo's constants)
from framepack_rt.demo.world import vocabulary
from framepack_rt.pipeline import tiny_models
from framepack_rt.pipeline.tiny_models import TinyModels, _seeded, _vocabulary

ENCODER_SEED = 0  # the frozen encoders' weights: the transformer is trained on their features, so fixed
TEXT_DIM = 64
IMAGE_SIZE = 64

TRANSFORMER_CONFIG = FramePackConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    num_layers=3,
    num_single_layers=3,
    num_refiner_layers=1,
    text_embed_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM,
    rope_axes_dim=(8, 12, 12),
    image_proj_dim=TEXT_DIM,
)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 64), layers_per_block=1,
    norm_num_groups=1, scaling_factor=1.0, spatial_compression_ratio=8, temporal_compression_ratio=4,
)  # scaling_factor is measured after VAE training (train.py) and written into the saved config
PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor", "vae",
         "transformer")


def demo_words() -> list[str]:
    """The tiny set's vocabulary plus the world's words, de-duplicated (ids are fixed by this order)."""
    return list(dict.fromkeys(_vocabulary() + vocabulary()))


def build_llama_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny set's word-level LLaMA-3 stand-in over :func:`demo_words`."""
    return tiny_models.build_llama_tokenizer(demo_words())


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny set's word-level CLIP stand-in over :func:`demo_words`."""
    return tiny_models.build_clip_tokenizer(demo_words())


def build_vae(**overrides) -> torch.nn.Module:
    """A fresh demo VAE (diffusers AutoencoderKLHunyuanVideo), random weights from torch's current RNG."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(**{**VAE_CONFIG, **overrides})


def build_demo_models(seed: int = 0, transformer_config: FramePackConfig = TRANSFORMER_CONFIG,
                      vae_overrides: dict | None = None) -> TinyModels:
    """Every demo part with seeded random weights (fp32, eval mode); training replaces VAE and transformer."""
    from framepack_rt.model.transformer import FramePackTransformer

    cfg = transformer_config
    tok, tok2 = build_llama_tokenizer(), build_clip_tokenizer()
    llama_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.text_embed_dim, intermediate_size=2 * cfg.text_embed_dim,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=cfg.pooled_projection_dim, intermediate_size=2 * cfg.pooled_projection_dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=cfg.pooled_projection_dim, bos_token_id=tok2.bos_token_id, eos_token_id=tok2.eos_token_id,
        pad_token_id=tok2.pad_token_id,
    )
    siglip_cfg = SiglipVisionConfig(
        hidden_size=cfg.image_proj_dim, intermediate_size=2 * cfg.image_proj_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16,
    )
    parts = {}
    builders = [
        ("text_encoder", lambda: LlamaModel(llama_cfg)),
        ("text_encoder_2", lambda: CLIPTextModel(clip_cfg)),
        ("image_encoder", lambda: SiglipVisionModel(siglip_cfg)),
        ("vae", lambda: build_vae(**(vae_overrides or {}))),
    ]
    for i, (name, build) in enumerate(builders):
        with _seeded(seed + i):  # one seed per part: changing one part never changes the others
            parts[name] = build().eval()
    for name in ("text_encoder", "text_encoder_2", "image_encoder"):
        _round_to_fp16(parts[name])
    return TinyModels(
        tokenizer=tok,
        tokenizer_2=tok2,
        feature_extractor=SiglipImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        transformer=FramePackTransformer.from_config(cfg, seed=seed + 10).eval(),
        **parts,
    )


@torch.no_grad()
def _round_to_fp16(module: torch.nn.Module) -> None:
    """Make fp32 weights fp16-representable: the fp16 files then load back bit-identical, so the features the
    transformer is trained on are exactly those the shipped encoders give."""
    for p in module.parameters():
        p.copy_(p.half().float())


def save_demo_models(models: TinyModels, root: str | Path, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Write every part under ``root`` in the published layout, weights cast to ``dtype``, and the example
    start; bytes per part.

    The in-memory models are not changed (each part is copied for the cast).
    """
    from framepack_rt.demo import example_start
    from framepack_rt.pipeline.builtin import write_example

    root = Path(root)
    sizes = {}
    write_example(root, *example_start())  # what a server opens this model with
    for name in PARTS + ("fast_decoder",) * (models.fast_decoder is not None):
        sizes[name] = save_part(getattr(models, name), root / name, dtype)
    return sizes


def save_part(part: torch.nn.Module | PreTrainedTokenizerFast | SiglipImageProcessorPil, folder: str | Path,
              dtype: torch.dtype = torch.float16) -> int:
    """One part (a model, cast to ``dtype`` on a copy, or a tokenizer / processor) saved in ``folder``; its bytes."""
    import copy

    folder = Path(folder)
    if isinstance(part, torch.nn.Module):
        part = copy.deepcopy(part).to(dtype)
    part.save_pretrained(folder)
    _drop_source_path(folder / "config.json")
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _drop_source_path(config: Path) -> None:
    """diffusers records the folder a model was loaded from ("_name_or_path"): a path on the machine that trained
    it, meaningless in the package."""
    import json

    if config.is_file():
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parameter_counts(models: TinyModels) -> dict[str, int]:
    """Parameters per neural part."""
    return {name: sum(p.numel() for p in getattr(models, name).parameters())
            for name in ("text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer")}


class InMemoryParts:
    """A parts provider (the API of framepack_rt.pipeline.parts.TinyParts) over a model set held in memory.

    ``FramePackPipeline(InMemoryParts(models), buckets="tiny", default_steps=DEMO_STEPS)`` runs a model set that
    is being trained or was just loaded, without writing it to disk first.
    """

    def __init__(self, models: TinyModels, device: torch.device | str = "cpu") -> None:
        from framepack_rt.pipeline.encoders import CLIPTextEncoder, ImageEncoder, TextEncoder
        from framepack_rt.pipeline.vae import VideoVAE

        self.device = torch.device(device)
        self.text = TextEncoder(models.text_encoder.to(self.device), models.tokenizer)
        self.clip = CLIPTextEncoder(models.text_encoder_2.to(self.device), models.tokenizer_2)
        self.image = ImageEncoder(models.image_encoder.to(self.device), models.feature_extractor)
        fast = models.fast_decoder.to(self.device).eval() if models.fast_decoder is not None else None
        self._vae = VideoVAE(models.vae.to(self.device), fast_decoder=fast)
        self._transformer = models.transformer.to(self.device).eval()

    def encode_text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.encode(prompt)

    def encode_pooled(self, prompt: str) -> torch.Tensor:
        return self.clip.encode(prompt)

    def encode_image(self, fitted) -> torch.Tensor:
        return self.image.encode(fitted)

    def encode_latent(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._vae.encode(pixels)

    def transformer(self) -> torch.nn.Module:
        return self._transformer

    def vae(self):
        return self._vae
