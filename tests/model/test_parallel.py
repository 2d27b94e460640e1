"""Ulysses sequence parallelism (framepack_rt/model/parallel.py): a gloo world of 2 processes on the CPU computes
the same velocity as one process, fp32, for F1 and inverted layouts, odd token counts (padded shards) and
ragged CFG batches; the shard layout reassembles the joint sequence for any world size."""

from __future__ import annotations

import dataclasses
import socket
import sys
from pathlib import Path

import pytest
import torch

from framepack_rt import FramePackConfig, FramePackTransformer
from framepack_rt.model.packing import JointPacking
from framepack_rt.model.parallel import ShardedPacking, check_world

WORLD_TIMEOUT = 180  # seconds for the spawned world (about 15 s on an idle 2-core machine)
STEP_KEYS = ("hidden_states", "timestep", "guidance")
# name: (fp32 output head, make_inputs keywords)
CASES = {
    "f1": (True, dict(text_lengths=(10,), layout="f1")),
    "inverted": (True, dict(text_lengths=(10,), layout="inverted")),
    "f1_odd_tokens": (True, dict(text_lengths=(10,), layout="f1", height=6, width=6)),  # 107 video, 17 context
    "ragged_cfg_pair": (True, dict(text_lengths=(10, 3), layout="f1", height=6, width=6)),
    "ragged_inverted_head_off": (False, dict(text_lengths=(4, 9), layout="inverted")),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(fp32_head: bool) -> FramePackConfig:
    return dataclasses.replace(FramePackConfig.preset("tiny"), fp32_output_head=fp32_head)


def _inputs(make_inputs) -> dict:
    return {name: (dataclasses.asdict(config_for(head)), make_inputs(config_for(head), **kw))
            for name, (head, kw) in CASES.items()}


@pytest.fixture(scope="module")
def sp_world(tmp_path_factory, run_bounded):
    """run(cases) -> each rank's results: the world runs once per module, on the first test's inputs (the
    inputs are seeded, so every test builds the same ones)."""
    state = {}

    def run(cases: dict) -> list[dict]:
        if "results" not in state:
            tmp = tmp_path_factory.mktemp("sp")
            torch.save(cases, tmp / "inputs.pt")
            script = Path(__file__).with_name("sp_world.py")
            done = run_bounded([sys.executable, str(script), str(tmp / "inputs.pt"), str(tmp), "2", str(free_port())],
                               WORLD_TIMEOUT)
            assert done.returncode == 0, done.stdout[-3000:]
            state["results"] = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
        return state["results"]

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_step_equals_one_process(sp_world, make_inputs, case):
    cases = _inputs(make_inputs)
    results = sp_world(cases)
    config, inputs = cases[case]
    model = FramePackTransformer.from_config(FramePackConfig(**config), seed=0).eval()
    with torch.no_grad():
        expected = model(**inputs)
    for rank, result in enumerate(results):
        got = result[case]
        assert got["video_local"] == -(-got["video_len"] // 2) < got["video_len"]  # each rank held half the tokens
        assert got["context_local"] == -(-got["context_len"] // 2) < got["context_len"]
        assert got["velocity"].shape == expected.shape
        err = (got["velocity"] - expected).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: max |diff| {err:.2e} against one process"
    if case == "f1_odd_tokens":
        assert results[0][case]["video_len"] % 2 == 1 and results[0][case]["context_len"] % 2 == 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("context_lengths", [(17,), (12, 5, 30)], ids=["batch1", "ragged3"])
def test_shards_reassemble_the_joint_sequence(world, context_lengths):
    """What the all-to-all does, done by hand: every rank's local rows back to back, reordered by ``order``,
    are exactly the single-device joint sequence; ``inverse`` takes it back to every rank's rows (padding 0)."""
    batch, video_len, dim = len(context_lengths), 107, 3
    full = JointPacking(batch, video_len, list(context_lengths), torch.device("cpu"))
    video = torch.randn(batch, video_len, dim)
    context = torch.randn(sum(context_lengths), dim)
    shards = [ShardedPacking(full, world, r, torch.device("cpu")) for r in range(world)]
    rows = [s.join(s.shard_video(video), s.shard_context(context)) for s in shards]
    assert len({r.shape[0] for r in rows}) == 1  # balanced: every rank the same number of rows
    gathered = torch.cat(rows)
    assert torch.equal(gathered.index_select(0, shards[0].order), full.join(video, context))
    back = torch.cat([full.join(video, context), torch.zeros(1, dim)]).index_select(0, shards[0].inverse)
    for r, s in enumerate(shards):
        mine_video, mine_context = s.split(back.unflatten(0, (world, -1))[r])
        assert torch.equal(mine_video, s.shard_video(video)) and torch.equal(mine_context, s.shard_context(context))
    # per-sample modulation follows the shard: each local context row gets its own sample's vector
    per_sample = torch.arange(batch, dtype=torch.float32)[:, None]
    ids = torch.cat([s.per_context_token(per_sample).expand(s.context_local, 1) for s in shards])[: full.context.total]
    assert torch.equal(ids, full.per_context_token(per_sample).expand(full.context.total, 1))


def test_heads_must_split_over_the_ranks():
    check_world(24, 8)
    with pytest.raises(ValueError, match="1, 2, 3, 4, 6, 8, 12, 24 ranks"):
        check_world(24, 5)
    with pytest.raises(ValueError, match="1, 2 ranks"):
        check_world(2, 4)
