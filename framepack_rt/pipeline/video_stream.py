"""A running generation: :class:`VideoStream` yields :class:`Section` s of decoded frames and takes prompt, LoRA
and pause/stop changes from any thread. ``FramePackPipeline.stream`` (framepack_pipeline.py) builds it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from framepack_rt.engine.batching import SectionRun
from framepack_rt.engine.generator import Conditioning, SectionGenerator, SectionLatents
from framepack_rt.engine.prompts import Blend, PromptBlender, blend_label, entry_sections, normalize_blend, single
from framepack_rt.pipeline.decode_ahead import DecodeAhead
from framepack_rt.pipeline.fast_decoder import CausalStreamingDecoder
from framepack_rt.pipeline.media import PromptChange
from framepack_rt.pipeline.vae import StreamingDecoder

if TYPE_CHECKING:
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline


@dataclass
class Section:
    """One generated section, as it leaves the pipeline.

    frames: (T, H, W, 3) uint8, the frames that became final with this section; first_frame: where they sit
    in the video (in inverted mode later sections land earlier). ms = sample_ms + decode_ms.
    """

    index: int
    frames: np.ndarray
    first_frame: int
    prompt: str
    ms: float
    sample_ms: float
    decode_ms: float
    ms_per_step: float
    steps_run: int
    steps_skipped: int
    is_last: bool
    blend: Blend = ()  # the prompts and weights it was generated with (prompt is their label)


@dataclass
class StepProgress:
    """Per denoising step: preview is the current x0 guess of the window's newest latent, (h, w, 3) uint8 RGB
    at latent resolution (the 16->3 linear map, no VAE)."""

    section: int
    step: int
    steps: int
    preview: np.ndarray


class _Stopped(Exception):
    """Raised inside sampling to abandon the section in flight when the stream is stopped."""


class VideoStream:
    """Iterator of :class:`Section`; ``set_prompt`` / ``pause`` / ``resume`` / ``stop`` are thread-safe."""

    def __init__(self, pipe: "FramePackPipeline", generator: SectionGenerator,
                 decoder: StreamingDecoder | CausalStreamingDecoder,
                 prompt: str, prompt_schedule: list[PromptChange] | None, image_embeds: torch.Tensor,
                 decode_overlap: bool = False, first: Conditioning | None = None) -> None:
        """first: the conditioning of ``prompt`` the generator starts with (so it is not encoded again)."""
        self._pipe, self._gen, self._decoder = pipe, generator, decoder
        # decode_overlap: section k decodes on its own thread (CUDA stream) while k + 1 samples (decode_ahead.py)
        self._ahead = DecodeAhead(self._decode, generator.device) if decode_overlap else None
        self._image_embeds = image_embeds
        self._lock = threading.Lock()
        self._init_prompts(prompt, prompt_schedule, first)
        self._running = threading.Event()
        self._running.set()
        self._stopped = False
        self._in_flight: int | None = None
        self.sections_done = 0
        self._lora_scales = pipe.lora_scales()  # this stream's LoRA scales, put on the shared model per section
        self._lora_pending: dict[str, tuple[float, int]] = {}  # name -> (scale, the section it applies from)

    # -- control ---------------------------------------------------------------------------------------------
    def set_prompt(self, prompt: str | Sequence[tuple[str, float]], transition_sections: int = 0) -> int:
        """Use ``prompt`` (a text, or weighted texts [(text, weight), ...], normalised) from the next section
        on, blended in over ``transition_sections`` sections from the blend in use (0 or 1: at once; section j
        of the transition uses weight (j + 1) / N of the new prompt). Returns the index of the section it
        applies from. A prompt set during a transition starts from the blend in use: no jump."""
        target = self._target(prompt)
        if isinstance(transition_sections, bool) or not isinstance(transition_sections, int) or transition_sections < 0:
            raise ValueError(f"transition_sections must be an integer >= 0, got {transition_sections!r}")
        with self._lock:
            self._pending_prompt = (target, transition_sections)
            return self._next_section()

    def set_prompt_schedule(self, schedule: list[PromptChange] | None,
                            transition_sections: int = 0) -> tuple[int, list[int | None]]:
        """Follow a prompt timeline (video seconds, as ``generate --prompt-schedule``) from the next section on;
        None drops the timeline. Each entry takes over at the first section starting at or after its time,
        blended in over ``transition_sections``; of the entries already past, the one in force takes over at
        the next section (the video follows the timeline from now as if it had always had it). Prompts set
        with :meth:`set_prompt` hold until the next entry's time. Returns (the next section, from which the
        timeline is followed; per entry, the section it takes over at, or None for entries that never will:
        past a clip's end, or superseded before any section starts)."""
        if isinstance(transition_sections, bool) or not isinstance(transition_sections, int) or transition_sections < 0:
            raise ValueError(f"transition_sections must be an integer >= 0, got {transition_sections!r}")
        for change in schedule or ():
            single(change.prompt)  # a usable text, or ValueError now rather than on the generation thread
        with self._lock:
            first = self._next_section()
            self._schedule = list(schedule) if schedule else None
            self._schedule_transition = transition_sections
            self._schedule_entry = None  # the entry in force at the next section takes over there
        if not schedule:
            return first, []
        gen_schedule = self._gen.schedule
        return first, entry_sections([c.seconds for c in schedule],
                                     lambda k: self._pipe.section_start_seconds(gen_schedule, k), first,
                                     gen_schedule.num_sections)

    @property
    def prompt(self) -> str:
        """The label of the prompt (blend) being moved to: what set_prompt last asked for."""
        with self._lock:
            return blend_label(self._pending_prompt[0] if self._pending_prompt else self._blender.target)

    @property
    def max_section_frames(self) -> int:
        """The most frames one section hands over (4 per latent of the window; the first also the start frame):
        the buffer room a server reserves before it starts a section, so handing it over never waits."""
        return 4 * self._gen.schedule.window + 1

    @property
    def blend(self) -> Blend:
        """The prompts and weights of the last section started."""
        return self._blender.in_use

    def pause(self) -> None:
        """Finish the section in flight, then wait until ``resume`` (or ``stop``)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        """End the stream: the section in flight is abandoned at its next step; iteration ends."""
        self._stopped = True
        self._running.set()
        if self._ahead is not None:
            self._ahead.close()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def check_stop(self) -> None:
        if self._stopped:
            raise _Stopped

    # -- iteration -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Section]:
        return self

    def __next__(self) -> Section:
        if self._ahead is not None:
            return self._next_overlapped(self._ahead)
        self._running.wait()
        if self._stopped or self._gen.finished:
            raise StopIteration
        k = self._begin_section()
        try:
            section = self._decode(next(self._gen))
        except _Stopped:
            raise StopIteration from None
        finally:
            # Section k counts as in flight until its frames are decoded: a prompt set meanwhile is for k + 1.
            self.close_run(k)
        return section

    def _next_overlapped(self, ahead: DecodeAhead) -> Section:
        """Section k (decoding on ahead's thread) is handed over once k + 1 has sampled here. Pausing, stopping
        and prompts act on sampling exactly as without overlap: a section sampled is decoded and handed over,
        even if the stream was paused meanwhile; a stop abandons the section sampling; a prompt set while k
        samples applies from k + 1."""
        if not ahead.pending:
            self._running.wait()
            latents = None if self._stopped or self._gen.finished else self._sample_section()
            if latents is None:
                ahead.close()
                raise StopIteration
            ahead.submit(latents, latents.output_latents)
        following = None
        if self._running.is_set() and not self._stopped and not self._gen.finished:
            following = self._sample_section()
        section = ahead.take()
        if following is not None:
            ahead.submit(following, following.output_latents)
        elif section.is_last:
            ahead.close()
        return section

    def _sample_section(self) -> SectionLatents | None:
        """Sample the next section on this thread (None if stopped meanwhile); with overlap only."""
        k = self._begin_section()
        try:
            return next(self._gen)
        except _Stopped:
            return None
        finally:
            self.close_run(k)  # sampled: a prompt set from now on is for the section after it

    # -- continuous batching (pipeline/batching.py drives these, one step at a time) -------------------------
    def open_run(self) -> SectionRun | None:
        """The next section, opened for sampling step by step with other streams' (None: the stream ended).
        Prompts and LoRA scales due apply as in ``next()``; the run's batch key is this stream's LoRA scales."""
        if self._stopped or self._gen.finished:
            return None
        k = self._begin_section()
        try:
            return SectionRun(self._gen, batch_key=tuple(sorted(self.lora_scales.items())))
        except BaseException:
            self.close_run(k)
            raise

    def _begin_section(self) -> int:
        """Apply the prompt and LoRA scales due at the next section and mark it in flight (_apply_prompt does,
        under the lock); returns its index. :meth:`close_run` ends it, on every path."""
        k = self.sections_done
        self._apply_prompt(k)
        self._apply_lora(k)
        return k

    def close_run(self, k: int) -> None:
        """Section ``k``'s run ended (sampled or abandoned): a prompt set from now on is for the next section."""
        with self._lock:
            self._in_flight = None
            self.sections_done = k + int(self._gen.sections_done > k)

    # -- LoRA scales (model/lora.py): per stream, on the model shared with other streams ---------------------
    def set_lora_scale(self, name: str, scale: float) -> int:
        """Adapter ``name`` at ``scale`` from the next section on; returns the index of the section it applies
        from. Raises ValueError (LoraError) for an unknown name, a scale out of range, or a fused adapter."""
        scale = self._pipe.check_lora_scale(name, scale)
        with self._lock:
            section = self._next_section()
            self._lora_pending[name] = (scale, section)
            return section

    @property
    def lora_scales(self) -> dict[str, float]:
        """The scales of the last section started."""
        with self._lock:
            return dict(self._lora_scales)

    def _apply_lora(self, k: int) -> None:
        """Before sampling section k: the scales due by k, then this stream's scales onto the shared model."""
        if not self._lora_scales:
            return
        with self._lock:
            for name, (scale, section) in list(self._lora_pending.items()):
                if section <= k:
                    self._lora_scales[name] = scale
                    del self._lora_pending[name]
            scales = dict(self._lora_scales)
        self._pipe.apply_lora_scales(scales)

    # -- prompts (blends, transitions, timelines; engine/prompts.py) ---------------------------------------
    def _init_prompts(self, prompt: str, schedule: list[PromptChange] | None, first: Conditioning | None) -> None:
        self._blender = PromptBlender(lambda text: self._pipe.conditioning(text, self._image_embeds), prompt, first)
        self._pending_prompt: tuple[Blend, int] | None = None  # (target, transition sections) for the next section
        self._schedule = schedule
        self._schedule_transition = 0
        # The timeline entry in force at the last section (None: the next section applies whichever is).
        self._schedule_entry: int | None = None
        if schedule:
            self._schedule_entry = max((i for i, c in enumerate(schedule) if c.seconds <= 0.0), default=None)
        self._blends: dict[int, Blend] = {}  # section index -> its blend, until the section is decoded

    @staticmethod
    def _target(prompt: str | Sequence[tuple[str, float]]) -> Blend:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("empty prompt")
            return single(prompt)
        return normalize_blend(prompt)

    def _next_section(self) -> int:
        """The section a request made now applies from (call holding the lock)."""
        return self.sections_done if self._in_flight is None else self._in_flight + 1

    def _apply_prompt(self, k: int) -> None:
        """Before sampling section k: the request or timeline entry due, then the blend for k."""
        with self._lock:
            # In flight from here: a request made after this applies from k + 1, as set_prompt answers.
            self._in_flight = k
            request, self._pending_prompt = self._pending_prompt, None
            scheduled = self._scheduled_change(k)
        if request is None:
            request = scheduled  # a request made for this section wins over the timeline entry due at it
        if request is not None:
            self._blender.start(*request)
        blend, conditioning = self._blender.advance()
        if conditioning is not None:
            self._gen.set_conditioning(conditioning)
        self._blends[k] = blend

    def _scheduled_change(self, k: int) -> tuple[Blend, int] | None:
        """The timeline entry that takes over at section k, if one does (call holding the lock)."""
        if not self._schedule:
            return None
        seconds = self._pipe.section_start_seconds(self._gen.schedule, k)
        entry = max((i for i, c in enumerate(self._schedule) if c.seconds <= seconds), default=None)
        if entry is None or entry == self._schedule_entry:
            return None
        self._schedule_entry = entry
        return single(self._schedule[entry].prompt), self._schedule_transition

    def _decode(self, s: SectionLatents) -> Section:
        began = time.perf_counter()
        chunk = self._decoder.push(s.output_latents[0])
        frames = chunk.frames
        if s.is_last:
            tail = self._decoder.finish()
            if self._decoder.direction == "forward":
                frames = torch.cat([frames, tail.frames])
        decode_ms = (time.perf_counter() - began) * 1000
        return Section(
            index=s.index, frames=frames.numpy(), first_frame=chunk.start, prompt=s.prompt,
            ms=s.ms + decode_ms, sample_ms=s.ms, decode_ms=decode_ms, ms_per_step=s.ms_per_step,
            steps_run=s.steps_run, steps_skipped=s.steps_skipped, is_last=s.is_last,
            blend=self._blends.pop(s.index, single(s.prompt)),
        )
