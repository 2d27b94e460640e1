"""The body of ``POST /offer``, checked field by field before anything is spent on it.

Every problem is a ValueError whose text tells the client what to send instead (answered with 400).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from framepack_rt.stream.control import load_json, validate_prompt

MAX_SDP_CHARS = 64 * 1024  # a browser's offer is 2-6 KB; a much larger "SDP" is not one
MAX_ID_CHARS = 64  # session ids are 22 base64url characters (128 bits)
MAX_STEPS = 50  # --max-steps: sampling steps a page may ask for (the release samples 25)
MAX_WINDOW = 16  # --max-window: latent frames per section a page may ask for (the release uses 9)
MAX_CFG = 20.0  # real CFG scales above this only burn the picture


@dataclass(frozen=True)
class StartLimits:
    """What a page may ask for at start (the server's flags); the bucket is checked against the model's set."""

    max_steps: int = MAX_STEPS
    max_window: int = MAX_WINDOW
    max_cfg: float = MAX_CFG


@dataclass(frozen=True)
class StartSettings:
    """Generation settings sent with a new session's offer; None: the server's default."""

    steps: int | None = None
    cfg: float | None = None
    window: int | None = None
    bucket: tuple[int, int] | None = None  # (height, width) generated at, one of the model's buckets


@dataclass(frozen=True)
class Offer:
    """A well-formed offer: join ``session`` if set, else start a new one from the optional fields."""

    sdp: str
    type: str
    session: str | None = None
    prompt: str | None = None
    image: str | None = None  # a data URL, decoded later (off the event loop, within the image limits)
    seed: int = 0
    start: StartSettings = field(default_factory=StartSettings)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ValueError saying what a valid body looks like."""
    try:
        body = load_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("POST /offer takes UTF-8 JSON: {\"sdp\": ..., \"type\": \"offer\"}") from None
    except ValueError as exc:
        raise ValueError(f"POST /offer takes JSON, this is {exc}: {{\"sdp\": ..., \"type\": \"offer\"}}") from None
    if not isinstance(body, dict):
        raise ValueError("POST /offer takes a JSON object: {\"sdp\": ..., \"type\": \"offer\"}")
    return body


def parse_offer(body: dict[str, Any], max_prompt_chars: int, limits: StartLimits = StartLimits()) -> Offer:
    """Check the fields of an offer body (credentials are read elsewhere)."""
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or body.get("type") != "offer":
        raise ValueError("POST /offer needs {\"sdp\": <the offer's SDP>, \"type\": \"offer\"}")
    if len(sdp) > MAX_SDP_CHARS:
        raise ValueError(f"the SDP is {len(sdp)} characters; an offer has at most {MAX_SDP_CHARS}")
    if not sdp.startswith("v=0"):
        raise ValueError("\"sdp\" is not an SDP offer (it must start with v=0); send pc.localDescription.sdp")
    session = body.get("session")
    if session is not None and (not isinstance(session, str) or not 0 < len(session) <= MAX_ID_CHARS):
        raise ValueError("\"session\" must be a session id from GET /api/sessions or a join link")
    prompt = body.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError("\"prompt\" must be a string")
        # A blank prompt means "the default", as leaving it out does.
        prompt = validate_prompt(prompt, max_prompt_chars) if prompt.strip() else None
    image = body.get("image")
    if image is not None and not (isinstance(image, str) and (image == "" or image.startswith("data:image/"))):
        raise ValueError("\"image\" must be a data URL such as data:image/png;base64,... (read the file with "
                         "FileReader.readAsDataURL)")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError("\"seed\" must be a non-negative integer below 2**63")
    return Offer(sdp=sdp, type="offer", session=session, prompt=prompt or None, image=image or None, seed=seed,
                 start=parse_start_settings(body, limits))


def parse_start_settings(body: dict[str, Any], limits: StartLimits = StartLimits()) -> StartSettings:
    """``steps``, ``cfg``, ``window`` and ``bucket`` of an offer body, each optional (null: the default)."""
    steps = _whole(body.get("steps"), "steps", 1, limits.max_steps)
    window = _whole(body.get("window"), "window", 1, limits.max_window)
    cfg = body.get("cfg")
    if cfg is not None:
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) \
                or not 1 <= cfg <= limits.max_cfg:
            raise ValueError(f"\"cfg\" must be a number from 1 (no real guidance) to {limits.max_cfg:g}")
        cfg = float(cfg)
    return StartSettings(steps=steps, cfg=cfg, window=window, bucket=_bucket(body.get("bucket")))


def _whole(value: object, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"\"{name}\" must be a whole number from {low} to {high} on this server")
    return value


def _bucket(value: object) -> tuple[int, int] | None:
    """"HxW" (e.g. "640x608") or [H, W] -> (H, W)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        h, sep, w = value.lower().partition("x")
        digits = sep and all(v.isascii() and v.isdigit() and len(v) <= 5 for v in (h, w))
        value = [int(h), int(w)] if digits else None
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 8192 for v in value)):
        raise ValueError("\"bucket\" must be a resolution as \"HxW\", e.g. \"640x608\" (GET /api/config lists "
                         "the model's)")
    return int(value[0]), int(value[1])
