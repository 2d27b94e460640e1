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
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from framepack_rt.engine.generator import Conditioning, SamplerConfig, SectionGenerator, SectionLatents, StepEvent
from framepack_rt.pipeline.media import BUCKET_SETS, PromptChange, fit_to_bucket, load_image, nearest_bucket, prompt_at
from framepack_rt.engine.sampling import GuidanceConfig
from framepack_rt.engine.schedules import Schedule, f1_schedule, inverted_schedule, num_sections, video_frames_for_latents
from framepack_rt.engine.teacache import TeaCacheConfig
from framepack_rt.pipeline import builtin
from framepack_rt.pipeline.vae import StreamingDecoder, latent_preview

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

    def __init__(self, pipe: "FramePackPipeline", generator: SectionGenerator, decoder: StreamingDecoder,
                 prompt: str, prompt_schedule: list[PromptChange] | None, image_embeds: torch.Tensor) -> None:
        self._pipe, self._gen, self._decoder = pipe, generator, decoder
        self._image_embeds = image_embeds
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self._prompt = prompt
        self._schedule = prompt_schedule
        self._running = threading.Event()
        self._running.set()
        self._stopped = False
        self._in_flight: int | None = None
        self.sections_done = 0

    # -- control ---------------------------------------------------------------------------------------------
    def set_prompt(self, text: str) -> int:
        """Use ``text`` from the next section on; returns the index of the section it applies from."""
        if not text.strip():
            raise ValueError("empty prompt")
        with self._lock:
            self._pending_prompt = text
            return self.sections_done if self._in_flight is None else self._in_flight + 1

    @property
    def prompt(self) -> str:
        with self._lock:
            return self._pending_prompt or self._prompt

    def pause(self) -> None:
        """Finish the section in flight, then wait until ``resume`` (or ``stop``)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        """End the stream: the section in flight is abandoned at its next step; iteration ends."""
        self._stopped = True
        self._running.set()

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
        self._running.wait()
        if self._stopped or self._gen.finished:
            raise StopIteration
        k = self.sections_done
        self._apply_prompt(k)
        with self._lock:
            self._in_flight = k
        try:
            section = self._decode(next(self._gen))
        except _Stopped:
            raise StopIteration from None
        finally:
            # Section k counts as in flight until its frames are decoded: a prompt set meanwhile is for k + 1.
            with self._lock:
                self._in_flight = None
                self.sections_done = k + int(self._gen.sections_done > k)
        return section

    def _apply_prompt(self, k: int) -> None:
        with self._lock:
            text, self._pending_prompt = self._pending_prompt, None
        if text is None and self._schedule is not None:
            scheduled = prompt_at(self._schedule, self._pipe.section_start_seconds(self._gen.schedule, k))
            text = scheduled if scheduled != self._prompt else None
        if text is not None and text != self._prompt:
            self._gen.set_conditioning(self._pipe.conditioning(text, self._image_embeds))
            with self._lock:
                self._prompt = text

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
        )


class FramePackPipeline:
    """The encoders, the transformer and the VAE, loaded from local folders or built in ("tiny")."""

    def __init__(self, parts, *, buckets: str = "640", default_steps: int = 25,
                 default_guidance: GuidanceConfig = GuidanceConfig(),
                 example: tuple[np.ndarray, str] | None = None, placement: Placement | None = None) -> None:
        """default_guidance: what stream() samples with when not told (the release: distilled 10, no real CFG).
        example: a start image (H, W, 3) uint8 and prompt this model set is made for (the demo's red ball);
        servers and tools open with it. None: the model has no preference. placement: the device and dtype
        from_pretrained resolved (None when the parts were built elsewhere)."""
        self.parts = parts
        self.placement = placement
        self.buckets = BUCKET_SETS[buckets]
        self.default_steps = default_steps
        self.default_guidance = default_guidance
        self.example = example

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
        ``compile``: torch.compile each transformer block (compiled at the first step)."""
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
                       placement=placement)
        settings: dict = {"buckets": buckets}
        if str(path) == "demo" and not part_paths:
            path = builtin.demo_weights_dir()
            settings = {"buckets": "demo", "default_steps": builtin.DEMO_STEPS,
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
    ) -> VideoStream:
        """Start generating; returns the :class:`VideoStream` of sections.

        mode "f1": forward, endless unless ``seconds``. mode "inverted": anti-drifting, needs ``seconds``, may
        end on ``end_image``; its sections come end-first (``Section.first_frame`` says where they go).
        teacache: a threshold (e.g. 0.15) or a config; None turns it off. guidance: None, the model's default
        (``default_guidance``; :meth:`guidance` changes only its scale). negative_prompt: what real CFG steers
        away from (None or empty: zero text embeddings).
        """
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

        start_latent, image_embeds, _ = self.encode_image(image)
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
                preview = latent_preview(event.denoised[:, :, -1:])[0, 0].numpy()
                on_step(StepProgress(event.section, event.step, event.steps, preview))

        negative = None
        if sampler.guidance.cfg != 1.0 and negative_prompt:
            negative = self.conditioning(negative_prompt, image_embeds)
        transformer = self.parts.transformer()
        generator = SectionGenerator(
            transformer, schedule, start_latent, self.conditioning(prompt, image_embeds), sampler=sampler,
            seed=seed, end_latent=end_latent, step_callback=step_callback, negative=negative,
        )
        vae = self.parts.vae()
        if schedule.order.value == "forward":
            decoder = StreamingDecoder(vae, direction="forward")
            decoder.push(start_latent[0])  # the video begins with the start frame, as the release's F1 output
        else:
            decoder = StreamingDecoder(vae, direction="backward", total_latents=schedule.num_sections * window + 1)
        stream = VideoStream(self, generator, decoder, prompt, prompt_schedule, image_embeds)
        holder["stream"] = stream
        return stream

    def generate(self, image, prompt: str, **kwargs) -> np.ndarray:
        """All frames of a finite clip in playback order, (T, H, W, 3) uint8."""
        if kwargs.get("seconds") is None:
            raise ValueError("generate() needs seconds; use stream() for an endless video")
        chunks = sorted(((s.first_frame, s.frames) for s in self.stream(image, prompt, **kwargs)), key=lambda c: c[0])
        return np.concatenate([frames for _, frames in chunks])
