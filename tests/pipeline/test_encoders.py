"""Text and image encoders on the tiny parts: template cropping, hidden_states[-3], masks, pooling, shapes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SiglipVisionConfig, SiglipVisionModel

from framepack_rt.pipeline.encoders import (
    PROMPT_TEMPLATE,
    SYSTEM_PROMPT,
    CLIPTextEncoder,
    ImageEncoder,
    TextEncoder,
    compute_crop_start,
)
from framepack_rt.pipeline.tiny_models import build_tiny_models

PROMPTS = ["a dog runs on the beach at sunset", "a cat"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_models(seed=0)


@pytest.fixture(scope="module")
def text_encoder(tiny):
    return TextEncoder(tiny.text_encoder, tiny.tokenizer)


def test_crop_start_is_the_template_token_count(tiny, text_encoder):
    tok = tiny.tokenizer
    # diffusers' rule, stated independently: tokens of the template with a "{}" placeholder, minus the
    # placeholder and the closing <|eot_id|>.
    placeholder = PROMPT_TEMPLATE.format(system=SYSTEM_PROMPT, prompt="{}")
    assert text_encoder.crop_start == len(tok(placeholder)["input_ids"]) - 2 == compute_crop_start(tok)
    ids = text_encoder.tokenize(["a dog runs"])["input_ids"][0]
    start = text_encoder.crop_start
    assert tok.convert_ids_to_tokens(ids[: start].tolist())[-1] == "<|end_header_id|>"  # template ends here
    prompt_ids = tok("a dog runs", add_special_tokens=False)["input_ids"]
    assert ids[start : start + len(prompt_ids) + 1].tolist() == prompt_ids + [tok.convert_tokens_to_ids("<|eot_id|>")]
    # The released value: word-level tokens for the template, plus the 2 "\n\n" and 1 " " pieces that the
    # llama-3 byte-level BPE adds, give 95.
    assert start + 3 == 95


def test_llama3_tokenizer_with_another_crop_start_is_refused(tiny):
    # A llama-3-sized vocabulary (>= 128000 ids, llama special tokens) whose template count is not 95 must
    # not encode silently with shifted features.
    vocab = dict(tiny.tokenizer.get_vocab())
    vocab.update({f"filler{i}": len(vocab) + i for i in range(128256 - len(vocab))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|end_of_text|>",
                                  additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    with pytest.raises(ValueError, match="expected 95"):
        TextEncoder(tiny.text_encoder, big)


def test_features_are_hidden_states_minus_3_of_the_prompt_tokens(tiny, text_encoder):
    features, mask = text_encoder.encode(PROMPTS)
    enc = text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        hidden = tiny.text_encoder(**enc, output_hidden_states=True).hidden_states
    start = text_encoder.crop_start
    lengths = (enc["attention_mask"][:, start:].sum(dim=1)).tolist()
    assert mask.sum(dim=1).tolist() == lengths
    for i, n in enumerate(lengths):
        torch.testing.assert_close(features[i, :n], hidden[-3][i, start : start + n], rtol=0, atol=0)
        for other in (-1, -2, -4):  # a different layer would not match
            assert not torch.allclose(features[i, :n], hidden[other][i, start : start + n], atol=1e-3)


def test_shapes_mask_and_padding(tiny, text_encoder):
    features, mask = text_encoder.encode(PROMPTS)
    n_long = len(tiny.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>
    n_short = len(tiny.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]) + 1
    assert features.shape == (2, n_long, 32) and mask.shape == (2, n_long) and mask.dtype == torch.bool
    assert mask[0].all() and mask[1].sum() == n_short and not mask[1, n_short:].any()
    assert (features[1, n_short:] == 0).all()  # padded positions carry nothing
    # Right padding + causal attention: a prompt encodes the same alone and in a batch.
    alone, _ = text_encoder.encode(PROMPTS[1])
    torch.testing.assert_close(alone[0], features[1, :n_short], rtol=1e-5, atol=1e-6)


def test_prompt_truncated_to_max_length(tiny):
    short = TextEncoder(tiny.text_encoder, tiny.tokenizer, max_length=5)
    assert short.tokenize(["a"])["input_ids"].shape == (1, short.crop_start + 5)
    features, mask = short.encode("a dog runs on the beach at sunset")
    assert features.shape == (1, 5, 32) and mask.all()


def test_clip_pooled_vector_is_the_eos_state(tiny):
    enc = CLIPTextEncoder(tiny.text_encoder_2, tiny.tokenizer_2)
    ids = enc.tokenize(PROMPTS)
    assert ids.shape == (2, 77)
    pooled = enc.encode(PROMPTS)
    assert pooled.shape == (2, 32)
    with torch.no_grad():
        states = tiny.text_encoder_2(ids).last_hidden_state
    for i, prompt in enumerate(PROMPTS):
        eos = len(tiny.tokenizer_2(prompt, add_special_tokens=False)["input_ids"]) + 1  # after <|startoftext|>
        assert ids[i, eos] == tiny.tokenizer_2.eos_token_id
        torch.testing.assert_close(pooled[i], states[i, eos], rtol=0, atol=0)


def test_image_encoder_tokens(tiny):
    enc = ImageEncoder(tiny.image_encoder, tiny.feature_extractor)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)
    pixels = enc.preprocess(images)
    assert pixels.shape == (2, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    tokens = enc.encode(images)
    assert tokens.shape == (2, 16, 32)  # (64 / 16) ** 2 patches, hidden 32
    torch.testing.assert_close(enc.encode(images[1])[0], tokens[1], rtol=1e-5, atol=1e-5)


def test_image_encoder_gives_729_tokens_at_the_redux_geometry(tiny):
    # flux redux: SigLIP so400m at 384 px, patch 14 -> 27 x 27 = 729 tokens; hidden shrunk to stay cheap.
    cfg = SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                             image_size=384, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SiglipVisionModel(cfg)
    processor = type(tiny.feature_extractor)(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3)
    tokens = ImageEncoder(model, processor).encode(np.zeros((200, 300, 3), dtype=np.uint8))
    assert tokens.shape == (1, 729, 8)


def test_release_frees_and_refuses_to_encode(tiny):
    enc = CLIPTextEncoder(tiny.text_encoder_2, tiny.tokenizer_2)
    assert enc.device.type == "cpu" and enc.dtype == torch.float32
    enc.release()
    assert enc.model is None
    with pytest.raises(RuntimeError, match="released"):
        enc.encode("a dog")
