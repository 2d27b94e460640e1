"""Training data for the transformer: clips -> latent caches -> FramePack windows with their contexts.

A :class:`LatentCache` holds encoded clips (scaled VAE latents, the prompt of every latent frame, the start
frame's image embeddings) and a prompt table (text features, mask length, pooled vector per prompt). It is what
stage 2 of train.py reads; ``encode_clip`` builds one entry with any parts provider (the demo's, or the 13B
set through ``framepack_rt.pipeline.parts.FolderParts``), so the same trainer fine-tunes the 13B on real videos.

A training example is one F1 section taken from a clip: the target is the window of ``w`` latents starting at
latent ``s``; the context is what the F1 stream would hold right before generating it: the start latent and
the K = 19 latents before ``s`` (zeros before the clip start, exactly as ``ContextRing.reset`` fills them).
:func:`pack_context` turns (start, history) into the model's context inputs for any forward layout (F1, or
vanilla without the start slot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from framepack_rt.engine.context import ContextInputs
from framepack_rt.engine.schedules import CLEAN_1X, HISTORY_2X, HISTORY_4X, Order, SectionLayout


@dataclass
class LatentClip:
    """One encoded clip. latents (N, 16, h, w) scaled, stored fp16; prompts: N strings (one per latent);
    image_embeds (n, D) of the clip's first frame."""

    latents: torch.Tensor
    prompts: list[str]
    image_embeds: torch.Tensor

    def change_latents(self) -> list[int]:
        """Latents where the prompt differs from the previous latent's (0 included)."""
        return [0] + [i for i in range(1, len(self.prompts)) if self.prompts[i] != self.prompts[i - 1]]


@dataclass
class LatentCache:
    """Encoded clips plus ``prompts``: prompt -> (text features (L, D) fp32, pooled (D,) fp32)."""

    clips: list[LatentClip] = field(default_factory=list)
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        torch.save({"clips": [vars(c) for c in self.clips], "prompts": self.prompts}, Path(path))

    @classmethod
    def load(cls, *paths: str | Path) -> LatentCache:
        """One or more cache files merged (prompt tables are unioned)."""
        cache = cls()
        for path in paths:
            data = torch.load(Path(path), weights_only=True)
            cache.clips += [LatentClip(**c) for c in data["clips"]]
            cache.prompts.update(data["prompts"])
        return cache


@torch.no_grad()
def encode_video(vae_model: torch.nn.Module, frames: np.ndarray, scaling_factor: float) -> torch.Tensor:
    """uint8 (T, H, W, 3), T = 4N - 3 -> scaled latents (N, 16, H/8, W/8) fp32 (posterior mean).

    Long clips go through diffusers' temporal tiles (17 frames, stride 12), as the release's VAE encodes.
    """
    if (len(frames) - 1) % 4:
        raise ValueError(f"a clip needs 4N - 3 frames, got {len(frames)}")
    param = next(vae_model.parameters())
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]
    pixels = pixels.to(param.device, param.dtype) / 127.5 - 1
    latents = vae_model.encode(pixels).latent_dist.mode()[0] * scaling_factor
    return latents.transpose(0, 1).float().cpu()


def encode_clip(parts, frames: np.ndarray, prompts_per_latent: list[str]) -> LatentClip:
    """One clip with a parts provider (``encode_image``, ``encode_latent``, ``vae()``; see framepack_rt.pipeline.parts).

    frames (T, H, W, 3) uint8 with T = 4N - 3; prompts_per_latent: N prompts, the one in force at each latent.
    """
    vae = parts.vae()
    latents = encode_video(vae.live, frames, vae.scaling_factor)
    # GroupNorm statistics span every frame of a VAE tile, so the clip's latent 0 is not exactly the latent of
    # its first frame alone. The pipeline's start latent is the latter (the image alone): train with that one.
    pixels = torch.from_numpy(np.ascontiguousarray(frames[:1])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents[0] = parts.encode_latent(pixels)[0, :, 0].float().cpu()
    if len(prompts_per_latent) != latents.shape[0]:
        raise ValueError(f"{len(prompts_per_latent)} prompts for {latents.shape[0]} latents")
    image = parts.encode_image(np.ascontiguousarray(frames[0]))[0].float().cpu()
    return LatentClip(latents.half(), list(prompts_per_latent), image)


def encode_prompts(parts, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt -> (features (L, D), pooled (D,)), fp32 CPU, with a parts provider's text encoders."""
    table = {}
    for p in prompts:
        features, mask = parts.encode_text(p)
        length = int(mask[0].sum())
        table[p] = (features[0, :length].float().cpu(), parts.encode_pooled(p)[0].float().cpu())
    return table


# -------------------------------------------------------------------------------------------------- windows
def history_before(latents: torch.Tensor, s: int, k: int) -> torch.Tensor:
    """The F1 history window right before latent ``s``: (k, C, h, w), the newest k of cat(zeros(k), latents[:s])."""
    if s < 1:
        raise ValueError("the first section starts at latent 1 (latent 0 is the start frame)")
    hist = latents.new_zeros((k, *latents.shape[1:]))
    prior = latents[max(0, s - k) : s]
    if len(prior):
        hist[k - len(prior) :] = prior
    return hist


def latent_slots(history: torch.Tensor) -> torch.Tensor:
    """(B, 1, K, 1, 1) bool for a (B, C, K, h, w) history: the slots holding a latent, not the all-zero ones
    before a clip's start (which the stream holds as exact zeros, so corruptions of the history leave them)."""
    return history.abs().amax(dim=(1, 3, 4), keepdim=True) > 0


def pack_context(layout: SectionLayout, start: torch.Tensor, history: torch.Tensor) -> ContextInputs:
    """Forward-order model context from start (B, C, 1, h, w) and history (B, C, K, h, w), oldest first.

    Uses the layout's own slices and indices, so it equals what ``ContextRing.inputs`` hands the model.
    """
    if layout.order is not Order.FORWARD:
        raise ValueError("training windows are packed for forward layouts (F1, vanilla)")
    slices = layout.history_slices
    one_x = history[:, :, slices[CLEAN_1X]]
    clean = torch.cat([start, one_x], dim=2) if layout.pattern.start_full_resolution else one_x
    idx = layout.indices(device=history.device)

    def part(tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor if tensor.shape[2] else None

    return ContextInputs(
        latents_clean=part(clean), indices_latents_clean=idx["indices_latents_clean"],
        latents_history_2x=part(history[:, :, slices[HISTORY_2X]]),
        indices_latents_history_2x=idx["indices_latents_history_2x"],
        latents_history_4x=part(history[:, :, slices[HISTORY_4X]]),
        indices_latents_history_4x=idx["indices_latents_history_4x"],
        indices_latents=idx["indices_latents"],
    )


def valid_windows(clip: LatentClip, window: int) -> list[int]:
    """Window starts s (>= 1) whose w latents share one prompt: the pipeline changes prompts per section only."""
    n, prompts = clip.latents.shape[0], clip.prompts
    return [s for s in range(1, n - window + 1) if len(set(prompts[s : s + window])) == 1]


class WindowDataset(Dataset):
    """Map-style: item i -> one training window (DistributedSampler-friendly).

    The index lists every valid window once, then repeats the windows that start a new prompt
    ``change_repeat`` extra times and the first section (s = 1) ``first_repeat`` extra times: those are the
    moments the demo is judged on (turning when the prompt turns; the first section from a still image).
    """

    def __init__(self, cache: LatentCache, window: int = 9, num_history: int = 19, change_repeat: int = 3,
                 first_repeat: int = 3) -> None:
        self.cache, self.window, self.k = cache, window, num_history
        index: list[tuple[int, int]] = []
        for c, clip in enumerate(cache.clips):
            starts = valid_windows(clip, window)
            changes = set(clip.change_latents()[1:])
            index += [(c, s) for s in starts]
            index += [(c, s) for s in starts if s in changes for _ in range(change_repeat)]
            index += [(c, 1) for _ in range(first_repeat) if 1 in starts]
        if not index:
            raise ValueError(f"no clip has {window + 1} latents with one prompt: the cache is too short")
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        c, s = self.index[i]
        clip = self.cache.clips[c]
        lat = clip.latents[: s + self.window]  # slice before the fp32 copy: real clips can be long
        return {
            "target": lat[s : s + self.window].float().transpose(0, 1),  # (C, w, h, w)
            "start": lat[0:1].float().transpose(0, 1),  # (C, 1, h, w)
            "history": history_before(lat, s, self.k).float().transpose(0, 1),  # (C, K, h, w)
            "image_embeds": clip.image_embeds.float(),
            "prompt": clip.prompts[s],
        }


def collate(items: list[dict], prompts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Stack items; text features padded to the longest prompt with a bool mask (B, L)."""
    out = {k: torch.stack([it[k] for it in items]) for k in ("target", "start", "history", "image_embeds")}
    feats = [prompts[it["prompt"]][0] for it in items]
    length = max(f.shape[0] for f in feats)
    text = torch.zeros(len(items), length, feats[0].shape[1])
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, f in enumerate(feats):
        text[i, : f.shape[0]], mask[i, : f.shape[0]] = f, True
    out.update(text=text, text_mask=mask, pooled=torch.stack([prompts[it["prompt"]][1] for it in items]),
               prompts=[it["prompt"] for it in items])
    return out
