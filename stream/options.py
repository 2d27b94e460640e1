"""The ``framepack-rt serve`` flags for limits, access, connections, networks and logging (kept out of cli.py;
imports nothing heavy).

Flags left out keep :class:`~framepack_rt.stream.settings.ServerSettings`' defaults, which come from
:mod:`.limits` and :mod:`.connections`; the help texts quote the same values.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from framepack_rt.stream.limits import (
    CONTROL_SLOTS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_PENDING_PER_CLIENT, MAX_SESSIONS, MAX_SESSIONS_PER_CLIENT,
    SessionPolicy)

TOKEN_ENV = "FRAMEPACK_RT_TOKEN"
# Mirrors connections.ConnectionLimits' defaults (that module imports aiohttp; this one stays light).
CONNECTION_DEFAULTS = {"max_connections": 256, "max_connections_per_client": 32, "header_timeout": 10.0,
                       "body_timeout": 60.0, "keepalive_timeout": 10.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the limit, access, connection, network and logging flags to the ``serve`` subparser."""
    d, c = SessionPolicy(), CONNECTION_DEFAULTS
    g = parser.add_argument_group("limits (over-limit requests get a 4xx answer with a message)")
    g.add_argument("--max-sessions", type=int, metavar="N", help=f"sessions at once (default: {MAX_SESSIONS})")
    g.add_argument("--max-viewers", type=int, metavar="N", help=f"viewers per session (default: {d.max_viewers})")
    g.add_argument("--max-image-mb", type=float, metavar="MB",
                   help=f"largest start image file (default: {MAX_IMAGE_BYTES / 2**20:g})")
    g.add_argument("--max-image-pixels", type=int, metavar="N",
                   help=f"largest start image, width x height (default: {MAX_IMAGE_PIXELS})")
    g.add_argument("--max-prompt-chars", type=int, metavar="N",
                   help=f"longest prompt (default: {d.max_prompt_chars})")
    g.add_argument("--message-rate", type=float, metavar="N",
                   help=f"control messages per second per viewer, bursts of twice that (default: {d.message_rate:g})")
    g.add_argument("--grace", type=float, metavar="SECONDS",
                   help=f"a session without viewers pauses at once and closes after this (default: {d.grace:g})")
    g.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help=f"a paused, stopped or ended session closes after this (default: {d.idle_timeout:g})")
    g.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                   help="drop a viewer not connected by then; a session whose first viewer never connects closes "
                        f"then (default: {d.connect_timeout:g})")
    g.add_argument("--viewer-timeout", type=float, metavar="SECONDS",
                   help=f"drop a viewer silent this long, e.g. a killed browser (default: {d.viewer_timeout:g})")
    g.add_argument("--max-sessions-per-client", type=int, metavar="N",
                   help=f"sessions one address may have started (default: {MAX_SESSIONS_PER_CLIENT})")
    g.add_argument("--max-pending-per-client", type=int, metavar="N",
                   help=f"offers from one address whose connection is not up yet (default: {MAX_PENDING_PER_CLIENT})")
    g.add_argument("--control-slots", type=int, metavar="N",
                   help=f"with a token: places of each session kept from view-key viewers (default: {CONTROL_SLOTS})")

    g = parser.add_argument_group("connections (HTTP)")
    g.add_argument("--max-connections", type=int, metavar="N",
                   help=f"open HTTP connections in all; lowered to half the descriptor limit if need be "
                        f"(default: {c['max_connections']})")
    g.add_argument("--max-connections-per-client", type=int, metavar="N",
                   help=f"open HTTP connections from one address (default: {c['max_connections_per_client']})")
    g.add_argument("--header-timeout", type=float, metavar="SECONDS",
                   help=f"a request's headers must arrive within this (default: {c['header_timeout']:g})")
    g.add_argument("--body-timeout", type=float, metavar="SECONDS",
                   help=f"a request's body must arrive within this (default: {c['body_timeout']:g})")
    g.add_argument("--keepalive-timeout", type=float, metavar="SECONDS",
                   help=f"an idle keep-alive connection is closed after this (default: {c['keepalive_timeout']:g})")
    g.add_argument("--trusted-proxy", action="append", default=None, metavar="ADDRESS",
                   help="a reverse proxy's address (repeatable): its X-Forwarded-For names the client for the "
                        "per-client limits, and it is exempt from the per-address connection cap")

    g = parser.add_argument_group("networks (WebRTC)")
    g.add_argument("--ice-server", action="append", default=None, metavar="URL",
                   help="a STUN or TURN server (repeatable), e.g. stun:stun.example.org:3478 or "
                        "turn:turn.example.org:3478?transport=udp; TURN credentials come from "
                        "$FRAMEPACK_RT_TURN_USERNAME and $FRAMEPACK_RT_TURN_CREDENTIAL")
    g.add_argument("--public-ip", metavar="ADDRESS",
                   help="the address clients reach this machine at, when it is behind a 1:1 NAT (a cloud VM): "
                        "announced with the same UDP ports")
    g.add_argument("--udp-ports", metavar="MIN-MAX",
                   help="UDP ports for WebRTC (one per viewer per address), e.g. 40000-40099 (default: any)")
    g.add_argument("--allow-mdns", action="store_true",
                   help="accept clients' *.local ICE candidates (resolved by multicast DNS on this network)")

    _add_recording_arguments(parser)
    _add_prompt_arguments(parser)
    _add_batching_arguments(parser)

    parser.add_argument("--token", metavar="TOKEN",
                        help=f"require this token to start, list and control sessions (default: ${TOKEN_ENV}; "
                             "prefer the variable, command lines are visible to other users)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                        help="what the server logs to stderr (default: info: sessions starting and ending, "
                             "rejected requests, rate-limited)")


def _add_recording_arguments(parser: argparse.ArgumentParser) -> None:
    """Recording (stream/recording.py) and the start settings a page may ask for (stream/offers.py)."""
    from framepack_rt.stream.offers import MAX_STEPS, MAX_WINDOW
    from framepack_rt.stream.recording import DEFAULT_MAX_SECONDS

    g = parser.add_argument_group("recording and start settings")
    g.add_argument("--record-max-seconds", type=float, metavar="SECONDS",
                   help="video kept per session for 'Download MP4' (H.264 segments in a temporary folder, the "
                        f"oldest dropped past this; 0 turns recording off; default: {DEFAULT_MAX_SECONDS:g})")
    g.add_argument("--recording-for-viewers", action="store_true",
                   help="let view-only viewers download a session's video too (default: only viewers with control)")
    g.add_argument("--max-steps", type=int, metavar="N",
                   help=f"most sampling steps a page may ask for at start (default: {MAX_STEPS})")
    g.add_argument("--max-window", type=int, metavar="N",
                   help=f"most latent frames per section a page may ask for at start (default: {MAX_WINDOW})")


def _recording_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in ("record_max_seconds", "max_steps", "max_window")
                              if getattr(args, name, None) is not None}
    if getattr(args, "recording_for_viewers", False):
        kwargs["recording_for_viewers"] = True
    return kwargs


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """How prompts change (engine/prompts.py): the default transition of a prompt sent without one."""
    from framepack_rt.stream.control import MAX_TRANSITION_SECTIONS

    parser.add_argument("--transition-sections", type=int, metavar="N",
                        help="sections a new prompt (or timeline entry) blends in over when the page sends no "
                             f"'transition' (0: from the next section at once, the default; at most "
                             f"{MAX_TRANSITION_SECTIONS}); each section is window * 4 frames, 1.2 s at the defaults")


MAX_BATCH = 8  # mirrors stream/batching.py's default (that module imports torch)


def _add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """Continuous batching of sessions' sampling steps (stream/batching.py)."""
    g = parser.add_argument_group("batching (several sessions on one device)")
    g.add_argument("--batching", choices=("on", "off"), default=None,
                   help="on: the open sections of all sessions advance one sampling step at a time as one packed "
                        "forward, and sections finishing together decode in one VAE batch; off: sessions take "
                        "turns, a whole section each (default: on)")
    g.add_argument("--max-batch", type=at_least_one, metavar="N",
                   help=f"most sections in one packed forward; more sessions take several (default: {MAX_BATCH})")


def at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def _batching_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "batching", None) is not None:
        kwargs["batching"] = args.batching == "on"
    if getattr(args, "max_batch", None) is not None:
        kwargs["max_batch"] = args.max_batch
    return kwargs


def configure_logging(args: argparse.Namespace) -> None:
    """Set up logging for ``serve`` from --log-level (call before the server starts)."""
    from framepack_rt.stream.logs import configure_logging as configure

    configure(args.log_level)


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerSettings keywords for the flags given (the rest keep their defaults)."""
    names = ("max_sessions", "max_viewers", "max_image_pixels", "max_prompt_chars", "message_rate", "grace",
             "idle_timeout", "connect_timeout", "viewer_timeout", "max_sessions_per_client",
             "max_pending_per_client", "control_slots", *CONNECTION_DEFAULTS, "public_ip")
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.max_image_mb is not None:
        kwargs["max_image_bytes"] = int(args.max_image_mb * 2**20)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None:
        kwargs["token"] = token
    if args.trusted_proxy:
        kwargs["trusted_proxies"] = tuple(args.trusted_proxy)
    if args.ice_server:
        from framepack_rt.stream.ice import turn_credentials_from_env

        kwargs["ice_servers"] = list(args.ice_server)
        kwargs["turn_username"], kwargs["turn_credential"] = turn_credentials_from_env()
    if args.udp_ports is not None:
        from framepack_rt.stream.ice import parse_port_range

        kwargs["udp_ports"] = parse_port_range(args.udp_ports)
    if args.allow_mdns:
        kwargs["allow_mdns"] = True
    kwargs.update(_recording_kwargs(args))
    kwargs.update(_batching_kwargs(args))
    if getattr(args, "transition_sections", None) is not None:
        kwargs["transition_sections"] = args.transition_sections
    return kwargs
