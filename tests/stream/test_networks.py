"""Serving real networks: --ice-server (STUN, TURN with credentials from the environment), --public-ip,
--udp-ports, and ICE candidates that follow --host. A STUN server of our own on 127.0.0.1 stands in for a
real one: nothing leaves loopback (the public address is announced, never probed: the client refuses it)."""

from __future__ import annotations

import asyncio

import aiohttp
import aioice.ice
import pytest
from aioice import stun

from framepack_rt.stream import ice
from framepack_rt.stream.client import StreamClient


def test_flags_reach_the_settings(monkeypatch):
    from framepack_rt.commands.cli import build_parser
    from framepack_rt.stream.options import settings_kwargs
    from framepack_rt.stream.server import ServerSettings

    monkeypatch.setenv(ice.TURN_USERNAME_ENV, "turn-user")
    monkeypatch.setenv(ice.TURN_CREDENTIAL_ENV, "turn-secret-1234")
    args = build_parser().parse_args([
        "serve", "--ice-server", "stun:stun.example.org:3478", "--ice-server", "turn:turn.example.org?transport=tcp",
        "--public-ip", "203.0.113.7", "--udp-ports", "40000-40099", "--max-connections", "64",
        "--header-timeout", "5", "--max-sessions-per-client", "1", "--trusted-proxy", "10.0.0.5", "--log-level",
        "warning"])
    s = ServerSettings(**settings_kwargs(args))
    assert s.ice_servers == ["stun:stun.example.org:3478", "turn:turn.example.org?transport=tcp"]
    assert (s.turn_username, s.turn_credential) == ("turn-user", "turn-secret-1234")
    assert "turn-secret" not in repr(s)
    assert (s.public_ip, s.udp_ports, s.max_connections, s.header_timeout) == ("203.0.113.7", (40000, 40099), 64, 5)
    assert s.max_sessions_per_client == 1 and s.trusted_proxies == ("10.0.0.5",) and args.log_level == "warning"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ice_servers=["turn:turn.example.org"]), "FRAMEPACK_RT_TURN_USERNAME"),
    (dict(ice_servers=["http://stun.example.org"]), "--ice-server"),
    (dict(ice_servers=["stuns:stun.example.org"]), "--ice-server"),
    (dict(public_ip="my.host.example"), "--public-ip"), (dict(public_ip="0.0.0.0"), "--public-ip"),
    (dict(udp_ports=(50000, 40000)), "--udp-ports"), (dict(udp_ports=(80, 90)), "--udp-ports"),
    (dict(max_connections=0), "--max-connections"), (dict(header_timeout=0), "--header-timeout"),
    (dict(max_pending_per_client=0), "--max-pending-per-client"),
])
def test_bad_network_settings_are_refused_with_the_flag_named(kwargs, fragment):
    from framepack_rt.stream.server import ServerSettings

    with pytest.raises(ValueError, match=fragment):
        ServerSettings(**kwargs)


def test_turn_servers_get_the_credentials_and_stun_servers_none():
    servers = ice.ice_servers(["stun:stun.example.org", "turns:turn.example.org:443?transport=tcp"], "u", "p")
    assert servers[0].urls == "stun:stun.example.org" and servers[0].username is None
    assert (servers[1].username, servers[1].credential) == ("u", "p")
    assert ice.parse_port_range("40000-40009") == (40000, 40009)
    with pytest.raises(ValueError, match="MIN-MAX"):
        ice.parse_port_range("40000")


def test_candidates_follow_the_bound_address(monkeypatch):
    assert ice.host_addresses(["127.0.0.1"]) == ("127.0.0.1",) and ice.listens_on_loopback(["127.0.0.1", "::1"])
    assert ice.host_addresses(["192.0.2.9"]) == ("192.0.2.9",) and not ice.listens_on_loopback(["192.0.2.9"])
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["192.0.2.9"] if use_ipv4 else [])
    assert ice.host_addresses(["0.0.0.0"]) == ("192.0.2.9",)  # a wildcard: every interface
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [])
    assert ice.host_addresses(["0.0.0.0"]) == ("127.0.0.1",)  # nothing but loopback


class StunResponder(asyncio.DatagramProtocol):
    """A STUN server: answers each Binding request with the address it came from."""

    def __init__(self) -> None:
        self.requests = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = addr[:2]
        self.transport.sendto(bytes(response), addr)


def test_stun_public_ip_and_port_range_on_a_live_connection(run_with_server, synthetic_pipe, monkeypatch):
    sent: list[tuple[str, int]] = []
    original = aioice.ice.StunProtocol.send_stun
    monkeypatch.setattr(aioice.ice.StunProtocol, "send_stun",
                        lambda self, message, addr: (sent.append(tuple(addr[:2])), original(self, message, addr)))
    low = 47310  # ten ports above the usual ephemeral range's start; free ones are picked at random

    async def main():
        loop = asyncio.get_running_loop()
        transport, stun_server = await loop.create_datagram_endpoint(StunResponder, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            async def scenario(server, url):
                client = StreamClient(url)
                try:
                    await client.connect()
                    await client.wait_frames(10, timeout=20)
                    answer = client.pc.remoteDescription.sdp
                finally:
                    await client.close()
                async with aiohttp.ClientSession() as http, http.get(url + "api/config") as resp:
                    config = await resp.json()
                return answer, config

            from framepack_rt.stream.server import ServerSettings, StreamServer

            server = StreamServer(synthetic_pipe, ServerSettings(
                ice_servers=[f"stun:127.0.0.1:{port}"], public_ip="203.0.113.7", udp_ports=(low, low + 9)))
            url = await server.start("127.0.0.1", 0)
            try:
                answer, config = await asyncio.wait_for(scenario(server, url), 60)
            finally:
                await server.stop()
            return answer, config, stun_server.requests
        finally:
            transport.close()

    answer, config, stun_requests = asyncio.run(main())
    candidates = [line.split()[4:8] for line in answer.split("\r\n") if line.startswith("a=candidate:")]
    hosts = [(addr, int(p)) for addr, p, _, kind in candidates if kind == "host"]
    announced = [(addr, int(p)) for addr, p, _, kind in candidates if kind == "srflx"]
    print(f"\nanswer candidates: {candidates}; STUN requests {stun_requests}")
    assert hosts and all(addr == "127.0.0.1" and low <= p <= low + 9 for addr, p in hosts)  # --host, --udp-ports
    assert ("203.0.113.7", hosts[0][1]) in announced  # --public-ip: the same port at the public address
    assert stun_requests >= 1 and ("127.0.0.1", hosts[0][1]) in announced  # --ice-server: a STUN candidate
    assert config["ice_servers"] == [f"stun:127.0.0.1:{config['ice_servers'][0].split(':')[-1]}"]
    assert all(host == "127.0.0.1" for host, _ in sent), set(sent)  # 203.0.113.7 was never probed


def test_help_defaults_match_the_settings():
    """options.py quotes the connection defaults without importing aiohttp: they must be the real ones."""
    from framepack_rt.stream.connections import ConnectionLimits
    from framepack_rt.stream.options import CONNECTION_DEFAULTS

    limits = ConnectionLimits()
    assert CONNECTION_DEFAULTS == {"max_connections": limits.max_connections,
                                   "max_connections_per_client": limits.max_per_client,
                                   "header_timeout": limits.header_timeout, "body_timeout": limits.body_timeout,
                                   "keepalive_timeout": limits.keepalive_timeout}
