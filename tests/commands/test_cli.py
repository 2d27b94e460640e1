"""The framepack-rt command: generate writes playable MP4s; bad arguments give one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from framepack_rt.commands.cli import main


@pytest.mark.parametrize("mode, extra", [("f1", []), ("inverted", ["--end-image", "IMAGE"])], ids=["f1", "inverted-end-image"])
def test_generate_writes_a_playable_mp4(tmp_path, start_image, mode, extra, capsys, mp4_frames):
    out = tmp_path / "out.mp4"
    extra = [str(start_image) if a == "IMAGE" else a for a in extra]
    rc = main(["generate", "--image", str(start_image), "--prompt", "a red ball moves right", "--seconds", "2",
               "--mode", mode, "--steps", "2", "--out", str(out), *extra])
    assert rc == 0
    assert len(mp4_frames(out)) == 73  # 2 sections x 9 latents + start = 19 latents -> 73 frames
    assert "wrote" in capsys.readouterr().out


def test_generate_with_a_prompt_schedule(tmp_path, start_image, mp4_frames):
    out = tmp_path / "sched.mp4"
    assert main(["generate", "--image", str(start_image), "--prompt-schedule", "0:a ball rolls;1.2:the ball stops",
                 "--seconds", "2", "--steps", "2", "--cfg", "1.5", "--solver", "euler_stochastic", "--out", str(out)]) == 0
    assert len(mp4_frames(out)) == 73


@pytest.mark.parametrize(
    "args, message",
    [(["--seconds", "0"], "--seconds must be > 0"), (["--seconds", "-1"], "--seconds must be > 0"),
     (["--mode", "sideways"], "choose one of f1, inverted"), (["--image", "/no/such.png"], "no such image file"),
     (["--image", "NOTIMAGE"], "not a readable image"), (["--end-image", "IMAGE"], "needs --mode inverted"),
     (["--out", "/no/such/dir/x.mp4"], "does not exist"), (["--prompt-schedule", "2:late"], "one of --prompt"),
     (["--cfg", "0"], "--cfg must be > 0"), (["--memory-budget-gb", "4"], "add --low-vram"),
     (["--solver", "dpm"], "--solver 'dpm': choose one of")],
    ids=["zero-seconds", "negative-seconds", "bad-mode", "missing-image", "unreadable-image", "end-image-f1",
         "bad-out-dir", "prompt-and-schedule", "zero-cfg", "budget-without-low-vram", "bad-solver"],
)
def test_bad_arguments_one_line_nonzero(tmp_path, start_image, args, message, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    base = {"--image": str(start_image), "--prompt": "a ball", "--seconds": "2", "--out": str(tmp_path / "o.mp4")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].replace("NOTIMAGE", str(not_image)).replace("IMAGE", str(start_image))
    argv = ["generate"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow  # 13 s; CI trim: main() runs in-process in the other tests
def test_console_script_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "framepack_rt.commands.cli", "generate", "--image", "/nope.png",
                             "--prompt", "x", "--seconds", "1", "--out", str(tmp_path / "o.mp4")],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no such image" in result.stderr


def test_not_enough_memory_is_one_line_before_loading(tmp_path, start_image, monkeypatch, capsys):
    from framepack_rt.pipeline import memory

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 20 * 2**20)  # 20 MiB free on this "machine"
    assert main(["generate", "--model", "demo", "--device", "cpu", "--image", str(start_image), "--prompt", "a ball",
                 "--seconds", "1", "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 80.6 MiB on cpu" in err and "20.0 MiB free" in err
    assert not (tmp_path / "o.mp4").exists()


def test_device_flags_default_to_auto():
    from framepack_rt.commands.cli import build_parser

    parser = build_parser()
    for command in (["generate", "--image", "x", "--prompt", "p", "--seconds", "1", "--out", "o.mp4"],
                    ["serve"], ["info"], ["doctor"], ["bench"]):
        args = parser.parse_args(command)
        assert (args.device, args.dtype) == ("auto", "auto"), command


def test_generate_with_fp8_weights_and_compile(tmp_path, start_image, monkeypatch, mp4_frames):
    """--quantize fp8 and --compile reach the transformer (compile is lazy: checked, not run, here)."""
    from framepack_rt.model.quantize import Fp8Linear
    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline

    loaded = {}
    original = FramePackPipeline.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        loaded["pipe"] = original(cls, *args, **{**kwargs, "compile": False})  # no inductor run in this test
        loaded["kwargs"] = kwargs
        return loaded["pipe"]

    monkeypatch.setattr(FramePackPipeline, "from_pretrained", classmethod(recording))
    out = tmp_path / "fp8.mp4"
    assert main(["generate", "--model", "tiny", "--image", str(start_image), "--prompt", "a ball", "--seconds", "1",
                 "--steps", "1", "--quantize", "fp8", "--compile", "--out", str(out)]) == 0
    assert loaded["kwargs"]["quantize"] == "fp8" and loaded["kwargs"]["compile"] is True
    blocks = loaded["pipe"].parts.transformer().transformer_blocks
    assert any(isinstance(m, Fp8Linear) for m in blocks.modules())
    assert len(mp4_frames(out)) > 0


def test_unknown_quantization_is_one_line(tmp_path, start_image, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--image", str(start_image), "--prompt", "x", "--seconds", "1", "--quantize", "int4",
              "--out", str(tmp_path / "x.mp4")])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_info_prints_the_memory_plan(capsys):
    assert main(["info", "--model", "framepack-13b", "--device", "cpu", "--dtype", "bf16", "--resolution", "640",
                 "--quantize", "fp8", "--memory-budget-gb", "6"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: 640x640, window 9" in out and "float8_e4m3fn" in out and "budget 6.00 GiB: fits" in out


def test_info_memory_plan_too_small_is_one_line(capsys):
    assert main(["info", "--model", "framepack-13b", "--device", "cpu", "--dtype", "bf16", "--resolution", "640",
                 "--memory-budget-gb", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("framepack-rt info:") and len(err.strip().splitlines()) == 1


def test_generate_without_image_uses_the_models_example_start(tmp_path, capfd, mp4_frames):
    """The default model (the demo) carries its example (a red ball, "a red ball moves right"): no --model, no
    --image, no --prompt. The video starts from that picture, the real length is printed, and loading prints no
    "install accelerate" warning (captured at the file descriptors: the libraries' log handlers write there)."""
    import numpy as np
    from PIL import Image

    from framepack_rt.pipeline.builtin import demo_weights_dir, read_example

    out = tmp_path / "example.mp4"
    assert main(["generate", "--seconds", "1", "--steps", "1", "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert "--seconds 1 makes 1 section of 9 latents" in printed.err and "37 frames, 1.23 s at 30 fps" in printed.err
    assert "wrote" in printed.out and "37 frames (1.23 s at 30 fps)" in printed.out
    assert "accelerate" not in printed.err + printed.out
    frames = mp4_frames(out)
    example, _ = read_example(demo_weights_dir())
    first = frames[0].astype(np.int16)
    h, w = first.shape[:2]  # the demo's fast decoder draws twice the example's side: compare at that size
    example = np.asarray(Image.fromarray(example).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    here, mirrored = np.abs(first - example).mean(), np.abs(first - example[:, ::-1]).mean()
    assert len(frames) == 37 and here < 10 and here < mirrored - 2, (here, mirrored)


@pytest.mark.parametrize("seconds, sections, frames", [(0.1, 1, 37), (1, 1, 37), (3, 2, 73), (5, 4, 145), (6, 5, 181)])
def test_the_length_note_says_how_seconds_round_to_sections(seconds, sections, frames):
    """--seconds rounds to the nearest whole section (Python's round, as the release: 3 s is 2.5 sections -> 2)."""
    from framepack_rt.commands.generate import length_note
    from framepack_rt.engine.schedules import num_sections, video_frames_for_latents

    assert num_sections(seconds, 9) == sections and video_frames_for_latents(sections * 9 + 1) == frames
    note = length_note(seconds, 9, sections, frames)
    assert f"--seconds {seconds:g} makes {sections} section" in note and f"{frames} frames, {frames / 30:.2f} s" in note
    assert "36 frames, 1.20 s each" in note and "rounds to the nearest number of them (at least 1)" in note


COMMANDS = {"serve": [], "generate": ["--seconds", "1", "--out", "o.mp4"], "info": [], "doctor": [], "bench": []}


def test_every_command_has_the_same_model_names_and_default(capsys):
    """One default (the demo) and one list of names for serve, generate, info, doctor and bench, each listed in
    the help; the transformer-only preset is taken where a transformer runs alone (info, doctor) and refused
    with what to do elsewhere; a name that is no model and no folder is refused before anything loads."""
    from framepack_rt.commands.cli import build_parser
    from framepack_rt.model.config import PRESETS
    from framepack_rt.pipeline.builtin import BUILTIN_MODELS, DEFAULT_MODEL, TRANSFORMER_PRESETS

    assert DEFAULT_MODEL == "demo" and set(PRESETS) == set(TRANSFORMER_PRESETS) | {"tiny"}
    parser = build_parser()
    for command, rest in COMMANDS.items():
        assert parser.parse_args([command, *rest]).model == DEFAULT_MODEL, command
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        takes_presets = command in ("info", "doctor")
        names = [*BUILTIN_MODELS, *(TRANSFORMER_PRESETS if takes_presets else ())]
        assert f"{' | '.join(names)} | PATH (default: demo)" in help_text, (command, help_text)
        assert all(f"{name}: " in help_text for name in names)
        if takes_presets:
            assert parser.parse_args([command, "--model", "framepack-13b"]).model == "framepack-13b"
        else:
            with pytest.raises(SystemExit) as refused:
                parser.parse_args([command, "--model", "framepack-13b", *rest])
            assert refused.value.code == 2 and "`info` and `doctor` take it" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--model", "dem", *rest])
        err = capsys.readouterr().err
        assert "'dem': not a model name (demo, tiny" in err and "no such folder" in err, err
        assert parser.parse_args([command, "--model", "tiny", *rest]).model == "tiny"


def test_a_model_folder_is_taken_by_path(tmp_path):
    from framepack_rt.commands.cli import build_parser

    parser = build_parser()
    for command, rest in COMMANDS.items():
        assert parser.parse_args([command, "--model", str(tmp_path), *rest]).model == str(tmp_path)


def test_accelerate_is_installed_with_the_package():
    """Without accelerate, diffusers prints "install accelerate" on every load: setup.py depends on it."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text())
    requires = next(node.value for node in ast.walk(tree)
                    if isinstance(node, ast.keyword) and node.arg == "install_requires")
    names = [ast.literal_eval(item).split(">")[0].split("=")[0] for item in requires.elts]
    assert "accelerate" in names, names


def test_generate_says_which_schedule_entries_fall_past_the_end(tmp_path, start_image, capsys):
    out = tmp_path / "late.mp4"
    assert main(["generate", "--model", "tiny", "--image", str(start_image), "--prompt-schedule",
                 "0:a ball rolls;0.5:the ball stops;9:never", "--seconds", "1", "--steps", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "entries at 9 s start after the video ends (1.23 s)" in err and "0.5" not in err.split("warning")[1]


def test_a_model_without_an_example_needs_an_image(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--seconds", "1", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "has no example start: pass --image" in capsys.readouterr().err


def test_fast_decoder_on_a_model_without_one_says_what_to_do(tmp_path, start_image, capsys):
    assert main(["generate", "--model", "tiny", "--image", str(start_image), "--prompt", "x", "--seconds", "1",
                 "--steps", "1", "--decoder", "fast", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "no fast decoder" in err and "decoder 'vae'" in err
    assert not (tmp_path / "x.mp4").exists()
