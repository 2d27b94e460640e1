"""Small pieces of the stream server: start images, the loopback ICE fallback, server settings."""

from __future__ import annotations

import base64

import aioice.ice
import numpy as np
import pytest

from framepack_rt.stream.ice import ensure_host_candidates
from framepack_rt.stream.images import (
    decode_data_url,
    default_scene,
    encode_jpeg_data_url,
    png_bytes,
    resize_rgb,
)
from framepack_rt.stream.server import ServerSettings


def test_default_scene_is_a_picture():
    scene = default_scene(96, 128)
    assert scene.shape == (96, 128, 3) and scene.dtype == np.uint8
    assert scene.std() > 20  # sky, sun, hills and water, not a flat fill


def test_data_url_round_trip_and_errors():
    image = default_scene(40, 60)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    assert np.array_equal(decode_data_url(url), image)
    assert encode_jpeg_data_url(image).startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError, match="data URL"):
        decode_data_url("http://example.com/cat.png")
    with pytest.raises(ValueError, match="base64"):
        decode_data_url("data:image/png;base64,@@@")
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_data_url("data:image/png;base64," + base64.b64encode(b"not an image").decode())


def test_resize_crops_to_the_target_aspect():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # a white centre square: a center crop to 1:1 keeps only it
    out = resize_rgb(image, 32, 32)
    assert out.shape == (32, 32, 3) and out.min() > 200


def test_loopback_candidates_only_when_there_is_no_other_address(monkeypatch):
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["192.0.2.7"])
    assert ensure_host_candidates() is False
    assert aioice.ice.get_host_addresses(True, True) == ["192.0.2.7"]

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [])
    assert ensure_host_candidates() is True
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert ensure_host_candidates() is True  # idempotent: not wrapped twice
    assert aioice.ice.get_host_addresses(False, True) == []


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(fps=0), "--fps"), (dict(fps=240), "--fps"), (dict(window=0), "--window"),
    (dict(steps=0), "--steps"), (dict(buffer_seconds=0), "buffer"), (dict(mode="inverted"), "f1"),
])
def test_settings_reject_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ServerSettings(**kwargs)


def test_buffer_frames_follow_fps():
    assert ServerSettings(fps=30, buffer_seconds=2).buffer_frames == 60
    assert ServerSettings(fps=10, buffer_seconds=0.01).buffer_frames == 1


def test_server_opens_with_the_models_example(stream_pipe, run_with_server):
    """A model set with an example (the demo's red ball) gives the page its start image and prompt; an explicit
    --default-prompt setting still wins; a model without one keeps the landscape."""
    import io

    import aiohttp
    from PIL import Image

    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline
    from framepack_rt.stream.images import DEFAULT_PROMPT

    example = np.full((64, 64, 3), 30, np.uint8)
    example[20:30, 20:30] = (220, 40, 40)
    pipe = FramePackPipeline(stream_pipe.parts, buckets="tiny", default_steps=2, example=(example, "a red ball moves right"))

    async def fetch(server, url):
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "api/config") as r:
                config = await r.json()
            async with http.get(url + "api/default-image") as r:
                image = np.asarray(Image.open(io.BytesIO(await r.read())).convert("RGB"))
        return config["default_prompt"], image

    prompt, image = run_with_server(pipe, fetch)
    assert prompt == "a red ball moves right" and np.array_equal(image, example)
    assert run_with_server(pipe, fetch, default_prompt="a blue square grows")[0] == "a blue square grows"
    prompt, image = run_with_server(stream_pipe, fetch)
    assert prompt == DEFAULT_PROMPT and image.shape == (384, 512, 3)


def test_server_samples_with_the_cfg_it_was_given(stream_pipe, run_with_server):
    """``serve --cfg`` reaches every session's stream and /api/config; unset, the pipeline's default is used."""
    import aiohttp

    from framepack_rt.stream.client import StreamClient

    class RecordingPipe:
        def __init__(self) -> None:
            self.requested = []  # the guidance each stream() was asked for

        def __getattr__(self, name):
            return getattr(stream_pipe, name)

        def stream(self, image, prompt, **kwargs):
            self.requested.append(kwargs.get("guidance"))
            return stream_pipe.stream(image, prompt, **kwargs)

    async def scenario(server, url):
        async with aiohttp.ClientSession() as http, http.get(url + "api/config") as r:
            config = await r.json()
        client = StreamClient(url)
        try:
            await client.connect(prompt="a red ball moves right")
            await client.wait_frames(5, timeout=30)
        finally:
            await client.close()
        return config["cfg"]

    pipe = RecordingPipe()
    assert run_with_server(pipe, scenario, cfg=1.5) == 1.5
    assert run_with_server(pipe, scenario) is None
    assert pipe.requested[0].cfg == 1.5 and pipe.requested[-1] is None
