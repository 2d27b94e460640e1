"""What strangers can send and what they may do: the control parser under fuzzing, start images, offer bodies,
the token and roles, no CORS, static files, and HTTP answers that are always a clear 4xx for bad input.

The HTTP and WebRTC tests use a synthetic pipeline (frames made in numpy): they test the server, not the
model, and stay fast on two cores. test_stream_reliability.py and test_stream_soak.py use the real tiny one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import threading
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from framepack_rt.stream import control
from framepack_rt.stream.client import StreamClient
from framepack_rt.stream.control import ControlError, parse_client_message
from framepack_rt.stream.limits import RateLimiter, TooLarge
from framepack_rt.stream.offers import parse_json_body, parse_offer
from framepack_rt.stream.security import CONTROL, VIEW, Access, Unauthorized, static_files
from framepack_rt.stream.server import ServerSettings, StreamServer
from framepack_rt.stream.uploads import decode_image, decode_start_image

TOKEN = "s3cret-token-for-tests-0123"
SDP_VIDEO = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"  # passes the offer check; aiortc would refuse it
MB = 2**20


# -- a synthetic pipeline: the VideoStream interface, frames from numpy ----------------------------------------

@dataclass
class Section:
    index: int
    frames: np.ndarray
    first_frame: int
    prompt: str
    ms: float = 1.0
    steps_run: int = 1
    steps_skipped: int = 0
    is_last: bool = False


class SyntheticStream:
    """8 frames per section, 0.1 s each: a 80 fps generator, so the 30 fps track never runs dry."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.sections_done = prompt, 0
        self.stopped = threading.Event()

    def __next__(self) -> Section:
        if self.stopped.wait(0.1):
            raise StopIteration
        k = self.sections_done
        frames = np.full((8, 48, 64, 3), (k * 40) % 250, np.uint8)
        self.sections_done += 1
        return Section(k, frames, k * 8, self.prompt)

    def set_prompt(self, text: str) -> int:
        self.prompt = text
        return self.sections_done + 1

    def stop(self) -> None:
        self.stopped.set()


class SyntheticPipe:
    def frame_size(self, image) -> tuple[int, int]:
        return 48, 64

    def bucket(self, image) -> tuple[int, int]:
        return 48, 64

    def stream(self, image, prompt, **kwargs) -> SyntheticStream:
        return SyntheticStream(prompt)


class Client(StreamClient):
    """StreamClient (token= goes in the Authorization header) that can also put a token (body_token=) or a
    join key in the offer body, and keeps the whole answer."""

    def __init__(self, url: str, token: str | None = None, key: str | None = None,
                 body_token: str | None = None) -> None:
        super().__init__(url, token=token)
        self.body_token, self.key, self.answer = body_token, key, {}

    async def post_json(self, path: str, body: dict) -> dict:
        body = {**body, **({"token": self.body_token} if self.body_token else {}),
                **({"key": self.key} if self.key else {})}
        self.answer = await super().post_json(path, body)
        return self.answer


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, dict, dict]:
    async with http.request(method, url, **kwargs) as resp:
        body = await resp.json(content_type=None) if resp.content_type == "application/json" else {}
        return resp.status, body, dict(resp.headers)


async def raw_get(url: str, path: str) -> int:
    """GET ``path`` byte for byte (aiohttp's client would normalize ../ and %2e away); the status code."""
    host, port = url.split("//")[1].strip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status = (await reader.readline()).decode().split()
    writer.close()
    return int(status[1])


# -- the control parser -----------------------------------------------------------------------------------------

def _parses_or_control_error(raw) -> None:
    try:
        msg = parse_client_message(raw)
    except ControlError as exc:
        assert str(exc)  # every refusal says what is wrong
        return
    assert isinstance(msg, (control.PromptMessage, control.PauseMessage, control.ResumeMessage,
                            control.StopMessage, control.PingMessage))
    control.encode(control.client_message(msg))  # whatever parsed can be sent back as JSON


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
messages_like = st.fixed_dictionaries(
    {"type": st.sampled_from(control.CLIENT_TYPES + ("Prompt", "", "dance"))},
    optional={"text": json_values | st.text(), "id": json_values, "t": json_values})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text() | st.binary() | json_values.map(json.dumps) | messages_like.map(json.dumps))
def test_parser_raises_only_its_own_error(raw):
    _parses_or_control_error(raw)


valid_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=200).map(
    str.strip).filter(bool)
valid_messages = st.one_of(
    st.builds(control.PromptMessage, valid_text,
              st.none() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=50)),
    st.builds(control.PauseMessage), st.builds(control.ResumeMessage), st.builds(control.StopMessage),
    st.builds(control.PingMessage, st.floats(allow_nan=False, allow_infinity=False)))


@settings(max_examples=300, deadline=None)
@given(valid_messages, st.booleans())
def test_valid_messages_round_trip(msg, as_bytes):
    text = control.encode(control.client_message(msg))
    assert parse_client_message(text.encode() if as_bytes else text) == msg


@pytest.mark.parametrize("raw, fragment", [
    ("[" * 50_00 + "]" * 5000, "nested too deeply"),  # deeper than Python's recursion limit
    ('{"type": "ping", "t": ' + "9" * 5000 + "}", "number too long"),  # over int's 4300-digit limit
    ('{"type": "ping", "t": NaN}', "finite"),
    ('{"type": "ping", "t": 1e999}', "finite"),  # json reads it as inf: a pong could not carry it
    ('{"type": "prompt", "text": "a \\ud800 cat"}', "surrogates"),  # would fail inside the text encoder
    ('{"type": "prompt", "text": "a \\u0000 cat"}', "control characters"),
    ('{"type": "prompt", "text": "a", "id": ' + str(2**60) + "}", "\"id\" must be"),
    (b"\x00" * (4 * control.MAX_MESSAGE_CHARS + 1), "too long"),  # refused before decoding
    ('{"type": "' + "x" * 500 + '"}', "unknown message type"),
])
def test_parser_edge_cases(raw, fragment):
    with pytest.raises(ControlError) as info:
        parse_client_message(raw)
    assert fragment in str(info.value)
    assert len(str(info.value)) < 300  # a long type name is shortened, not echoed whole


def test_prompt_limit_is_configurable():
    assert parse_client_message('{"type": "prompt", "text": "abcdef"}', max_prompt_chars=6).text == "abcdef"
    with pytest.raises(ControlError, match="at most 5"):
        parse_client_message('{"type": "prompt", "text": "abcdef"}', max_prompt_chars=5)


# -- rate limiting ------------------------------------------------------------------------------------------------

def test_rate_limiter_allows_bursts_then_warns_once_per_interval():
    now = [0.0]
    limiter = RateLimiter(rate=10, burst=5, warn_interval=1.0, clock=lambda: now[0])
    verdicts = [limiter.check() for _ in range(50)]
    assert verdicts[:5] == ["ok"] * 5 and verdicts[5] == "warn" and set(verdicts[6:]) == {"drop"}
    now[0] = 0.5  # half a second refills 5 tokens; no second warning within the interval
    verdicts = [limiter.check() for _ in range(20)]
    assert verdicts.count("ok") == 5 and verdicts.count("warn") == 0
    now[0] = 1.6
    assert [limiter.check() for _ in range(7)].count("warn") == 1
    assert limiter.dropped == 45 + 15 + 2  # 5 refilled (capped at the burst), then 2 refused


# -- start images -----------------------------------------------------------------------------------------------

def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def test_images_are_checked_before_they_are_decoded():
    ok = decode_start_image(_data_url(_png(40, 30)), MB, 10_000)
    assert ok.shape == (30, 40, 3) and ok.dtype == np.uint8
    # A decompression bomb: 20000 x 20000 1-bit pixels in ~50 KB. Refused from its header: no 400-megapixel
    # buffer is ever allocated (it would take seconds and 1.2 GB as RGB).
    bomb = _png(20_000, 20_000, mode="1")
    assert len(bomb) < 200_000
    began = time.monotonic()
    with pytest.raises(ValueError, match="pixels"):
        decode_image(bomb, MB, 4096 * 4096)
    with pytest.raises(ValueError, match="pixels"):  # Pillow's own bomb guard (over 2x its limit) says so too
        decode_image(bomb, MB, 10**12)
    assert time.monotonic() - began < 1.0
    with pytest.raises(ValueError, match="101x100 pixels"):
        decode_image(_png(101, 100), MB, 100 * 100)


@pytest.mark.parametrize("url, error, fragment", [
    ("http://example.com/cat.png", ValueError, "data URL"),
    ("data:image/png,rawbytes", ValueError, "base64"),
    ("data:image/png;base64,@@@@", ValueError, "base64"),
    (_data_url(b"not an image at all"), ValueError, "not a PNG, JPEG"),
    (_data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), ValueError, "not a PNG, JPEG"),  # no EPS
    (_data_url(_png(64, 64)[:60]), ValueError, "could not be"),  # a valid header, then nothing
    (_data_url(b"\x89PNG" + b"\0" * 3000), TooLarge, "larger than"),
])
def test_bad_images_are_refused_with_a_reason(url, error, fragment):
    with pytest.raises(error) as info:
        decode_start_image(url, 2048, 10_000)
    assert fragment in str(info.value)


# -- offer bodies -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, fragment", [
    (b"{oops", "takes JSON"), (b"\xff\xfe{}", "UTF-8"), (b"[1]", "JSON object"), (b"[" * 100_000, "nested"),
    (b'{"sdp": 1, "type": "offer"}', "needs"), (b'{"sdp": "v=0", "type": "answer"}', "needs"),
    (b'{"sdp": "hello", "type": "offer"}', "v=0"), (b'{"sdp": "v=0", "type": "offer", "session": 5}', "session"),
    (b'{"sdp": "v=0", "type": "offer", "prompt": 5}', "prompt"),
    (b'{"sdp": "v=0", "type": "offer", "seed": -1}', "seed"), (b'{"sdp": "v=0", "type": "offer", "seed": 1.5}', "seed"),
    (b'{"sdp": "v=0", "type": "offer", "image": {}}', "data URL"),
    (json.dumps({"sdp": "v=0", "type": "offer", "prompt": "x" * 11}).encode(), "at most 10"),
    (json.dumps({"sdp": "v=0" + "a" * 70_000, "type": "offer"}).encode(), "at most"),
])
def test_offer_bodies_are_checked(raw, fragment):
    with pytest.raises(ValueError) as info:
        parse_offer(parse_json_body(raw), max_prompt_chars=10)
    assert fragment in str(info.value)


# -- access -------------------------------------------------------------------------------------------------------

def test_roles_follow_token_and_key():
    def request(auth: str | None = None):
        return make_mocked_request("POST", "/offer", headers={"Authorization": auth} if auth else {})

    open_server = Access(None)
    assert open_server.role_to_create(request(), {}) == CONTROL  # no token: whoever starts a session steers it
    assert open_server.role_to_join(request(), {}, "k") == VIEW  # ... and whoever joins it watches

    locked = Access(TOKEN)
    for body, auth in [({}, None), ({"token": "wrong-token-123"}, None), ({}, "Bearer wrong"), ({}, TOKEN)]:
        with pytest.raises(Unauthorized):
            locked.role_to_create(request(auth), body)
    assert locked.role_to_create(request(f"Bearer {TOKEN}"), {}) == CONTROL
    assert locked.role_to_create(request(), {"token": TOKEN}) == CONTROL
    assert locked.role_to_join(request(), {"token": TOKEN}, "view-key") == CONTROL
    assert locked.role_to_join(request(), {"key": "view-key"}, "view-key") == VIEW  # a join link: watch only
    for body in ({}, {"key": "other-key"}, {"key": 5}):
        with pytest.raises(Unauthorized, match="join link"):
            locked.role_to_join(request(), body, "view-key")
    with pytest.raises(ValueError, match="at least 8"):
        Access("short")


def test_static_files_are_a_fixed_list_without_symlinks(tmp_path):
    (tmp_path / "app.js").write_text("ok")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_text("nested")
    secret = tmp_path.parent / "secret.txt"
    secret.write_text("secret")
    (tmp_path / "link.js").symlink_to(secret)
    assert set(static_files(tmp_path)) == {"app.js"}


# -- over HTTP ----------------------------------------------------------------------------------------------------

def test_bad_requests_get_a_clear_4xx_and_change_nothing(run_with_server):
    async def scenario(server, url):
        async with aiohttp.ClientSession() as http:
            offer = url + "offer"
            cases = [
                ("POST", offer, dict(data=b"{oops", headers={"Content-Type": "application/json"}), 400, "JSON"),
                ("POST", offer, dict(json={"sdp": "v=0\r\nm=video\r\n", "type": "offer"}), 400, "could not answer"),
                ("POST", offer, dict(json={"sdp": "v=0", "type": "offer", "session": "nope"}), 404, "/api/sessions"),
                ("POST", offer, dict(data=json.dumps({"sdp": "v=0", "type": "offer"})), 415, "application/json"),
                ("POST", offer, dict(data=b"x" * (3 * MB), headers={"Content-Type": "application/json"}),
                 413, "too large"),
                ("POST", offer, dict(json={"sdp": SDP_VIDEO, "type": "offer", "image": _data_url(_png(20_000, 20_000, "1"))}),
                 400, "pixels"),
                ("POST", offer, dict(json={"sdp": SDP_VIDEO, "type": "offer", "image": _data_url(b"GIF89a nonsense")}),
                 400, "not a PNG"),
                ("POST", offer, dict(json={"sdp": "v=0", "type": "offer", "prompt": "p" * 101}), 400, "at most 100"),
                ("GET", offer, {}, 405, "not allowed"),
                ("GET", url + "api/sessions/nope", {}, 404, "no session"),
                ("GET", url + "nothing/here", {}, 404, "nothing at"),
                ("DELETE", url + "api/health", {}, 405, "not allowed"),
            ]
            results = [(await status_of(http, m, u, **kw)) + (want, fragment) for m, u, kw, want, fragment in cases]
            health = await status_of(http, "GET", url + "api/health")
        return results, health

    results, health = run_with_server(SyntheticPipe(), scenario, max_image_bytes=2 * MB, max_prompt_chars=100)
    for status, body, _, want, fragment in results:
        assert status == want and fragment in body["error"], (status, body, want)
    assert health[0] == 200 and health[1]["sessions"] == 0 and health[1]["viewers"] == 0  # nothing was started


def test_token_roles_and_view_only_viewers(caplog, run_with_server):
    caplog.set_level(logging.DEBUG)

    async def scenario(server, url):
        async with aiohttp.ClientSession() as http:
            no_token = await status_of(http, "POST", url + "offer", json={"sdp": "v=0", "type": "offer"})
            listing = await status_of(http, "GET", url + "api/sessions")
            page = await status_of(http, "GET", url + f"?token={TOKEN}")  # the page itself is public
        owner, viewer, admin = Client(url, token=TOKEN), None, Client(url, body_token=TOKEN)
        try:
            session = await owner.connect(prompt="a quiet harbour")
            key = owner.answer["view_key"]
            viewer = Client(url, key=key)
            await viewer.connect(session=session)
            strangers = []
            for body in ({}, {"key": "not-the-key"}):
                async with aiohttp.ClientSession() as http:
                    strangers.append(await status_of(http, "POST", url + "offer",
                                                     json={"sdp": "v=0", "type": "offer", "session": session, **body}))
            hello = await viewer.wait_for("hello", timeout=10)
            for message in ({"type": "prompt", "text": "a burning harbour", "id": "v1"}, {"type": "pause"},
                            {"type": "stop"}):
                since = len(viewer.messages)
                viewer.send(message)
                await viewer.wait_for("error", timeout=5, since=since)
            rtt = await viewer.ping()  # watching and pinging are allowed
            await admin.connect(session=session)  # the token holder joins with control
            ack = await admin.send_prompt("a harbour at dawn", id="a1")
            listed = (200, await owner.get_json("/api/sessions"))  # the header token reads the listing
            return no_token, listing, page, owner.answer, viewer.answer, strangers, hello, viewer.messages, rtt, \
                admin.answer, ack, listed, server.sessions[session].state
        finally:
            await asyncio.gather(*(c.close() for c in (owner, viewer, admin) if c is not None))

    (no_token, listing, page, owner, viewer, strangers, hello, messages, rtt, admin, ack, listed,
     state) = run_with_server(SyntheticPipe(), scenario, token=TOKEN)
    assert no_token[0] == 401 and "token" in no_token[1]["error"] and "Bearer" in no_token[2]["WWW-Authenticate"]
    assert listing[0] == 401 and page[0] == 200
    assert owner["role"] == "control" and len(owner["view_key"]) >= 16
    assert viewer["role"] == "view" and "view_key" not in viewer
    assert [s[0] for s in strangers] == [401, 401] and "join link" in strangers[0][1]["error"]
    assert hello["role"] == "view"
    refusals = [m for m in messages if m.get("type") == "error"]
    assert len(refusals) == 3 and all("view-only" in m["message"] for m in refusals)
    assert not any(m.get("type") == "ack" and m.get("id") == "v1" for m in messages)
    assert 0 < rtt < 2000
    assert admin["role"] == "control" and ack["prompt"] == "a harbour at dawn"
    assert listed[0] == 200 and listed[1]["sessions"][0]["prompt"] == "a harbour at dawn"
    assert state == "running"  # the viewer's pause and stop changed nothing
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and owner["view_key"] not in logged


def test_no_cors_and_security_headers_everywhere(run_with_server):
    async def scenario(server, url):
        evil = {"Origin": "http://evil.example"}
        answers = []
        async with aiohttp.ClientSession() as http:
            for method, path in [("GET", ""), ("GET", "static/app.js"), ("GET", "api/health"), ("GET", "api/config"),
                                 ("GET", "api/sessions"), ("GET", "api/default-image"), ("POST", "offer"),
                                 ("OPTIONS", "offer"), ("OPTIONS", "api/sessions"), ("GET", "missing")]:
                headers = {**evil, "Access-Control-Request-Method": "POST"} if method == "OPTIONS" else evil
                answers.append((method, path) + (await status_of(http, method, url + path, headers=headers)))
        return answers

    for method, path, status, _, headers in run_with_server(SyntheticPipe(), scenario):
        assert status < 500, (method, path, status)
        assert not any(k.lower().startswith("access-control-") for k in headers), (method, path, headers)
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "unsafe-eval" not in headers["Content-Security-Policy"]
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert "camera=()" in headers["Permissions-Policy"]
        assert headers["Server"] == "framepack-rt"  # no versions


def test_static_files_cannot_be_walked_out_of(run_with_server):
    async def scenario(server, url):
        paths = ["/static/../server.py", "/static/%2e%2e/server.py", "/static/%2E%2E%2Fserver.py",
                 "/static/..%2fserver.py", "/static/....//server.py", "/static//etc/passwd",
                 "/static/%2fetc%2fpasswd", "/static/../../framepack_rt/commands/cli.py", "/../../etc/passwd",
                 "/static/app.js%00.py", "/static/.", "/static/", "/static"]
        statuses = {p: await raw_get(url, p) for p in paths}
        good = await raw_get(url, "/static/app.js")
        return statuses, good

    statuses, good = run_with_server(SyntheticPipe(), scenario)
    assert good == 200
    for path, status in statuses.items():
        assert status in (400, 404), (path, status)


def test_default_bind_is_loopback():
    from framepack_rt.commands.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"

    async def scenario():
        server = StreamServer(SyntheticPipe(), ServerSettings())
        url = await server.start(port=0)
        try:
            return url, server._runner.addresses
        finally:
            await server.stop()

    url, addresses = asyncio.run(scenario())
    assert url.startswith("http://127.0.0.1:") and all(a[0] == "127.0.0.1" for a in addresses)


def test_cli_limit_flags_reach_the_settings(monkeypatch):
    from framepack_rt.commands.cli import build_parser
    from framepack_rt.stream.options import settings_kwargs

    args = build_parser().parse_args(["serve", "--max-sessions", "2", "--max-viewers", "3", "--max-image-mb", "1.5",
                                      "--grace", "4", "--message-rate", "5"])
    monkeypatch.setenv("FRAMEPACK_RT_TOKEN", TOKEN)
    s = ServerSettings(**settings_kwargs(args))
    assert (s.max_sessions, s.max_viewers, s.max_image_bytes, s.grace, s.message_rate) == (2, 3, int(1.5 * MB), 4, 5)
    assert s.token == TOKEN and TOKEN not in repr(s)  # from the environment, and never printed
    assert s.session_policy().message_burst == 10 and not math.isinf(s.max_request_bytes)
    with pytest.raises(ValueError, match="--max-viewers"):
        ServerSettings(max_viewers=0)


def test_a_server_fault_is_a_logged_500_without_details(caplog):
    class BrokenPipe(SyntheticPipe):
        def frame_size(self, image):
            raise RuntimeError("internal detail: the device exploded")

    async def scenario():
        server = StreamServer(BrokenPipe(), ServerSettings())
        url = await server.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                sdp = await _offer_sdp()
                fault = await status_of(http, "POST", url + "offer", json={"sdp": sdp, "type": "offer"})
                health = await status_of(http, "GET", url + "api/health")
            return fault, health, len(server.sessions), server._starting.count
        finally:
            await server.stop()

    (status, body, _), health, sessions, reserved = asyncio.run(scenario())
    assert status == 500 and "server log" in body["error"] and "exploded" not in body["error"]
    assert any("POST /offer failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert health[0] == 200 and sessions == 0 and reserved == 0  # nothing half-made stays behind


async def _offer_sdp(send_media: bool = False) -> str:
    """A real browser-like offer (recvonly video + data channel), or one that also wants to send media."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        if send_media:
            pc.addTrack(VideoStreamTrack())
            pc.addTrack(AudioStreamTrack())
        else:
            pc.addTransceiver("video", direction="recvonly")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


def test_viewers_cannot_send_media_to_the_server(run_with_server):
    async def scenario(server, url):
        async with aiohttp.ClientSession() as http:
            sdp = await _offer_sdp(send_media=True)
            status, answer, _ = await status_of(http, "POST", url + "offer", json={"sdp": sdp, "type": "offer"})
        return status, answer

    status, answer = run_with_server(SyntheticPipe(), scenario)
    assert status == 200
    sections = answer["sdp"].split("m=")[1:]
    video = next(s for s in sections if s.startswith("video"))
    audio = next(s for s in sections if s.startswith("audio"))
    assert "a=sendonly" in video and "a=inactive" in audio


def test_broken_requests_get_our_answer_without_versions_or_echo(run_with_server):
    """What aiohttp answers itself (a request line over 8190 bytes, TLS to the HTTP port) and what aiortc
    cannot parse: JSON from us, the Server header without versions, nothing of the request or aiortc quoted."""

    async def scenario(server, url):
        host, port = url.split("//")[1].strip("/").split(":")
        answers = []
        for raw in (b"GET /?token=" + TOKEN.encode() + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(raw)
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        async with aiohttp.ClientSession() as http:
            bad_sdps = ["v=0\r\nm=video\r\n", "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:\r\n",
                        "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:x\r\n"]
            refusals = [await status_of(http, "POST", url + "offer", json={"sdp": sdp, "type": "offer"})
                        for sdp in bad_sdps]
        return answers, refusals

    answers, refusals = run_with_server(SyntheticPipe(), scenario)
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400" and b"Server: framepack-rt\r\n" in head + b"\r\n"
        assert b"aiohttp" not in head and b"Python" not in head
        assert TOKEN.encode() not in answer and b"aaaa" not in body and json.loads(body)["error"]
    for status, body, headers in refusals:
        assert status == 400 and body["error"].startswith("could not answer the offer"), body
        assert not any(word in body["error"] for word in ("Error", "None", "list", "index"))
