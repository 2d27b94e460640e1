"""Reading and writing diffusers-format transformer folders, memory-mapped.

A folder holds config.json and either ``diffusion_pytorch_model.safetensors`` or shards
``diffusion_pytorch_model-0000k-of-0000n.safetensors`` listed in ``diffusion_pytorch_model.safetensors.index.json``.

Loading maps each file with ``UntypedStorage.from_file`` (MAP_PRIVATE: pages are read lazily, nothing is
copied) and views the tensors out of it, builds the model on the meta device, checks every name and shape, and
assigns. Converting dtype or device copies one tensor at a time, so the peak extra memory is one tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from framepack_rt.model.config import FramePackConfig
from framepack_rt.model.quantize import (
    QUANTIZE_CHOICES,
    Fp8Linear,
    quantize_blocks,
    quantize_weight,
    quantized_linear_names,
)

if TYPE_CHECKING:
    from torch import nn

    ModelT = TypeVar("ModelT", bound=nn.Module)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint folder does not match the model: the message names the key and the file."""


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a view into a private memory map of it (no copy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {info['dtype']}, which torch cannot map")
        begin, end = info["data_offsets"]
        chunk = raw[data_start + begin : data_start + end]
        if (data_start + begin) % dtype.itemsize:
            chunk = chunk.clone()  # misaligned for a zero-copy view: copy this one tensor
        tensors[name] = chunk.view(dtype).reshape(info["shape"])
    return tensors


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the file that holds it, from the index json or the single weights file."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS_NAME
    if single.exists():
        return {name: single for name in _header_names(single)}
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise FileNotFoundError(
        f"{folder}: expected {INDEX_NAME} (sharded) or {WEIGHTS_NAME}; found {found or 'no safetensors files'}"
    )


def _header_names(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return [k for k in json.loads(f.read(header_len)) if k != "__metadata__"]


def load_transformer(
    build: Callable[[FramePackConfig], "ModelT"],
    folder: Path,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
    fp32_output_head: bool,
    quantize: str | None = None,
) -> "ModelT":
    """The model ``build(config)`` makes (on the meta device) with the folder's weights assigned, checked by name
    and shape. Takes the constructor, so this module needs no import of the model (no import cycle).

    ``quantize="fp8"`` stores the blocks' linear weights as fp8 (quantize.py), converting one tensor at a time
    on the target device: the full-precision weights are never all resident there."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; pass a FramePack transformer folder (config.json + weights)")
    config = FramePackConfig.from_file(folder / CONFIG_NAME, fp32_output_head=fp32_output_head)
    with torch.device("meta"):
        model = build(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    files = weight_files(folder)

    unexpected = sorted(set(files) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]!r} in {files[unexpected[0]].name} ({len(unexpected)} in all)")
    missing = sorted(set(expected) - set(files))
    if missing:
        listed = INDEX_NAME if (folder / INDEX_NAME).exists() else WEIGHTS_NAME
        raise CheckpointError(f"missing key {missing[0]!r}: not in {listed} ({len(missing)} missing in all)")

    quantized = set()
    if quantize is not None:
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}, or None")
        quantized = {f"{name}.weight" for name in quantized_linear_names(model)}
    mapped: dict[Path, dict[str, torch.Tensor]] = {}
    state = {}
    for name, file in files.items():
        if file not in mapped:
            if not file.exists():
                raise FileNotFoundError(f"{file}: listed in {INDEX_NAME} for {name!r} but missing")
            mapped[file] = mmap_safetensors(file)
        tensor = mapped[file].get(name)
        if tensor is None:
            raise CheckpointError(f"missing key {name!r}: {INDEX_NAME} says {file.name}, which does not hold it")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(
                f"key {name!r} in {file.name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name])}"
            )
        if name in quantized:
            state[name], state[name + "_scale"] = quantize_weight(tensor.to(device))
        else:
            state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    if quantize is not None:
        quantize_blocks(model, quantize)  # on the meta device: the structure only, filled by the assign below
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                module.compute_dtype = dtype or state[next(iter(state))].dtype
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_transformer(model: "nn.Module", folder: Path, *, max_shard_size: int) -> None:
    """config.json (from ``model.config``) and safetensors, sharded with an index beyond ``max_shard_size``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_json_dict(), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_size:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        shard_bytes += nbytes
    for stale in [*folder.glob("diffusion_pytorch_model*.safetensors"), folder / INDEX_NAME]:
        stale.unlink(missing_ok=True)  # a previous save with other sharding must not leave files behind
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        file = f"diffusion_pytorch_model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
