"""CFG parallel and the driver/follower protocol (framepack_rt/engine/parallel.py) in gloo worlds of 2 processes:
sections sampled through DistributedTransformer (sequence parallel over 2 ranks; CFG parallel, one rank per
branch, ragged prompt lengths, some steps unguided) equal one process's; a worker that dies ends the run with an
error, with and without a supervising parent."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("parallel_world.py")
WORLD_TIMEOUT = 240  # seconds per script (about 25 s on an idle 2-core machine)


def run_script(run_bounded, *args: str) -> str:
    """The script in its own session; it and everything it spawned are killed if it outlives WORLD_TIMEOUT."""
    done = run_bounded([sys.executable, str(SCRIPT), *args], WORLD_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def script_module():
    spec = importlib.util.spec_from_file_location("parallel_world", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_process():
    """The same sections and CFG-pair velocity from the plain model in this process (batched CFG)."""
    world = script_module()
    model, *case = world.build_case()
    return world.generate(model, *case)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory, run_bounded):
    out = tmp_path_factory.mktemp("equal")
    run_script(run_bounded, "equal", str(out))
    return torch.load(out / "equal.pt")


@pytest.mark.parametrize("mode", ["sp", "cfg"], ids=["sequence_parallel_2", "cfg_parallel_2"])
def test_parallel_sections_equal_batched_cfg_in_one_process(parallel, one_process, mode):
    got = parallel[mode]
    err = (got["pair_velocity"] - one_process["pair_velocity"]).abs().max().item()
    assert err <= 1e-5, f"CFG pair velocity: max |diff| {err:.2e}"
    assert len(got["latents"]) == len(one_process["latents"]) == 2
    for k, (a, b) in enumerate(zip(got["latents"], one_process["latents"])):
        err = (a - b).abs().max().item()
        assert err <= 1e-4, f"section {k}: max |diff| {err:.2e} after {a.shape} latents were sampled"


@pytest.mark.slow  # 31 s; tests/stream/test_parallel_serve.py kills a worker end to end by default
def test_a_dead_worker_ends_the_run_with_an_error(tmp_path, run_bounded):
    run_script(run_bounded, "die", str(tmp_path))
    seen = torch.load(tmp_path / "die.pt")
    # Supervised (launch() spawned the workers): the parent stops the others and names the worker.
    assert "worker 1 of 2 died (exit code 3)" in seen["supervised"]
    assert seen["supervised_s"] < 60
    # A worker that hangs: rank 0's collective times out (5 s) and its error ends the run.
    assert "worker 0 of 2 failed" in seen["hung"] and "Timed out" in seen["hung"], seen["hung"][-500:]
    assert seen["hung_s"] < 60
    # Unsupervised (a torchrun-like world): rank 0's collective fails by itself within its 10 s timeout.
    assert seen["rank1_exit"] == 3
    assert seen["alone"] is not None, "rank 0 never returned: it hung on its dead peer"
    assert seen["alone"]["outcome"] != "finished", "rank 0 finished a stream its peer died in"
    assert "WorkerLost: a worker process stopped answering" in seen["alone"]["outcome"], seen["alone"]["outcome"]
    assert seen["alone"]["seconds"] < 60
