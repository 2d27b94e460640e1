"""Process-group setup, FSDP wrapping and checkpoints for train.py (torchrun, or a single process).

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment) the process
group is NCCL on GPUs and gloo on the CPU; without them everything runs in one process and nothing here
touches torch.distributed. With ``--fsdp`` the transformer is wrapped in FullyShardedDataParallel with one FSDP
unit per double- and single-stream block (the 13B's 60 blocks shard evenly), bf16 compute optionally, and
activation checkpointing per block optionally. Checkpoints of a sharded run go through
torch.distributed.checkpoint (each rank writes its shards); single-process runs use one torch.save file.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None, force: bool = False) -> DistInfo:
    """Join the torchrun process group if the environment describes one (or ``force``: a group of 1).

    device: "cuda" / "cpu" / None (CUDA when available). Each rank uses cuda:LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not (launched or force):
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    if force and not launched:  # a one-process group, e.g. to test the FSDP path
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def block_classes() -> set[type]:
    from framepack_rt.model.blocks import DoubleStreamBlock, SingleStreamBlock

    return {DoubleStreamBlock, SingleStreamBlock}


def wrap_fsdp(model: torch.nn.Module, info: DistInfo, *, bf16: bool, sync_from_rank0: bool) -> torch.nn.Module:
    """FullyShardedDataParallel, one unit per transformer block; parameters stay in their dtype (the master
    copy), compute in bf16 when ``bf16``. ``sync_from_rank0``: other ranks built the model on the meta device
    and receive rank 0's weights (only rank 0 reads the checkpoint into host memory)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    precision = None
    if bf16:
        precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   buffer_dtype=torch.bfloat16)
    init_fn = None
    if sync_from_rank0 and not info.is_main:
        def init_fn(module: torch.nn.Module) -> None:  # meta -> real (empty) storage, filled from rank 0
            module.to_empty(device=info.device, recurse=False)
    return FSDP(
        model, auto_wrap_policy=ModuleWrapPolicy(block_classes()), mixed_precision=precision,
        sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=info.device, use_orig_params=True,
        sync_module_states=sync_from_rank0, param_init_fn=init_fn,
    )


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (needed for the 13B at 640 px; optional elsewhere)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    classes = tuple(block_classes())
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, classes),
    )


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """FSDP's own clip (norm over all shards) when wrapped, else torch's."""
    if hasattr(model, "clip_grad_norm_"):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered on every rank for FSDP; names without wrappers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Offloading gathered CPU parameters to the CPU again crashes torch 2.13's FSDP at world size 2 (a segfault
    # cloning in its state-dict hook): on the CPU the gathered tensors already are where they should be.
    on_cpu = next(model.parameters()).device.type == "cpu"
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu))


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
                    info: DistInfo) -> None:
    """Model + optimizer + ``extra`` (step, EMA, ...). Sharded (one folder, every rank writes) when distributed."""
    path.mkdir(parents=True, exist_ok=True)
    if info.distributed:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        writer = dcp.FileSystemWriter(str(path / "sharded"), overwrite=True)  # the newest checkpoint replaces the last
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
        if info.is_main:
            torch.save(extra, path / "extra.pt")
        dist.barrier()
        return
    tmp = path / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), **extra}, tmp)
    tmp.replace(path / "state.pt")  # atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo) -> dict | None:
    """Restore what :func:`save_checkpoint` wrote; returns ``extra`` (None when there is no checkpoint)."""
    if info.distributed:
        if not (path / "extra.pt").exists():
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return torch.load(path / "extra.pt", weights_only=False)
    if not (path / "state.pt").exists():
        return None
    state = torch.load(path / "state.pt", weights_only=False)
    model.load_state_dict(state.pop("model"))
    optimizer.load_state_dict(state.pop("optim"))
    return state


def log_line(path: Path, record: dict, info: DistInfo) -> None:
    """Append one JSON record to the run's log (main rank only) and echo it."""
    if not info.is_main:
        return
    line = json.dumps(record)
    with open(path, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)
