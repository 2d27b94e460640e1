"""The ``framepack-rt serve`` flags for limits and access (kept out of cli.py; imports nothing heavy).

Flags left out keep :class:`~framepack_rt.stream.server.ServerSettings`' defaults, which come from
:mod:`.limits`; the help texts quote the same values.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from framepack_rt.stream.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_SESSIONS, SessionPolicy

TOKEN_ENV = "FRAMEPACK_RT_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the limit and access flags to the ``serve`` subparser."""
    d = SessionPolicy()
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
                   help=f"drop a viewer not connected by then (default: {d.connect_timeout:g})")
    g.add_argument("--viewer-timeout", type=float, metavar="SECONDS",
                   help=f"drop a viewer silent this long, e.g. a killed browser (default: {d.viewer_timeout:g})")
    parser.add_argument("--token", metavar="TOKEN",
                        help=f"require this token to start, list and control sessions (default: ${TOKEN_ENV}; "
                             "prefer the variable, command lines are visible to other users)")


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerSettings keywords for the flags given (the rest keep their defaults)."""
    names = ("max_sessions", "max_viewers", "max_image_pixels", "max_prompt_chars", "message_rate", "grace",
             "idle_timeout", "connect_timeout", "viewer_timeout")
    kwargs: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.max_image_mb is not None:
        kwargs["max_image_bytes"] = int(args.max_image_mb * 2**20)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None:
        kwargs["token"] = token
    return kwargs
