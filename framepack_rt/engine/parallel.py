"""One stream on several processes: rank 0 drives the engine, the other ranks follow its transformer calls.

The world is a DeviceMesh of shape (cfg, sp): ``cfg`` is 2 with CFG parallel (the two guidance branches on two
halves of the ranks) and 1 without; ``sp`` ranks run each transformer call sequence parallel
(framepack_rt/model/parallel.py). Rank 0 runs the whole engine (sampler, context ring, pipeline, server);
the engine calls :class:`DistributedTransformer` where it would call the model, with the same ``prepare`` /
``step`` signatures, so SectionGenerator does not change. Each call is broadcast to every rank, which runs its
part; the other ranks sit in :func:`follow` until rank 0 closes.

CFG parallel: the engine batches both branches into one call of 2B samples (positive first, then negative;
``SectionGenerator._paired_velocity_fn``). With ``cfg`` = 2 the first half of the ranks prepares and steps
samples [0, B) and the second half [B, 2B); the second half's first rank sends its velocities to rank 0. Each
sample's packed layout is its own, so this equals the batched call. A call whose batch does not split in two
(the positive branch alone: steps outside the guidance interval, or cfg 1) runs on the first half while the
second half waits.

Per call: a 4-integer header broadcast, then for a step the latents and the timesteps/guidance (one tensor);
for a prepare (once a section and branch) the conditioning and context latents as one pickled object. Every
collective has the process group's timeout (set where the group is made: framepack_rt/pipeline/parallel_launch.py),
so a worker that dies makes the others fail with an error instead of waiting for ever; a failed collective is
raised on rank 0 as :class:`WorkerLost`. A server's world can sit idle for longer than the timeout (no session
running): rank 0 then sends a no-op call every few seconds (:class:`Keepalive`), so that only a dead or hung
rank 0 makes a follower's wait run out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from framepack_rt.model.parallel import SequenceParallel, check_world

log = logging.getLogger(__name__)

PREPARE, STEP, STOP, NOOP = 1, 2, 3, 4
HEADER = 4  # op, plan id, has guidance, reserved
KEEP_PLANS = 8  # plans each rank keeps: a section prepares at most two (the CFG pair, the positive branch), x 4 sessions


@dataclass(frozen=True)
class ParallelWorld:
    """Where this process sits: its rank, the CFG half (``branch``) it serves and its sequence-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    cfg_parallel: bool
    branch: int  # 0: the first half of a split batch (CFG's positive branch), 1: the second half
    sp_size: int
    sp_group: dist.ProcessGroup | None

    @classmethod
    def build(cls, device: torch.device, cfg_parallel: bool, num_heads: int | None = None) -> "ParallelWorld":
        """The mesh over the initialised default process group; every rank calls this (it makes groups).
        ``num_heads``: check now that the heads split over the sequence-parallel ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        world, rank = dist.get_world_size(), dist.get_rank()
        halves = 2 if cfg_parallel else 1
        if world % halves:
            raise ValueError(f"CFG parallel puts the two guidance branches on two halves of the workers: use an even "
                             f"number of workers, not {world}")
        sp_size = world // halves
        if num_heads is not None:
            check_world(num_heads, sp_size)
        mesh = init_device_mesh(device.type, (halves, sp_size), mesh_dim_names=("cfg", "sp"))
        return cls(rank, world, device, cfg_parallel, mesh.get_local_rank("cfg"), sp_size, mesh.get_group("sp"))

    @property
    def second_half_leader(self) -> int:
        """The rank that sends the second half's velocities to rank 0 under CFG parallel."""
        return self.sp_size


@dataclass(frozen=True)
class PlanHandle:
    """What :meth:`DistributedTransformer.prepare` returns: every rank keeps its own part under this id."""

    plan_id: int
    latent_shape: tuple[int, int, int, int]


@dataclass
class _LocalPlan:
    latent_shape: tuple[int, int, int, int]
    part: slice | None  # the samples this rank computes; None: idle for this plan
    split: bool  # the batch is split over the two CFG halves
    plan: Any = None


class _Executor:
    """Runs this rank's part of each call (on rank 0 and on the followers alike)."""

    def __init__(self, model: torch.nn.Module, world: ParallelWorld) -> None:
        self.model, self.world = model, world
        self.runner = SequenceParallel(model, world.sp_group) if world.sp_size > 1 else model
        self.plans: OrderedDict[int, _LocalPlan] = OrderedDict()

    def _part(self, batch: int) -> tuple[slice | None, bool]:
        w = self.world
        if not w.cfg_parallel:
            return slice(0, batch), False
        if batch % 2 == 0:
            half = batch // 2
            return slice(w.branch * half, (w.branch + 1) * half), True
        return (slice(0, batch) if w.branch == 0 else None), False

    def prepare(self, plan_id: int, latent_shape: tuple[int, int, int, int], kwargs: dict) -> None:
        batch = latent_shape[0]
        part, split = self._part(batch)
        local = _LocalPlan(tuple(latent_shape), part, split)
        if part is not None:
            sliced = {k: _batch_slice(v, batch, part) for k, v in kwargs.items()}
            local.plan = self.runner.prepare((part.stop - part.start, *latent_shape[1:]), **sliced)
        self.plans[plan_id] = local
        while len(self.plans) > KEEP_PLANS:
            self.plans.popitem(last=False)

    def local_plan(self, plan_id: int) -> _LocalPlan:
        if plan_id not in self.plans:
            raise RuntimeError(f"plan {plan_id} is no longer held (each rank keeps the last {KEEP_PLANS}): "
                               "prepare again for this section")
        return self.plans[plan_id]

    def step(self, plan_id: int, x: torch.Tensor, timestep: torch.Tensor,
             guidance: torch.Tensor | None) -> torch.Tensor | None:
        """The velocity of the whole batch on rank 0; None on the other ranks."""
        local, w = self.local_plan(plan_id), self.world
        if local.part is None:
            return None
        part = local.part
        velocity = self.runner.step(local.plan, x[part], timestep[part], None if guidance is None else guidance[part])
        if not local.split:
            return velocity if w.rank == 0 else None
        if w.rank == w.second_half_leader:
            dist.send(velocity.contiguous(), dst=0)
        elif w.rank == 0:
            other = torch.empty_like(velocity)
            dist.recv(other, src=w.second_half_leader)
            return torch.cat([velocity, other])
        return None


def _from_the_world(exc: BaseException) -> bool:
    """A failed collective (gloo and NCCL raise RuntimeError or DistError: a peer gone, a timeout), not rank 0's
    own out-of-memory or a programming error (those keep their type: the server reports an OOM as one)."""
    return isinstance(exc, RuntimeError) and not isinstance(exc, (torch.OutOfMemoryError, WorkerLost))


def _batch_slice(value: Any, batch: int, part: slice) -> Any:
    """A prepare() argument restricted to the samples in ``part``: per-sample tensors (batch first, 2-D or
    more) are sliced; shared ones ((T,) frame indices, None) pass."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch:
        return value[part]
    return value


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1).expand(batch)


class WorkerLost(RuntimeError):
    """A collective of the multi-process world failed (a worker died, hung past the timeout, or left): every
    worker must be restarted."""


class DistributedTransformer:
    """Rank 0's stand-in for the transformer: ``prepare`` / ``step`` as the model's, each call run by the world.

    Use it where the engine takes a model (SectionGenerator, the pipeline's parts); calls from several threads
    run one after another. ``close()`` (or the ``with`` block) releases the followers. TeaCache is not
    supported (its cache lives on rank 0)."""

    def __init__(self, model: torch.nn.Module, world: ParallelWorld,
                 on_broken: Callable[[BaseException], None] | None = None) -> None:
        """on_broken(exc): called once, on the calling thread, when a call fails and the world is broken (a
        server stops itself there: the sessions after it could only fail)."""
        if world.rank != 0:
            raise ValueError(f"rank {world.rank} follows (framepack_rt.engine.parallel.follow); only rank 0 drives")
        self.model, self.world = model, world
        self._executor = _Executor(model, world)
        self._next_id = 0
        self._closed = self._broken = False
        self.failure: BaseException | None = None  # what broke the world, once it is
        self._on_broken = on_broken
        self._lock = threading.Lock()

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _header(self, op: int, plan_id: int = 0, has_guidance: bool = False) -> None:
        if self._closed:
            raise RuntimeError("the distributed transformer is closed: its followers have left")
        if self._broken:
            raise WorkerLost(f"the worker processes failed earlier ({self.failure}); restart them all")
        header = torch.tensor([op, plan_id, int(has_guidance), 0], dtype=torch.int64, device=self.world.device)
        dist.broadcast(header, src=0)

    def prepare(self, latent_shape: tuple[int, int, int, int], encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, pooled_projections: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, **context: torch.Tensor | None) -> PlanHandle:
        """FramePackTransformer.prepare's arguments; every rank prepares its part."""
        with self._collective():
            return self._prepare(latent_shape, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                 image_embeds, **context)

    def _prepare(self, latent_shape, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                 image_embeds, **context) -> PlanHandle:
        kwargs = dict(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                      pooled_projections=pooled_projections, image_embeds=image_embeds, **context)
        plan_id, self._next_id = self._next_id, self._next_id + 1
        self._header(PREPARE, plan_id)
        payload = (tuple(int(n) for n in latent_shape),
                   {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        dist.broadcast_object_list([payload], src=0, device=self.world.device)
        self._executor.prepare(plan_id, payload[0], kwargs)
        return PlanHandle(plan_id, payload[0])

    def step(self, plan: PlanHandle, hidden_states: torch.Tensor, timestep: torch.Tensor,
             guidance: torch.Tensor | None = None, step_cache: object | None = None) -> torch.Tensor:
        """The velocity for the whole batch (B, 16, T, H, W), as FramePackTransformer.step."""
        if step_cache is not None:
            raise ValueError("TeaCache cannot run with --sequence-parallel / --cfg-parallel yet: drop --teacache")
        with self._collective():
            return self._step(plan, hidden_states, timestep, guidance)

    def _step(self, plan: PlanHandle, hidden_states: torch.Tensor, timestep: torch.Tensor,
              guidance: torch.Tensor | None) -> torch.Tensor:
        batch, device = plan.latent_shape[0], self.world.device
        self._header(STEP, plan.plan_id, guidance is not None)
        x = hidden_states.to(device=device, dtype=torch.float32).contiguous()
        dist.broadcast(x, src=0)
        scalars = [_per_sample(timestep, batch, device)]
        if guidance is not None:
            scalars.append(_per_sample(guidance, batch, device))
        scalars = torch.cat(scalars)
        dist.broadcast(scalars, src=0)
        return self._executor.step(plan.plan_id, x, scalars[:batch],
                                   scalars[batch:] if guidance is not None else None)

    def step_branches(self, branches: list) -> list[torch.Tensor]:
        """FramePackTransformer.step_branches (StepBranch tuples): one distributed step per branch."""
        return [self.step(b.plan, b.hidden_states, b.timestep, b.guidance, b.step_cache) for b in branches]

    def ping(self) -> bool:
        """A no-op call if the world is idle (nothing else holds it); True if one was sent. Keeps followers,
        which wait at most the collective timeout for rank 0's next call, waiting while nothing runs."""
        if not self._lock.acquire(blocking=False):
            return False
        self._lock.release()
        with self._collective():
            if self._closed:
                return False
            self._header(NOOP)
            return True

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """A call the whole world takes part in, one at a time (a server's sessions call from their own threads;
        the collectives of two calls must not interleave). If it fails (a peer died, a timeout), the world is
        broken, close() must not wait on it once more, and a failed collective is raised as WorkerLost."""
        already = self._broken
        with self._lock:
            try:
                yield
            except BaseException as exc:
                self._broken = True
                if already:
                    raise
                self.failure = exc
                lost = None
                if _from_the_world(exc):
                    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                    lost = WorkerLost(f"a worker process stopped answering ({detail}); every worker must be "
                                      "restarted")
                    self.failure = lost
                if self._on_broken is not None:
                    self._on_broken(self.failure)
                if lost is not None:
                    raise lost from exc
                raise

    def close(self) -> None:
        """Tell the followers to return (once; later calls do nothing). After a failed call nothing is sent:
        the followers fail on their own collective's timeout. Followers already gone (a launcher such as torchrun
        signals every worker at once on shutdown) are logged, not raised: there is nobody left to release."""
        with self._lock:
            try:
                if not (self._closed or self._broken):
                    self._header(STOP)
            except RuntimeError as exc:
                log.warning("the other workers had already left when rank 0 closed: %s", str(exc).splitlines()[0])
            finally:
                self._closed = True

    def __enter__(self) -> "DistributedTransformer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def follow(model: torch.nn.Module, world: ParallelWorld) -> int:
    """Ranks other than 0: run this rank's part of every call rank 0 broadcasts, until it closes. Returns the
    number of steps run (a collective that times out raises: the driver or a peer is gone)."""
    if world.rank == 0:
        raise ValueError("rank 0 drives (DistributedTransformer); follow() is for the other ranks")
    executor, steps = _Executor(model, world), 0
    header = torch.empty(HEADER, dtype=torch.int64, device=world.device)
    while True:
        dist.broadcast(header, src=0)
        op, plan_id, has_guidance, _ = header.tolist()
        if op == STOP:
            return steps
        if op == NOOP:  # rank 0 is idle and alive
            continue
        if op == PREPARE:
            payload = [None]
            dist.broadcast_object_list(payload, src=0, device=world.device)
            latent_shape, kwargs = payload[0]
            kwargs = {k: v.to(world.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            executor.prepare(plan_id, latent_shape, kwargs)
        elif op == STEP:
            batch, frames, height, width = executor.local_plan(plan_id).latent_shape
            x = torch.empty(batch, model.config.in_channels, frames, height, width, device=world.device)
            dist.broadcast(x, src=0)
            scalars = torch.empty(batch * (2 if has_guidance else 1), device=world.device)
            dist.broadcast(scalars, src=0)
            executor.step(plan_id, x, scalars[:batch], scalars[batch:] if has_guidance else None)
            steps += 1
        else:
            raise RuntimeError(f"unknown command {op} from rank 0: were the workers started from different versions?")


class Keepalive:
    """Rank 0's thread that pings the world (:meth:`DistributedTransformer.ping`) every ``every_s`` seconds
    while it is idle; ``with Keepalive(proxy, 5.0): ...``. It stops at the first failure (the proxy is then
    broken and its on_broken hook has run)."""

    def __init__(self, proxy: DistributedTransformer, every_s: float) -> None:
        self.proxy, self.every_s = proxy, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="framepack-keepalive", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.proxy.ping()
            except Exception as exc:  # noqa: BLE001 -- the world is broken; the proxy recorded and reported it
                log.error("the worker processes stopped answering: %s", exc)
                return

    def __enter__(self) -> "Keepalive":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.every_s + 1.0)  # a ping stuck on a hung world is a daemon thread: not waited for
