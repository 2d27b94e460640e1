"""``framepack-rt bench``: the statistics on synthetic data with known answers, and one short end-to-end run
(real tiny pipeline, in-process server, aiortc viewers, stamps, scaling and the viewer sweep) through the CLI."""

from __future__ import annotations

import json
import math
import os

import pytest

from framepack_rt.bench import report
from framepack_rt.bench.latency import BenchConfig, EncoderTimer
from framepack_rt.bench.browser import CHROMIUM
from framepack_rt.commands.cli import main

PERIOD = 1000 / 30  # ms at 30 fps


def test_percentile_intervals_jitter_and_misses():
    assert report.percentile([], 50) is None
    assert report.percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert report.percentile([10.0, 20.0, 30.0, 40.0], 95) == pytest.approx(38.5)  # linear interpolation
    assert report.intervals_ms([0.0, 0.030, 0.070, 0.130]) == pytest.approx([30.0, 40.0, 60.0])
    intervals = [30.0, 30.0, 40.0, 40.0, 60.0]
    # |30 - 33.3| x2 + |40 - 33.3| x2 + |60 - 33.3| = 6.67 + 13.33 + 26.67 = 46.67, over 5 intervals.
    assert report.jitter_ms(intervals, 30) == pytest.approx(46.666667 / 5)
    assert report.jitter_ms([PERIOD] * 10, 30) == pytest.approx(0.0)
    # Rule: a miss is an interval longer than 1.5 periods (50 ms at 30 fps); exactly 50 is not a miss.
    assert report.deadline_miss_rate(intervals, 30) == pytest.approx(0.2)
    assert report.deadline_miss_rate([50.0, 50.1, 20.0, 100.0], 30) == pytest.approx(0.5)
    assert report.jitter_ms([], 30) is None and report.deadline_miss_rate([], 30) is None


def test_first_arrivals_skip_repeats_and_unread_frames():
    arrivals = [1.0, 1.1, 1.2, 1.3, 1.4]
    stamps = [None, 5, 5, 6, None]  # 5 was held for one tick
    assert report.first_arrivals(arrivals, stamps) == [(5, 1.1), (6, 1.3)]
    sent = {5: 1.05, 6: 1.27}
    assert [ms for _, ms in report.glass_to_glass(arrivals, stamps, sent)] == pytest.approx([50.0, 30.0])
    assert report.held_fraction(report.ViewerRecord("v", 0.0, arrivals, stamps)) == pytest.approx(0.5)


def test_prompt_to_effect_matches_frames_to_sections_exactly():
    sections = [
        {"index": 0, "prompt": "a", "frames": [0, 9]},
        {"index": 1, "prompt": "b", "frames": [10, 19]},  # an older use of "b": before the ack's section
        {"index": 2, "prompt": "a", "frames": [20, 29]},
        {"index": 3, "prompt": "b", "frames": [30, 39]},
    ]
    arrivals = [10.0 + 0.1 * i for i in range(40)]
    stamps = list(range(40))
    # Sent at 11.45: frames 15..19 (section 1, "b") come later but precede the ack's section 3.
    assert report.prompt_to_effect_ms(arrivals, stamps, sections, "b", 11.45, from_section=3) == pytest.approx(
        (13.0 - 11.45) * 1000)
    assert report.prompt_to_effect_ms(arrivals, stamps, sections, "b", 11.45) == pytest.approx(50.0)
    assert report.prompt_to_effect_ms(arrivals, stamps, sections, "c", 11.45) is None


def test_summarize_a_perfect_synthetic_run():
    n = 91
    arrivals = [100.0 + i / 30 for i in range(n)]
    stamps = list(range(n))
    sent = {i: t - 0.040 for i, t in zip(stamps, arrivals)}  # every frame 40 ms glass-to-glass
    viewer = report.ViewerRecord("v", offer=99.9, arrivals=arrivals, stamps=stamps)
    sections = [{"index": k, "prompt": "a" if k < 2 else "b", "frames": [k * 30, k * 30 + 29], "ms": 500.0}
                for k in range(3)] + [{"index": 3, "prompt": "b", "frames": [90, 90], "ms": 100.0}]
    run = report.RunRecord(30.0, [viewer], sections, sent, start=100.0, end=200.0, prompt="b",
                           prompt_sent=101.0, ack_section=2, encode_ms=[1.0, 2.0, 3.0])
    result = report.summarize(run)
    assert set(result) == set(report.METRICS)
    assert result["ttff_ms"] == pytest.approx(100.0)
    assert result["frame_interval_ms_p50"] == pytest.approx(PERIOD)
    assert result["frame_interval_ms_p99"] == pytest.approx(PERIOD)
    assert result["jitter_ms"] == pytest.approx(0.0, abs=1e-6) and result["deadline_miss_rate"] == 0.0
    assert result["glass_to_glass_ms_p50"] == pytest.approx(40.0)
    assert result["glass_to_glass_ms_p95"] == pytest.approx(40.0)
    assert result["prompt_to_effect_ms"] == pytest.approx(1000.0)  # frame 60 arrives at 102.0
    assert result["gen_fps"] == pytest.approx(91 / 1.6)  # 91 frames in 1600 ms of sections
    assert result["play_fps"] == pytest.approx(91 / 3.0)
    assert result["section_ms_p50"] == pytest.approx(500.0) and result["encode_ms_p50"] == pytest.approx(2.0)


def test_encoder_timer_wraps_and_restores():
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.vpx import Vp8Encoder

    before = Vp8Encoder.encode, H264Encoder.encode
    with EncoderTimer() as timer:
        assert Vp8Encoder.encode is not before[0]
    assert (Vp8Encoder.encode, H264Encoder.encode) == before and timer.samples == []


def test_config_is_checked():
    assert BenchConfig().model == "demo" and BenchConfig().steps is None  # every command's default, its steps
    assert BenchConfig(model="tiny").steps == 2  # tiny: few steps, so the CPU keeps up with 30 fps
    with pytest.raises(ValueError):
        BenchConfig(seconds=3, prompt_after=4)
    with pytest.raises(ValueError):
        BenchConfig(viewers=0)


def test_bench_end_to_end_writes_every_field(tmp_path, capsys):
    out = tmp_path / "latency.json"
    code = main(["bench", "--model", "tiny", "--seconds", "3.5", "--prompt-after", "1.2", "--viewers", "2",
                 "--scaling", "--scaling-sections", "3", "--viewers-sweep", "--sweep-seconds", "0.6",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "glass_to_glass_ms_p50" in printed and "wall time" in printed
    result = json.loads(out.read_text())
    assert set(result) == set(report.METRICS) | {"config", "machine", "scaling"}
    for key in report.METRICS:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), (key, result[key])
    assert 0 < result["ttff_ms"] < 15_000
    assert 0 < result["section_ms_p50"] <= result["section_ms_p95"]
    assert result["gen_fps"] > 0 and 0 < result["play_fps"] <= 31
    # The track paces at 30 fps: intervals centre on 33 ms even on a loaded 2-core machine.
    assert 20 < result["frame_interval_ms_p50"] < 50
    assert result["frame_interval_ms_p50"] <= result["frame_interval_ms_p95"] <= result["frame_interval_ms_p99"]
    assert 0 <= result["deadline_miss_rate"] <= 1 and result["jitter_ms"] >= 0
    assert 0 < result["glass_to_glass_ms_p50"] <= result["glass_to_glass_ms_p95"] < 2_000
    assert 0 < result["prompt_to_effect_ms"] < 30_000
    assert 0 < result["encode_ms_p50"] < 100
    assert result["config"]["glass_to_glass_source"] == "in-process" and result["config"]["frame_size"] == [64, 80]
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    sweep = result["scaling"]["viewers"]
    assert [row["viewers"] for row in sweep] == [1, 2, 4, 8]
    assert all(row["frame_interval_ms_p95"] > 0 and row["glass_to_glass_ms_p50"] > 0 for row in sweep)
    sections = result["scaling"]["sections"]
    assert len(sections["rows"]) == 3 and sections["rows"][0]["naive_ms"] > 0 and sections["stream"]
    png = out.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found: apt-get install -y chromium")
def test_bench_with_a_headless_browser_viewer(tmp_path):
    out = tmp_path / "browser.json"
    assert main(["bench", "--model", "tiny", "--seconds", "3", "--prompt-after", "1", "--browser", "--json",
                 str(out)]) == 0
    browser = json.loads(out.read_text())["browser"]
    # The page read the stamps back from a canvas: its own glass-to-glass (to the expected display time).
    assert 0 < browser["ttff_ms"] < 15_000
    assert 0 < browser["glass_to_glass_ms_p50"] < 2_000 and browser["frame_interval_ms_p50"] > 0


@pytest.mark.slow  # 20 s; the token itself is tested in tests/stream/test_security*.py
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not found: apt-get install -y chromium")
def test_bench_reaches_a_token_protected_server(tmp_path, launch_serve):
    """--url with --token: the Python viewer and the browser viewer both get in; the token is not saved."""
    token = "bench-token-0123456789abcdef"
    proc, url, _ = launch_serve("--model", "tiny", "--steps", "1", "--stamp", "--token", token)
    try:
        out = tmp_path / "remote.json"
        assert main(["bench", "--url", url, "--token", token, "--seconds", "3", "--prompt-after", "1", "--browser",
                     "--json", str(out)]) == 0
        text = out.read_text()
        result = json.loads(text)
        assert result["config"]["url"] == url and result["config"]["model"] == "tiny"
        assert result["glass_to_glass_ms_p50"] > 0 and result["browser"]["frame_interval_ms_p50"] > 0
        assert token not in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
