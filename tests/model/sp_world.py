"""Run by tests/model/test_parallel.py as a script (spawned worlds need an importable entry point; pytest's
test modules are not one): a gloo world of N ranks on 127.0.0.1 runs SequenceParallel.step on every case of
INPUTS and saves each rank's velocities to OUT/rank{r}.pt.

    python tests/model/sp_world.py INPUTS OUT WORLD_SIZE PORT
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEP_KEYS = ("hidden_states", "timestep", "guidance")


def worker(rank: int, inputs_path: str, out: str, world: int, port: int) -> None:
    from framepack_rt.model.config import FramePackConfig
    from framepack_rt.model.parallel import SequenceParallel
    from framepack_rt.model.transformer import FramePackTransformer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        cases = torch.load(inputs_path, weights_only=False)
        results = {}
        for name, (config, inputs) in cases.items():
            model = FramePackTransformer.from_config(FramePackConfig(**config), seed=0).eval()
            sp = SequenceParallel(model)
            x = inputs["hidden_states"]
            context = {k: v for k, v in inputs.items() if k not in STEP_KEYS}
            with torch.no_grad():
                plan = sp.prepare((x.shape[0], *x.shape[2:]), **context)
                velocity = sp.step(plan, x, inputs["timestep"], inputs["guidance"])
            results[name] = {"velocity": velocity, "video_local": plan.packing.video_local,
                             "video_len": plan.packing.video_len, "context_local": plan.packing.context_local,
                             "context_len": plan.packing.context_len}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    path, out, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mp.spawn(worker, (path, out, world, port), nprocs=world)
