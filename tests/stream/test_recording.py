"""Recording (stream/recording.py): sections kept as H.264 segments, a bound that drops the oldest, one MP4 of
everything so far (the open segment included) remuxed without re-encoding, files gone with the session and the
server; and GET /api/sessions/ID/video.mp4 with the access rules of control."""

from __future__ import annotations

import asyncio

import aiohttp
import av
import numpy as np
import pytest

from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.recording import NothingRecorded, Recorder

TOKEN = "recording-token-0123456789"


def gray_frames(start: int, count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames whose gray level encodes their number (steps of 3, so codec error cannot confuse two)."""
    levels = (np.arange(start, start + count) * 3) % 240 + 8
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).astype(np.uint8)


def decode(data: bytes, path) -> tuple[list[int], av.video.stream.VideoStream]:
    """(each decoded frame's mean gray level, the stream) of an MP4 held in ``data``."""
    path.write_bytes(data)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        levels = [round(float(f.to_ndarray(format="rgb24").mean())) for f in container.decode(stream)]
        return levels, stream


def export_bytes(recording) -> tuple[bytes, int]:
    handle, size, frames = recording.export().result(timeout=30)
    with handle:
        data = handle.read()
    assert len(data) == size
    return data, frames


@pytest.fixture
def recorder(tmp_path):
    rec = Recorder(fps=30, max_seconds=60, segment_seconds=0.5, root=tmp_path)
    yield rec
    rec.close()


def test_sections_become_segments_and_one_mp4_of_every_frame(recorder, tmp_path):
    recording = recorder.open("s1")
    for start, count in ((0, 25), (25, 17), (42, 40)):  # sections of uneven length, across segment ends
        recording.add(gray_frames(start, count))
    recorder._executor.submit(lambda: None).result(timeout=30)  # what is queued is encoded
    segments = sorted(recording.folder.glob("segment-*.mp4"))
    assert len(segments) == 6  # 82 frames in segments of 15: five closed, the sixth open (7 frames so far)
    data, frames = export_bytes(recording)
    assert frames == 82
    levels, stream = decode(data, tmp_path / "out.mp4")
    assert stream.codec_context.name == "h264" and stream.average_rate == 30
    assert np.abs(np.array(levels) - [(i * 3) % 240 + 8 for i in range(82)]).max() <= 1, levels
    assert not list(recording.folder.glob("export-*"))  # the export is unlinked once open


def test_the_open_segment_counts_and_a_second_export_has_the_new_frames(recorder, tmp_path):
    recording = recorder.open("s2")
    with pytest.raises(NothingRecorded, match="nothing generated yet"):
        recording.export().result(timeout=30)
    recording.add(gray_frames(0, 10))  # less than a segment: only the open one holds them
    _, frames = export_bytes(recording)
    assert frames == 10
    recording.add(gray_frames(10, 7))
    data, frames = export_bytes(recording)
    assert frames == 17
    levels, _ = decode(data, tmp_path / "again.mp4")
    assert np.abs(np.array(levels) - [(i * 3) % 240 + 8 for i in range(17)]).max() <= 1
    assert recording.summary()["frames"] == 17 and recording.summary()["seconds"] == pytest.approx(17 / 30, abs=0.01)


def test_the_bound_drops_the_oldest_segments(tmp_path):
    recorder = Recorder(fps=30, max_seconds=1.0, segment_seconds=0.5, root=tmp_path)
    try:
        recording = recorder.open("s3")
        for start in range(0, 120, 12):
            recording.add(gray_frames(start, 12))
        data, frames = export_bytes(recording)
        assert 15 <= frames <= 30  # at most the bound, at least one segment of it
        assert recording.frames_dropped == 120 - frames
        levels, _ = decode(data, tmp_path / "bounded.mp4")
        expected = [(i * 3) % 240 + 8 for i in range(120 - frames, 120)]  # the newest frames, in order
        assert np.abs(np.array(levels) - expected).max() <= 1
        assert len(list(recording.folder.glob("segment-*.mp4"))) <= 2
    finally:
        recorder.close()


def test_odd_sizes_are_cropped_and_files_go_with_the_session_and_the_server(tmp_path):
    recorder = Recorder(fps=24, max_seconds=10, root=tmp_path)
    recording = recorder.open("s4")
    recording.add(gray_frames(0, 5, height=47, width=63))
    data, frames = export_bytes(recording)
    levels, stream = decode(data, tmp_path / "odd.mp4")
    assert (stream.height, stream.width) == (46, 62) and stream.average_rate == 24 and len(levels) == 5
    root = recorder.root
    recording.close()
    recording.add(gray_frames(5, 5))  # after close: ignored
    recorder._executor.submit(lambda: None).result(timeout=30)
    assert not recording.folder.exists() and root.exists()
    recorder.close()
    assert not root.exists()


# -- the endpoint --------------------------------------------------------------------------------------------

async def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession(headers=headers or {}) as http, http.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def test_video_mp4_needs_control_and_holds_the_frames_played(synthetic_pipe, run_with_server, tmp_path):
    async def scenario(server, url):
        async with StreamClient(url, keep_frames=True, token=TOKEN) as client:
            sid = await client.connect()
            await client.wait_frames(60, timeout=20)
            session = server.sessions[sid]
            video = f"{url}api/sessions/{sid}/video.mp4"
            played = len(client.frames)
            codes = {
                "nothing": (await _get(video))[0],
                "view key": (await _get(f"{video}?key={session.view_key}"))[0],
                "wrong key": (await _get(f"{video}?key=x{session.control_key}"))[0],
                "unknown, no token": (await _get(f"{url}api/sessions/nope/video.mp4"))[0],
                "unknown, token": (await _get(f"{url}api/sessions/nope/video.mp4",
                                              {"Authorization": f"Bearer {TOKEN}"}))[0],
            }
            by_token = await _get(video, {"Authorization": f"Bearer {TOKEN}"})
            status, headers, data = await _get(f"{video}?key={session.control_key}")
            folder = server.recordings[sid].folder
            summary = await client.get_json(f"/api/sessions/{sid}")
        await asyncio.sleep(0)
        return codes, by_token[0], status, headers, data, played, folder, summary

    codes, by_token, status, headers, data, played, folder, summary = run_with_server(
        synthetic_pipe, scenario, token=TOKEN)
    assert codes == {"nothing": 401, "view key": 401, "wrong key": 401, "unknown, no token": 401,
                     "unknown, token": 404}
    assert by_token == 200 and status == 200
    assert headers["Content-Type"] == "video/mp4" and headers["Content-Disposition"].startswith("attachment;")
    with av.open(__import__("io").BytesIO(data)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    # Played frames include the start image shown before the first section; every generated one is recorded.
    assert decoded == int(headers["X-Frames"]) >= played - 30, (decoded, played)
    assert summary["recording"]["enabled"] and summary["recording"]["frames"] >= decoded
    assert not folder.exists() and not folder.parent.exists()  # session closed, server stopped: all deleted


def test_viewers_may_download_with_the_flag_and_recording_can_be_off(synthetic_pipe, run_with_server):
    async def scenario(server, url):
        async with StreamClient(url) as client:
            sid = await client.connect()
            await client.wait_frames(20, timeout=20)
            await asyncio.sleep(0.3)  # a section generated and queued for the encoder
            video = f"{url}api/sessions/{sid}/video.mp4"
            return [(await _get(video))[0], (await _get(f"{video}?key={server.sessions[sid].view_key}"))[0],
                    (await _get(f"{video}?key={server.sessions[sid].control_key}"))[0]]

    assert run_with_server(synthetic_pipe, scenario, recording_for_viewers=True) == [200, 200, 200]
    assert run_with_server(synthetic_pipe, scenario)[:2] == [401, 401]  # no token: viewers need the flag

    async def off(server, url):
        async with StreamClient(url) as client:
            sid = await client.connect()
            config = await client.get_json("/api/config")
            status, _, body = await _get(f"{url}api/sessions/{sid}/video.mp4?key={server.sessions[sid].control_key}")
            return config["recording"], status, body

    config, status, body = run_with_server(synthetic_pipe, off, record_max_seconds=0)
    assert config == {"enabled": False, "max_seconds": 0, "for_viewers": False}
    assert status == 409 and b"--record-max-seconds 0" in body


def test_a_slow_encoder_holds_the_generator_back_instead_of_queueing_without_bound(tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from framepack_rt.stream.recording import Recording

    executor = ThreadPoolExecutor(max_workers=1)
    folder = tmp_path / "slow"
    folder.mkdir()
    recording = Recording(folder, executor, fps=30, max_seconds=10, max_pending=1)
    busy = threading.Event()
    executor.submit(busy.wait, 10)  # the encoder thread is busy (another session's long section)
    recording.add(gray_frames(0, 6))  # queued: the one pending place
    second = threading.Thread(target=recording.add, args=(gray_frames(6, 6),))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the encoder instead of queueing a second section
    busy.set()
    second.join(10)
    assert not second.is_alive()
    handle, _, frames = recording.export().result(timeout=30)
    handle.close()
    assert frames == 12
    executor.shutdown()
