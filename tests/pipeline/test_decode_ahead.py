"""The VAE decode of section k beside the sampling of k + 1 (pipeline/decode_ahead.py, VideoStream): the same
sections, bit for bit and in order, with and without overlap; prompts, pauses and stops issued at the same
point of sampling act at the same section; one section decoded ahead at most; the decode thread ends."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from framepack_rt.pipeline.decode_ahead import DecodeAhead
from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline


def sections_of(stream, limit: int = 20) -> list:
    out = []
    for section in stream:
        out.append(section)
        if len(out) == limit:
            stream.stop()
            break
    return out


def assert_same_sections(a: list, b: list) -> None:
    assert [(s.index, s.first_frame, s.prompt, s.is_last) for s in a] == \
           [(s.index, s.first_frame, s.prompt, s.is_last) for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.frames, y.frames), f"section {x.index}: frames differ"


@pytest.mark.parametrize("mode", ["f1", "inverted"])
def test_overlap_gives_the_same_frames_bit_for_bit_in_order(pipe, image, mode):
    kwargs = dict(seed=3, steps=2, mode=mode, seconds=4)
    plain = list(pipe.stream(image, "a red ball moves right", decode_overlap=False, **kwargs))
    overlapped = list(pipe.stream(image, "a red ball moves right", decode_overlap=True, **kwargs))
    assert len(plain) == 3 and plain[-1].is_last
    assert_same_sections(plain, overlapped)
    indices = [s.index for s in overlapped]
    assert indices == sorted(indices) == list(range(3))


def controlled(pipe, image, overlap: bool, action):
    """An endless F1 stream whose on_step calls ``action(stream, progress, log)`` (the sampling thread)."""
    holder, log = {}, []

    def on_step(progress):
        action(holder["s"], progress, log)

    holder["s"] = stream = pipe.stream(image, "a red ball moves right", seed=1, steps=2, on_step=on_step,
                                       decode_overlap=overlap)
    return stream, log


def test_a_prompt_set_while_section_1_samples_applies_from_section_2_either_way(pipe, image):
    def action(stream, progress, log):
        if progress.section == 1 and progress.step == 0:
            log.append(stream.set_prompt("a red ball moves left"))

    runs = {}
    for overlap in (False, True):
        stream, log = controlled(pipe, image, overlap, action)
        runs[overlap] = (sections_of(stream, 4), log)
    assert runs[False][1] == runs[True][1] == [2]
    assert [s.prompt for s in runs[True][0]] == ["a red ball moves right"] * 2 + ["a red ball moves left"] * 2
    assert_same_sections(runs[False][0], runs[True][0])


def test_a_stop_while_section_2_samples_ends_after_section_1_either_way(pipe, image):
    def action(stream, progress, log):
        if progress.section == 2:
            stream.stop()

    runs = {}
    for overlap in (False, True):
        stream, _ = controlled(pipe, image, overlap, action)
        runs[overlap] = sections_of(stream)
        assert stream.sections_done == 2
        if overlap:
            assert stream._ahead.join(10), "the decode thread outlived its stream"
    assert [s.index for s in runs[True]] == [0, 1]
    assert_same_sections(runs[False], runs[True])


def test_a_pause_while_section_1_samples_hands_over_section_1_then_waits(pipe, image):
    def action(stream, progress, log):
        if progress.section == 1 and progress.step == 0 and not log:
            log.append("paused")
            stream.pause()

    runs = {}
    for overlap in (False, True):
        stream, _ = controlled(pipe, image, overlap, action)
        got = [next(stream), next(stream)]  # sections 0 and 1: section 1 was in flight when paused
        waiter = threading.Thread(target=lambda: got.append(next(stream)))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and len(got) == 2, "the stream went on while paused"
        stream.resume()
        waiter.join(60)
        got.append(next(stream))
        stream.stop()
        runs[overlap] = got
    assert [s.index for s in runs[True]] == [0, 1, 2, 3]
    assert_same_sections(runs[False], runs[True])


def test_decode_ahead_holds_one_job_raises_its_errors_and_ends_its_thread():
    started, release = threading.Event(), threading.Event()

    def decode(item):
        started.set()
        release.wait(10)
        if item == "bad":
            raise ValueError("a decode failed")
        return item * 2

    ahead = DecodeAhead(decode, "cpu")
    ahead.submit(21)
    assert started.wait(10) and ahead.pending
    with pytest.raises(RuntimeError, match="one section is decoded ahead at most"):
        ahead.submit(1)
    release.set()
    assert ahead.take() == 42 and not ahead.pending
    ahead.submit("bad")
    with pytest.raises(ValueError, match="a decode failed"):
        ahead.take()
    ahead.submit(5)
    ahead.close()  # the job it holds still runs
    assert ahead.take() == 10
    assert ahead.join(10)
    ahead.submit(1)  # after close nothing runs and nothing is pending
    assert not ahead.pending


def test_the_decode_of_section_k_runs_while_section_k_plus_1_samples(pipe, image):
    """Section k's decode finishes only once section k + 1 has run a step, on another thread: that cannot
    happen one after the other (the decode would wait for ever; it gives up after 20 s and fails)."""
    stepped = {k: threading.Event() for k in range(8)}
    stream = pipe.stream(image, "a ball", steps=2, decode_overlap=True,
                         on_step=lambda p: stepped[p.section].set())
    decode, decoding_threads = stream._ahead._decode, []

    def decode_once_the_next_section_steps(latents):
        decoding_threads.append(threading.current_thread().name)
        if not stepped[latents.index + 1].wait(20):
            raise AssertionError(f"section {latents.index + 1} never sampled while {latents.index} decoded")
        return decode(latents)

    stream._ahead._decode = decode_once_the_next_section_steps
    sections = [next(stream) for _ in range(3)]
    stream.stop()
    for event in stepped.values():  # section 3 decodes ahead; section 4 never samples now
        event.set()
    assert [s.index for s in sections] == [0, 1, 2]
    assert set(decoding_threads) == {"framepack-decode"} and len(decoding_threads) >= 3
    assert stream._ahead.join(30)


def test_a_dropped_stream_leaves_no_thread(pipe, image, monkeypatch):
    from framepack_rt.pipeline import decode_ahead

    monkeypatch.setattr(decode_ahead, "IDLE_EXIT_S", 0.2)
    stream = pipe.stream(image, "a ball", steps=2, decode_overlap=True)
    next(stream)  # section 1 is sampled and decoded ahead; the stream is then neither stopped nor finished
    assert stream._ahead.join(30), "an idle decode thread kept running"


def test_low_vram_streams_do_not_overlap_by_default(pipe):
    assert pipe._decode_overlap(None, torch.device("cpu")) is True
    assert pipe._decode_overlap(False, torch.device("cpu")) is False

    class LowVram:
        low_vram = True

    low = FramePackPipeline(LowVram())
    assert low._decode_overlap(None, torch.device("cuda")) is False
    assert low._decode_overlap(True, torch.device("cuda")) is True
