"""Prompt and image encoders: LLaMA text features, CLIP-L pooled text, SigLIP image tokens.

Thin wrappers over the transformers classes the release uses. Each wrapper owns one model on one
device/dtype and can be dropped with ``release()``: the low-VRAM mode loads, encodes and frees them one at a
time (model_folders.ModelLoader.using does exactly that).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel, PreTrainedTokenizerBase, SiglipVisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

# HunyuanVideo's video prompt template, word for word as the release uses it (diffusers'
# pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE, imported by FramePack's diffusers_helper/hunyuan.py).
# Item 4 reads "light, style and atmosphere": with that wording the llava-llama-3 tokenizer gives the
# published crop_start of 95; other wordings that circulate change the count and the features.
SYSTEM_PROMPT = (
    "Describe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:"
)
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
)
# What compute_crop_start gives for the llava-llama-3-8b tokenizer (BOS + 94 template tokens); the release
# hard-codes it. Checked at construction whenever the tokenizer is a llama-3 one.
LLAMA3_CROP_START = 95
MAX_PROMPT_TOKENS = 256  # real prompt tokens kept after the template (the release's max_length)
CLIP_MAX_LENGTH = 77


def _default_dtype(device: torch.device | str) -> torch.dtype:
    # The release runs every encoder in fp16 on the GPU; fp16 on the CPU is slow or unsupported.
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class _Encoder:
    """Shared bits: one module, its device/dtype, and release()."""

    model: torch.nn.Module | None

    @property
    def device(self) -> torch.device:
        return self._live().device

    @property
    def dtype(self) -> torch.dtype:
        return self._live().dtype

    def _live(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} was released; load it again to encode")
        return self.model

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "_Encoder":
        self._live().to(device=device, dtype=dtype)
        return self

    def release(self) -> None:
        """Drop the weights (and the CUDA cache they held): the low-VRAM mode frees each encoder after use."""
        on_cuda = self.model is not None and self.model.device.type == "cuda"
        self.model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def prompt_prefix(system: str = SYSTEM_PROMPT, template: str = PROMPT_TEMPLATE) -> str:
    """The template text before the user prompt."""
    return template.split("{prompt}")[0].format(system=system)


def compute_crop_start(tokenizer: PreTrainedTokenizerBase, system: str = SYSTEM_PROMPT,
                       template: str = PROMPT_TEMPLATE) -> int:
    """Number of tokens (BOS included) the template puts before the prompt: features start there.

    diffusers states the same rule as len(tokens(template with "{}")) - 2 (the placeholder and <|eot_id|>);
    counting the prefix directly does not assume the placeholder is one token.
    """
    return len(tokenizer(prompt_prefix(system, template))["input_ids"])


class TextEncoder(_Encoder):
    """LLaMA (llava-llama-3-8b as LlamaModel): per-token prompt features from hidden_states[-3].

    Output of ``encode``: features (B, L, D) and mask (B, L) bool, L = the longest prompt's real token count
    (prompt + closing <|eot_id|>, at most ``max_length``); padded positions are zero. D = 4096 for the real model.
    """

    def __init__(self, model: LlamaModel, tokenizer: PreTrainedTokenizerBase, *, max_length: int = MAX_PROMPT_TOKENS,
                 system: str = SYSTEM_PROMPT, template: str = PROMPT_TEMPLATE) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.system, self.template = system, template
        if tokenizer.pad_token is None:  # llama-3 ships without one; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.prefix_ids = tokenizer(prompt_prefix(system, template))["input_ids"]
        self.crop_start = len(self.prefix_ids)
        is_llama3 = "<|start_header_id|>" in tokenizer.get_vocab() and len(tokenizer) >= 128000
        released_template = system == SYSTEM_PROMPT and template == PROMPT_TEMPLATE
        if is_llama3 and released_template and self.crop_start != LLAMA3_CROP_START:
            raise ValueError(
                f"the llama-3 tokenizer puts {self.crop_start} tokens before the prompt, expected "
                f"{LLAMA3_CROP_START}: tokenizer or template differ from the released HunyuanVideo ones"
            )

    @classmethod
    def from_pretrained(cls, model_path: str | Path, tokenizer_path: str | Path, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        **kwargs) -> "TextEncoder":
        dtype = dtype or _default_dtype(device)
        model = LlamaModel.from_pretrained(model_path, dtype=dtype, local_files_only=True).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True), **kwargs)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (B, crop_start + max_length), right-padded, truncated at the end."""
        texts = [self.template.format(system=self.system, prompt=p) for p in prompts]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.crop_start + self.max_length, padding_side="right")
        prefix = torch.tensor(self.prefix_ids)
        if not bool((enc["input_ids"][:, : self.crop_start] == prefix).all()):
            # A tokenizer that merges across the template/prompt boundary would shift every feature.
            raise ValueError("the prompt changed how the template prefix tokenizes; crop_start would be wrong")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = {k: v.to(self.device) for k, v in self.tokenize(prompts).items()}
        out = self._live()(**enc, output_hidden_states=True)
        # hidden_states[-3]: the release skips the last two layers (they are tuned for next-token prediction).
        mask = enc["attention_mask"][:, self.crop_start :].bool()
        length = int(mask.sum(dim=1).max())
        features = out.hidden_states[-3][:, self.crop_start : self.crop_start + length]
        mask = mask[:, :length]
        return features * mask[..., None].to(features.dtype), mask


class CLIPTextEncoder(_Encoder):
    """CLIP-L text model: pooled prompt vector (B, 768) from pooler_output (the eos token's state)."""

    def __init__(self, model: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, *,
                 max_length: int = CLIP_MAX_LENGTH) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def from_pretrained(cls, model_path: str | Path, tokenizer_path: str | Path, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> "CLIPTextEncoder":
        dtype = dtype or _default_dtype(device)
        model = CLIPTextModel.from_pretrained(model_path, dtype=dtype, local_files_only=True).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """input_ids (B, 77): padded to max_length, truncated."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # No attention mask, as in the release: CLIP is causal, so pads after eos cannot reach the pooled eos.
        return self._live()(self.tokenize(prompts).to(self.device)).pooler_output


class ImageEncoder(_Encoder):
    """SigLIP vision tower (flux redux): image tokens (B, 729, 1152) from last_hidden_state.

    Preprocessing uses the PIL backend (SiglipImageProcessorPil) whatever is installed: it is the processor
    the release ran (transformers 4.x slow processor), and keeps results independent of torchvision.
    """

    def __init__(self, model: SiglipVisionModel, processor: SiglipImageProcessorPil) -> None:
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, model_path: str | Path, processor_path: str | Path, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> "ImageEncoder":
        dtype = dtype or _default_dtype(device)
        model = SiglipVisionModel.from_pretrained(model_path, dtype=dtype, local_files_only=True).to(device)
        return cls(model, SiglipImageProcessorPil.from_pretrained(processor_path, local_files_only=True))

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) or (B, H, W, 3) -> pixel_values (B, 3, S, S) in [-1, 1]."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        return self._live()(pixel_values=pixels).last_hidden_state
