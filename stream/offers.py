"""The body of ``POST /offer``, checked field by field before anything is spent on it.

Every problem is a ValueError whose text tells the client what to send instead (answered with 400).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from framepack_rt.stream.control import load_json, validate_prompt

MAX_SDP_CHARS = 64 * 1024  # a browser's offer is 2-6 KB; a much larger "SDP" is not one
MAX_ID_CHARS = 64  # session ids are 22 base64url characters (128 bits)


@dataclass(frozen=True)
class Offer:
    """A well-formed offer: join ``session`` if set, else start a new one from the optional fields."""

    sdp: str
    type: str
    session: str | None = None
    prompt: str | None = None
    image: str | None = None  # a data URL, decoded later (off the event loop, within the image limits)
    seed: int = 0


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


def parse_offer(body: dict[str, Any], max_prompt_chars: int) -> Offer:
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
    return Offer(sdp=sdp, type="offer", session=session, prompt=prompt or None, image=image or None, seed=seed)
