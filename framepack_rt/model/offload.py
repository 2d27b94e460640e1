"""Low-VRAM mode: transformer weights live in CPU memory and stream to the accelerator block by block.

The release runs the 13B (about 26 GB of bf16 weights) on a 6 GB GPU this way. :class:`BlockStreamer` keeps
a CPU master copy of every transformer block (pinned when the target is CUDA, so copies are asynchronous),
makes as many blocks permanently resident on the device as the memory budget allows, and for the others
copies the weights in right before the block runs and drops them right after. Everything that is not a
block (embedders, refiner, output head: about 1% of the 13B) stays resident.

The code is device-agnostic: on a CPU-only machine the "device" copy is a real copy too, so the byte
accounting (resident, peak, streamed per forward) is the same as on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass
class StreamStats:
    resident_bytes: int = 0  # weights kept on the device for good
    in_flight_bytes: int = 0  # streamed weights on the device right now
    peak_bytes: int = 0  # max of resident + in flight
    streamed_bytes: int = 0  # copied host -> device since the last reset
    blocks_streamed: int = 0

    def reset_traffic(self) -> None:
        self.streamed_bytes = self.blocks_streamed = 0


@dataclass
class ResidencyPlan:
    others: list[nn.Module]  # non-block modules: always resident
    resident: list[nn.Module]  # blocks kept on the device
    streamed: list[nn.Module]  # blocks copied in per forward
    base_bytes: int


def plan_residency(model: nn.Module, budget_bytes: int) -> ResidencyPlan:
    """Which blocks fit for good: the earliest ones, while room for one streamed block stays on top."""
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    block_lists = (model.transformer_blocks, model.single_transformer_blocks)
    others = [m for m in model.children() if all(m is not lst for lst in block_lists)]
    base = sum(module_bytes(m) for m in others)
    largest = max(module_bytes(b) for b in blocks)
    if base + largest > budget_bytes:
        raise ValueError(
            f"a memory budget of {_size(budget_bytes)} cannot hold the non-block weights ({_size(base)}) "
            f"plus one streamed block ({_size(largest)}); raise the budget"
        )
    resident, streamed, used = [], [], base
    for block in blocks:
        size = module_bytes(block)
        if not streamed and used + size + largest <= budget_bytes:
            resident.append(block)
            used += size
        else:
            streamed.append(block)
    return ResidencyPlan(others, resident, streamed, base)


class BlockStreamer:
    """Attach to a FramePackTransformer; ``budget_bytes`` caps the device memory its weights may use."""

    def __init__(self, model: nn.Module, device: torch.device | str, budget_bytes: int) -> None:
        self.device = torch.device(device)
        self.model = model
        self.budget_bytes = budget_bytes
        self.stats = StreamStats()
        plan = plan_residency(model, budget_bytes)
        for m in plan.others:
            m.to(self.device)
        self.stats.resident_bytes = plan.base_bytes

        pin = self.device.type == "cuda"
        self.streamed: list[nn.Module] = []
        self._masters: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = []
        for block in plan.resident:
            block.to(self.device)
            self.stats.resident_bytes += module_bytes(block)
        for block in plan.streamed:
            block.to("cpu")
            tensors = [*block.parameters(), *block.buffers()]
            masters = [(t, t.data.pin_memory() if pin else t.data) for t in tensors]
            self._masters[id(block)] = masters
            self.streamed.append(block)
            self._handles.append(block.register_forward_pre_hook(self._load))
            self._handles.append(block.register_forward_hook(self._unload))
        self.stats.peak_bytes = self.stats.resident_bytes

    def _load(self, block: nn.Module, _args) -> None:
        nbytes = 0
        for tensor, master in self._masters[id(block)]:
            tensor.data = torch.empty_like(master, device=self.device).copy_(master, non_blocking=True)
            nbytes += master.numel() * master.element_size()
        s = self.stats
        s.in_flight_bytes += nbytes
        s.peak_bytes = max(s.peak_bytes, s.resident_bytes + s.in_flight_bytes)
        s.streamed_bytes += nbytes
        s.blocks_streamed += 1

    def _unload(self, block: nn.Module, _args, _output) -> None:
        nbytes = 0
        for tensor, master in self._masters[id(block)]:
            tensor.data = master  # the device copy is freed once the last reference (this one) goes
            nbytes += master.numel() * master.element_size()
        self.stats.in_flight_bytes -= nbytes

    def detach(self) -> None:
        """Remove the hooks; streamed blocks stay on the CPU."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
