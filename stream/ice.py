"""ICE for the server: which local addresses and ports it offers, which remote candidates it probes, and the
STUN/TURN servers it uses (``--ice-server``, ``--public-ip``, ``--udp-ports``).

aioice takes none of these as arguments: it gathers on every interface (``get_host_addresses``), binds
ephemeral ports, and probes whatever candidates it is given. So :func:`install` replaces the ``Connection``
class that aiortc instantiates with :class:`PolicyConnection`, which reads an :class:`IcePolicy` from a
context variable when it is created. The server sets the policy around the calls that create and gather a
viewer's peer connection (:func:`policy_scope`); connections made outside such a scope (a Python client in
the same process) behave exactly as aioice's own. A context variable, not a module setting, because one
process may hold servers and clients with different policies (the tests do).

Without a policy, a machine whose only interface is loopback still needs a candidate:
:func:`ensure_host_candidates` makes aioice offer 127.0.0.1 there (Chromium then needs
``--allow-loopback-in-peer-connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import socket
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import aioice.ice
import aiortc.rtcicetransport
from aioice import Candidate
from aiortc import RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

from framepack_rt.stream.candidates import CandidatePolicy

log = logging.getLogger(__name__)

_MARK = "_framepack_loopback"  # set on the replacement, so installing twice is a no-op
TURN_USERNAME_ENV = "FRAMEPACK_RT_TURN_USERNAME"
TURN_CREDENTIAL_ENV = "FRAMEPACK_RT_TURN_CREDENTIAL"


@dataclass(frozen=True)
class IcePolicy:
    """How one side gathers and probes. ``addresses``: local addresses for host candidates (empty: every
    interface, as aioice does). ``ports``: (low, high) inclusive UDP port range, None: ephemeral ports.
    ``public_ip``: also announce each host candidate's port at this address (a 1:1 NAT, e.g. a cloud VM's
    public IP), as a server-reflexive candidate. ``remote``: which remote candidates may be probed."""

    addresses: tuple[str, ...] = ()
    ports: tuple[int, int] | None = None
    public_ip: str | None = None
    remote: CandidatePolicy = field(default_factory=CandidatePolicy)


_POLICY: ContextVar[IcePolicy | None] = ContextVar("framepack_rt_ice_policy", default=None)


@contextlib.contextmanager
def policy_scope(policy: IcePolicy | None) -> Iterator[None]:
    """Peer connections created (and gathered) inside this block follow ``policy``."""
    install()
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


class PolicyConnection(aioice.Connection):
    """aioice's Connection that follows the :class:`IcePolicy` in effect when it was created."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = _POLICY.get()
        self.refused = 0  # remote candidates refused by the policy (also counted by the offer check)
        self._targets: set[tuple[str, int]] = set()

    async def add_remote_candidate(self, remote_candidate: Candidate | None) -> None:
        """The last word on what is probed: the offer check filtered the SDP, this covers every other path."""
        policy = self.policy
        if policy is not None and remote_candidate is not None:
            target = (remote_candidate.host.lower(), remote_candidate.port)
            refused = policy.remote.refuse(remote_candidate.host)
            if refused is None and target not in self._targets and len(self._targets) >= policy.remote.max_candidates:
                refused = "over the candidate limit"
            if refused is not None:
                self.refused += 1
                log.debug("remote candidate refused (%s)", refused)
                return
            self._targets.add(target)
        await super().add_remote_candidate(remote_candidate)

    async def get_component_candidates(self, component: int, addresses: list[str],
                                       timeout: int = 5) -> list[Candidate]:
        policy = self.policy
        if policy is None:
            return await super().get_component_candidates(component, addresses, timeout)
        addresses = list(policy.addresses) or addresses or ["127.0.0.1"]
        if policy.ports is None:
            candidates = await super().get_component_candidates(component, addresses, timeout)
        else:
            candidates = await self._gather_in_range(component, addresses, policy.ports, timeout)
        if policy.public_ip:
            candidates += [_announced(c, policy.public_ip) for c in candidates
                           if c.type == "host" and _family(c.host) == _family(policy.public_ip)]
        return candidates

    async def _gather_in_range(self, component: int, addresses: list[str], ports: tuple[int, int],
                               timeout: int) -> list[Candidate]:
        """aioice's host gathering, with the sockets bound in ``ports``; STUN and TURN as aioice does them."""
        loop = asyncio.get_running_loop()
        candidates: list[Candidate] = []
        protocols = []
        for address in addresses:
            sock = bind_udp_in_range(address, ports)
            if sock is None:
                log.warning("no free UDP port in %d-%d on %s: a viewer could not get a candidate there; widen "
                            "--udp-ports", ports[0], ports[1], address)
                continue
            _, protocol = await loop.create_datagram_endpoint(lambda: aioice.ice.StunProtocol(self), sock=sock)
            host, port = sock.getsockname()[:2]
            protocol.local_candidate = Candidate(
                foundation=aioice.ice.candidate_foundation("host", "udp", host), component=component,
                transport="udp", priority=aioice.ice.candidate_priority(component, "host"), host=host, port=port,
                type="host")
            protocols.append(protocol)
            candidates.append(protocol.local_candidate)
        self._protocols += protocols
        tasks = []
        if self.stun_server:
            tasks += [asyncio.ensure_future(aioice.ice.server_reflexive_candidate(p, self.stun_server))
                      for p in protocols if _family(p.local_candidate.host) == 4]
        # The TURN allocation (if any) is aioice's own code: host gathering with no addresses does only that.
        relayed = asyncio.ensure_future(super().get_component_candidates(component, [], timeout))
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            candidates += [t.result()[0] for t in done if t.exception() is None]
            for task in pending:
                task.cancel()
        return candidates + await relayed


def bind_udp_in_range(address: str, ports: tuple[int, int]) -> socket.socket | None:
    """A UDP socket bound to ``address`` on a free port in ``ports`` (tried from a random start), or None."""
    low, high = ports
    family = socket.AF_INET6 if _family(address) == 6 else socket.AF_INET
    start = random.randint(low, high)
    for port in [*range(start, high + 1), *range(low, start)]:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((address, port))
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, aioice.turn.UDP_SOCKET_BUFFER_SIZE)
        return sock
    return None


def _announced(host: Candidate, public_ip: str) -> Candidate:
    """``host``'s port at the public address: what a 1:1 NAT forwards to it."""
    return Candidate(foundation=aioice.ice.candidate_foundation("srflx", "udp", host.host), component=host.component,
                     transport="udp", priority=aioice.ice.candidate_priority(host.component, "srflx"),
                     host=public_ip, port=host.port, type="srflx", related_address=host.host, related_port=host.port)


def _family(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


def install() -> None:
    """Make aiortc create :class:`PolicyConnection` (process-wide, idempotent; no policy: aioice's behaviour)."""
    if aiortc.rtcicetransport.Connection is not PolicyConnection:
        aiortc.rtcicetransport.Connection = PolicyConnection


# -- the server's policy from its flags ----------------------------------------------------------------------

def host_addresses(bound: list[str]) -> tuple[str, ...]:
    """Local addresses for host candidates, from the addresses the HTTP server is bound to: candidates follow
    ``--host``. A wildcard means every interface (aioice's lookup), or 127.0.0.1 where there is none."""
    addresses: list[str] = []
    for host in bound:
        if host in ("0.0.0.0", "::"):
            found = _host_lookup()(use_ipv4=True, use_ipv6=host == "::")
            addresses += found or ["127.0.0.1"]
        else:
            addresses.append(host)
    return tuple(dict.fromkeys(addresses))


def listens_on_loopback(bound: list[str]) -> bool:
    return all(_is_loopback(host) for host in bound)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_port_range(text: str) -> tuple[int, int]:
    """``"MIN-MAX"`` -> (MIN, MAX); ValueError saying what to write."""
    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--udp-ports {text!r}: write MIN-MAX, e.g. 40000-40099")
    ports = int(low), int(high)
    if not 1024 <= ports[0] <= ports[1] <= 65535:
        raise ValueError(f"--udp-ports {text}: need 1024 <= MIN <= MAX <= 65535")
    return ports


def parse_public_ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"--public-ip {text!r}: give an IP address (not a name), e.g. 203.0.113.7") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ValueError(f"--public-ip {text}: must be the unicast address clients reach this machine at")
    return str(address)


def ice_servers(urls: list[str], username: str | None, credential: str | None) -> list[RTCIceServer]:
    """``--ice-server`` URLs as aiortc's RTCIceServer list. TURN URLs get the credentials (from
    FRAMEPACK_RT_TURN_USERNAME / FRAMEPACK_RT_TURN_CREDENTIAL); ValueError for a URL aiortc cannot use."""
    servers, kinds = [], []
    for url in urls:
        try:
            parsed = parse_stun_turn_uri(url)
        except ValueError as exc:
            raise ValueError(f"--ice-server {url!r}: {exc}; write e.g. stun:stun.example.org:3478 or "
                             "turn:turn.example.org:3478?transport=udp") from None
        scheme = parsed["scheme"]
        if scheme not in ("stun", "turn", "turns"):
            raise ValueError(f"--ice-server {url!r}: aiortc supports stun:, turn: and turns: URLs")
        if scheme.startswith("turn"):
            if not username or not credential:
                raise ValueError(f"--ice-server {url}: a TURN server needs credentials; set {TURN_USERNAME_ENV} "
                                 f"and {TURN_CREDENTIAL_ENV}")
            servers.append(RTCIceServer(urls=url, username=username, credential=credential))
        else:
            servers.append(RTCIceServer(urls=url))
        kinds.append("stun" if scheme == "stun" else "turn")
    for kind in ("stun", "turn"):
        if kinds.count(kind) > 1:
            log.warning("aiortc uses only the first %s server given; the others are ignored", kind.upper())
    return servers


def turn_credentials_from_env() -> tuple[str | None, str | None]:
    return os.environ.get(TURN_USERNAME_ENV) or None, os.environ.get(TURN_CREDENTIAL_ENV) or None


# -- machines with nothing but loopback (no policy in effect) ------------------------------------------------

def _host_lookup():
    return getattr(aioice.ice.get_host_addresses, "__wrapped__", aioice.ice.get_host_addresses)


def loopback_only() -> bool:
    """True when aioice finds no host address at all (only loopback interfaces)."""
    return not _host_lookup()(use_ipv4=True, use_ipv6=True)


def ensure_host_candidates(force: bool = False) -> bool:
    """Make aioice offer 127.0.0.1 when there is no other address (or always, with ``force``).

    Returns True if the loopback lookup is in effect. This patches the aioice module (process-wide): it is the
    one place aioice asks for addresses when no :class:`IcePolicy` says which.
    """
    current = aioice.ice.get_host_addresses
    if getattr(current, _MARK, False):
        return True
    if not force and not loopback_only():
        return False

    def loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    loopback_addresses.__wrapped__ = current  # type: ignore[attr-defined]
    setattr(loopback_addresses, _MARK, True)
    aioice.ice.get_host_addresses = loopback_addresses
    log.info("no network interface besides loopback: ICE host candidates use 127.0.0.1")
    return True
