"""Settings at start: seed, steps, CFG, window and resolution bucket sent with the offer, checked strictly
against the server's limits and the model's buckets, used by the pipeline, and reported (hello message,
/api/sessions/ID); defaults and limits in /api/config; the flags."""

from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from framepack_rt.commands.cli import build_parser
from framepack_rt.stream import options
from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.offers import StartLimits, StartSettings, parse_offer, parse_start_settings
from framepack_rt.stream.server import ServerSettings

SDP = "v=0\r\n"


@pytest.mark.parametrize("body, expected", [
    ({}, StartSettings()),
    ({"steps": 3, "cfg": 2, "window": 5, "bucket": "64x80"}, StartSettings(3, 2.0, 5, (64, 80))),
    ({"steps": None, "cfg": 1.5, "bucket": [608, 640]}, StartSettings(cfg=1.5, bucket=(608, 640))),
    ({"bucket": "640X608"}, StartSettings(bucket=(640, 608))),
    ({"bucket": ""}, StartSettings()),
])
def test_valid_start_settings(body, expected):
    assert parse_start_settings(body) == expected


@pytest.mark.parametrize("body, fragment", [
    ({"steps": 0}, '"steps" must be a whole number from 1 to 50'),
    ({"steps": 2.5}, '"steps" must be a whole number'),
    ({"steps": True}, '"steps" must be a whole number'),
    ({"steps": "8"}, '"steps" must be a whole number'),
    ({"window": 17}, '"window" must be a whole number from 1 to 16'),
    ({"cfg": 0.5}, '"cfg" must be a number from 1'),
    ({"cfg": float("inf")}, '"cfg" must be a number'),
    ({"cfg": "2"}, '"cfg" must be a number'),
    ({"bucket": "64"}, '"bucket" must be a resolution as "HxW"'),
    ({"bucket": "64x"}, '"bucket" must be a resolution'),
    ({"bucket": "²x4"}, '"bucket" must be a resolution'),
    ({"bucket": [64, 64, 3]}, '"bucket" must be a resolution'),
    ({"bucket": [8, 8]}, '"bucket" must be a resolution'),
    ({"bucket": {"h": 64}}, '"bucket" must be a resolution'),
])
def test_invalid_start_settings_say_what_to_send(body, fragment):
    with pytest.raises(ValueError) as info:
        parse_start_settings(body)
    assert fragment in str(info.value)


def test_limits_come_from_the_server_and_reach_the_offer():
    limits = StartLimits(max_steps=4, max_window=3)
    with pytest.raises(ValueError, match="from 1 to 4 on this server"):
        parse_start_settings({"steps": 5}, limits)
    offer = parse_offer({"sdp": SDP, "type": "offer", "steps": 4, "window": 3, "seed": 9}, 100, limits)
    assert offer.start == StartSettings(steps=4, window=3) and offer.seed == 9
    assert parse_offer({"sdp": SDP, "type": "offer"}, 100).start == StartSettings()


def test_flags_and_their_checks():
    args = build_parser().parse_args(["serve", "--max-steps", "12", "--max-window", "4", "--record-max-seconds",
                                      "30", "--recording-for-viewers"])
    kwargs = options.settings_kwargs(args)
    assert {k: kwargs[k] for k in ("max_steps", "max_window", "record_max_seconds", "recording_for_viewers")} == \
        {"max_steps": 12, "max_window": 4, "record_max_seconds": 30.0, "recording_for_viewers": True}
    defaults = options.settings_kwargs(build_parser().parse_args(["serve"]))
    assert not {"max_steps", "max_window", "record_max_seconds", "recording_for_viewers"} & set(defaults)
    with pytest.raises(ValueError, match="--steps 30 is above --max-steps 20"):
        ServerSettings(steps=30, max_steps=20)
    with pytest.raises(ValueError, match="--window 9 is above --max-window 4"):
        ServerSettings(max_window=4)
    with pytest.raises(ValueError, match="--record-max-seconds -1"):
        ServerSettings(record_max_seconds=-1)


class BucketPipe:
    """The synthetic pipe with what a real one tells the server: buckets, default steps and guidance; it keeps
    the arguments stream() was called with."""

    buckets = ((48, 96), (64, 80), (64, 64))
    default_steps = 6

    class default_guidance:  # noqa: N801 -- stands in for a GuidanceConfig
        cfg = 1.0

    def __init__(self, synthetic) -> None:
        self.synthetic, self.calls = synthetic, []

    def guidance(self, cfg):
        return ("guidance", cfg)

    def bucket(self, image):
        from framepack_rt.pipeline.media import nearest_bucket

        return nearest_bucket(*np.asarray(image).shape[:2], self.buckets)

    def frame_size(self, image):
        return self.bucket(image)

    def stream(self, image, prompt, **kwargs):
        self.calls.append((np.asarray(image).shape, kwargs))
        return self.synthetic.stream(image, prompt)


def _client_with(url: str, extra: dict, answers: list) -> StreamClient:
    """A StreamClient whose offers carry ``extra`` fields; the answers land in ``answers``."""
    client = StreamClient(url)
    post = client.post_json

    async def post_json(path, body):
        answer = await post(path, {**body, **extra})
        answers.append(answer)
        return answer

    client.post_json = post_json
    return client


def test_the_values_asked_for_are_used_and_reported(synthetic_pipe, run_with_server):
    pipe = BucketPipe(synthetic_pipe)

    async def scenario(server, url):
        answers = []
        async with _client_with(url, {"seed": 11, "steps": 3, "cfg": 2.5, "window": 5, "bucket": "64x80"},
                                answers) as client:
            sid = await client.connect()
            await client.wait_frames(10)
            hello = await client.wait_for("hello")
            running = await client.wait_for(lambda m: m.get("type") in ("hello", "state") and m["state"] == "running")
            summary = await client.get_json(f"/api/sessions/{sid}")
        async with _client_with(url, {}, []) as plain:
            await plain.connect(seed=4)
            await plain.wait_frames(5)
            defaults = (await plain.get_json(f"/api/sessions/{plain.session}"))["settings"]
        config = await client.get_json("/api/config")
        return answers[0], hello, running, summary, defaults, config

    answer, hello, running, summary, defaults, config = run_with_server(pipe, scenario, max_steps=8)
    assert answer["control_key"] and answer["role"] == "control"
    used = {"seed": 11, "steps": 3, "cfg": 2.5, "window": 5, "bucket": [64, 80], "frame": [64, 80]}
    assert hello["settings"] == used and summary["settings"] == used and running["state"] == "running"
    (shape, kwargs), (plain_shape, plain_kwargs) = pipe.calls
    assert shape[:2] == (64, 80)  # the start image fitted to the bucket asked for
    assert (kwargs["seed"], kwargs["steps"], kwargs["window"], kwargs["guidance"]) == (11, 3, 5, ("guidance", 2.5))
    # Nothing asked: the server's settings (here --steps 2 from run_with_server), else the model's.
    assert defaults == {"seed": 4, "steps": 2, "cfg": 1.0, "window": 9, "bucket": list(pipe.bucket(
        np.zeros(plain_shape, np.uint8))), "frame": list(pipe.frame_size(np.zeros(plain_shape, np.uint8)))}
    assert (plain_kwargs["steps"], plain_kwargs["window"]) == (2, 9)
    assert config["start"] == {"seed": 0, "steps": 2, "cfg": 1.0, "window": 9, "bucket": None,
                               "buckets": [[48, 96], [64, 80], [64, 64]], "max_steps": 8, "max_window": 16,
                               "max_cfg": 20.0}


def test_settings_out_of_limits_or_buckets_get_a_400(synthetic_pipe, run_with_server, browser_offer):
    pipe = BucketPipe(synthetic_pipe)

    async def scenario(server, url):
        sdp = await browser_offer()
        answers = []
        async with aiohttp.ClientSession() as http:
            for extra in ({"bucket": "640x608"}, {"steps": 9}, {"window": 0}, {"cfg": 25}):
                async with http.post(url + "offer", json={"sdp": sdp, "type": "offer", **extra}) as resp:
                    answers.append((resp.status, (await resp.json())["error"]))
        return answers, len(server.sessions)

    answers, sessions = run_with_server(pipe, scenario, max_steps=8)
    assert [status for status, _ in answers] == [400] * 4 and sessions == 0
    assert "bucket 640x608 is not one of this model's resolutions: 48x96, 64x80, 64x64" in answers[0][1]
    assert "from 1 to 8 on this server" in answers[1][1]
