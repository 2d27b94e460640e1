"""Ahead-of-time compile of every kernel for Hopper (sm_90) at the 13B shapes, on this CPU-only machine.

``python -m framepack_rt.kernels.aot`` runs in two subprocesses (two shards in parallel) without
TRITON_INTERPRET (this process has it on, see conftest.py) and with a fresh Triton cache, so every job really
goes through ttir -> ttgir -> llir -> ptx -> ptxas. Each job is one configuration the autotuner (after pruning)
or the launch heuristic can pick at those shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from framepack_rt.kernels import aot

JOBS = {job.name: job for job in aot.jobs()}
MISSING = aot.missing_compiler_support()  # an older Triton: the ahead-of-time entry points are not there
# slow: the compile fixture alone takes 60 s on 2 cores; CI trim (run with -m slow)
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"aot: {MISSING}"), pytest.mark.slow]
SHARDS = 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, stated (silences a 3.9 warning)
    commands = [
        [sys.executable, "-m", "framepack_rt.kernels.aot", "--shard", f"{i}/{SHARDS}", "--json", str(tmp / f"{i}.json")]
        for i in range(SHARDS)
    ]
    procs = [  # in parallel: compiling is single-threaded
        subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    results = {}
    for i, proc in enumerate(procs):
        output, _ = proc.communicate(timeout=900)  # minutes when other work shares the cores
        assert proc.returncode == 0, f"aot shard {i} failed:\n{output[-4000:]}"
        results.update({r["name"]: r for r in json.loads((tmp / f"{i}.json").read_text())})
    return results


@pytest.mark.parametrize("name", list(JOBS))
def test_compiles_to_a_cubin(compiled, name):
    result = compiled[name]
    assert result["cubin_bytes"] > 0
    assert result["shared_bytes"] <= aot.SMEM_LIMIT, "the pruning kept a config that cannot launch on sm_90"
    if "smem_estimate" in result:  # the pruning's estimate must not under-count
        assert result["shared_bytes"] <= result["smem_estimate"]


@pytest.mark.parametrize("name", [n for n, job in JOBS.items() if job.kernel in ("packed_attention", "patchify")])
def test_gemm_kernels_take_the_hopper_path(compiled, name):
    """Wide tiles must lower to wgmma (Hopper tensor cores); attention's K/V loads must be pipelined."""
    job, result = JOBS[name], compiled[name]
    if job.constexprs["BLOCK_M"] >= 64:
        assert result["uses_wgmma"], f"{name} does not use wgmma"
    if job.kernel == "packed_attention":
        assert result["uses_async_copy"], f"{name}: K/V loads are not software-pipelined (no cp.async)"


def test_every_kernel_is_covered():
    assert {job.kernel for job in JOBS.values()} == {"packed_attention", "patchify", "qk_norm_rope", "adaln"}
