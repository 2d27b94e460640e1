"""ICE on machines whose only network interface is loopback.

aioice never offers 127.0.0.1 as a host candidate, so on a machine with nothing but ``lo`` (containers, CI
sandboxes) neither the server nor a local client has a candidate and every connection fails. There the host
address lookup is patched to return 127.0.0.1 (Chromium then needs ``--allow-loopback-in-peer-connection``).
With any other interface up, nothing is changed: candidates use that local address as usual.
"""

from __future__ import annotations

import logging

import aioice.ice

log = logging.getLogger(__name__)

_MARK = "_framepack_loopback"  # set on the replacement, so installing twice is a no-op


def loopback_only() -> bool:
    """True when aioice finds no host address at all (only loopback interfaces)."""
    lookup = getattr(aioice.ice.get_host_addresses, "__wrapped__", aioice.ice.get_host_addresses)
    return not lookup(use_ipv4=True, use_ipv6=True)


def ensure_host_candidates(force: bool = False) -> bool:
    """Make aioice offer 127.0.0.1 when there is no other address (or always, with ``force``).

    Returns True if the loopback lookup is in effect. This patches the aioice module (process-wide): it is the
    one place aioice asks for addresses, and it takes no configuration for it.
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
