"""Low-VRAM mode: transformer blocks stream from one pinned host arena to the device, overlapping compute.

The 13B's blocks hold 97% of its weights (24 GiB in bf16, 12 in fp8). :class:`BlockStreamer` keeps what fits
in the weight budget on the device for good (the non-block modules, block 0's AdaLN that TeaCache probes, and
as many whole blocks as fit) and streams the rest:

* **One host arena.** The streamed blocks' weights are copied once into a single host buffer, each block a
  contiguous region (tensors 256-byte aligned), and the blocks' parameters point into it. On CUDA the buffer
  is page-locked with ``cudaHostRegister``, so pinned bytes equal the streamed weight bytes (plus alignment):
  no per-tensor ``pin_memory()``, whose caching host allocator rounds every tensor up to a power of two.
* **Fixed device slots.** ``prefetch + 1`` device buffers, each the size of the largest streamed region; a
  block is one contiguous copy into the next slot of the ring, and its parameters are pointed at their views
  in that slot (the views are made once, at attach).
* **Copies on a side stream, ordered by events.** A copy waits for the event recorded when the slot's
  previous block was released (the compute stream moved on to another streamed block); the compute stream
  waits for the copy's event before the block runs. While block j runs, blocks j+1 .. j+prefetch are copied,
  cyclically: after the last streamed block of a step the first ones of the next step are already on their way.
* **One residency per block per step.** A block is released only when another streamed block starts, so
  calling the same block again (CFG's two branches run block by block by
  ``FramePackTransformer.step_branches``) reuses the copy. The TeaCache probe (``transformer_blocks[0]
  .modulated_input``, outside any block call) reads only ``norm1`` of block 0, which always stays resident.

The device side is a small :class:`Transfer` object (CUDA streams and events, or plain CPU copies), so the
schedule runs and is tested on a CPU with a stand-in that records it. Inference only: the hooks repoint
``.data`` of the streamed parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch
import torch.nn as nn

LOGGER = logging.getLogger(__name__)
ALIGN = 256  # bytes: every tensor of a region starts on this boundary (CUDA's allocator alignment)
GiB = 2**30


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.2f} MiB"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_empty(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` starting on an ALIGN boundary."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=device)
    start = -raw.data_ptr() % ALIGN
    return raw[start : start + nbytes]


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def all_blocks(model: nn.Module) -> list[nn.Module]:
    """The 20 double- then 40 single-stream blocks, in execution order."""
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def probe_module(model: nn.Module) -> nn.Module:
    """What the TeaCache probe reads outside the blocks' calls: block 0's ``norm1`` (always resident)."""
    return model.transformer_blocks[0].norm1


# -- the layout of a block's region ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One parameter or buffer of a streamed block: where it sits in the block's region."""

    owner: nn.Module
    name: str
    is_param: bool
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.name]

    def view(self, buffer: torch.Tensor, base: int) -> torch.Tensor:
        """This tensor's view in a uint8 ``buffer`` whose region starts at byte ``base``."""
        start = base + self.offset
        return buffer[start : start + self.nbytes].view(self.dtype).view(self.shape)


def region_entries(block: nn.Module, skip: nn.Module | None = None) -> tuple[tuple[Entry, ...], int]:
    """The block's tensors laid out back to back, each aligned; (entries, region bytes). ``skip``: a submodule
    left out (it stays resident)."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    entries, offset = [], 0
    for module in block.modules():
        if id(module) in skipped:
            continue
        for is_param, store in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                entries.append(Entry(module, name, is_param, offset, tensor.dtype, tuple(tensor.shape)))
                offset = _align(offset + entries[-1].nbytes)
    return tuple(entries), offset


def region_bytes(block: nn.Module, skip: nn.Module | None = None) -> int:
    return region_entries(block, skip)[1]


# -- which blocks stay, which stream -------------------------------------------------------------------------------
@dataclass
class ResidencyPlan:
    others: list[nn.Module]  # non-block modules and the probe: always resident
    resident: list[nn.Module]  # blocks kept on the device
    streamed: list[nn.Module]  # blocks copied in every step, in execution order
    base_bytes: int  # the others' bytes (the probe included)
    resident_bytes: int  # base_bytes + the resident blocks (block 0 without its probe, counted in base)
    slots: int  # device buffers for streamed blocks (prefetch + 1)
    slot_bytes: int  # each: the largest streamed region
    streamed_bytes: int  # the streamed regions: what one step copies in, and the host arena's size

    @property
    def device_bytes(self) -> int:
        """Weights on the device: resident ones plus the slots."""
        return self.resident_bytes + (self.slots * self.slot_bytes if self.streamed else 0)


def choose_residency(base: int, sizes: list[int], regions: list[int], budget_bytes: int,
                     slots: int) -> tuple[list[int], int, int, int]:
    """The blocks to keep under ``budget_bytes`` of weights: (their indices, slot bytes, resident bytes, slots).

    ``base``: the always-resident bytes; ``sizes[i]`` / ``regions[i]``: block i's bytes resident / as a
    streamed region. Most resident bytes wins (fewest moved per step); each streamed block needs a slot of
    the largest streamed region, so every distinct region size is tried as the slot size (and none: all
    resident), blocks larger than the slot kept, the others added largest first while they fit. When
    ``slots`` slots do not fit, fewer are used (down to one: copies then wait for the compute, and back)."""
    for n in range(slots, 0, -1):
        best = _best_residency(base, sizes, regions, budget_bytes, n)
        if best is not None:
            used, keep, slot = best
            if n < slots:
                LOGGER.warning("low-VRAM mode: %s of weights leave room for %d device slot(s) instead of %d; "
                               "fewer blocks are prefetched", _size(budget_bytes), n, slots)
            return keep, slot if len(keep) < len(sizes) else 0, base + used, n
    least = minimum_weight_budget(base, sizes, regions, 1)
    raise ValueError(
        f"a weight budget of {_size(budget_bytes)} cannot hold the non-block weights ({_size(base)}) plus one "
        f"streamed block: it takes at least {_size(least)} ({_size(minimum_weight_budget(base, sizes, regions, slots))}"
        f" to prefetch with {slots} slots); raise the budget"
    )


def _best_residency(base: int, sizes: list[int], regions: list[int], budget_bytes: int,
                    slots: int) -> tuple[int, list[int], int] | None:
    best: tuple[int, list[int], int] | None = None  # (resident block bytes, indices, slot bytes)
    for slot in sorted({0, *regions}, reverse=True):
        room = budget_bytes - base - slots * slot
        keep = {i for i, r in enumerate(regions) if r > slot}
        used = sum(sizes[i] for i in keep)
        if used > room:
            continue
        for i in sorted(set(range(len(sizes))) - keep, key=lambda i: -sizes[i]):
            if used + sizes[i] <= room:
                keep.add(i)
                used += sizes[i]
        if best is None or used >= best[0]:  # equal bytes moved: the smaller slots win
            best = (used, sorted(keep), slot)
    return best


def minimum_weight_budget(base: int, sizes: list[int], regions: list[int], slots: int) -> int:
    """The smallest weight budget :func:`choose_residency` accepts: the base, the slots, and every block too
    large for them (whichever slot size makes that least)."""
    return min(base + slots * slot + sum(n for n, r in zip(sizes, regions) if r > slot) for slot in set(regions))


def plan_residency(model: nn.Module, budget_bytes: int, *, prefetch: int = 1) -> ResidencyPlan:
    """Which blocks stay on the device under ``budget_bytes`` of weights, with ``prefetch + 1`` slots for the
    streamed ones (:func:`choose_residency`). Works on meta-device models."""
    blocks = all_blocks(model)
    probe = probe_module(model)
    block_lists = (model.transformer_blocks, model.single_transformer_blocks)
    others = [m for m in model.children() if all(m is not lst for lst in block_lists)] + [probe]
    base = sum(module_bytes(m) for m in others)
    sizes = [module_bytes(b) - (module_bytes(probe) if i == 0 else 0) for i, b in enumerate(blocks)]
    regions = [region_bytes(b, probe if i == 0 else None) for i, b in enumerate(blocks)]
    keep, slot, resident_bytes, slots = choose_residency(base, sizes, regions, budget_bytes, prefetch + 1)
    streamed = [i for i in range(len(blocks)) if i not in set(keep)]
    return ResidencyPlan(others, [blocks[i] for i in keep], [blocks[i] for i in streamed], base, resident_bytes,
                         slots, slot, sum(regions[i] for i in streamed))


# -- the device side -----------------------------------------------------------------------------------------------
class Transfer(Protocol):
    """Buffers, copies and their ordering on one device. Events are opaque (None means "nothing to wait for")."""

    device: torch.device

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer the device can copy from asynchronously (page-locked where that exists)."""
        ...

    def release_host(self, buffer: torch.Tensor) -> None: ...

    def device_buffer(self, nbytes: int) -> torch.Tensor: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """On the copy stream: wait for ``after``, copy ``src`` (host) into ``dst`` (device); returns its event."""
        ...

    def record(self) -> Any:
        """An event on the compute stream, after everything enqueued on it so far."""
        ...

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for ``event``."""
        ...

    def synchronize(self) -> None: ...


class CpuTransfer:
    """The CPU as the "device": real copies, in order, so bytes and results are those of a GPU run."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return aligned_empty(nbytes)

    def release_host(self, buffer: torch.Tensor) -> None:
        return None

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return aligned_empty(nbytes, self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        dst.copy_(src)
        return None

    def record(self) -> Any:
        return None

    def wait(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


class CudaTransfer:
    """A side stream for the copies, events between it and the current (compute) stream, and a host arena
    page-locked with ``cudaHostRegister`` (exactly its bytes; torch's pinned allocator would round it up)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self._registered: set[int] = set()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        buffer = aligned_empty(nbytes)
        status = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if status != 0:
            raise RuntimeError(
                f"cudaHostRegister of the {_size(nbytes)} weight arena failed (CUDA error {status}): the host "
                "may not allow that much page-locked memory (see `ulimit -l`); raise the memory budget so fewer "
                "blocks stream, or add host RAM"
            )
        self._registered.add(buffer.data_ptr())
        return buffer

    def release_host(self, buffer: torch.Tensor) -> None:
        if buffer.data_ptr() in self._registered:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
            self._registered.discard(buffer.data_ptr())

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def transfer_for(device: torch.device | str) -> Transfer:
    device = torch.device(device)
    return CudaTransfer(device) if device.type == "cuda" else CpuTransfer(device)


# -- the streamer ----------------------------------------------------------------------------------------------------
@dataclass
class StreamStats:
    resident_bytes: int = 0  # weights kept on the device for good
    slot_bytes: int = 0  # the device slots for streamed blocks, all of them
    arena_bytes: int = 0  # the host arena (page-locked on CUDA)
    streamed_bytes: int = 0  # copied host -> device since the last reset
    blocks_streamed: int = 0  # copies since the last reset
    stalls: int = 0  # blocks that were not prefetched when they were called (the compute waited for a copy)

    @property
    def peak_bytes(self) -> int:
        """Device bytes of weights: fixed (resident + slots), whatever streams."""
        return self.resident_bytes + self.slot_bytes

    def reset_traffic(self) -> None:
        self.streamed_bytes = self.blocks_streamed = self.stalls = 0


@dataclass
class _Block:
    module: nn.Module
    entries: tuple[Entry, ...]
    nbytes: int  # region bytes (aligned)
    arena_offset: int
    host_views: list[torch.Tensor] = field(default_factory=list)
    slot_views: list[list[torch.Tensor]] = field(default_factory=list)  # per slot


LOADED, CURRENT, RELEASED = "loaded", "current", "released"  # a streamed block's residency


class BlockStreamer:
    """Attach to a FramePackTransformer: ``budget_bytes`` caps the device memory its weights use (resident
    weights plus ``prefetch + 1`` slots). ``transfer``: the device side (default: CUDA streams on CUDA, plain
    copies elsewhere). ``plan``: a residency decided elsewhere (default: :func:`plan_residency`)."""

    def __init__(self, model: nn.Module, device: torch.device | str, budget_bytes: int, *, prefetch: int = 1,
                 transfer: Transfer | None = None, plan: ResidencyPlan | None = None) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch}: use 0 (no overlap) or more blocks ahead")
        self.device = torch.device(device)
        self.model = model
        self.budget_bytes = budget_bytes
        self.prefetch = prefetch
        self.transfer = transfer or transfer_for(self.device)
        self.plan = plan or plan_residency(model, budget_bytes, prefetch=prefetch)
        self.prefetch = min(prefetch, self.plan.slots - 1)  # fewer slots when the budget has no room for more
        self.stats = StreamStats()
        for module in self.plan.others:
            module.to(self.device)
        for block in self.plan.resident:
            block.to(self.device)
        self.stats.resident_bytes = self.plan.resident_bytes

        probe = probe_module(model)
        self.blocks: list[_Block] = []
        offset = 0
        for block in self.plan.streamed:
            entries, nbytes = region_entries(block, probe if block is model.transformer_blocks[0] else None)
            self.blocks.append(_Block(block, entries, nbytes, offset))
            offset += nbytes
        self.streamed = [b.module for b in self.blocks]
        self._index = {id(b.module): i for i, b in enumerate(self.blocks)}
        self.arena = self.transfer.host_buffer(offset) if self.blocks else None
        self.slots = [self.transfer.device_buffer(self.plan.slot_bytes) for _ in range(self.plan.slots)] \
            if self.blocks else []
        self.stats.arena_bytes = offset
        self.stats.slot_bytes = sum(s.numel() for s in self.slots)
        for b in self.blocks:  # each block's weights into its region, once; then its tensors point there
            b.host_views = [e.view(self.arena, b.arena_offset) for e in b.entries]
            for entry, view in zip(b.entries, b.host_views):
                view.copy_(entry.get().detach())
            b.slot_views = [[e.view(slot, 0) for e in b.entries] for slot in self.slots]
            self._point(b, b.host_views)

        # The schedule's state: which block each slot holds, and each block's residency.
        self._slot_of: list[int | None] = [None] * len(self.blocks)
        self._occupant: list[int | None] = [None] * len(self.slots)
        self._copied: list[Any] = [None] * len(self.slots)  # the copy event of the slot's occupant
        self._freed: list[Any] = [None] * len(self.slots)  # the compute event after its previous occupant
        self._state: list[str | None] = [None] * len(self.blocks)
        self._next_slot = 0
        self._current: int | None = None
        self._handles = [b.module.register_forward_pre_hook(self._before) for b in self.blocks]

    # -- the schedule ------------------------------------------------------------------------------------------
    def _point(self, block: _Block, views: list[torch.Tensor]) -> None:
        for entry, view in zip(block.entries, views):
            if entry.is_param:
                entry.owner._parameters[entry.name].data = view
            else:
                entry.owner._buffers[entry.name] = view

    def _load(self, j: int) -> None:
        """Copy block j into the next slot of the ring (evicting its occupant)."""
        k = self._next_slot
        self._next_slot = (k + 1) % len(self.slots)
        old = self._occupant[k]
        if old is not None:
            self._slot_of[old], self._state[old] = None, None
            self._point(self.blocks[old], self.blocks[old].host_views)
        b = self.blocks[j]
        src = self.arena[b.arena_offset : b.arena_offset + b.nbytes]
        self._copied[k] = self.transfer.copy(self.slots[k][: b.nbytes], src, self._freed[k])
        self._occupant[k], self._slot_of[j], self._state[j] = j, k, LOADED
        self._point(b, b.slot_views[k])
        self.stats.streamed_bytes += b.nbytes
        self.stats.blocks_streamed += 1

    def _prefetch_after(self, j: int) -> None:
        """Start copying the blocks after j (cyclically) into free slots, up to ``prefetch`` ahead."""
        n = len(self.blocks)
        for ahead in range(1, min(self.prefetch, n - 1) + 1):
            t = (j + ahead) % n
            if self._slot_of[t] is not None:
                continue
            occupant = self._occupant[self._next_slot]
            if occupant is not None and self._state[occupant] != RELEASED:
                return  # the ring's next slot still holds a block that is running or about to
            self._load(t)

    def _before(self, module: nn.Module, _args) -> None:
        j = self._index[id(module)]
        if self._current == j:
            return  # the same block again (another branch of this step): already resident
        if self._current is not None:
            prev = self._current
            self._state[prev] = RELEASED
            self._freed[self._slot_of[prev]] = self.transfer.record()  # its slot may be overwritten after this
        self._current = j
        if self._slot_of[j] is None:
            self.stats.stalls += 1
            self._load(j)
        k = self._slot_of[j]
        self.transfer.wait(self._copied[k])
        self._state[j] = CURRENT
        self._prefetch_after(j)

    # -- inspection and teardown ----------------------------------------------------------------------------------
    def resident_now(self) -> Iterator[tuple[str, str]]:
        """(block name, residency) of the streamed blocks now in a slot."""
        names = {id(m): n for n, m in self.model.named_modules()}
        for j, k in enumerate(self._slot_of):
            if k is not None:
                yield names[id(self.blocks[j].module)], self._state[j]

    def detach(self) -> None:
        """Remove the hooks; streamed blocks point at their host copies again (the CPU), slots are freed."""
        self.transfer.synchronize()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for b in self.blocks:
            self._point(b, b.host_views)
        self.slots = []
        self._slot_of = [None] * len(self.blocks)
        if self.arena is not None:
            self.transfer.release_host(self.arena)
