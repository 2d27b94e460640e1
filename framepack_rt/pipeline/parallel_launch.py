"""Start the workers of one multi-process stream: N processes on this machine, or join a torchrun world.

    result = launch(job, LaunchConfig(world_size=2, cfg_parallel=False, device="cpu"), *args)

Every worker joins the process group (gloo on the CPU, NCCL on CUDA with one GPU per worker, cuda:LOCAL_RANK),
with ``timeout_s`` on every collective, builds its :class:`~framepack_rt.engine.parallel.ParallelWorld` and
calls ``job(world, *args)``; rank 0's return value comes back. ``job`` must be a module-level function (the
workers are spawned and import it). A worker that raises or dies ends the run: the others are stopped and
:class:`WorkerFailed` says which rank and why; a worker blocked in a collective with a dead peer fails by
itself within ``timeout_s``.

Across machines, start the same command on every machine with torchrun; the environment it sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is used and nothing is spawned here:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        -m framepack_rt.commands.parallel --device cuda --sequence-parallel 16 --cfg-parallel ...

(the mesh puts ranks 0-7, one machine, on the positive branch and 8-15 on the negative: the all-to-alls stay
inside a machine, on NVLink; only the velocities cross).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from framepack_rt.engine.parallel import ParallelWorld

TORCHRUN_VARS = ("RANK", "WORLD_SIZE")
STOP_GRACE_S = 10.0  # workers asked to stop (SIGTERM) get this long before they are killed


class WorkerFailed(RuntimeError):
    """A worker of a multi-process run raised or died; the message names the rank and the cause."""


class _Terminated(Exception):
    """SIGTERM reached the launching process (raised in its main thread)."""


@dataclass(frozen=True)
class LaunchConfig:
    world_size: int
    cfg_parallel: bool = False
    device: str = "cpu"  # "cpu": gloo (tests, no GPU); "cuda": NCCL, one GPU per worker
    timeout_s: float = 600.0  # every collective; a worker blocked on a dead peer fails after at most this
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (spawned workers) or MASTER_PORT (torchrun)
    num_heads: int | None = None  # when known: check before starting that the heads split over the ranks

    def validate(self) -> None:
        """Raise ValueError for what is wrong before any process starts."""
        if self.world_size < 1:
            raise ValueError(f"--sequence-parallel {self.world_size}: give at least 1 worker")
        if self.cfg_parallel and self.world_size % 2:
            raise ValueError(f"--cfg-parallel runs the two guidance branches on two halves of the workers: give an "
                             f"even number (--sequence-parallel {self.world_size} is odd)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device}: multi-process runs take cpu (gloo) or cuda (NCCL, one GPU "
                             "per worker)")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.num_heads is not None:
            from framepack_rt.model.parallel import check_world

            check_world(self.num_heads, self.world_size // (2 if self.cfg_parallel else 1))
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) != self.world_size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} workers but --sequence-parallel is "
                             f"{self.world_size}: give the same number (nnodes x nproc-per-node)")
        if self.device == "cuda" and not under_torchrun():
            count = torch.cuda.device_count()
            if count < self.world_size:
                raise ValueError(f"{self.world_size} workers need {self.world_size} GPUs, {count} visible: lower "
                                 "--sequence-parallel or use torchrun across machines")


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_world(config: LaunchConfig) -> ParallelWorld:
    """Join the process group the environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and build
    the mesh. CPU workers split the cores between them."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if config.device == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=config.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return ParallelWorld.build(device, config.cfg_parallel, config.num_heads)


def _worker(rank: int, job: Callable, config: LaunchConfig, port: int, result_path: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(config.world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(config.world_size), MASTER_ADDR=config.master_addr, MASTER_PORT=str(port))
    if config.device == "cpu" and config.master_addr == "127.0.0.1" and "lo" in dict(socket.if_nameindex()).values():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo's pairs on the loopback only
    world = join_world(config)
    try:
        result = job(world, *args)
        if rank == 0:  # a file: a pipe would block on a large result until the parent reads it
            torch.save(result, result_path)
    finally:
        dist.destroy_process_group()


def launch(job: Callable[..., Any], config: LaunchConfig, *args: Any, stop: threading.Event | None = None) -> Any:
    """Run ``job(world, *args)`` on every worker; returns rank 0's result (None on other torchrun ranks).
    ``stop``: set from another thread, it stops the workers as SIGTERM would (a launch run off the main thread,
    where no signal handler can be set)."""
    config.validate()
    if under_torchrun():
        world = join_world(config)
        try:
            return job(world, *args)
        finally:
            dist.destroy_process_group()
    import torch.multiprocessing as mp

    port = config.master_port or free_port(config.master_addr)
    with tempfile.TemporaryDirectory(prefix="framepack-rt-launch-") as scratch, _sigterm_exits():
        result_path = os.path.join(scratch, "result.pt")
        context = mp.start_processes(_worker, args=(job, config, port, result_path, args), nprocs=config.world_size,
                                     join=False, start_method="spawn")
        try:
            while not context.join(timeout=1.0, grace_period=STOP_GRACE_S):
                if stop is not None and stop.is_set():
                    raise _Terminated("stopped")
        except _Terminated:  # the workers are stopped below; a server's rank 0 shuts down cleanly and returns
            _stop_all(context.processes)
            if not os.path.exists(result_path):
                raise KeyboardInterrupt("stopped by SIGTERM") from None
        except mp.ProcessRaisedException as exc:  # the worker's exception with its traceback; the others stopped
            raise WorkerFailed(f"worker {exc.error_index} of {config.world_size} failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:  # killed, or exited without a Python exception
            raise WorkerFailed(f"worker {exc.error_index} of {config.world_size} died (exit code {exc.exit_code}); "
                               "the others were stopped. Out of memory? Check the system log.") from None
        finally:
            _stop_all(context.processes)  # an interrupted join leaves none behind
        if not os.path.exists(result_path):
            raise WorkerFailed("rank 0 finished without a result")
        return torch.load(result_path, weights_only=False)


@contextlib.contextmanager
def _sigterm_exits():
    """While the workers run, SIGTERM to this (the launching) process raises _Terminated, so that the workers
    are stopped in order (rank 0 first) instead of being orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_all(processes: list) -> None:
    """SIGTERM to rank 0 first (a server shuts down and releases the followers), then to the others; whatever
    still runs after STOP_GRACE_S is killed."""
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(STOP_GRACE_S if process is processes[0] else 0)
    for process in processes:
        process.join(STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()


class _PartsWithTransformer:
    """A pipeline's parts with the transformer replaced (rank 0's DistributedTransformer)."""

    def __init__(self, parts: Any, transformer: Any) -> None:
        self._parts, self._transformer = parts, transformer

    def transformer(self) -> Any:
        return self._transformer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parts, name)


def with_transformer(pipe: Any, transformer: Any) -> Any:
    """A shallow copy of ``pipe`` (a FramePackPipeline) whose stream() samples with ``transformer``."""
    out = copy.copy(pipe)
    out.parts = _PartsWithTransformer(pipe.parts, transformer)
    return out
