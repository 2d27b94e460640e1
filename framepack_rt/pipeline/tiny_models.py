"""The built-in tiny model set: the real classes at toy sizes, deterministic weights, tokenizers built in code.

Every part is the class the released checkpoints use (LlamaModel, CLIPTextModel, SiglipVisionModel,
AutoencoderKLHunyuanVideo, FramePackTransformer), so the tiny set exercises the same loading and encoding code
as the 13B set. Sizes line up with ``FramePackConfig.preset("tiny")``: text features 32, pooled text 32, image
tokens 32 wide. ``write_tiny_models`` saves them in the published folder layouts (see model_folders.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
UNK = "<unk>"

# The prompt template's words (both wordings of item 4 that circulate) plus everyday prompt vocabulary.
_TEMPLATE_WORDS = """system user describe the video by detailing following aspects main content and theme of color
shape size texture quantity text spatial relationships objects actions events behaviors temporal physical movement
changes background environment light style atmosphere camera angles movements transitions used in overall"""
_COMMON_WORDS = """a an is are was were be been being it its this that these those with without on at for from to as
up down over under into onto out off through across around near far behind front left right top bottom inside
outside while then when where who what how very slowly quickly gently softly man woman girl boy child people person
dog cat bird horse fish car train boat plane tree flower grass water river sea ocean beach sky sun moon cloud rain
snow city street road house room table chair window door hand hands face eyes hair head arm arms body red green
blue yellow white black orange purple pink brown gray gold silver bright dark big small large little tall short
long old young new happy sad beautiful walks walking runs running dances dancing jumps jumping sits sitting stands
standing looks looking smiles smiling turns turning holds holding moves moving flies flying swims swimming plays
playing waves waving falls falling opens closes rotates zooms pans close view shot scene frame night day morning
evening sunset sunrise warm cold soft hard smooth wind fire smoke dust one two three many some all each other his
her their our your my he she they we you i not no yes""".split()
_PUNCT = list(".,:;!?'\"-()/{}[]") + ["{}"]


def _vocabulary() -> list[str]:
    words = [d for d in "0123456789"] + _TEMPLATE_WORDS.split() + _COMMON_WORDS + _PUNCT
    return list(dict.fromkeys(words))  # de-duplicated, order kept: the ids are fixed by this list


def _word_level(vocab: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # \w+ | [^\w\s]+ : words and punctuation runs; special tokens are matched before this and never lowercased.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def build_llama_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level stand-in for the llava-llama-3 tokenizer: same special tokens, BOS added like llama-3.

    ``words``: the vocabulary (ids follow its order); default the tiny set's.
    """
    vocab = [UNK] + (words if words is not None else _vocabulary()) + LLAMA_SPECIALS
    tok = _word_level(vocab)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab.index(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        unk_token=UNK,
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
        model_max_length=1024,
        padding_side="right",
    )


def build_clip_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level stand-in for the CLIP-L tokenizer: <|startoftext|> $A <|endoftext|>, padded with eos.

    EOS is the last id on purpose: CLIPTextModel pools at the first eos position (or, for legacy configs,
    at argmax(input_ids)), and both rules then agree. ``words``: as for :func:`build_llama_tokenizer`.
    """
    vocab = [UNK] + (words if words is not None else _vocabulary()) + [CLIP_BOS, CLIP_EOS]
    tok = _word_level(vocab)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, vocab.index(CLIP_BOS)), (CLIP_EOS, vocab.index(CLIP_EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS, unk_token=UNK,
        model_max_length=77, padding_side="right",
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic init without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _vae():
    from diffusers import AutoencoderKLHunyuanVideo

    # 4 blocks = 3 spatial (x8) and 2 temporal (x4) up/downsamplings, like the real VAE; 8-16 channels.
    return AutoencoderKLHunyuanVideo(
        latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
    )


@dataclass
class TinyModels:
    """The whole tiny set in memory (fp32, CPU, eval mode)."""

    text_encoder: LlamaModel
    tokenizer: PreTrainedTokenizerFast
    text_encoder_2: CLIPTextModel
    tokenizer_2: PreTrainedTokenizerFast
    image_encoder: SiglipVisionModel
    feature_extractor: SiglipImageProcessorPil
    vae: "torch.nn.Module"  # diffusers AutoencoderKLHunyuanVideo (diffusers imported lazily)
    transformer: "torch.nn.Module"  # FramePackTransformer
    fast_decoder: "torch.nn.Module | None" = None  # FastVideoDecoder, when one was trained for this VAE


def build_tiny_models(seed: int = 0) -> TinyModels:
    """Build every tiny part with seeded weights (the same seed gives bit-identical weights)."""
    from framepack_rt.model.transformer import FramePackTransformer

    cfg = FramePackConfig.preset("tiny")
    tok, tok2 = build_llama_tokenizer(), build_clip_tokenizer()
    llama_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.text_embed_dim, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=cfg.pooled_projection_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=cfg.pooled_projection_dim,
        bos_token_id=tok2.bos_token_id, eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id,
    )
    siglip_cfg = SiglipVisionConfig(
        hidden_size=cfg.image_proj_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=64, patch_size=16,
    )
    parts = {}
    for i, (name, build) in enumerate(
        [
            ("text_encoder", lambda: LlamaModel(llama_cfg)),
            ("text_encoder_2", lambda: CLIPTextModel(clip_cfg)),
            ("image_encoder", lambda: SiglipVisionModel(siglip_cfg)),
            ("vae", _vae),
        ]
    ):
        with _seeded(seed + i):  # one seed per part: adding a part never changes the others' weights
            parts[name] = build().eval()
    return TinyModels(
        tokenizer=tok,
        tokenizer_2=tok2,
        # SigLIP's published preprocessing: resize to the model size, scale to [-1, 1] (mean = std = 0.5).
        feature_extractor=SiglipImageProcessorPil(
            size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        transformer=FramePackTransformer.from_config(cfg, seed=seed + 10).eval(),
        **parts,
    )


def write_tiny_models(root: str | Path, seed: int = 0) -> TinyModels:
    """Save the tiny set under ``root`` in the published layouts; returns the in-memory parts.

    root/{text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae}   hunyuanvideo-community/HunyuanVideo
    root/{image_encoder, feature_extractor}                             lllyasviel/flux_redux_bfl
    root/transformer                                                    lllyasviel/FramePackI2V_HY (or F1)
    """
    root = Path(root)
    tiny = build_tiny_models(seed)
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder",
                 "feature_extractor", "vae", "transformer"):
        getattr(tiny, name).save_pretrained(root / name)
    return tiny
