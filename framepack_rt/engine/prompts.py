"""Prompt blends and transitions: several encoded prompts mixed by weight, and a new prompt blended in over
several sections.

A :class:`Blend` names the prompts in play and their weights (positive, summing to 1, in the order they came
into play). :func:`blend_conditionings` turns encoded prompts and weights into one :class:`Conditioning`; a
:class:`PromptBlender` holds the blend in use, moves it toward a target over N sections (section k of a
transition uses weight (k+1)/N of the target, so the last one is exactly the target) and encodes each prompt
text once while it is in play.

    blender = PromptBlender(lambda text: pipe.conditioning(text, image_embeds), "a red ball moves right")
    blender.start(normalize_blend([("a red ball moves left", 1.0)]), sections=3)
    blend, conditioning = blender.advance()   # once per section, before sampling it
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from framepack_rt.engine.generator import Conditioning

Blend = tuple[tuple[str, float], ...]  # (prompt text, weight): weights > 0, summing to 1, in order of arrival

PARALLEL_COS = 1 - 1e-6  # directions closer than this are blended linearly (slerp's sin(omega) is ~0 there)


def normalize_blend(parts: Iterable[tuple[str, float]]) -> Blend:
    """Weighted prompts -> a :data:`Blend`: repeated texts merged, zero weights dropped, weights scaled to sum
    to 1. Raises ValueError (saying what to send instead) for an empty text, a negative or non-finite weight,
    or no positive weight at all."""
    merged: dict[str, float] = {}
    for text, weight in parts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a weighted prompt has an empty text; give every entry some text")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"prompt {text.strip()[:40]!r}: weight must be a finite number >= 0, got {weight!r}")
        key = text.strip()
        merged[key] = merged.get(key, 0.0) + float(weight)
    total = sum(merged.values())
    if not total > 0:
        raise ValueError("the weighted prompts have no positive weight; give at least one a weight > 0")
    return tuple((text, w / total) for text, w in merged.items() if w > 0)


def single(text: str) -> Blend:
    """One prompt at weight 1."""
    return normalize_blend([(text, 1.0)])


def mix(current: Blend, target: Blend, t: float) -> Blend:
    """(1 - t) * current + t * target as weights: current's prompts first (their order kept), then target's
    new ones; prompts whose weight reaches 0 leave, so ``mix(a, b, 1) == b`` as a set of weights."""
    weights: dict[str, float] = {text: (1 - t) * w for text, w in current}
    for text, w in target:
        weights[text] = weights.get(text, 0.0) + t * w
    return normalize_blend((text, w) for text, w in weights.items() if w > 0)


def same_blend(a: Blend, b: Blend, tolerance: float = 1e-9) -> bool:
    """The same prompts with the same weights (order aside)."""
    wa, wb = dict(a), dict(b)
    return wa.keys() == wb.keys() and all(abs(wa[k] - wb[k]) <= tolerance for k in wa)


def blend_label(blend: Blend) -> str:
    """How a blend is shown: the text for one prompt, else "a cat:0.70 | a dog:0.30" (the page's syntax)."""
    if len(blend) == 1:
        return blend[0][0]
    return " | ".join(f"{text}:{weight:.2f}" for text, weight in blend)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation along the last dimension: the direction moves along the great circle from a's
    to b's at constant angular speed, the norm moves linearly from |a| to |b| (so unit vectors stay unit).
    Rows whose directions are (anti)parallel, or that are zero, fall back to the linear blend."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(dim=-1, keepdim=True), b32.norm(dim=-1, keepdim=True)
    ua, ub = a32 / na.clamp_min(1e-12), b32 / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / sin.clamp_min(1e-12)
    spherical = direction * ((1 - t) * na + t * nb)
    linear = (1 - t) * a32 + t * b32
    use_linear = (cos.abs() > PARALLEL_COS) | (na == 0) | (nb == 0)
    return torch.where(use_linear, linear, spherical).to(a.dtype)


def blend_conditionings(parts: Sequence[tuple[Conditioning, float]], prompt: str | None = None) -> Conditioning:
    """One Conditioning from encoded prompts and their weights (normalised here; zero weights dropped).

    Text features (B, L_i, D) are padded to the longest L with zeros and mixed linearly; the mask is the
    union of the masks. Why the union: the LLaMA features of different prompts are aligned by token position,
    so a position that is real in any prompt carries that prompt's words (scaled by its weight). Intersecting
    the masks would cut the longer prompt's tail at every weight, so even at weight 1 the result would not be
    that prompt. This is what zero-padded fixed-length embeddings do in diffusers' prompt interpolation and
    Daydream Scope's blender (T5 features padded with zeros, all positions attended), without attending to
    positions that are padding in every prompt. A prompt at weight 0 is dropped before the union, so the
    endpoints of a transition are exactly the prompts' own conditionings.

    Pooled vectors (B, P) are slerped (:func:`slerp`), folded in order: the running blend of the first i
    prompts is slerped toward prompt i+1 by its share w_{i+1} / (w_1 + ... + w_{i+1}); for two prompts that
    is slerp(p1, p2, w2). Image embeddings come from the first prompt (they are the same start image).
    ``prompt``: the label the result reports (default: :func:`blend_label` of the texts and weights).
    """
    kept = [(c, float(w)) for c, w in parts if w > 0]
    if not kept:
        raise ValueError("nothing to blend: give at least one prompt a weight > 0")
    total = sum(w for _, w in kept)
    kept = [(c, w / total) for c, w in kept]
    label = prompt if prompt is not None else blend_label(tuple((c.prompt, w) for c, w in kept))
    if len(kept) == 1:
        return replace(kept[0][0], prompt=label)
    first = kept[0][0]
    length = max(c.text.shape[1] for c, _ in kept)
    text = torch.zeros((*first.text.shape[:1], length, first.text.shape[2]), dtype=torch.float32,
                       device=first.text.device)
    mask = torch.zeros(first.text.shape[0], length, dtype=torch.bool, device=first.text.device)
    pooled, pooled_weight = None, 0.0
    for c, w in kept:
        n = c.text.shape[1]
        text[:, :n] += w * c.text.float()
        mask[:, :n] |= c.text_mask.bool() if c.text_mask is not None else True
        pooled_weight += w
        pooled = c.pooled.float() if pooled is None else slerp(pooled, c.pooled.float(), w / pooled_weight)
    return replace(first, prompt=label, text=text.to(first.text.dtype), text_mask=mask,
                   pooled=pooled.to(first.pooled.dtype))


@dataclass
class Transition:
    """A move from ``source`` to ``target`` over ``sections`` sections, ``done`` of them sampled."""

    source: Blend
    target: Blend
    sections: int
    done: int = 0

    def next_blend(self) -> Blend:
        """The blend of the next section: weight (done + 1) / sections of the target."""
        return mix(self.source, self.target, (self.done + 1) / self.sections)


class PromptBlender:
    """The prompts in use for one stream: the blend of the last section, an optional transition toward a
    target, and the encodings of the prompts in play (each text encoded once while it is in play).

    Not thread-safe: the stream calls :meth:`start` and :meth:`advance` from its generation thread only
    (requests from other threads are handed over by the stream under its own lock).
    """

    def __init__(self, encode: Callable[[str], Conditioning], initial: Blend | str,
                 first: Conditioning | None = None) -> None:
        """encode: text -> its Conditioning (e.g. the pipeline's encoders with the start image's embeddings).
        initial: the blend the stream starts with; ``first``: its conditioning when already encoded (a single
        prompt), so it is not encoded twice."""
        self._encode = encode
        self.in_use: Blend = single(initial) if isinstance(initial, str) else initial
        self.transition: Transition | None = None
        self._encoded: dict[str, Conditioning] = {}
        if first is not None and len(self.in_use) == 1:
            self._encoded[self.in_use[0][0]] = first

    @property
    def target(self) -> Blend:
        """Where the blend is going (the blend in use when no transition runs)."""
        return self.transition.target if self.transition is not None else self.in_use

    def start(self, target: Blend, sections: int) -> int:
        """Move from the blend in use toward ``target`` over ``sections`` sections (0 or 1: at the next
        section). A transition under way is replaced, starting from the blend in use: no jump. Returns the
        sections the move takes (0 when ``target`` is already in use)."""
        if sections < 0:
            raise ValueError(f"transition sections must be >= 0, got {sections}")
        if same_blend(target, self.in_use):
            self.transition = None
            return 0
        self.transition = Transition(self.in_use, target, max(sections, 1))
        return self.transition.sections

    def advance(self) -> tuple[Blend, Conditioning | None]:
        """Call once before each section: (the blend it uses, its Conditioning if it differs from the
        previous section's, else None)."""
        if self.transition is None:
            return self.in_use, None
        blend = self.transition.next_blend()
        self.transition.done += 1
        if self.transition.done >= self.transition.sections:
            blend, self.transition = self.transition.target, None
        self.in_use = blend
        conditioning = self.conditioning(blend)
        self._forget_unused()
        return blend, conditioning

    def conditioning(self, blend: Blend) -> Conditioning:
        """The Conditioning of ``blend``; prompts not encoded yet are encoded now (once)."""
        parts = []
        for text, weight in blend:
            if text not in self._encoded:
                self._encoded[text] = self._encode(text)
            parts.append((self._encoded[text], weight))
        return blend_conditionings(parts, blend_label(blend))

    def _forget_unused(self) -> None:
        in_play = {text for text, _ in self.in_use} | {text for text, _ in self.target}
        for text in [t for t in self._encoded if t not in in_play]:
            del self._encoded[text]


def entry_sections(entry_seconds: Sequence[float], section_start: Callable[[int], float], first: int,
                   count: int | None) -> list[int | None]:
    """Where each entry of a prompt timeline takes over: the first section k >= ``first`` at whose start
    (``section_start(k)``, video seconds) it is the entry in force (the last one at or before that time),
    or None when it never is (past the end of a clip of ``count`` sections, or superseded by a later entry
    before any section starts). ``entry_seconds`` ascending. The entry in force at section ``first`` takes
    over there, however long ago it began. ``count`` None: endless, with section starts increasing."""
    def in_force(k: int) -> int:
        t = section_start(k)
        return max(i for i, s in enumerate(entry_seconds) if s <= t) if entry_seconds[0] <= t else -1

    found: list[int | None] = [None] * len(entry_seconds)
    if count is not None:  # a finite clip: every section looked at (inverted clips go backward in time)
        for k in range(first, count):
            j = in_force(k)
            if j >= 0 and found[j] is None:
                found[j] = k
        return found
    for i, seconds in enumerate(entry_seconds):
        k = _first_section_at(seconds, section_start, first)  # forward: starts increase with k
        if in_force(k) == i:
            found[i] = k
    return found


def _first_section_at(seconds: float, section_start: Callable[[int], float], first: int) -> int:
    """The first k >= first with section_start(k) >= seconds (section starts increasing): doubling, then
    bisection, so a far-off time costs a few dozen calls."""
    if section_start(first) >= seconds:
        return first
    low, step = first, 1
    while section_start(low + step) < seconds:
        low, step = low + step, step * 2
    high = low + step
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if section_start(mid) < seconds else (low, mid)
    return high
