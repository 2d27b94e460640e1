"""Offers checked before aiortc parses them: how many media sections, which remote ICE candidates.

aiortc builds a transceiver, an ICE gatherer and a DTLS transport for every media section of an offer, on the
event loop: 680 sections blocked every session for 2.6 s. And aioice sends connectivity checks to every
candidate it is given, whatever the address (0.0.0.0, broadcast, multicast, link-local, 169.254.169.254, or
``*.local`` names it resolves by multicast DNS). So an offer is read here first, as text, in one pass:

* at most :data:`MAX_MEDIA_SECTIONS` media sections (a viewer needs one video and one data channel; the
  margin covers clients that also offer audio or a second video), at most one of them a data channel;
* at most :data:`MAX_CANDIDATE_LINES` candidate lines in all (a browser sends a handful per section);
* every candidate must name a unicast address this server may talk to (:class:`CandidatePolicy`); the others
  are taken out of the SDP before aiortc sees it, and only the first :data:`MAX_CANDIDATES` distinct targets
  are kept. A client whose candidates are all dropped can still connect: its own checks reach the server,
  which learns its address from them (a peer-reflexive candidate).

Structural problems are a ValueError (400) with our own text; nothing aiortc says reaches the client.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

MAX_MEDIA_SECTIONS = 4
MAX_DATA_SECTIONS = 1
MAX_CANDIDATE_LINES = 64
MAX_CANDIDATES = 16  # distinct remote addresses (ip, port) an offer may have probed
_MDNS_NAME = re.compile(r"^[0-9A-Za-z-]{1,63}\.local$")  # browsers send <uuid>.local
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


@dataclass(frozen=True)
class CandidatePolicy:
    """Which remote candidates the server accepts.

    ``loopback``: the server listens on loopback only, so only loopback candidates can work (and no other
    address may be probed); otherwise loopback candidates are refused (a stranger must not make the server
    talk to its own local services). ``allow_mdns``: accept ``*.local`` names (aioice resolves them by
    multicast DNS on the server's network; off by default). ``max_candidates``: distinct targets kept.
    """

    loopback: bool = True
    allow_mdns: bool = False
    max_candidates: int = MAX_CANDIDATES

    def refuse(self, host: str) -> str | None:
        """Why a candidate naming ``host`` is refused, or None if it is accepted."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if _MDNS_NAME.match(host):
                return None if self.allow_mdns else "mdns"
            return "not an address"
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified or (address.version == 4 and address in _THIS_NETWORK):
            return "unspecified"
        if address.is_multicast:
            return "multicast"
        if address == _BROADCAST or (address.version == 4 and address.is_reserved):
            return "broadcast or reserved"
        if address.is_link_local:
            return "link-local"
        if address.is_loopback != self.loopback:
            return "loopback" if address.is_loopback else "not loopback"
        return None


@dataclass
class CheckedOffer:
    """The offer's SDP with refused candidates taken out, and what was taken out (reason -> count)."""

    sdp: str
    kept: int
    dropped: Counter = field(default_factory=Counter)


def check_offer(sdp: str, policy: CandidatePolicy) -> CheckedOffer:
    """Count media sections, filter candidate lines; ValueError (400) for an offer no viewer would send."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    media = [line for line in lines if line.startswith("m=")]
    if not media:
        raise ValueError("could not answer the offer: it has no media section; send the browser's "
                         "pc.localDescription (one video, one data channel)")
    if len(media) > MAX_MEDIA_SECTIONS:
        raise ValueError(f"the offer has {len(media)} media sections; a viewer needs one video and one data "
                         f"channel (at most {MAX_MEDIA_SECTIONS} sections are accepted)")
    if sum(line.startswith("m=application") for line in media) > MAX_DATA_SECTIONS:
        raise ValueError("the offer has more than one data channel section; a viewer needs one")
    candidate_lines = sum(line.startswith("a=candidate:") for line in lines)
    if candidate_lines > MAX_CANDIDATE_LINES:
        raise ValueError(f"the offer has {candidate_lines} ICE candidates; at most {MAX_CANDIDATE_LINES} are "
                         "accepted (a browser sends a handful)")
    kept_lines: list[str] = []
    targets: set[tuple[str, str]] = set()
    dropped: Counter = Counter()
    for line in lines:
        if line.startswith("a=candidate:"):
            target, reason = _read_candidate(line, policy)
            if reason is None and target not in targets and len(targets) >= policy.max_candidates:
                reason = "over the candidate limit"
            if reason is not None:
                dropped[reason] += 1
                continue
            targets.add(target)
        kept_lines.append(line)
    text = "\r\n".join(line.rstrip("\r") for line in kept_lines)
    return CheckedOffer(sdp=text if text.endswith("\r\n") else text + "\r\n", kept=len(targets), dropped=dropped)


def _read_candidate(line: str, policy: CandidatePolicy) -> tuple[tuple[str, str], str | None]:
    """((host, port), None) for an accepted candidate line, else (_, why it is refused).

    ``a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...``
    """
    parts = line[len("a=candidate:"):].split()
    if len(parts) < 8 or parts[6] != "typ":
        raise ValueError("the offer has a malformed a=candidate line; send the browser's offer unchanged")
    component, transport, priority, host, port, kind = parts[1], parts[2], parts[3], parts[4], parts[5], parts[7]
    if not (component.isdigit() and priority.isdigit() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("the offer has a malformed a=candidate line; send the browser's offer unchanged")
    if transport.lower() != "udp":
        return (host, port), "not udp"  # aioice speaks ICE over UDP only: a TCP candidate would be ignored
    if kind not in ("host", "srflx", "relay"):  # what aioice takes (peer-reflexive ones it finds itself)
        return (host, port), "unknown type"
    return (host.lower(), port), policy.refuse(host)
