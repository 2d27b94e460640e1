"""Generation on several worker processes (framepack_rt/commands/parallel.py through the launcher): a gloo world
of 2 on the CPU writes the video one process writes, sequence parallel and with CFG parallel; what cannot work
is refused before any worker starts, for generate and serve."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

RUN_TIMEOUT = 300  # seconds per parallel run: about 40 s on a loaded 2-core machine, most of it process start


def run_parallel_cli(run_bounded, *args: str) -> subprocess.CompletedProcess:
    """``framepack-rt generate --sequence-parallel ...`` in its own session: killed, workers included, on timeout."""
    return run_bounded([sys.executable, "-m", "framepack_rt.commands.cli", "generate", *args], RUN_TIMEOUT,
                       merge_stderr=False)


@pytest.mark.parametrize("mode, flags", [("f1", ["--sequence-parallel", "2"]),
                                         pytest.param("inverted", ["--sequence-parallel", "2", "--cfg-parallel"],
                                                      marks=pytest.mark.slow)],  # 20 s more, the same path
                         ids=["sequence_parallel_2_f1", "cfg_parallel_2_inverted"])
def test_two_workers_write_the_video_one_process_writes(tmp_path, start_image, mode, flags, run_bounded,
                                                       mp4_frames):
    from framepack_rt.commands.cli import main

    common = ["--model", "tiny", "--device", "cpu", "--image", str(start_image), "--prompt", "a red ball moves right",
              "--seconds", "2.5", "--mode", mode, "--cfg", "2", "--seed", "3"]
    assert main(["generate", *common, "--out", str(tmp_path / "one.mp4")]) == 0
    done = run_parallel_cli(run_bounded, *common, *flags, "--out", str(tmp_path / "two.mp4"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 workers" in done.stdout
    one, two = mp4_frames(tmp_path / "one.mp4"), mp4_frames(tmp_path / "two.mp4")
    assert one.shape == two.shape and one.shape[0] > 37  # more than one section
    diff = np.abs(one.astype(np.float64) - two).mean()
    assert diff <= 0.5, f"mean |diff| {diff:.3f}/255 against one process"


@pytest.mark.parametrize("flags, message", [
    (["--sequence-parallel", "3", "--cfg-parallel"], "even number"),
    (["--sequence-parallel", "2", "--teacache", "0.1"], "--teacache cannot run"),
    (["--sequence-parallel", "2", "--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
])
def test_impossible_layouts_are_refused_before_any_worker_starts(tmp_path, start_image, capsys, flags, message):
    from framepack_rt.commands.parallel import main

    argv = ["--model", "tiny", "--image", str(start_image), "--prompt", "a ball", "--seconds", "1",
            "--out", str(tmp_path / "x.mp4"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_heads_that_do_not_split_are_refused():
    from framepack_rt.pipeline.parallel_launch import LaunchConfig

    with pytest.raises(ValueError, match="1, 2 ranks"):
        LaunchConfig(4, num_heads=2).validate()
    LaunchConfig(4, cfg_parallel=True, num_heads=2).validate()  # two halves of 2: the tiny model's 2 heads split


@pytest.mark.parametrize("flags, message", [
    (["--teacache", "0.1"], "--teacache cannot run"),
    (["--low-vram"], "leave --low-vram out"),
    (["--cfg-parallel", "--sequence-parallel", "3"], "even number"),
], ids=["teacache", "low_vram", "odd_cfg_parallel"])
def test_serve_refuses_what_workers_cannot_do_before_any_starts(capsys, flags, message):
    from framepack_rt.commands.cli import main

    argv = ["serve", "--model", "tiny", "--device", "cpu", "--port", "0", "--sequence-parallel", "2", *flags]
    began = time.perf_counter()
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - began < 10  # refused up front: no worker was started (each takes 20 s or more)


def test_no_decode_overlap_reaches_the_pipeline_from_generate_and_serve(tmp_path):
    from framepack_rt.commands.cli import build_parser
    from framepack_rt.commands.generate import write_video
    from framepack_rt.stream.server import ServerSettings

    class Asked(Exception):
        pass

    class Pipe:  # what write_video needs before it streams; stream() reports what it was asked
        example, default_steps = (np.zeros((64, 64, 3), np.uint8), "a ball"), 2

        def guidance(self, cfg):
            return None

        def stream(self, image, prompt, **kwargs):
            raise Asked(kwargs.get("decode_overlap"))

    parser = build_parser()
    for flags, expected in (([], None), (["--no-decode-overlap"], False)):
        args = parser.parse_args(["generate", "--seconds", "1", "--out", str(tmp_path / "x.mp4"), *flags])
        with pytest.raises(Asked) as asked:
            write_video(Pipe(), args)
        assert asked.value.args[0] is expected
    assert parser.parse_args(["serve", "--no-decode-overlap"]).no_decode_overlap
    assert ServerSettings(decode_overlap=False).decode_overlap_kwargs() == {"decode_overlap": False}
    assert ServerSettings().decode_overlap_kwargs() == {}
