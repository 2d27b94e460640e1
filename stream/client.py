"""A Python viewer for ``framepack-rt serve`` (aiortc): for tests, scripts and latency benchmarks.

    client = StreamClient("http://127.0.0.1:8188/", keep_frames=True)
    session = await client.connect(prompt="a red fox running through snow")
    await client.wait_frames(60)
    ack = await client.send_prompt("the fox jumps", id="p1")         # {"type": "ack", "section": k, ...}
    frames, arrivals = client.frames_array(), client.arrival_times()  # (N, H, W, 3) uint8, (N,) seconds
    await client.close()

Every received frame is counted with its arrival time (``time.time()``, comparable with the server's
``server_time`` stamps on the same machine; and ``time.monotonic()``) and RTP pts; decoded pixels are kept
only if asked. With ``stamps=True`` the frame number a ``--stamp`` server wrote into the pixels is read too.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
from yarl import URL
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from framepack_rt.stream import control
from framepack_rt.stream.candidates import CandidatePolicy
from framepack_rt.stream.ice import IcePolicy, ensure_host_candidates, policy_scope
from framepack_rt.stream.stamp import read_stamp_luma, unwrap


@dataclass(frozen=True)
class FrameArrival:
    """One received frame: when it arrived (time.time()), its pts (90 kHz) and size.

    mono: the arrival on time.monotonic() (the clock a stamping server logs send times on); stamp: the frame
    number read from the pixels (``stamps=True``), None if not read or the frame carries none.
    """

    arrival: float
    pts: int
    width: int
    height: int
    mono: float = 0.0
    stamp: int | None = None


class StreamClient:
    """Connects to a framepack-rt server as one viewer; collects frames and control messages."""

    def __init__(self, base_url: str, keep_frames: bool | int = False, stamps: bool = False,
                 token: str | None = None) -> None:
        """keep_frames: False (count only), True (keep every decoded frame) or N (keep the last N).
        stamps: read the frame number stamped into each frame (see stream/stamp.py).
        token: the server's access token (``serve --token``), sent as ``Authorization: Bearer`` with every
        request: it starts sessions, lists them and joins with control."""
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.keep_frames = keep_frames
        self.stamps = stamps
        self.offer_sent: float | None = None  # time.monotonic() when POST /offer went out
        # The last frame number read: stamps carry it modulo 4096. Seed it (e.g. from the stamps endpoint)
        # before joining a session more than 4096 frames old.
        self.last_stamp: int | None = None
        self.session: str | None = None
        self.control_key: str | None = None
        self.frames: list[FrameArrival] = []
        self.messages: list[dict[str, Any]] = []
        self.pc: RTCPeerConnection | None = None
        self.channel: Any = None
        self._pixels: list[np.ndarray] = []
        self._new_message = asyncio.Event()
        self._new_frame = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)

    # -- connection ------------------------------------------------------------------------------------------
    async def connect(self, session: str | None = None, prompt: str | None = None, image: Any = None,
                      seed: int | None = None, timeout: float = 20.0) -> str:
        """Offer/answer over HTTP; returns the session id. ``session`` joins it, else a new one starts.

        image: a path, an (H, W, 3) uint8 array or a data URL.
        """
        ensure_host_candidates()
        with policy_scope(_loopback_policy(self.base_url)):
            opened = await self._negotiate(session, prompt, image, seed)
        try:
            await asyncio.wait_for(opened.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"control channel did not open within {timeout} s (ICE state "
                               f"{self.pc.iceConnectionState}); is the server reachable on this machine?") from None
        return self.session

    async def _negotiate(self, session: str | None, prompt: str | None, image: Any,
                         seed: int | None) -> asyncio.Event:
        """Offer, post, apply the answer; returns the event set once the control channel opens."""
        # No STUN server: a local server needs none, and the default one is unreachable offline.
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        self.channel = pc.createDataChannel("control")
        opened = asyncio.Event()
        self.channel.on("open", opened.set)
        self.channel.on("message", self._on_message)

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "video":
                self._reader = asyncio.ensure_future(self._read(track))

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers all candidates here
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        if session:
            body["session"] = session
        if prompt:
            body["prompt"] = prompt
        if image is not None:
            body["image"] = _image_data_url(image)
        if seed is not None:
            body["seed"] = seed
        self.offer_sent = time.monotonic()
        answer = await self.post_json("/offer", body)
        self.session = answer["session"]
        self.control_key = answer.get("control_key")  # ?key= of DELETE and video.mp4 (given with control)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return opened

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> "StreamClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- HTTP ------------------------------------------------------------------------------------------------
    async def get_json(self, path: str) -> Any:
        async with aiohttp.ClientSession(headers=self._headers) as http, http.get(self.base_url + path) as resp:
            return await _json_or_raise(resp, path)

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        async with (aiohttp.ClientSession(headers=self._headers) as http,
                    http.post(self.base_url + path, json=body) as resp):
            return await _json_or_raise(resp, path)

    async def wait_end(self, timeout: float = 30.0) -> dict[str, Any]:
        """On a cluster (``serve --cluster ray``): the session's end as the ingress saw it, {"state": "closed" |
        "lost" | "running" (still, at ``timeout``), "reason"}; a lost session's replica died."""
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(deadline - time.monotonic(), 25.0))
            answer = await self.get_json(f"/api/sessions/{self.session}/end?wait={wait:.1f}")
            if answer["state"] != "running" or time.monotonic() >= deadline:
                return answer

    # -- frames ----------------------------------------------------------------------------------------------
    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            mono, stamp = time.monotonic(), None
            if self.stamps:
                code = read_stamp_luma(frame.to_ndarray(format="yuv420p")[:frame.height])
                if code is not None:
                    stamp = self.last_stamp = unwrap(code, self.last_stamp)
            self.frames.append(FrameArrival(time.time(), int(frame.pts or 0), frame.width, frame.height,
                                            mono, stamp))
            if self.keep_frames:
                self._pixels.append(frame.to_ndarray(format="rgb24"))
                if not isinstance(self.keep_frames, bool) and len(self._pixels) > self.keep_frames:
                    del self._pixels[0]
            self._new_frame.set()

    async def wait_frames(self, count: int, timeout: float = 20.0) -> int:
        """Wait until ``count`` frames have arrived in total; returns the number received."""
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"received {len(self.frames)} of {count} frames within {timeout} s")
            self._new_frame.clear()
            try:
                await asyncio.wait_for(self._new_frame.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return len(self.frames)

    def arrival_times(self) -> np.ndarray:
        """(N,) float64 arrival times (time.time()) of every frame received so far."""
        return np.array([f.arrival for f in self.frames], dtype=np.float64)

    def frames_array(self) -> np.ndarray:
        """(N, H, W, 3) uint8 of the kept frames (needs keep_frames)."""
        if not self.keep_frames:
            raise RuntimeError("frames were not kept: create the client with keep_frames=True (or a count)")
        if not self._pixels:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        return np.stack(self._pixels)

    # -- control ---------------------------------------------------------------------------------------------
    def _on_message(self, raw: str | bytes) -> None:
        try:
            self.messages.append(json.loads(raw))
        except ValueError:
            self.messages.append({"type": "invalid", "raw": raw})
        self._new_message.set()

    def send(self, message: dict[str, Any] | str) -> None:
        """Send a control message (a dict, or raw text to test the server's parser)."""
        if self.channel is None or self.channel.readyState != "open":
            raise RuntimeError("not connected: call connect() first")
        self.channel.send(message if isinstance(message, str) else control.encode(message))

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool] | str, timeout: float = 20.0,
                       since: int = 0) -> dict[str, Any]:
        """The first message (from index ``since``) matching ``predicate`` (or of that type), waiting for it."""
        match = (lambda m: m.get("type") == predicate) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for message in self.messages[seen:]:
                if match(message):
                    return message
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = sorted({m.get("type", "?") for m in self.messages})
                raise TimeoutError(f"no matching message within {timeout} s (received types: {kinds})")
            self._new_message.clear()
            try:
                await asyncio.wait_for(self._new_message.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def send_prompt(self, text: str, id: str | int | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Change the prompt; returns the server's ack ({"section": k} is where it applies from)."""
        ident = id if id is not None else f"py-{next(self._ids)}"
        since = len(self.messages)
        self.send({"type": "prompt", "text": text, "id": ident})
        return await self.wait_for(lambda m: m.get("type") == "ack" and m.get("id") == ident, timeout, since)

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time over the control channel, in milliseconds."""
        t = time.perf_counter()
        since = len(self.messages)
        self.send({"type": "ping", "t": t})
        await self.wait_for(lambda m: m.get("type") == "pong" and m.get("t") == t, timeout, since)
        return (time.perf_counter() - t) * 1000

    def pause(self) -> None:
        self.send({"type": "pause"})

    def resume(self) -> None:
        self.send({"type": "resume"})

    def stop(self) -> None:
        self.send({"type": "stop"})


async def _json_or_raise(resp: aiohttp.ClientResponse, path: str) -> Any:
    data = await resp.json(content_type=None)
    if resp.status >= 400:
        detail = data.get("error") if isinstance(data, dict) else data
        raise RuntimeError(f"{path}: HTTP {resp.status}: {detail}")
    return data


def _loopback_policy(base_url: str) -> IcePolicy | None:
    """A server on a loopback address is reached over loopback only: gather and probe nothing else."""
    try:
        loopback = ipaddress.ip_address(URL(base_url).host or "").is_loopback
    except ValueError:
        loopback = URL(base_url).host == "localhost"
    return IcePolicy(addresses=("127.0.0.1",), remote=CandidatePolicy(loopback=True)) if loopback else None


def _image_data_url(image: Any) -> str:
    if isinstance(image, str) and image.startswith("data:"):
        return image
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            img = im.convert("RGB")
    else:
        img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
