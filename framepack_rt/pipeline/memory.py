"""Before loading model folders: what their weights need on the device, against what is free there.

Parameters are counted on the meta device (no memory, no weights read): the transformer with
``FramePackTransformer.from_config(config, device="meta")``, the encoders and the VAE from their
transformers / diffusers configs; a part whose config does not build falls back to its safetensors headers.
Bytes are the parameters times the dtype each part loads in (:func:`framepack_rt.pipeline.devices.part_dtype`;
fp8 blocks at one byte per weight). What comes on top of the weights is the activation-aware plan of
:mod:`framepack_rt.model.memory_plan` at the pipeline's largest bucket (one step's activations, the section's
tensors, TeaCache's buffers, the VAE's decode tiles, a workspace margin); only when the transformer's config
does not build is it a flat 1 GiB plus 10% of the weights.

    estimate = estimate_folders(paths, placement, frame=(640, 640))  # MemoryEstimate: needed on the device
    ensure_fits(estimate)                          # InsufficientMemory: needed vs free, and the flag that fits

In low-VRAM mode ``--memory-budget-gb`` is the whole device budget: the plan keeps the VAE, the workspace and
the worst phase (a step's activations, the decode, or an encoder while it runs) inside it and gives the
transformer's blocks what is left (:attr:`MemoryEstimate.streamer_budget_bytes`). When the largest encoder
cannot fit beside them (the 8 B LLaMA in a 6 GB budget), the encoders run on the CPU instead
(:attr:`MemoryEstimate.encoders_on_cpu`): slower prompt changes, but the run fits.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from framepack_rt.model.config import FramePackConfig
from framepack_rt.model.memory_plan import DEFAULT_WORKSPACE, MemoryPlan, VaeSpec, count_weights, plan_memory
from framepack_rt.model.offload import minimum_weight_budget
from framepack_rt.pipeline.devices import DTYPES, TRANSFORMER, Placement, dtype_name

GiB = 2**30
MARGIN_FLAT_BYTES = 1 * GiB  # CUDA context, allocator slack, the process's own tensors
MARGIN_FRACTION = 0.10  # activations and the VAE's decode tiles, as a share of the weights
DEFAULT_BUDGET_GB = 6.0  # low-VRAM mode's device budget for transformer weights (as the release)
ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder")
PLAN_FRAME = (640, 640)  # the release's largest square bucket: what a pipeline of its folders may run
PLAN_WINDOW = 9  # latents per section, the release's latent_window_size
WEIGHT_PARTS = (*ENCODERS, "vae", TRANSFORMER)  # the folders that hold weights (tokenizers etc. do not)


class InsufficientMemory(ValueError):
    """The device (or the host, in low-VRAM mode) cannot hold the model: the message says what is needed,
    what is free, and which flags fit."""


# -- counting ------------------------------------------------------------------------------------------------
def _module_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(floating-point elements, bytes of the other buffers such as int64 position ids)."""
    floats, other = 0, 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            floats += t.numel()
        else:
            other += t.numel() * t.element_size()
    return floats, other


def count_module(module: torch.nn.Module, counted_by: str = "model") -> tuple[int, int, str]:
    """(floating-point elements, other bytes, ``counted_by``) of a model already built (meta device or not)."""
    return (*_module_numel(module), counted_by)


def _meta_transformer(folder: Path) -> torch.nn.Module:
    from framepack_rt.model.config import FramePackConfig
    from framepack_rt.model.transformer import FramePackTransformer

    return FramePackTransformer.from_config(FramePackConfig.from_file(folder / "config.json"), device="meta")


def _meta_transformers_model(class_name: str) -> Callable[[Path], torch.nn.Module]:
    def build(folder: Path) -> torch.nn.Module:
        import transformers

        cls = getattr(transformers, class_name)
        config = cls.config_class.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            return cls(config)

    return build


def _meta_vae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo

    config = AutoencoderKLHunyuanVideo.load_config(folder, local_files_only=True)
    with torch.device("meta"):
        return AutoencoderKLHunyuanVideo.from_config(config)


# part -> how to build it on the meta device from its folder's config.json (the classes the loaders use)
META_BUILDERS: dict[str, Callable[[Path], torch.nn.Module]] = {
    "text_encoder": _meta_transformers_model("LlamaModel"),
    "text_encoder_2": _meta_transformers_model("CLIPTextModel"),
    "image_encoder": _meta_transformers_model("SiglipVisionModel"),
    "vae": _meta_vae,
    TRANSFORMER: _meta_transformer,
}

_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_numel(folder: str | Path) -> tuple[int, int]:
    """(floating-point elements, bytes of integer tensors) over every ``*.safetensors`` file in ``folder``,
    read from the headers only."""
    floats, other = 0, 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files to count")
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for n in entry["shape"]:
                numel *= n
            if entry["dtype"].startswith(("F", "BF")):
                floats += numel
            else:
                other += numel * _SAFETENSORS_ITEMSIZE.get(entry["dtype"], 8)
    return floats, other


def _count(part: str, folder: Path) -> tuple[tuple[int, int, str], torch.nn.Module | None]:
    """((floating-point elements, other bytes, how counted), the meta model or None) for one part's folder."""
    try:
        model = META_BUILDERS[part](folder)
    except (ValueError, TypeError, KeyError, OSError, AttributeError) as exc:  # a config these classes do not take
        floats, other = safetensors_numel(folder)
        return (floats, other, f"safetensors headers (config.json did not build: {type(exc).__name__})"), None
    return (*_module_numel(model), "meta-device model from config.json"), model


def count_part(part: str, folder: str | Path) -> tuple[int, int, str]:
    """(floating-point elements, other bytes, how it was counted) for one part's folder."""
    return _count(part, Path(folder))[0]


# -- the estimate --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartSize:
    """One part's weights as loaded: ``numel`` floating-point elements in ``dtype`` plus ``other_bytes``."""

    name: str
    numel: int
    dtype: torch.dtype
    other_bytes: int = 0
    counted_by: str = ""
    quantized_bytes: int | None = None  # the floating-point tensors' bytes when some are fp8 (the transformer)

    @property
    def nbytes(self) -> int:
        floats = self.numel * self.dtype.itemsize if self.quantized_bytes is None else self.quantized_bytes
        return floats + self.other_bytes

    def in_dtype(self, dtype: torch.dtype) -> "PartSize":
        return replace(self, dtype=dtype, quantized_bytes=None)  # estimate_parts counts fp8 again


def margin_bytes(weights: int) -> int:
    """What the device needs beyond the weights: flat plus a share of them (see the module docstring)."""
    return MARGIN_FLAT_BYTES + int(MARGIN_FRACTION * weights)


@dataclass(frozen=True)
class PlanInputs:
    """What the activation-aware plan needs besides the weights' dtype and a budget: the transformer's config,
    the frame and window of the largest section the pipeline will run, fp8 or not, the VAE."""

    config: FramePackConfig
    height: int = PLAN_FRAME[0]
    width: int = PLAN_FRAME[1]
    window: int = PLAN_WINDOW
    quantize: str | None = None
    vae_channels: tuple[int, ...] | None = VaeSpec.block_out_channels  # None: no VAE config to plan its tiles by


@dataclass(frozen=True)
class MemoryEstimate:
    """What loading the parts needs on ``device`` (and, in low-VRAM mode on a GPU, in host RAM).

    Normal mode keeps every part on the device. Low-VRAM mode keeps the VAE, loads one encoder at a time (on the
    device when it fits the budget beside the rest, else on the CPU), and streams the transformer's blocks from
    host RAM (pinned on CUDA) so that the device's peak stays within ``budget_bytes``.
    ``plan``: the activation-aware plan (None when the transformer's config did not build: then a flat margin).
    ``plan_error``: why low-VRAM mode cannot run in ``budget_bytes`` (what is needed), None when it can.
    ``min_budget_bytes``: the smallest budget that runs at all.
    """

    device: torch.device
    parts: tuple[PartSize, ...]
    low_vram: bool = False
    budget_bytes: int | None = None
    min_budget_bytes: int | None = None
    free_bytes: int | None = None  # on the device, when measured
    host_free_bytes: int | None = None  # host RAM available, when measured (low-VRAM mode on a GPU)
    notes: tuple[str, ...] = ()
    plan: MemoryPlan | None = None
    plan_inputs: PlanInputs | None = None
    encoders_on_cpu: bool = False
    plan_error: str | None = None

    def part(self, name: str) -> PartSize | None:
        return next((p for p in self.parts if p.name == name), None)

    @property
    def weights_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def _largest_encoder(self) -> int:
        return max((p.nbytes for p in self.parts if p.name in ENCODERS), default=0)

    @property
    def _cpu_master_copy(self) -> int:
        """On the CPU the "device" copies of low-VRAM mode sit beside the transformer's master copy."""
        transformer = self.part(TRANSFORMER)
        return transformer.nbytes if self.low_vram and self.device.type == "cpu" and transformer else 0

    @property
    def resident_bytes(self) -> int:
        """Weights on the device at the peak."""
        if not self.low_vram:
            return self.weights_bytes
        transformer, vae = self.part(TRANSFORMER), self.part("vae")
        if self.plan is not None:
            streamed = self.plan.weights.device_bytes
        else:
            streamed = min(self.budget_bytes or 0, transformer.nbytes) if transformer else 0
        encoders = 0 if self.encoders_on_cpu else self._largest_encoder
        return streamed + encoders + (vae.nbytes if vae else 0) + self._cpu_master_copy

    @property
    def margin_bytes(self) -> int:
        """Beyond the weights: the plan's workspace and its worst phase, or the flat rule without a plan."""
        if self.plan is None:
            return margin_bytes(self.resident_bytes)
        return self.needed_bytes - self.resident_bytes

    @property
    def needed_bytes(self) -> int:
        """Device memory needed at the peak."""
        plan = self.plan
        if plan is None:
            return self.resident_bytes + margin_bytes(self.resident_bytes)
        if self.low_vram:  # the plan already holds the VAE, the encoder phase and the workspace
            return plan.peak_bytes + self._cpu_master_copy
        return self.weights_bytes + plan.workspace + max(plan.step_bytes, plan.vae_decode)

    @property
    def streamer_budget_bytes(self) -> int | None:
        """The weight budget BlockStreamer gets in low-VRAM mode: the budget less everything else."""
        if not self.low_vram or self.budget_bytes is None:
            return None
        if self.plan is None:  # no plan: the budget is for weights only, as the flat rule assumes
            return self.budget_bytes
        return self.plan.streamer_weight_budget

    @property
    def host_bytes(self) -> int | None:
        """Host RAM the low-VRAM mode needs on a GPU (the transformer's master copy, and the largest encoder when
        encoders run on the CPU); None otherwise."""
        transformer = self.part(TRANSFORMER)
        if not self.low_vram or self.device.type == "cpu" or transformer is None:
            return None
        return transformer.nbytes + (self._largest_encoder if self.encoders_on_cpu else 0)

    def fits(self) -> bool | None:
        """None when free memory is unknown."""
        if self.plan_error is not None:
            return False
        if self.free_bytes is None:
            return None
        host_ok = self.host_bytes is None or self.host_free_bytes is None or self.host_bytes <= self.host_free_bytes
        return self.needed_bytes <= self.free_bytes and host_ok

    def summary(self) -> str:
        """One line: needed (weights by part and dtype + margin) vs free."""
        parts = ", ".join(f"{p.name} {human_bytes(p.nbytes)} {dtype_name(p.dtype)}"
                          f"{' (fp8 blocks)' if p.quantized_bytes is not None else ''}" for p in self.parts)
        if self.low_vram:
            held = (f" in low-VRAM mode (budget {human_bytes(self.budget_bytes or 0)}): "
                    f"{human_bytes(self.resident_bytes)} of the {human_bytes(self.weights_bytes)} of weights at once")
            if self.encoders_on_cpu:
                held += ", encoders on the CPU"
        else:
            held = f" ({human_bytes(self.resident_bytes)} of weights"
        what = "activations, decode and workspace" if self.plan is not None else "margin"
        line = (f"needs {human_bytes(self.needed_bytes)} on {self.device}{held} [{parts}] + "
                f"{human_bytes(self.margin_bytes)} {what}")
        line += "" if self.low_vram else ")"
        if self.plan is not None:
            line += f" at {self.plan.height}x{self.plan.width}, window {self.plan.window}"
        if self.free_bytes is not None:
            line += f", {human_bytes(self.free_bytes)} free"
        if self.host_bytes is not None:
            line += f"; host RAM {human_bytes(self.host_bytes)}"
            if self.host_free_bytes is not None:
                line += f", {human_bytes(self.host_free_bytes)} available"
        return line

    def to_json(self) -> dict:
        return {
            "device": str(self.device), "low_vram": self.low_vram, "budget_bytes": self.budget_bytes,
            "parts": [{"name": p.name, "numel": p.numel, "dtype": dtype_name(p.dtype), "bytes": p.nbytes,
                       "counted_by": p.counted_by} for p in self.parts],
            "weights_bytes": self.weights_bytes, "resident_bytes": self.resident_bytes,
            "margin_bytes": self.margin_bytes, "needed_bytes": self.needed_bytes, "free_bytes": self.free_bytes,
            "host_bytes": self.host_bytes, "host_free_bytes": self.host_free_bytes, "fits": self.fits(),
            "encoders_on_cpu": self.encoders_on_cpu, "streamer_budget_bytes": self.streamer_budget_bytes,
            "planned_at": None if self.plan is None else [self.plan.height, self.plan.width, self.plan.window],
            "plan_error": self.plan_error, "notes": list(self.notes),
        }


def human_bytes(nbytes: int | float) -> str:
    """GiB with one decimal; MiB below 1 GiB."""
    return f"{nbytes / GiB:.1f} GiB" if abs(nbytes) >= GiB else f"{nbytes / 2**20:.1f} MiB"


STREAM_SLOTS = 2  # device buffers low-VRAM mode streams blocks through (model.offload: prefetch 1 + 1)


def min_budget_for(model: torch.nn.Module, dtype: torch.dtype, slots: int = STREAM_SLOTS) -> int:
    """The least low-VRAM budget for a FramePack transformer: its non-block weights plus ``slots`` buffers the
    size of its largest block (every block streamed)."""
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    total = _module_numel(model)[0]
    in_blocks = sum(_module_numel(b)[0] for b in blocks)
    largest = max(_module_numel(b)[0] for b in blocks)
    return (total - in_blocks + slots * largest) * dtype.itemsize


def estimate_parts(sizes: Mapping[str, tuple[int, int, str]], placement: Placement, *, low_vram: bool = False,
                   budget_bytes: int | None = None, min_budget_bytes: int | None = None,
                   notes: Iterable[str] = (), plan_inputs: PlanInputs | None = None) -> MemoryEstimate:
    """An estimate from counted parts ``{part: (floating numel, other bytes, how counted)}``, planned with
    ``plan_inputs`` when given (:func:`with_plan`); free memory is filled in by :func:`with_free_memory`."""
    parts = tuple(PartSize(name, numel, placement.dtype_for(name), other, how)
                  for name, (numel, other, how) in sizes.items())
    if low_vram and budget_bytes is None:
        budget_bytes = int(DEFAULT_BUDGET_GB * GiB)
    estimate = MemoryEstimate(placement.device, parts, low_vram, budget_bytes if low_vram else None,
                              min_budget_bytes, notes=tuple(notes))
    return estimate if plan_inputs is None else with_plan(estimate, plan_inputs)


def with_plan(estimate: MemoryEstimate, inputs: PlanInputs) -> MemoryEstimate:
    """``estimate`` with the activation-aware plan (model/memory_plan.py) of its transformer at ``inputs``: fp8
    blocks counted at their bytes, and in low-VRAM mode the encoders' place (the device when the largest fits
    the budget beside the rest, else the CPU), the smallest budget that runs, or why the budget cannot."""
    transformer, vae = estimate.part(TRANSFORMER), estimate.part("vae")
    if transformer is None:
        return estimate
    parts = estimate.parts
    if inputs.quantize:
        quantized = count_weights(inputs.config, transformer.dtype, inputs.quantize).total - transformer.other_bytes
        transformer = replace(transformer, quantized_bytes=quantized)
        parts = tuple(transformer if p.name == TRANSFORMER else p for p in parts)
    estimate = replace(estimate, parts=parts, plan_inputs=inputs, plan=None, plan_error=None, encoders_on_cpu=False)
    vae_spec = None
    if vae is not None and inputs.vae_channels is not None:
        # low-VRAM mode decodes in 256 px spatial tiles (pipeline/vae.py); normal mode whole frames
        vae_spec = VaeSpec(weights_bytes=vae.nbytes, block_out_channels=inputs.vae_channels,
                           spatial_tile=256 if estimate.low_vram else None, itemsize=vae.dtype.itemsize)
    # The CPU has no cuBLAS workspace or autotuning buffers to hold room for; every other device does.
    workspace = 0 if estimate.device.type == "cpu" else DEFAULT_WORKSPACE
    settings = dict(height=inputs.height, width=inputs.width, window=inputs.window, dtype=transformer.dtype,
                    quantize=inputs.quantize, vae=vae_spec, workspace_bytes=workspace)
    unbudgeted = plan_memory(inputs.config, **settings)
    if not estimate.low_vram:
        return replace(estimate, plan=unbudgeted)
    w = unbudgeted.weights
    least = unbudgeted.non_weight_bytes + minimum_weight_budget(w.base, list(w.block_sizes), list(w.block_regions), 2)
    estimate = replace(estimate, min_budget_bytes=least)
    encoder = max((p.nbytes for p in parts if p.name in ENCODERS), default=0)
    error = ""
    for on_cpu in (False, True) if encoder else (False,):
        try:
            plan = plan_memory(inputs.config, **settings, encoder_bytes=0 if on_cpu else encoder,
                               budget_bytes=estimate.budget_bytes)
        except ValueError as exc:
            error = str(exc)
            continue
        return replace(estimate, plan=plan, encoders_on_cpu=on_cpu)
    return replace(estimate, plan=unbudgeted, encoders_on_cpu=bool(encoder), plan_error=error)


def plan_inputs_for(folders: Mapping[str, str | Path], *, frame: tuple[int, int] = PLAN_FRAME,
                    window: int = PLAN_WINDOW, quantize: str | None = None) -> PlanInputs | None:
    """The plan's inputs from part folders: the transformer's config.json (None when it does not parse) and
    the VAE's channel widths (diffusers' defaults where its config does not say)."""
    try:
        config = FramePackConfig.from_file(Path(folders[TRANSFORMER]) / "config.json")
    except (KeyError, OSError, ValueError, TypeError):
        return None
    channels: tuple[int, ...] | None = None
    if "vae" in folders:
        try:
            vae_config = json.loads((Path(folders["vae"]) / "config.json").read_text())
            channels = tuple(vae_config.get("block_out_channels", VaeSpec.block_out_channels))
        except (OSError, ValueError):
            channels = VaeSpec.block_out_channels
    return PlanInputs(config, frame[0], frame[1], window, quantize, channels)


def estimate_folders(folders: Mapping[str, str | Path], placement: Placement, *, low_vram: bool = False,
                     budget_bytes: int | None = None, quantize: str | None = None,
                     frame: tuple[int, int] = PLAN_FRAME, window: int = PLAN_WINDOW) -> MemoryEstimate:
    """The estimate for part folders ``{part: folder}`` (any of :data:`WEIGHT_PARTS`; a ModelPaths' fields do),
    planned for sections of ``frame`` (height, width) pixels and ``window`` latents, without free memory."""
    sizes, min_budget = {}, None
    for part in WEIGHT_PARTS:
        if part in folders:
            sizes[part], model = _count(part, Path(folders[part]))
            if part == TRANSFORMER and model is not None:
                min_budget = min_budget_for(model, placement.dtype_for(TRANSFORMER))
    inputs = plan_inputs_for(folders, frame=frame, window=window, quantize=quantize) if TRANSFORMER in sizes else None
    return estimate_parts(sizes, placement, low_vram=low_vram, budget_bytes=budget_bytes,
                          min_budget_bytes=min_budget, plan_inputs=inputs)


# -- free memory ---------------------------------------------------------------------------------------------
def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where there is none."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: torch.cuda.mem_get_info on CUDA, MemAvailable on the CPU, MPS's recommended
    maximum less what it holds; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    if device.type == "cpu":
        return host_available_bytes()
    return None


def with_free_memory(estimate: MemoryEstimate) -> MemoryEstimate:
    """``estimate`` with free device memory and available host RAM measured now."""
    host = host_available_bytes()
    free = host if estimate.device.type == "cpu" else device_free_bytes(estimate.device)
    return replace(estimate, free_bytes=free, host_free_bytes=host)


# -- the check -----------------------------------------------------------------------------------------------
def _alternatives(estimate: MemoryEstimate) -> list[tuple[str, MemoryEstimate]]:
    """Settings that need less, in the order they are suggested: bf16 instead of fp32, then low-VRAM mode
    with the largest budget that fits what is free (then low-VRAM mode in bf16)."""
    variants: list[tuple[str, tuple[PartSize, ...]]] = [("", estimate.parts)]
    if any(p.dtype == torch.float32 for p in estimate.parts):
        bf16 = tuple(p.in_dtype(DTYPES["bf16"]) if p.dtype == torch.float32 else p for p in estimate.parts)
        variants.append(("--dtype bf16", bf16))
    out: list[tuple[str, MemoryEstimate]] = []
    if not estimate.low_vram and len(variants) == 2:
        bf16_estimate = replace(estimate, parts=variants[1][1])
        if estimate.plan_inputs is not None:
            bf16_estimate = with_plan(bf16_estimate, estimate.plan_inputs)
        out.append(("--dtype bf16", bf16_estimate))
    transformer = estimate.part(TRANSFORMER)
    if transformer is None or estimate.free_bytes is None:
        return out
    for dtype_flag, parts in variants:
        if estimate.plan_inputs is not None:  # the budget is the whole device: all that is free, in tenths of a GiB
            budget_gb = int((estimate.free_bytes - estimate._cpu_master_copy) / GiB * 10) / 10
            if budget_gb <= 0:
                continue
            low = with_plan(replace(estimate, parts=parts, low_vram=True, budget_bytes=int(budget_gb * GiB)),
                            estimate.plan_inputs)
            if low.plan_error is None:
                flags = " ".join(filter(None, [f"--low-vram --memory-budget-gb {budget_gb:g}", dtype_flag]))
                out.append((flags, low))
            continue
        floor = estimate.min_budget_bytes or 0
        streamed = next(p for p in parts if p.name == TRANSFORMER)
        floor = floor * streamed.dtype.itemsize // transformer.dtype.itemsize
        unbudgeted = replace(estimate, parts=parts, low_vram=True, budget_bytes=0)
        # free = resident + margin(resident), resident = budget + what low-VRAM mode keeps besides: solve for budget
        room = (estimate.free_bytes - MARGIN_FLAT_BYTES) / (1 + MARGIN_FRACTION) - unbudgeted.resident_bytes
        budget_gb = min(int(room / GiB * 10) / 10, -(-streamed.nbytes // GiB))  # tenths of a GiB, rounded down
        if budget_gb <= 0 or budget_gb * GiB < floor:
            continue
        flags = " ".join(filter(None, [f"--low-vram --memory-budget-gb {budget_gb:g}", dtype_flag]))
        out.append((flags, replace(unbudgeted, budget_bytes=int(budget_gb * GiB))))
    return out


def advice(estimate: MemoryEstimate) -> str:
    """For an estimate that does not fit what is free: what to do, naming the first setting that fits."""
    if (estimate.plan_error is None and estimate.free_bytes is not None
            and estimate.needed_bytes <= estimate.free_bytes):
        # The device holds it; the host RAM does not hold low-VRAM mode's copy of the transformer.
        what = "use --dtype bf16" if any(p.dtype == torch.float32 for p in estimate.parts) else (
            "add host RAM, or leave low-VRAM mode if the device holds the whole model")
        return (f"low-VRAM mode keeps the transformer's weights in host RAM: it needs "
                f"{human_bytes(estimate.host_bytes or 0)}, {human_bytes(estimate.host_free_bytes or 0)} is "
                f"available: {what}")
    fitting = [(flags, alt) for flags, alt in _alternatives(estimate) if alt.fits()]
    if fitting:
        flags, alt = fitting[0]
        host = f" and {human_bytes(alt.host_bytes)} of host RAM" if alt.host_bytes is not None else ""
        where = ", encoders on the CPU" if alt.encoders_on_cpu else ""
        return f"use {flags} (needs {human_bytes(alt.needed_bytes)}{host}{where})"
    if estimate.plan_error is not None:
        return estimate.plan_error
    if estimate.plan_inputs is not None and estimate.free_bytes:  # why not even low-VRAM mode in all that is free
        probe = with_plan(replace(estimate, low_vram=True, budget_bytes=estimate.free_bytes), estimate.plan_inputs)
        if probe.plan_error is not None:
            return f"nothing fits: {probe.plan_error}"
    if estimate.low_vram and estimate.min_budget_bytes:
        return (f"low-VRAM mode needs a budget of at least {human_bytes(estimate.min_budget_bytes)} (non-block "
                "weights + the buffers blocks stream through) plus the largest encoder and the VAE: free memory on "
                "the device, or use one with more")
    return "nothing fits, not even --low-vram in bf16: use a device with more memory"


def ensure_fits(estimate: MemoryEstimate) -> MemoryEstimate:
    """``estimate`` with free memory measured (unless already given) when it fits or free memory is unknown;
    otherwise InsufficientMemory, one line: what is needed, what is free, and the first setting that fits."""
    if estimate.free_bytes is None:
        estimate = with_free_memory(estimate)
    if estimate.fits() is not False:
        return estimate
    if estimate.plan_error is not None:
        raise InsufficientMemory(f"the model {estimate.summary()}: {advice(estimate)}")
    if estimate.needed_bytes <= estimate.free_bytes:
        raise InsufficientMemory(advice(estimate))
    raise InsufficientMemory(f"the model {estimate.summary()}: {advice(estimate)}")
