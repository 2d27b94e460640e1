"""Image + prompt -> frames, section by section: the encoders, the engine and the streaming VAE decode.

    pipe = FramePackPipeline.from_pretrained("tiny")                 # built in, any CPU
    pipe = FramePackPipeline.from_pretrained("/models", low_vram=True, memory_budget_gb=6, device="cuda")
    stream = pipe.stream(image, "a red ball moves right", seconds=None)   # endless F1 stream
    for section in stream:                                           # Section: frames (T, H, W, 3) uint8
        ...
        stream.set_prompt("a red ball moves left")                   # from the next section on
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from framepack_rt.engine.generator import Conditioning, SamplerConfig, SectionGenerator, StepEvent
from framepack_rt.pipeline.media import (ImageInput, PromptChange, bucket_set, fit_to_bucket, load_image,
                                         nearest_bucket, prompt_at)
from framepack_rt.engine.sampling import SOLVERS, GuidanceConfig
from framepack_rt.engine.schedules import (
    DEFAULT_WINDOW,
    Schedule,
    f1_schedule,
    inverted_schedule,
    num_sections,
    video_frames_for_latents,
)
from framepack_rt.engine.teacache import TeaCacheConfig
from framepack_rt.pipeline import builtin
from framepack_rt.pipeline.decode_ahead import overlap_by_default
from framepack_rt.pipeline.devices import DECODER_CHOICES
from framepack_rt.pipeline.fast_decoder import CausalStreamingDecoder, folder_scale, untrained_sizes
from framepack_rt.pipeline.vae import StreamingDecoder, VideoVAE, latent_preview
from framepack_rt.pipeline.video_stream import Section, StepProgress, VideoStream  # noqa: F401  (public here too)

if TYPE_CHECKING:
    from framepack_rt.pipeline.devices import Placement

LOGGER = logging.getLogger(__name__)
MODES = ("f1", "inverted")
FPS = 30


def check_decoder(decoder: str) -> None:
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODER_CHOICES)}")


NO_FAST_DECODER = ("this model has no fast decoder (a fast_decoder/ folder beside vae/): use decoder 'vae' or 'auto', "
                   "or train one with `python -m framepack_rt.demo.train decoder`")


def resolve_decoder(has_fast: bool, decoder: str) -> str:
    """"vae" or "fast": what ``decoder`` ("auto", "vae", "fast") means for a model with or without a fast decoder."""
    check_decoder(decoder)
    if decoder == "fast" and not has_fast:
        raise ValueError(NO_FAST_DECODER)
    return "fast" if decoder == "fast" or (decoder == "auto" and has_fast) else "vae"


def warn_untrained_sizes(fast_decoder: Path, vae: Path, buckets: Sequence[tuple[int, int]]) -> None:
    """Logs a warning, once at load, when the fast decoder records the latent size it was trained on and some of
    ``buckets`` make latents of another size, where its pictures are worse than its training showed."""
    trained, other = untrained_sizes(fast_decoder, vae, buckets)
    if other:
        sizes = ", ".join(f"{w}x{h}" for h, w in other)
        LOGGER.warning("%s was trained on %dx%d latents, but this pipeline generates %s frames, whose latents are "
                       "another size: expect worse colours there (the demo's decoder trained on 8x8 latents drew a red "
                       "ball orange on grey from 12x12 ones). Train a decoder at that size (python -m "
                       "framepack_rt.demo.train decoder --size N --decoder-init %s ...) or decode with decoder 'vae'.",
                       fast_decoder, trained, trained, sizes, fast_decoder)


def make_decoder(vae: VideoVAE, decoder: str, direction: str,
                 total_latents: int | None) -> StreamingDecoder | CausalStreamingDecoder:
    """A stream's frame decoder, chosen once: the VAE's tiles, or the model's fast decoder ("auto": if it has one)."""
    if resolve_decoder(vae.fast is not None, decoder) == "fast":
        return CausalStreamingDecoder(vae.fast, direction=direction, total_latents=total_latents)
    return StreamingDecoder(vae, direction=direction, total_latents=total_latents)


class FramePackPipeline:
    """The encoders, the transformer and the VAE, loaded from local folders or built in ("tiny")."""

    def __init__(self, parts, *, buckets: str | Sequence[tuple[int, int]] = "640", default_steps: int = 25,
                 default_guidance: GuidanceConfig = GuidanceConfig(), default_solver: str = "unipc_bh1",
                 example: tuple[np.ndarray, str] | None = None, placement: Placement | None = None,
                 decoder: str = "auto", fast_scale: int | None = None) -> None:
        """default_guidance: what stream() samples with when not told (the release: distilled 10, no real CFG).
        default_solver: the sampler's solver when stream() is not told (engine/sampling.py's SOLVERS).
        example: a start image (H, W, 3) uint8 and prompt this model set is made for (the demo's red ball);
        servers and tools open with it. None: the model has no preference. placement: the device and dtype
        from_pretrained resolved (None when the parts were built elsewhere). decoder: what streams decode with
        when not told, one of devices.DECODER_CHOICES ("auto": the model's fast decoder when it has one, else the VAE).
        fast_scale: the fast decoder's upsampling over the VAE as from_pretrained read it from the folders (0: the
        model has none); None: asked of the parts' VAE when first needed."""
        check_decoder(decoder)
        self._fast_scale = fast_scale
        self.parts = parts
        self.default_decoder = decoder
        self.placement = placement
        self.buckets = bucket_set(buckets)
        self.default_steps = default_steps
        self.default_guidance = default_guidance
        if default_solver not in SOLVERS:
            raise ValueError(f"unknown solver {default_solver!r}: choose one of {', '.join(SOLVERS)}")
        self.default_solver = default_solver
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
        buckets: str | Sequence[tuple[int, int]] = "640",
        check_memory: bool = True,
        quantize: str | None = None,
        compile: bool = False,
        decoder: str = "auto",
        **part_paths: str | Path,
    ) -> "FramePackPipeline":
        """``"demo"`` (the trained demo model shipped in the package: 12x12 latents of its 96x96 bucket, drawn
        as 192x192 frames by its fast decoder, moves shapes as prompts say),
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
        for small test models; or (height, width) pairs, multiples of 16 px). ``quantize="fp8"``: the transformer
        blocks' weights in fp8 (model/quantize.py).
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
            resolve_decoder(False, decoder)  # the built-in tiny set has no fast decoder: refuse "fast" now
            placement = fp32_only(placement)
            return cls(TinyParts(device=placement.device, options=options), buckets="tiny", default_steps=TinyParts.DEFAULT_STEPS,
                       placement=placement, decoder=decoder, fast_scale=0)
        settings: dict = {"buckets": buckets, "decoder": decoder}
        if str(path) == "demo" and not part_paths:
            path = builtin.demo_weights_dir()
            settings = {**settings, "buckets": "demo", "default_steps": builtin.DEMO_STEPS,
                        "default_guidance": builtin.demo_guidance(), "default_solver": builtin.DEMO_SOLVER}
        roots = [] if str(path) == "tiny" else [path]
        if roots and (example := builtin.read_example(roots[0])) is not None:
            settings["example"] = example
        paths = resolve_model_paths(*roots, **part_paths)
        resolve_decoder(paths.fast_decoder is not None, decoder)  # "fast" without one: refused before loading
        budget = int((memory_budget_gb or DEFAULT_BUDGET_GB) * GiB) if low_vram else None
        # Planned at the largest bucket the pipeline will run; in low-VRAM mode the plan also splits the budget
        # (the blocks get what the activations, VAE and workspace leave) and places the encoders.
        buckets = bucket_set(settings["buckets"])
        largest = max(buckets, key=lambda hw: hw[0] * hw[1])
        estimate = estimate_folders(asdict(paths), placement, low_vram=low_vram, budget_bytes=budget,
                                    quantize=quantize, frame=largest)
        if check_memory:
            estimate = ensure_fits(estimate)
        elif estimate.plan_error is not None:
            raise InsufficientMemory(estimate.plan_error)
        parts = FolderParts(paths, device=placement.device, dtype=placement.dtype, low_vram=low_vram,
                            budget_bytes=estimate.streamer_budget_bytes, options=options,
                            encoders_on_cpu=estimate.encoders_on_cpu)
        fast_scale = 0 if paths.fast_decoder is None else folder_scale(paths.fast_decoder, paths.vae)
        if paths.fast_decoder is not None and decoder != "vae":
            warn_untrained_sizes(paths.fast_decoder, paths.vae, buckets)
        return cls(parts, placement=placement, fast_scale=fast_scale, **settings)

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
        the demo's sigma interval, stay. A stronger scale after a prompt change (``cfg_after_change``) stays
        when it is above ``cfg`` and goes with cfg 1 (real CFG off means off)."""
        if cfg is None:
            return self.default_guidance
        after = self.default_guidance.cfg_after_change
        if after is not None:
            after = None if cfg == 1.0 or after <= cfg else after
        return replace(self.default_guidance, cfg=cfg, cfg_after_change=after)

    # -- encoding --------------------------------------------------------------------------------------------
    def bucket(self, image: ImageInput) -> tuple[int, int]:
        """(H, W) the transformer generates at from ``image``: its nearest bucket."""
        return nearest_bucket(*load_image(image).shape[:2], self.buckets)

    def frame_size(self, image: ImageInput, decoder: str | None = None) -> tuple[int, int]:
        """(H, W) of the frames streamed from ``image`` and decoded with ``decoder`` (None: the default): its
        bucket, times the fast decoder's upsampling when that decodes (a decoder may draw larger frames than
        the VAE). Cheap: read from the folders at load, nothing is loaded here (but for parts built elsewhere)."""
        h, w = self.bucket(image)
        if self._fast_scale is None:
            vae = self.parts.vae()
            self._fast_scale = vae.fast_scale if vae.fast is not None else 0
        fast = resolve_decoder(self._fast_scale > 0, decoder or self.default_decoder) == "fast"
        scale = self._fast_scale if fast else 1
        return h * scale, w * scale

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
        window: int = DEFAULT_WINDOW,
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
        solver: str | None = None,
    ) -> VideoStream:
        """Start generating; returns the :class:`VideoStream` of sections.

        mode "f1": forward, endless unless ``seconds``. mode "inverted": anti-drifting, needs ``seconds``, may
        end on ``end_image``; its sections come end-first (``Section.first_frame`` says where they go).
        teacache: a threshold (e.g. 0.15) or a config; None turns it off. guidance: None, the model's default
        (``default_guidance``; :meth:`guidance` changes only its scale). negative_prompt: what real CFG steers
        away from (None or empty: zero text embeddings). decode_overlap: decode section k on its own thread
        (CUDA stream) while k + 1 samples; None: on, except in low-VRAM mode (decode_ahead.overlap_by_default).
        decoder: "vae", "fast" (the model's FastVideoDecoder) or "auto"; None: the pipeline's ``default_decoder``.
        solver: one of engine/sampling.py's SOLVERS; None: the pipeline's ``default_solver``.
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
                                teacache=teacache, solver=solver or self.default_solver)

        holder: dict[str, VideoStream] = {}

        def step_callback(event: StepEvent) -> None:
            holder["stream"].check_stop()
            if on_step is not None:
                preview = latent_preview(event.denoised[:, :, -1:], preview_rgb)[0, 0].numpy()
                on_step(StepProgress(event.section, event.step, event.steps, preview))

        negative = None
        if sampler.guidance.may_guide and negative_prompt:
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
