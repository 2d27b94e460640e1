"""Run by tests/engine/test_parallel.py as a script (spawned workers need an importable entry point; pytest's
test modules are not one). Worlds of 2 gloo processes on 127.0.0.1:

    python tests/engine/parallel_world.py equal OUT   # SP and CFG parallel through DistributedTransformer
    python tests/engine/parallel_world.py die OUT     # a worker dies mid-section

``equal`` saves rank 0's velocities and section latents to OUT/equal.pt; ``die`` (a worker that exits, one that
hangs, and one that exits with no supervising parent) saves what each harness saw to OUT/die.pt. build_case() is also imported by the test, for the one-process reference.
"""

from __future__ import annotations

import os
import sys
import time

import torch

STEPS, SECTIONS, HEIGHT, WIDTH = 4, 2, 6, 8


def build_case():
    """The tiny model, a start latent, a prompt and a (shorter: ragged) negative prompt, and the sampler."""
    from framepack_rt.engine.generator import Conditioning, SamplerConfig
    from framepack_rt.engine.sampling import GuidanceConfig
    from framepack_rt.engine.schedules import f1_schedule
    from framepack_rt.model.transformer import FramePackTransformer

    model = FramePackTransformer.from_config("tiny", seed=0).eval()
    g = torch.Generator().manual_seed(1)
    cfg = model.config

    def conditioning(prompt: str, length: int) -> Conditioning:
        return Conditioning(prompt, torch.randn(1, length, cfg.text_embed_dim, generator=g),
                            torch.randn(1, cfg.pooled_projection_dim, generator=g),
                            image_embeds=torch.randn(1, 7, cfg.image_proj_dim, generator=g))

    positive, negative = conditioning("a ball", 12), conditioning("blur", 5)
    start = torch.randn(1, cfg.in_channels, 1, HEIGHT, WIDTH, generator=g)
    # CFG on the noisy steps only: the other steps call the positive branch alone (batch 1, not split).
    sampler = SamplerConfig(steps=STEPS, guidance=GuidanceConfig(cfg=3.0, cfg_min_sigma=0.5))
    return model, f1_schedule(9, SECTIONS), start, positive, negative, sampler


def generate(model, schedule, start, positive, negative, sampler):
    """Section latents, and one direct CFG-pair velocity, with ``model`` (the plain model or rank 0's stand-in)."""
    from framepack_rt.engine.generator import SectionGenerator, _stacked

    gen = SectionGenerator(model, schedule, start, positive, sampler=sampler, seed=5, negative=negative)
    latents = [section.latents for section in gen]
    both = _stacked(positive, negative)
    context = gen.ring.inputs(schedule.layout(SECTIONS - 1)).as_kwargs()
    context = {k: v if v is None or v.ndim == 1 else torch.cat([v, v]) for k, v in context.items()}
    x = torch.randn(2, 16, 9, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plan = model.prepare((2, 9, HEIGHT, WIDTH), both.text, both.text_mask, both.pooled, both.image_embeds,
                             **context)
        velocity = model.step(plan, x, torch.tensor([700.0, 700.0]), torch.tensor([10_000.0, 10_000.0]))
    return {"latents": latents, "pair_velocity": velocity}


def equal_job(world):
    """SP over both ranks, then CFG parallel (one rank per branch), each through DistributedTransformer."""
    from framepack_rt.engine.parallel import DistributedTransformer, ParallelWorld, follow

    cfg_world = ParallelWorld.build(world.device, cfg_parallel=True)
    results = {}
    for name, w in (("sp", world), ("cfg", cfg_world)):
        model, *case = build_case()
        if w.rank != 0:
            results[name] = follow(model, w)
            continue
        with DistributedTransformer(model, w) as proxy:
            results[name] = generate(proxy, *case)
    return results


def die_job(world, kill_after_steps: int, hang: bool = False):
    """Rank 1 exits abruptly (or, with ``hang``, stops answering) in the middle of its part of a step; rank 0
    keeps generating."""
    from framepack_rt.engine.parallel import DistributedTransformer, follow

    model, *case = build_case()
    if world.rank == 0:
        with DistributedTransformer(model, world) as proxy:
            return generate(proxy, *case)
    calls = [0]
    run_blocks = model.run_blocks

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] > kill_after_steps:
            if hang:
                time.sleep(3600)
            os._exit(3)
        return run_blocks(*args, **kwargs)

    model.run_blocks = dying
    return follow(model, world)


def torchrun_like_rank(rank: int, port: int, out: str, timeout_s: float) -> None:
    """One process of a world nobody supervises (as under torchrun on two machines): rank 0 must fail by itself."""
    from framepack_rt.pipeline.parallel_launch import LaunchConfig, launch

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    began = time.perf_counter()
    try:
        launch(die_job, LaunchConfig(2, timeout_s=timeout_s), 1)
        outcome = "finished"
    except Exception as exc:  # what rank 0 saw: the test checks it is an error, and how long it took
        outcome = f"{type(exc).__name__}: {exc}"
    torch.save({"outcome": outcome, "seconds": time.perf_counter() - began}, os.path.join(out, f"alone{rank}.pt"))


def main(mode: str, out: str) -> None:
    import multiprocessing

    from framepack_rt.pipeline.parallel_launch import LaunchConfig, WorkerFailed, free_port, launch

    if mode == "equal":
        torch.save(launch(equal_job, LaunchConfig(2, timeout_s=60, num_heads=2)), os.path.join(out, "equal.pt"))
        return
    began = time.perf_counter()
    try:
        launch(die_job, LaunchConfig(2, timeout_s=20), 1)
        supervised = "finished"
    except WorkerFailed as exc:
        supervised = str(exc)
    supervised_s = time.perf_counter() - began
    # A worker that hangs instead: rank 0's next collective times out (5 s) and its error ends the run.
    began = time.perf_counter()
    try:
        launch(die_job, LaunchConfig(2, timeout_s=5), 1, True)
        hung = "finished"
    except WorkerFailed as exc:
        hung = str(exc)
    hung_s = time.perf_counter() - began
    # The same death with no supervising parent: rank 0's collective must time out or fail by itself.
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    ranks = [ctx.Process(target=torchrun_like_rank, args=(r, port, out, 10.0)) for r in range(2)]
    began = time.perf_counter()
    for p in ranks:
        p.start()
    ranks[0].join(timeout=120)
    alone_s = time.perf_counter() - began
    for p in ranks:
        if p.is_alive():
            p.kill()
        p.join()
    alone = torch.load(os.path.join(out, "alone0.pt")) if os.path.exists(os.path.join(out, "alone0.pt")) else None
    torch.save({"supervised": supervised, "supervised_s": supervised_s, "hung": hung, "hung_s": hung_s, "alone": alone, "alone_s": alone_s,
                "rank1_exit": ranks[1].exitcode}, os.path.join(out, "die.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
