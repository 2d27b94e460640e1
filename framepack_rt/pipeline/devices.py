"""Which device and dtype the pipeline runs on: one set of names and defaults for every command and the server.

    --device auto | cpu | cuda | cuda:N | mps     auto: CUDA when torch sees a GPU, else the CPU
    --dtype  auto | bf16 | fp16 | fp32            auto: the transformer in bf16 where the device has it, fp16 on
                                                  GPUs without bf16, fp32 on the CPU; on GPUs the encoders and
                                                  the VAE in fp16, as the release runs them

``resolve_placement("auto", "auto")`` turns the names into a :class:`Placement` once, at load time; nothing here
touches CUDA at import. Errors are :class:`DeviceError` (a ValueError) and say which flag to use instead.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

from framepack_rt.model.quantize import QUANTIZE_CHOICES

DECODER_CHOICES = ("auto", "vae", "fast")  # what streams decode frames with (framepack_pipeline.make_decoder)

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
_DEVICE_SYNTAX = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Parts as the loaders name them; every part but the transformer runs in fp16 on GPUs under dtype auto.
TRANSFORMER = "transformer"


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message says what to pass instead."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (other dtypes: torch's name without the prefix)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def check_device_syntax(text: str) -> str:
    """The --device value, lower-cased, if it is one of the names (availability is checked when resolving)."""
    value = text.strip().lower()
    if not _DEVICE_SYNTAX.match(value):
        raise DeviceError(f"--device {text!r}: choose {DEVICE_NAMES}")
    return value


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): ``cuda:<current>`` when torch sees a CUDA GPU, else ``cpu``. An explicit device must
    exist here: a clear DeviceError otherwise. CUDA devices always come back with their index."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    value = check_device_syntax("auto" if spec is None else spec)
    if value == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(f"--device {value}: torch {torch.__version__} ({build}) sees no CUDA GPU; use --device "
                              "cpu (or auto), or install a CUDA build of torch and check `nvidia-smi`")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DeviceError(f"--device {value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {value}: MPS (Apple GPUs) is not available in this torch build; use --device cpu")
    return device


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA: compute capability 8.0 or newer)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):  # macOS before 14: MPS has no bf16
            return False
        return True
    return True  # the CPU computes bf16 (slowly where the ISA lacks it); auto still picks fp32 there


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """None for ``auto`` (each part then takes :func:`part_dtype`'s default), else the dtype every part uses.
    bf16 on a GPU without it is refused with the flag that works."""
    if spec is None or isinstance(spec, torch.dtype):
        dtype = spec
    else:
        value = spec.strip().lower()
        value = _DTYPE_ALIASES.get(value, value)
        if value == "auto":
            return None
        if value not in DTYPES:
            raise DeviceError(f"--dtype {spec!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPES[value]
    if dtype == torch.bfloat16 and device.type != "cpu" and not supports_bf16(device):
        raise DeviceError(f"--dtype bf16: {describe_device(device)} has no bf16; use --dtype fp16 (or auto)")
    return dtype


def part_dtype(part: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``part`` loads in: ``dtype`` when one was chosen; under auto fp32 on the CPU, and on GPUs the
    release's choice: the transformer in bf16 (fp16 where the GPU lacks bf16), encoders and VAE in fp16."""
    if dtype is not None:
        return dtype
    if device.type not in ("cuda", "mps"):
        return torch.float32
    if part == TRANSFORMER:
        return torch.bfloat16 if supports_bf16(device) else torch.float16
    return torch.float16


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3, sm_90)``; ``cpu``; ``mps``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"
    return str(device)


@dataclass(frozen=True)
class Placement:
    """Where and in what precision the pipeline's parts load. ``dtype`` None: auto, per part."""

    device: torch.device
    dtype: torch.dtype | None = None

    def dtype_for(self, part: str) -> torch.dtype:
        return part_dtype(part, self.device, self.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The transformer's dtype: what the sampling steps compute in."""
        return self.dtype_for(TRANSFORMER)

    def describe(self) -> str:
        others = "" if self.dtype is not None or self.device.type == "cpu" else ", encoders and VAE fp16"
        return f"{describe_device(self.device)}, transformer {dtype_name(self.compute_dtype)}{others}"


def fp32_only(placement: Placement, what: str = "the built-in tiny model") -> Placement:
    """``placement`` in fp32 for a model that only runs in fp32; an explicit other dtype is refused."""
    if placement.dtype not in (None, torch.float32):
        raise DeviceError(f"{what} runs in fp32: use --dtype auto or fp32")
    return Placement(placement.device, torch.float32)


def resolve_placement(device: str | torch.device | None = "auto",
                      dtype: str | torch.dtype | None = "auto") -> Placement:
    """Names (or torch objects) -> a checked :class:`Placement`."""
    resolved = resolve_device(device)
    return Placement(resolved, resolve_dtype(dtype, resolved))


def _device_arg(text: str) -> str:
    try:
        return check_device_syntax(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--device {text!r}: ")) from None


def _budget_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GiB, e.g. 6") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser, *, memory: bool = False) -> None:
    """--device and --dtype; with ``memory``, also --low-vram, --memory-budget-gb, --quantize and --compile
    (commands that load the whole pipeline)."""
    parser.add_argument("--device", type=_device_arg, default="auto",
                        help=f"{DEVICE_NAMES} (default: auto, CUDA when available, else the CPU)")
    parser.add_argument("--dtype", type=str.lower, choices=DTYPE_CHOICES, default="auto",
                        help="weights and compute (default: auto: bf16 where the device has it, fp16 on GPUs "
                             "without bf16, fp32 on the CPU; encoders and VAE fp16 on GPUs)")
    if memory:
        parser.add_argument("--low-vram", action="store_true",
                            help="encoders loaded only while used, transformer blocks streamed from CPU memory")
        parser.add_argument("--memory-budget-gb", type=_budget_arg, metavar="GB",
                            help="low-VRAM mode: device memory for transformer weights (default: 6)")
        parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                            help="store the transformer blocks' weights as fp8 (half of bf16's bytes)")
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile each transformer block (slower start, faster steps on GPUs)")


def add_decoder_argument(parser: argparse.ArgumentParser) -> None:
    """--decoder, for the commands that decode frames (serve, generate)."""
    parser.add_argument("--decoder", choices=DECODER_CHOICES, default="auto",
                        help="frames from latents: the VAE's decoder, or the model's fast decoder (its fast_decoder/ "
                             "folder; the demo ships one); default auto: fast when the model has one")


def check_memory_flags(low_vram: bool, memory_budget_gb: float | None) -> None:
    """--memory-budget-gb only means something in low-VRAM mode."""
    if memory_budget_gb is not None and not low_vram:
        raise DeviceError("--memory-budget-gb (memory_budget_gb) is the low-VRAM mode's budget: add --low-vram "
                          "(low_vram=True)")
