"""``ServerSettings``: how ``framepack-rt serve`` generates, plays and limits, checked once when made (each
wrong value is a ValueError that names its flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

from framepack_rt.stream import DEFAULT_MODEL
from framepack_rt.stream import ice
from framepack_rt.stream.connections import ConnectionLimits
from framepack_rt.stream.control import MAX_TRANSITION_SECTIONS
from framepack_rt.stream.limits import (
    CONTROL_SLOTS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_PENDING_PER_CLIENT, MAX_SESSIONS, MAX_SESSIONS_PER_CLIENT,
    SessionPolicy)
from framepack_rt.stream.offers import MAX_SDP_CHARS, MAX_STEPS, MAX_WINDOW, StartLimits
from framepack_rt.stream.recording import DEFAULT_MAX_SECONDS
from framepack_rt.stream.security import check_token

_POLICY = SessionPolicy()  # the per-session defaults, in one place
_CONNECTIONS = ConnectionLimits()


@dataclass
class ServerSettings:
    """How sessions generate and play. ``steps``/``teacache``/``cfg`` None: the pipeline's defaults."""

    model: str = DEFAULT_MODEL
    fps: float = 30.0
    window: int = 9
    steps: int | None = None
    teacache: float | None = None
    cfg: float | None = None  # real classifier-free guidance scale (1: off)
    mode: str = "f1"  # live streams go forward; "inverted" builds fixed-length clips end-first
    buffer_seconds: float = 2.0  # bounded buffer: at most this much generated video waits to be played
    transition_sections: int = 0  # a prompt sent without "transition" blends in over this many sections
    batching: bool = True  # continuous batching of sessions' steps (stream/batching.py); False: round-robin
    max_batch: int = 8  # most sections in one packed forward
    # Limits (see limits.py and the README): capacity, input sizes, how long unused things live.
    max_sessions: int = MAX_SESSIONS
    max_viewers: int = _POLICY.max_viewers  # per session
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_prompt_chars: int = _POLICY.max_prompt_chars
    message_rate: float = _POLICY.message_rate  # control messages a second per viewer (bursts of twice that)
    grace: float = _POLICY.grace  # a session without viewers stops generating at once, closes after this long
    idle_timeout: float = _POLICY.idle_timeout  # generating nothing (paused, stopped, ended) this long: closed
    connect_timeout: float = _POLICY.connect_timeout  # a viewer whose connection is not up by then is dropped
    viewer_timeout: float = _POLICY.viewer_timeout  # silent (no RTCP receiver reports) this long: dropped
    token: str | None = field(default=None, repr=False)  # needed for /offer and control (security.py)
    ice_servers: list[str] = field(default_factory=list)  # --ice-server URLs, e.g. ["stun:stun.example.org"]
    default_prompt: str | None = None  # None: the model's example prompt (the demo's), else images.DEFAULT_PROMPT
    stamp: bool = False  # benchmarks: frame numbers in the pixels' top rows + send times (stream/stamp.py)
    # Where and how the model loads (framepack_rt.pipeline.devices): --device, --dtype, --low-vram,
    # --memory-budget-gb, --quantize, --compile.
    device: str = "auto"
    dtype: str = "auto"
    low_vram: bool = False
    memory_budget_gb: float | None = None
    quantize: str | None = None
    compile: bool = False
    decoder: str = "auto"  # --decoder: "vae", "fast" (the model's fast decoder) or "auto" (fast when it has one)
    decode_overlap: bool | None = None  # --no-decode-overlap: False; None: the pipeline's default (on)
    # LoRA (model/lora.py): --lora FILE[:SCALE] as (path, scale) pairs, loaded unmerged (each session may change
    # its scales live with a "lora" control message); --fuse-lora merges them into the weights (scales fixed).
    loras: tuple[tuple[str, float], ...] = ()
    fuse_lora: bool = False
    # Real networks (stream/ice.py): TURN credentials (from the environment), a 1:1 NAT's public address,
    # the UDP ports viewers' connections use, and whether clients' *.local (mDNS) candidates are resolved.
    turn_username: str | None = field(default=None, repr=False)
    turn_credential: str | None = field(default=None, repr=False)
    public_ip: str | None = None
    udp_ports: tuple[int, int] | None = None
    allow_mdns: bool = False
    # Per client (address; behind --trusted-proxy the X-Forwarded-For one): sessions started and offers whose
    # connection is not up yet. With a token, view-key viewers leave control_slots of each session free.
    max_sessions_per_client: int = MAX_SESSIONS_PER_CLIENT
    max_pending_per_client: int = MAX_PENDING_PER_CLIENT
    control_slots: int = CONTROL_SLOTS
    trusted_proxies: tuple[str, ...] = ()
    # HTTP connections (stream/connections.py): caps in total and per address, read deadlines, keep-alive.
    max_connections: int = _CONNECTIONS.max_connections
    max_connections_per_client: int = _CONNECTIONS.max_per_client
    header_timeout: float = _CONNECTIONS.header_timeout
    body_timeout: float = _CONNECTIONS.body_timeout
    keepalive_timeout: float = _CONNECTIONS.keepalive_timeout
    # Recording (stream/recording.py): seconds of video kept per session (0: off), and whether view-only
    # viewers may download it too. Start settings a page may ask for (stream/offers.py).
    record_max_seconds: float = DEFAULT_MAX_SECONDS
    recording_for_viewers: bool = False
    max_steps: int = MAX_STEPS
    max_window: int = MAX_WINDOW

    def __post_init__(self) -> None:
        if not 0 < self.fps <= 60:
            raise ValueError(f"--fps {self.fps}: must be in (0, 60] (the encoders cap at 30)")
        if self.window < 1:
            raise ValueError(f"--window {self.window}: must be at least 1 latent frame")
        if not 0 <= self.transition_sections <= MAX_TRANSITION_SECTIONS:
            raise ValueError(f"--transition-sections {self.transition_sections}: must be from 0 (a new prompt "
                             f"applies at once) to {MAX_TRANSITION_SECTIONS}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be at least 1")
        if self.mode != "f1":
            raise ValueError(f"mode {self.mode!r}: live streaming plays sections as they come, which only "
                             "F1 (forward) generates in playback order; use mode 'f1'")
        if self.buffer_seconds <= 0:
            raise ValueError(f"buffer of {self.buffer_seconds} s: must be positive")
        if self.max_sessions < 1:
            raise ValueError(f"--max-sessions {self.max_sessions}: must be at least 1")
        for name in ("max_sessions_per_client", "max_pending_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.control_slots < 0:
            raise ValueError(f"--control-slots {self.control_slots}: must be 0 or more")
        self.trusted_proxies = tuple(self.trusted_proxies)
        self.connection_limits()  # validates them
        self._check_start_limits()
        if self.max_image_bytes < 1024 or self.max_image_pixels < 64:
            raise ValueError("--max-image-mb and --max-image-pixels: too small for any start image")
        self.session_policy()  # validates the per-session limits
        check_token(self.token)
        ice.ice_servers(self.ice_servers, self.turn_username, self.turn_credential)  # validates the URLs
        if self.public_ip is not None:
            self.public_ip = ice.parse_public_ip(self.public_ip)
        if self.udp_ports is not None:
            self.udp_ports = ice.parse_port_range(f"{self.udp_ports[0]}-{self.udp_ports[1]}")

    def decode_overlap_kwargs(self) -> dict[str, bool]:
        """stream()'s decode_overlap when one was chosen (pipelines without the option get nothing)."""
        return {} if self.decode_overlap is None else {"decode_overlap": self.decode_overlap}

    def session_policy(self) -> SessionPolicy:
        return SessionPolicy(max_viewers=self.max_viewers, grace=self.grace, idle_timeout=self.idle_timeout,
                             connect_timeout=self.connect_timeout, viewer_timeout=self.viewer_timeout,
                             message_rate=self.message_rate, message_burst=max(1, round(2 * self.message_rate)),
                             max_prompt_chars=self.max_prompt_chars)

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.max_connections, self.max_connections_per_client, self.header_timeout,
                                self.body_timeout, self.keepalive_timeout)

    @property
    def view_slots(self) -> int:
        """With a token set, view-key viewers are let in while fewer viewers than this watch a session: the
        last ``control_slots`` places stay free for viewers with control."""
        return max(1, self.max_viewers - self.control_slots)

    @property
    def max_request_bytes(self) -> int:
        """The largest body /offer reads: a maximal start image as base64 text, plus the SDP and fields."""
        return (self.max_image_bytes + 2) // 3 * 4 + MAX_SDP_CHARS + 3 * self.max_prompt_chars + 4096

    def _check_start_limits(self) -> None:
        if self.record_max_seconds < 0:
            raise ValueError(f"--record-max-seconds {self.record_max_seconds:g}: must be 0 (off) or more")
        if self.max_steps < 1 or self.max_window < 1:
            raise ValueError("--max-steps and --max-window: must be at least 1")
        if self.steps is not None and self.steps > self.max_steps:
            raise ValueError(f"--steps {self.steps} is above --max-steps {self.max_steps}: raise --max-steps")
        if self.window > self.max_window:
            raise ValueError(f"--window {self.window} is above --max-window {self.max_window}: raise --max-window")

    def start_limits(self) -> StartLimits:
        return StartLimits(max_steps=self.max_steps, max_window=self.max_window)

    @property
    def buffer_frames(self) -> int:
        return max(1, round(self.buffer_seconds * self.fps))
