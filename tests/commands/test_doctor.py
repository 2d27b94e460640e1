"""`framepack-rt doctor` on the CPU: every section present, what cannot run here skipped with its reason,
`--json` one JSON object; and the device flags of every command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from framepack_rt.commands import doctor
from framepack_rt.commands import transformer_step as steps
from framepack_rt.commands.cli import main
from framepack_rt.pipeline.devices import Placement

CPU = Placement(torch.device("cpu"))
SECTIONS = ("versions", "device", "kernels", "attention", "step", "memory")


def test_doctor_json_on_the_cpu():
    result = subprocess.run([sys.executable, "-m", "framepack_rt.commands.cli", "doctor", "--model", "tiny",
                             "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # one object, strict JSON, nothing else on stdout
    assert report["model"] == "tiny" and all(report[s]["status"] in ("ok", "skipped") for s in SECTIONS)
    assert report["versions"]["torch"] == torch.__version__ and "triton" in report["versions"]
    assert report["device"]["device"] == "cpu" and report["device"]["free_bytes"] > 0
    assert report["kernels"] == {"status": "skipped", "reason": doctor.CPU_KERNELS_SKIPPED,
                                 "seconds": report["kernels"]["seconds"]}
    assert report["attention"]["backend"] == "sdpa" and report["attention"]["tflops"] > 0
    step = report["step"]
    assert step["status"] == "ok" and step["ms"] > 0 and step["output_finite"]
    assert step["seconds_per_frame"] == pytest.approx(step["ms"] / 1000 * step["steps"] / step["frames_per_section"])
    assert report["memory"]["fits"] is True and report["memory"]["needed_bytes"] > report["memory"]["weights_bytes"]


def test_the_13b_without_weights_is_skipped_with_reasons():
    report = doctor.diagnose("framepack-13b", CPU)
    assert report["step"]["status"] == "skipped"
    assert "no weights" in report["step"]["reason"] and "run doctor on a GPU" in report["step"]["reason"]
    attention = report["attention"]
    assert attention["status"] == "ok" and attention["timing"].startswith("skipped:")
    assert attention["tokens"] == steps.shapes_for("framepack-13b").tokens(steps.model_config("framepack-13b"))
    memory = report["memory"]
    assert memory["parts"][0]["numel"] == 12_874_314_816 and "transformer only" in memory["notes"][0]
    text = doctor.format_report(report)
    assert len(text.splitlines()) == 7 and "step       skipped: framepack-13b has no weights" in text


def test_the_demo_model_text_report(capsys):
    assert main(["doctor", "--model", "demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("framepack-rt doctor: model demo on cpu, transformer fp32")
    for name in SECTIONS:
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "8 steps per 36-frame section" in out and "fits" in out


def test_a_failing_section_is_reported_and_the_others_run(monkeypatch):
    def broken(*args):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(doctor, "attention", broken)
    report = doctor.diagnose("tiny", CPU)
    assert report["attention"]["status"] == "failed" and "RuntimeError: probe exploded" in report["attention"]["reason"]
    assert report["step"]["status"] == "ok"


def test_shapes_follow_the_model():
    demo, release = steps.shapes_for("demo"), steps.shapes_for("framepack-13b")
    assert (demo.latent_height, demo.latent_width, demo.steps) == (12, 12, 8)
    assert release.steps == 25 and release.image_tokens == 729
    config = steps.model_config("framepack-13b")
    # 9 latents of 38 x 40 tokens after 2x2 patches (608 x 640 bucket), the 1x/2x/4x context, text and image.
    h, w = release.latent_height // 2, release.latent_width // 2
    context = 2 * h * w + (h // 2) * (w // 2) + 4 * -(-h // 4) * -(-w // 4)
    assert release.tokens(config) == 9 * h * w + context + 64 + 729


@pytest.mark.parametrize("command", [
    ["doctor", "--device", "gpu"], ["info", "--dtype", "int8"], ["serve", "--device", "cuda:x"],
    ["bench", "--device", "tpu"],
])
def test_device_flags_are_checked_by_argparse(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", [["doctor", "--device", "cuda"], ["info", "--device", "cuda:0"],
                                     ["serve", "--device", "cuda", "--port", "0"]])
def test_cuda_asked_for_without_one_is_one_line(command, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sees no CUDA GPU; use --device cpu" in err


def test_doctor_times_the_step_with_fp8_weights(capsys):
    from framepack_rt.commands.cli import main

    assert main(["doctor", "--model", "tiny", "--device", "cpu", "--quantize", "fp8", "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert report["step"]["status"] == "ok" and report["step"]["quantize"] == "fp8"
    assert report["step"]["output_finite"] is True
