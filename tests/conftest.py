"""Shared fixtures. Tests run on the CPU; nothing here touches CUDA.

Triton's CPU interpreter is switched on here, before anything imports triton: ``triton.jit`` reads
TRITON_INTERPRET when a kernel is defined, and tests outside tests/kernels (the engine's, doctor's, the
demo's) may import a kernel module first. On this CPU-only suite the interpreter is the only way the kernels
run (tests/kernels/test_compile_sm90.py compiles for real in subprocesses that drop the variable)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Ray, whichever test module imports it first (its constants are read at import): a local instance's node
# address is loopback, so its servers listen there only, and it sends no usage statistics.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import dataclasses  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Frame-index layouts of the two released samplers (window 9), as the model receives them.
LAYOUTS = {
    # F1 forward: start | 4x (1..16) | 2x (17, 18) | 1x (19) | noisy (20..28)
    "f1": dict(
        indices_latents=torch.arange(20, 29),
        indices_latents_clean=torch.tensor([0, 19]),
        indices_latents_history_2x=torch.tensor([17, 18]),
        indices_latents_history_4x=torch.arange(1, 17),
    ),
    # Inverted anti-drifting, padding 2: start | blank (18) | noisy (19..27) | post (28) | 2x | 4x
    "inverted": dict(
        indices_latents=torch.arange(19, 28),
        indices_latents_clean=torch.tensor([0, 28]),
        indices_latents_history_2x=torch.tensor([29, 30]),
        indices_latents_history_4x=torch.arange(31, 47),
    ),
}


@pytest.fixture
def make_inputs() -> Callable[..., dict]:
    """Random forward() keyword arguments for a config, with per-sample text lengths."""

    def build(config, text_lengths=(10,), layout="f1", height=8, width=12, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        batch, max_len = len(text_lengths), max(text_lengths)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(dtype)

        mask = torch.zeros(batch, max_len, dtype=torch.long)
        for i, n in enumerate(text_lengths):
            mask[i, :n] = 1
        return dict(
            hidden_states=randn(batch, config.in_channels, 9, height, width),
            timestep=torch.linspace(900.0, 300.0, batch),
            encoder_hidden_states=randn(batch, max_len, config.text_embed_dim),
            encoder_attention_mask=mask,
            pooled_projections=randn(batch, config.pooled_projection_dim),
            image_embeds=randn(batch, 7, config.image_proj_dim),
            guidance=torch.full((batch,), 10_000.0),
            latents_clean=randn(batch, config.in_channels, 2, height, width),
            latents_history_2x=randn(batch, config.in_channels, 2, height, width),
            latents_history_4x=randn(batch, config.in_channels, 16, height, width),
            **LAYOUTS[layout],
        )

    return build


@pytest.fixture
def tiny_config():
    from framepack_rt import FramePackConfig

    # fp32 head off: the diffusers oracle computes its head in the model dtype.
    return dataclasses.replace(FramePackConfig.preset("tiny"), fp32_output_head=False)


STREAM_STEPS = 2  # few steps: the tiny model then generates above 30 fps on a CPU


@pytest.fixture(scope="session")
def stream_pipe():
    """The tiny pipeline, warmed up once (torch's first calls are slow), shared by the server tests."""
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
    from framepack_rt.stream.images import default_scene

    pipe = FramePackPipeline.from_pretrained("tiny")
    next(pipe.stream(default_scene(), "warm-up", steps=STREAM_STEPS))
    return pipe


@pytest.fixture
def run_with_server():
    """run(pipe, scenario, timeout=60, **settings): start a server on a free port, run
    ``await scenario(server, url)``, always stop the server; returns the scenario's result."""
    import asyncio

    from framepack_rt.stream.server import ServerSettings, StreamServer

    def run(pipe, scenario, timeout: float = 60.0, **settings):
        async def main():
            server = StreamServer(pipe, ServerSettings(steps=STREAM_STEPS, **settings))
            url = await server.start("127.0.0.1", 0)
            try:
                return await asyncio.wait_for(scenario(server, url), timeout)
            finally:
                await server.stop()

        return asyncio.run(main())

    return run


class ServeProcesses:
    """``framepack-rt serve --port 0 *args`` subprocesses. Called as ``(*args, env=None, timeout=90)`` it
    returns (proc, url, lines) once the server has printed its URL (``lines`` keeps filling with its output);
    ``stop(proc, lines)`` ends one the way Ctrl-C does and fails the test unless it exits cleanly within 15 s;
    ``close()`` kills whatever still runs."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 90.0):
        import re
        import sys
        import threading

        proc = subprocess.Popen([sys.executable, "-m", "framepack_rt.commands.cli", "serve", "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.procs.append(proc)
        lines: list[str] = []
        url: list[str] = []
        found = threading.Event()

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                match = re.search(r"open (http://\S+)", line)
                if match and not url:
                    url.append(match.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout):
            pytest.fail(f"server printed no URL within {timeout:.0f} s:\n" + "".join(lines))
        return proc, url[0], lines

    @staticmethod
    def stop(proc: subprocess.Popen, lines: list[str]) -> None:
        os.kill(proc.pid, signal.SIGTERM)  # the clean-shutdown path Ctrl-C takes too
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("server did not stop within 15 s of SIGTERM:\n" + "".join(lines))
        assert code == 0, "".join(lines)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def launch_serve():
    """launch(*args, env=None, timeout=90) -> (proc, url, lines), and launch.stop(proc, lines): see ServeProcesses.
    Tests stop their servers themselves (by pid); whatever still runs at teardown is killed."""
    servers = ServeProcesses()
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def launch_serve_module():
    """launch_serve for module-scoped fixtures (one server shared by a module's tests)."""
    servers = ServeProcesses()
    yield servers
    servers.close()


def _run_in_own_session(cmd: list[str], timeout: float, *, env: dict | None = None,
                        merge_stderr: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in its own session (multi-process worlds: torchrun, spawned workers); the test fails, and the
    process group is killed with everything it spawned, if it outlives ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ... did not finish within {timeout} s:\n{(err or out)[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err or "")


@pytest.fixture(scope="session")
def run_bounded() -> Callable[..., subprocess.CompletedProcess]:
    """run_bounded(cmd, timeout, env=None, merge_stderr=True) -> CompletedProcess: see _run_in_own_session."""
    return _run_in_own_session
