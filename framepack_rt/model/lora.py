"""LoRA adapters for the transformer: the two shared file layouts, applied unmerged (live scales) or fused.

Files (safetensors) come in two key layouts, both naming diffusers' module paths, which ours mirror:

* **diffusers / PEFT**: ``transformer.<module>.lora_A.weight`` (rank, in) and ``<module>.lora_B.weight``
  (out, rank); optional ``<module>.alpha`` (a scalar) or a ``lora_alpha`` in the file's
  ``lora_adapter_metadata``. The prefix may also be ``base_model.model.``, ``diffusion_model.`` or none.
  Without an alpha the delta is ``B @ A`` (PEFT's scaling alpha / rank with alpha = rank).
* **kohya / musubi-tuner**: ``lora_unet_<module with dots as underscores>.lora_down.weight`` (rank, in),
  ``.lora_up.weight`` (out, rank) and ``.alpha``; the delta is ``alpha / rank * up @ down`` (no alpha: 1).

Original HunyuanVideo names (``double_blocks.N.img_attn_qkv``, fused q/k/v) are not mapped, as the checkpoint
loader does not map them either: such a key is an error that names it.

:class:`LoraSet` attaches to a model. **Unmerged** (the default), each targeted linear (``nn.Linear`` or
:class:`~framepack_rt.model.quantize.Fp8Linear`) gets one forward hook that adds ``scale * up(down(x))`` per
adapter to its output; the adapters are allocated once, in the layer's compute dtype on the compute device,
with alpha / rank folded into ``up``. A scale is a plain float, set with :meth:`LoraSet.set_scales` (once
per section: the hooks keep a list of the adapters whose scale is not 0, rebuilt only when a scale changes).
The model's parameters and state dict are untouched, so fp8 weights and :class:`~framepack_rt.model.offload
.BlockStreamer` (which repoints the linears' weights) work as they are: the adapters stay on the device.
**Fused** (:meth:`LoraSet.fuse`): the deltas are added into the weights in place at the current scales
(fp8 weights are dequantized, summed and requantized per output channel); the scales are then fixed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_rt.model.quantize import Fp8Linear, quantize_weight

MAX_SCALE = 4.0  # |scale| above this is almost surely a typo (a LoRA at 10x turns the video to noise)
PEFT_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
KOHYA_PREFIX = "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")


class LoraError(ValueError):
    """A LoRA file or request that cannot be applied: the message names the file and the key or adapter."""


def check_scale(scale: object, what: str = "LoRA scale") -> float:
    """``scale`` as a float if it is a finite number within +-MAX_SCALE; LoraError otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"{what} must be a finite number, got {scale!r}")
    if abs(scale) > MAX_SCALE:
        raise LoraError(f"{what} {scale:g} is out of range: use -{MAX_SCALE:g} .. {MAX_SCALE:g} (1 = as trained)")
    return float(scale)


def parse_lora_spec(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (path, scale). SCALE is read after the last colon only when that part is a number,
    so ``C:\\loras\\a.safetensors`` is a path; the file must exist."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            pass  # not a number: the colon is part of the path (a drive letter, a URL-like name)
        else:
            path = head
    file = Path(path).expanduser()
    if not file.is_file():
        raise LoraError(f"--lora {text}: no file {file}; pass FILE or FILE:SCALE, e.g. style.safetensors:0.8")
    return file, check_scale(scale, f"--lora {text}: the scale")


# -- reading a file ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear: ``delta W = factor * up @ down``."""

    module: str  # our module name, e.g. "transformer_blocks.0.attn.to_q"
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    factor: float  # alpha / rank
    key: str  # the file's key for ``down`` (for messages)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str  # "peft" | "kohya"
    layers: tuple[LoraLayer, ...]


def linear_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA may adapt: every nn.Linear and Fp8Linear, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Fp8Linear))}


def _features(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


def read_lora(path: str | Path, model: nn.Module) -> LoraFile:
    """Read a LoRA file and map its keys onto ``model``'s linears, checking every key and shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRAs are read from .safetensors files (convert a .pt/.ckpt one first)")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    if any(key.startswith(KOHYA_PREFIX) for key in state):
        fmt, groups = "kohya", _kohya_groups(path, state, model)
    elif any(_PEFT_KEY.match(key) for key in state):
        fmt, groups = "peft", _peft_groups(path, state, model, _metadata_alpha(metadata))
    else:
        first = next(iter(state), None)
        raise LoraError(f"{path.name}: no LoRA keys found (first key {first!r}); expected "
                        "'transformer.<module>.lora_A.weight' (diffusers/PEFT) or "
                        "'lora_unet_<module>.lora_down.weight' (kohya/musubi)")
    targets = linear_targets(model)
    layers = tuple(_layer(path, module, parts, targets[module]) for module, parts in groups.items())
    if not layers:
        raise LoraError(f"{path.name}: holds no adapter weights")
    return LoraFile(path, fmt, layers)


def _unknown_module(path: Path, key: str, module: str, model: nn.Module) -> LoraError:
    other = dict(model.named_modules()).get(module)
    if other is not None:
        return LoraError(f"{path.name}: key {key!r} targets {module}, a {type(other).__name__}: only linear "
                         "layers take a LoRA here")
    hint = ("; original HunyuanVideo names (double_blocks/single_blocks) are not mapped: convert the LoRA to "
            "diffusers names" if "double_blocks" in key or "single_blocks" in key else
            "; the transformer's module names are diffusers' (transformer_blocks.N.attn.to_q ...)")
    return LoraError(f"{path.name}: key {key!r} matches no linear layer of the transformer{hint}")


def _peft_groups(path: Path, state: dict[str, torch.Tensor], model: nn.Module,
                 default_alpha: float | None) -> dict[str, dict]:
    targets = linear_targets(model)
    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        bare = next((key[len(p):] for p in PEFT_PREFIXES if key.startswith(p)), key)
        if (m := _PEFT_KEY.match(bare)) is not None:
            module, part = m["module"], "down" if m["part"] == "A" else "up"
        elif (m := _ALPHA_KEY.match(bare)) is not None:
            module, part = m["module"], "alpha"
        else:
            raise LoraError(f"{path.name}: key {key!r} is not a LoRA weight (expected <module>.lora_A.weight, "
                            "<module>.lora_B.weight or <module>.alpha; DoRA and bias deltas are not supported)")
        if module not in targets:
            raise _unknown_module(path, key, module, model)
        groups.setdefault(module, {"alpha": default_alpha})[part] = tensor
        groups[module].setdefault("keys", {})[part] = key
    return groups


def _kohya_groups(path: Path, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, dict]:
    targets = linear_targets(model)
    flat = {}
    for name in targets:
        key = name.replace(".", "_")
        if key in flat:  # two of our names flatten alike: kohya keys could not tell them apart
            raise LoraError(f"{path.name}: modules {flat[key]} and {name} have the same kohya name {key}")
        flat[key] = name
    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            raise LoraError(f"{path.name}: key {key!r} is not a kohya LoRA weight of the transformer (expected "
                            "lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha; text-encoder, "
                            "DoRA and LoCon keys are not supported)")
        module = flat.get(m["module"])
        if module is None:
            raise _unknown_module(path, key, m["module"], model)
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m["part"]]
        groups.setdefault(module, {"alpha": None})[part] = tensor
        groups[module].setdefault("keys", {})[part] = key
    return groups


def _metadata_alpha(metadata: Mapping[str, str]) -> float | None:
    """A global ``lora_alpha`` from diffusers' adapter metadata (a JSON string), if the file has one."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    alpha = data.get("lora_alpha", data.get("transformer.lora_alpha")) if isinstance(data, dict) else None
    return float(alpha) if isinstance(alpha, (int, float)) else None


def _layer(path: Path, module: str, parts: dict, target: nn.Module) -> LoraLayer:
    keys = parts["keys"]
    for need, other in (("down", "up"), ("up", "down")):
        if need not in parts:
            present = keys.get(other) or keys["alpha"]
            raise LoraError(f"{path.name}: key {present!r} has no matching {need} weight for {module}")
    down, up = parts["down"], parts["up"]
    if down.ndim == 4 and down.shape[2:] == (1, 1):  # kohya saves some linears as 1x1 convs
        down = down[:, :, 0, 0]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    in_features, out_features = _features(target)
    rank = down.shape[0] if down.ndim == 2 else -1
    if down.ndim != 2 or down.shape[1] != in_features:
        raise LoraError(f"{path.name}: key {keys['down']!r} has shape {tuple(parts['down'].shape)}, {module} "
                        f"needs (rank, {in_features})")
    if tuple(up.shape) != (out_features, rank):
        raise LoraError(f"{path.name}: key {keys['up']!r} has shape {tuple(parts['up'].shape)}, {module} needs "
                        f"({out_features}, {rank}) for rank {rank}")
    alpha = parts["alpha"]
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise LoraError(f"{path.name}: key {keys['alpha']!r} must be one number, has shape {tuple(alpha.shape)}")
        alpha = float(alpha.float().item())
    factor = 1.0 if alpha is None else alpha / rank
    return LoraLayer(module, down.float(), up.float(), factor, keys["down"])


# -- applying -------------------------------------------------------------------------------------------------
class _AdapterHook:
    """The forward hook of one adapted linear: output + sum of scale * up(down(x)) over the active adapters."""

    def __init__(self) -> None:
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (down, up * factor)
        self.active: tuple[tuple[torch.Tensor, torch.Tensor, float], ...] = ()

    def activate(self, scales: Mapping[str, float]) -> None:
        self.active = tuple((down, up, scales[name]) for name, (down, up) in self.adapters.items()
                            if scales[name] != 0.0)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for down, up, scale in self.active:
            # The scale multiplies the rank-wide intermediate, not the output-wide result.
            output = output + F.linear(F.linear(x, down.to(x.dtype)) * scale, up.to(x.dtype))
        return output


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return module.compute_dtype if isinstance(module, Fp8Linear) else module.weight.dtype


class LoraSet:
    """The LoRA adapters of one model: load several, set their scales, or fuse them into the weights.

    ``device``: where the adapters live and the layers compute (default: the model's ``device``; pass the
    compute device when a BlockStreamer keeps the blocks' weights on the host)."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._targets = linear_targets(model)
        self._hooks: dict[str, _AdapterHook] = {}
        self._handles: list = []
        self._scales: dict[str, float] = {}
        self._files: dict[str, LoraFile] = {}
        self.fused = False

    @property
    def names(self) -> list[str]:
        return list(self._scales)

    @property
    def scales(self) -> dict[str, float]:
        return dict(self._scales)

    def describe(self) -> list[dict]:
        """name, scale, format, layers adapted, fused: what a page or a log shows."""
        return [{"name": name, "scale": self._scales[name], "format": f.format, "layers": len(f.layers),
                 "fused": self.fused} for name, f in self._files.items()]

    def load(self, path: str | Path, *, scale: float = 1.0, name: str | None = None) -> str:
        """Read ``path``, check it against the model and attach it unmerged at ``scale``; returns its name
        (default: the file's stem)."""
        if self.fused:
            raise LoraError("the loaded LoRAs are fused into the weights: load every LoRA before fusing")
        scale = check_scale(scale)
        name = name or Path(path).stem
        if name in self._scales:
            raise LoraError(f"a LoRA named {name!r} is loaded already: give this one another name")
        lora = read_lora(path, self.model)
        with torch.no_grad():
            for layer in lora.layers:
                module = self._targets[layer.module]
                dtype = _compute_dtype(module)
                down = layer.down.to(device=self.device, dtype=dtype)
                up = (layer.up * layer.factor).to(device=self.device, dtype=dtype)
                hook = self._hooks.get(layer.module)
                if hook is None:
                    hook = self._hooks[layer.module] = _AdapterHook()
                    self._handles.append(module.register_forward_hook(hook))
                hook.adapters[name] = (down, up)
        self._files[name] = lora
        self._scales[name] = scale
        self._activate()
        return name

    def set_scales(self, scales: Mapping[str, float]) -> None:
        """Change the named adapters' scales (others keep theirs). Cheap when nothing changes: call it before
        every section of a stream that has its own scales."""
        checked = {name: self.check(name, scale) for name, scale in scales.items()}
        if any(self._scales[name] != scale for name, scale in checked.items()):
            self._scales.update(checked)
            self._activate()

    def check(self, name: str, scale: object) -> float:
        """``scale`` as a float if adapter ``name`` may take it now; LoraError naming the problem otherwise (an
        unknown name lists the loaded ones; a fused adapter's scale cannot change)."""
        if name not in self._scales:
            raise LoraError(f"no LoRA named {name!r}; loaded: {', '.join(self._scales) or 'none'}")
        scale = check_scale(scale, f"LoRA {name!r} scale")
        if self.fused and scale != self._scales[name]:
            raise LoraError(f"LoRA {name!r} is fused into the weights (--fuse-lora): its scale is fixed at "
                            f"{self._scales[name]:g}; run without --fuse-lora to change it live")
        return scale

    def _activate(self) -> None:
        for hook in self._hooks.values():
            hook.activate(self._scales)

    @torch.no_grad()
    def fuse(self) -> None:
        """Add every adapter, at its current scale, into the weights in place and remove the hooks. fp8 weights
        are dequantized, summed in fp32 and requantized (a new scale per output channel). In place: weights
        that a BlockStreamer holds in its host arena are changed there (fuse before the first step)."""
        if self.fused:
            return
        for module_name, hook in self._hooks.items():
            module = self._targets[module_name]
            delta = None
            for name, (down, up) in hook.adapters.items():
                if self._scales[name] != 0.0:
                    d = up.float() @ down.float() * self._scales[name]
                    delta = d if delta is None else delta + d
            if delta is not None:
                _add_to_weight(module, delta)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks.clear()
        self.fused = True

    def detach(self) -> None:
        """Remove unmerged adapters (the model computes as without them); fused ones stay in the weights."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks.clear()
        if not self.fused:
            self._scales.clear()
            self._files.clear()


def _add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """weight += delta, in place (the tensor's storage is kept: streamed weights live in a host arena)."""
    if isinstance(module, Fp8Linear):
        weight = module.weight.float() * module.weight_scale[:, None].float()
        w8, scale = quantize_weight(weight + delta.to(weight.device))
        module.weight.copy_(w8)
        module.weight_scale.copy_(scale)
    else:
        weight = module.weight.float() + delta.to(module.weight.device)
        module.weight.copy_(weight.to(module.weight.dtype))  # summed in fp32, rounded once
