"""Image + prompt -> frames, section by section: the encoders, the engine and the streaming VAE decode.

    pipe = FramePackPipeline.from_pretrained("tiny")                 # built in, any CPU
    pipe = FramePackPipeline.from_pretrained("/models", low_vram=True, memory_budget_gb=6, device="cuda")
    stream = pipe.stream(image, "a red ball moves right", seconds=None)   # endless F1 stream
    for section in stream:                                           # Section: frames (T, H, W, 3) uint8
        ...
        stream.set_prompt("a red ball moves left")                   # from the next section on
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from framepack_rt.engine.generator import Conditioning, SamplerConfig, SectionGenerator, SectionLatents, StepEvent
from framepack_rt.engine.batching import SectionRun
from framepack_rt.engine.prompts import Blend, PromptBlender, blend_label, entry_sections, normalize_blend, single
from framepack_rt.pipeline.media import BUCKET_SETS, PromptChange, fit_to_bucket, load_image, nearest_bucket, prompt_at
from framepack_rt.engine.sampling import GuidanceConfig
from framepack_rt.engine.schedules import Schedule, f1_schedule, inverted_schedule, num_sections, video_frames_for_latents
from framepack_rt.engine.teacache import TeaCacheConfig
from framepack_rt.pipeline import builtin
from framepack_rt.pipeline.decode_ahead import DecodeAhead, overlap_by_default
from framepack_rt.pipeline.devices import DECODER_CHOICES
from framepack_rt.pipeline.fast_decoder import CausalStreamingDecoder
from framepack_rt.pipeline.vae import StreamingDecoder, VideoVAE, latent_preview

if TYPE_CHECKING:
    from framepack_rt.pipeline.devices import Placement

MODES = ("f1", "inverted")
FPS = 30


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


def check_decoder(decoder: str) -> None:
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODER_CHOICES)}")


def make_decoder(vae: VideoVAE, decoder: str, direction: str,
                 total_latents: int | None) -> StreamingDecoder | CausalStreamingDecoder:
    """A stream's frame decoder, chosen once: the VAE's tiles, or the model's fast decoder ("auto": if it has one)."""
    if decoder == "fast" and vae.fast is None:
        raise ValueError("this model has no fast decoder (a fast_decoder/ folder beside vae/): use decoder 'vae' or "
                         "'auto', or train one with `python -m framepack_rt.demo.train decoder`")
    if decoder == "fast" or (decoder == "auto" and vae.fast is not None):
        return CausalStreamingDecoder(vae.fast, direction=direction, total_latents=total_latents)
    return StreamingDecoder(vae, direction=direction, total_latents=total_latents)


class FramePackPipeline:
    """The encoders, the transformer and the VAE, loaded from local folders or built in ("tiny")."""

    def __init__(self, parts, *, buckets: str = "640", default_steps: int = 25,
                 default_guidance: GuidanceConfig = GuidanceConfig(),
                 example: tuple[np.ndarray, str] | None = None, placement: Placement | None = None,
                 decoder: str = "auto") -> None:
        """default_guidance: what stream() samples with when not told (the release: distilled 10, no real CFG).
        example: a start image (H, W, 3) uint8 and prompt this model set is made for (the demo's red ball);
        servers and tools open with it. None: the model has no preference. placement: the device and dtype
        from_pretrained resolved (None when the parts were built elsewhere). decoder: what streams decode with
        when not told, one of devices.DECODER_CHOICES ("auto": the model's fast decoder when it has one, else the VAE)."""
        check_decoder(decoder)
        self.parts = parts
        self.default_decoder = decoder
        self.placement = placement
        self.buckets = BUCKET_SETS[buckets]
        self.default_steps = default_steps
        self.default_guidance = default_guidance
        self.example = example
        self._loras = None  # model/lora.py's LoraSet, made by the first load_lora()
        self._lora_defaults: dict[str, float] = {}  # name -> the scale new streams start with

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path = "tiny",
        *,
        device: torch.device | str = "auto",
        dtype: torch.dtype | str | None = "auto",
        low_vram: bool = False,
        memory_budget_gb: float | None = None,
        buckets: str = "640",
        check_memory: bool = True,
        quantize: str | None = None,
        compile: bool = False,
        decoder: str = "auto",
        **part_paths: str | Path,
    ) -> "FramePackPipeline":
        """``"demo"`` (the trained demo model shipped in the package: 64x64, moves shapes as prompts say),
        ``"tiny"`` (built in, random weights: fast, for tests), or a root folder with the published subfolders,
        and/or one path per part (text_encoder=, tokenizer=, text_encoder_2=, tokenizer_2=, vae=,
        image_encoder=, feature_extractor=, transformer=). Never downloads.

        device: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N", "mps" or a torch.device.
        dtype: "auto" (or None: fp32 on the CPU; on GPUs the transformer in bf16, fp16 where the GPU lacks bf16,
        encoders and VAE in fp16), "bf16", "fp16", "fp32" or a torch.dtype for every part; the tiny model is fp32.
        ``low_vram`` loads each encoder only while it is used and streams transformer blocks from CPU memory
        within ``memory_budget_gb`` (default 6). ``check_memory``: estimate what the folders need first and raise
        :class:`~framepack_rt.pipeline.memory.InsufficientMemory` (needed, free, the setting that fits) instead
        of running out while loading. ``buckets``: the resolution set for folders ("640", the release's; "tiny"
        for small test models). ``quantize="fp8"``: the transformer blocks' weights in fp8 (model/quantize.py).
        ``compile``: torch.compile each transformer block (compiled at the first step). ``decoder``: "auto"
        (the folder's fast_decoder/ when it has one: fast_decoder.py), "vae" or "fast"; streams may override it."""
        from framepack_rt.pipeline.devices import check_memory_flags, fp32_only, resolve_placement
        from framepack_rt.pipeline.memory import (DEFAULT_BUDGET_GB, GiB, InsufficientMemory, ensure_fits,
                                                   estimate_folders)
        from framepack_rt.pipeline.model_folders import resolve_model_paths
        from framepack_rt.pipeline.parts import FolderParts, TinyParts, TransformerOptions

        check_memory_flags(low_vram, memory_budget_gb)
        options = TransformerOptions(quantize=quantize, compile=compile)
        placement = resolve_placement(device, dtype)
        if str(path) == "tiny" and not part_paths:
            placement = fp32_only(placement)
            return cls(TinyParts(device=placement.device, options=options), buckets="tiny", default_steps=TinyParts.DEFAULT_STEPS,
                       placement=placement, decoder=decoder)
        settings: dict = {"buckets": buckets, "decoder": decoder}
        if str(path) == "demo" and not part_paths:
            path = builtin.demo_weights_dir()
            settings = {**settings, "buckets": "demo", "default_steps": builtin.DEMO_STEPS,
                        "default_guidance": builtin.demo_guidance()}
        roots = [] if str(path) == "tiny" else [path]
        if roots and (example := builtin.read_example(roots[0])) is not None:
            settings["example"] = example
        paths = resolve_model_paths(*roots, **part_paths)
        budget = int((memory_budget_gb or DEFAULT_BUDGET_GB) * GiB) if low_vram else None
        # Planned at the largest bucket the pipeline will run; in low-VRAM mode the plan also splits the budget
        # (the blocks get what the activations, VAE and workspace leave) and places the encoders.
        largest = max(BUCKET_SETS[settings["buckets"]], key=lambda hw: hw[0] * hw[1])
        estimate = estimate_folders(asdict(paths), placement, low_vram=low_vram, budget_bytes=budget,
                                    quantize=quantize, frame=largest)
        if check_memory:
            estimate = ensure_fits(estimate)
        elif estimate.plan_error is not None:
            raise InsufficientMemory(estimate.plan_error)
        parts = FolderParts(paths, device=placement.device, dtype=placement.dtype, low_vram=low_vram,
                            budget_bytes=estimate.streamer_budget_bytes, options=options,
                            encoders_on_cpu=estimate.encoders_on_cpu)
        return cls(parts, placement=placement, **settings)

    # -- LoRA (model/lora.py) ----------------------------------------------------------------------------
    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Attach a LoRA file (diffusers/PEFT or kohya/musubi keys) to the transformer, unmerged, at ``scale``:
        the default of new streams, which may change theirs live (VideoStream.set_lora_scale). Returns its
        name (default: the file's stem). Several stack."""
        name = self._lora_set(create=True).load(path, scale=scale, name=name)
        self._lora_defaults[name] = float(scale)
        return name

    def load_loras(self, loras: Sequence[tuple[str | Path, float]], fuse: bool = False) -> list[str]:
        """Several :meth:`load_lora` calls ((path, scale) each, named by their stems), then :meth:`fuse_lora`
        if ``fuse``: what ``--lora FILE[:SCALE] ... [--fuse-lora]`` does. Returns the names."""
        from framepack_rt.model.lora import LoraError

        if fuse and not loras:
            raise LoraError("--fuse-lora needs at least one --lora FILE[:SCALE]")
        names = [self.load_lora(path, scale=scale) for path, scale in loras]
        if fuse:
            self.fuse_lora()
        return names

    def fuse_lora(self) -> None:
        """Merge the loaded LoRAs into the transformer's weights at their scales (fp8 weights are requantized):
        no per-call cost, but the scales are fixed from now on. With streamed blocks (low_vram), fuse before
        the first section."""
        from framepack_rt.model.lora import LoraError

        loras = self._lora_set()
        if loras is None:
            raise LoraError("no LoRA loaded: load_lora() first, then fuse")
        streamer = getattr(self.parts, "streamer", None)
        if streamer is not None and streamer.stats.blocks_streamed:
            raise LoraError("the transformer's blocks are streaming already: fuse LoRAs right after loading, "
                            "before the first section (or leave them unmerged)")
        loras.fuse()

    def unload_loras(self) -> None:
        """Remove every unmerged LoRA (the model computes as before they were loaded); streams already made
        keep their scales but no longer have adapters to apply them to. Fused LoRAs cannot be taken out."""
        from framepack_rt.model.lora import LoraError

        loras = self._lora_set()
        if loras is not None and loras.fused:
            raise LoraError("the LoRAs are fused into the weights: reload the model to remove them")
        if loras is not None:
            loras.detach()
        self._loras, self._lora_defaults = None, {}

    def lora_info(self) -> list[dict]:
        """The loaded LoRAs: name, scale (new streams' default), format, layers, fused."""
        loras = self._lora_set()
        return [] if loras is None else [{**d, "scale": self._lora_defaults[d["name"]]} for d in loras.describe()]

    def lora_scales(self) -> dict[str, float]:
        """The scales new streams start with (the model's current ones belong to whichever stream ran last)."""
        return dict(self._lora_defaults)

    def check_lora_scale(self, name: str, scale: object) -> float:
        """``scale`` as a float if LoRA ``name`` may take it; LoraError (a ValueError) saying why not."""
        from framepack_rt.model.lora import LoraError

        loras = self._lora_set()
        if loras is None:
            raise LoraError("no LoRA is loaded (start with --lora FILE[:SCALE])")
        return loras.check(name, scale)

    def apply_lora_scales(self, scales: dict[str, float]) -> None:
        """Put ``scales`` on the shared transformer (a stream does before each of its sections)."""
        loras = self._lora_set()
        if loras is not None:  # names unloaded since the stream started are skipped
            loras.set_scales({name: scale for name, scale in scales.items() if name in loras.scales})

    def _lora_set(self, create: bool = False):
        loras = self._loras
        if loras is None and create:
            from framepack_rt.model.lora import LoraSet

            loras = self._loras = LoraSet(self.parts.transformer(), device=self.parts.device)
        return loras

    def guidance(self, cfg: float | None = None) -> GuidanceConfig:
        """The model's default guidance with real CFG at ``cfg`` (None: unchanged); its other settings, such as
        the demo's sigma interval, stay."""
        return self.default_guidance if cfg is None else replace(self.default_guidance, cfg=cfg)

    # -- encoding --------------------------------------------------------------------------------------------
    def frame_size(self, image) -> tuple[int, int]:
        """(H, W) of the frames generated from ``image``: its nearest bucket."""
        h, w = load_image(image).shape[:2]
        return nearest_bucket(h, w, self.buckets)

    def conditioning(self, prompt: str, image_embeds: torch.Tensor | None) -> Conditioning:
        text, mask = self.parts.encode_text(prompt)
        pooled = self.parts.encode_pooled(prompt)
        return Conditioning(prompt=prompt, text=text, text_mask=mask, pooled=pooled, image_embeds=image_embeds)

    def encode_image(self, image) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """-> (start latent (1, 16, 1, h, w), SigLIP embeds (1, N, D), the fitted image (H, W, 3) uint8)."""
        array = load_image(image)
        fitted = fit_to_bucket(array, nearest_bucket(*array.shape[:2], self.buckets))
        pixels = torch.from_numpy(fitted.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        return self.parts.encode_latent(pixels), self.parts.encode_image(fitted), fitted

    @staticmethod
    def section_start_seconds(schedule: Schedule, k: int) -> float:
        """Video time at which section ``k`` (generation order) begins, for prompt timelines."""
        w = schedule.window
        if schedule.num_sections is not None and schedule.order.value == "inverted":
            latents_before = 1 + (schedule.num_sections - 1 - k) * w
        else:
            latents_before = 1 + k * w
        return video_frames_for_latents(latents_before) / FPS

    # -- generation ------------------------------------------------------------------------------------------
    def stream(
        self,
        image,
        prompt: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        window: int = 9,
        mode: str = "f1",
        seconds: float | None = None,
        teacache: float | TeaCacheConfig | None = None,
        end_image=None,
        on_step: Callable[[StepProgress], None] | None = None,
        prompt_schedule: list[PromptChange] | None = None,
        guidance: GuidanceConfig | None = None,
        negative_prompt: str | None = None,
        decode_overlap: bool | None = None,
        decoder: str | None = None,
    ) -> VideoStream:
        """Start generating; returns the :class:`VideoStream` of sections.

        mode "f1": forward, endless unless ``seconds``. mode "inverted": anti-drifting, needs ``seconds``, may
        end on ``end_image``; its sections come end-first (``Section.first_frame`` says where they go).
        teacache: a threshold (e.g. 0.15) or a config; None turns it off. guidance: None, the model's default
        (``default_guidance``; :meth:`guidance` changes only its scale). negative_prompt: what real CFG steers
        away from (None or empty: zero text embeddings). decode_overlap: decode section k on its own thread
        (CUDA stream) while k + 1 samples; None: on, except in low-VRAM mode (decode_ahead.overlap_by_default).
        decoder: "vae", "fast" (the model's FastVideoDecoder) or "auto"; None: the pipeline's ``default_decoder``.
        """
        check_decoder(decoder or self.default_decoder)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if seconds is not None and seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        if mode == "inverted" and seconds is None:
            raise ValueError("mode 'inverted' builds a fixed-length clip: pass seconds")
        if end_image is not None and mode != "inverted":
            raise ValueError("an end image needs mode 'inverted' (F1 only goes forward)")
        sections = num_sections(seconds, window) if seconds is not None else None
        schedule = f1_schedule(window, sections) if mode == "f1" else inverted_schedule(
            sections, window, has_end_frame=end_image is not None)

        start_latent, image_embeds, start_fitted = self.encode_image(image)
        end_latent = None
        if end_image is not None:
            end_fitted = fit_to_bucket(load_image(end_image), tuple(int(s) * 8 for s in start_latent.shape[-2:]))
            end_pixels = torch.from_numpy(end_fitted.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
            end_latent = self.parts.encode_latent(end_pixels)
        if prompt_schedule:
            prompt = prompt_at(prompt_schedule, 0.0)
        if isinstance(teacache, (int, float)):
            teacache = TeaCacheConfig(threshold=float(teacache))
        sampler = SamplerConfig(steps=steps or self.default_steps, guidance=guidance or self.default_guidance,
                                teacache=teacache)

        holder: dict[str, VideoStream] = {}

        def step_callback(event: StepEvent) -> None:
            holder["stream"].check_stop()
            if on_step is not None:
                preview = latent_preview(event.denoised[:, :, -1:], preview_rgb)[0, 0].numpy()
                on_step(StepProgress(event.section, event.step, event.steps, preview))

        negative = None
        if sampler.guidance.cfg != 1.0 and negative_prompt:
            negative = self.conditioning(negative_prompt, image_embeds)
        transformer = self.parts.transformer()
        first = self.conditioning(prompt, image_embeds)
        generator = SectionGenerator(
            transformer, schedule, start_latent, first, sampler=sampler,
            seed=seed, end_latent=end_latent, step_callback=step_callback, negative=negative,
        )
        vae = self.parts.vae()
        # the preview's colours, decided once per stream: this VAE's, fitted with this start image (vae.py)
        preview_rgb = vae.latent_rgb(start_latent, start_fitted) if on_step is not None else None
        forward = schedule.order.value == "forward"
        frames_out = make_decoder(vae, decoder or self.default_decoder, "forward" if forward else "backward",
                                  None if forward else schedule.num_sections * window + 1)
        if forward:
            frames_out.push(start_latent[0])  # the video begins with the start frame, as the release's F1 output
        stream = VideoStream(self, generator, frames_out, prompt, prompt_schedule, image_embeds,
                             decode_overlap=self._decode_overlap(decode_overlap, generator.device), first=first)
        holder["stream"] = stream
        return stream

    def _decode_overlap(self, asked: bool | None, device: torch.device) -> bool:
        """stream()'s decode_overlap decided once per stream: as asked, else the default for the device."""
        if asked is not None:
            return asked
        return overlap_by_default(device, bool(getattr(self.parts, "low_vram", False)))

    def generate(self, image, prompt: str, **kwargs) -> np.ndarray:
        """All frames of a finite clip in playback order, (T, H, W, 3) uint8."""
        if kwargs.get("seconds") is None:
            raise ValueError("generate() needs seconds; use stream() for an endless video")
        chunks = sorted(((s.first_frame, s.frames) for s in self.stream(image, prompt, **kwargs)), key=lambda c: c[0])
        return np.concatenate([frames for _, frames in chunks])
