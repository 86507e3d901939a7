#!/usr/bin/env python3
"""Runs a stock Synapse as a federation peer for Hearth's federation tests, with its name
resolution kept on loopback.

Synapse resolves federation names through the machine's resolver (SRV records through
twisted.names, host names through getaddrinfo). The tests must never query it, so before
Synapse starts this launcher:

- answers every SRV lookup with "no records" (as a domain without SRV records would), and
- resolves host names only from SYNAPSE_TEST_HOSTS ("name=ip,name=ip"), IP literals as
  themselves, and every other name to nothing (a lookup failure), never asking DNS.

Everything else is stock Synapse: `launch.py --config-path homeserver.yaml`.
"""

import ipaddress
import os

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostResolution, IHostnameResolver
from zope.interface import implementer

HOSTS = {}
for entry in filter(None, os.environ.get("SYNAPSE_TEST_HOSTS", "").split(",")):
    name, _, ip = entry.partition("=")
    HOSTS[name.strip().lower()] = ipaddress.ip_address(ip.strip())


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@implementer(IHostnameResolver)
class LoopbackHostsResolver:
    """Answers from HOSTS and IP literals only."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        if isinstance(hostName, bytes):
            hostName = hostName.decode("ascii")
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        try:
            ip = ipaddress.ip_address(hostName.strip("[]"))
        except ValueError:
            ip = HOSTS.get(hostName.lower().rstrip("."))
        if ip is not None:
            kind = IPv4Address if ip.version == 4 else IPv6Address
            receiver.addressResolved(kind("TCP" if transportSemantics == "TCP" else "UDP", str(ip), portNumber))
        receiver.resolutionComplete()
        return resolution


reactor.installNameResolver(LoopbackHostsResolver())

# Synapse installs its own getaddrinfo resolver at start (synapse/app/_base.py): have it
# install this one instead.
import synapse.app._base  # noqa: E402

synapse.app._base.GAIResolver = lambda *args, **kwargs: LoopbackHostsResolver()  # type: ignore[misc]

from synapse.http.federation.srv_resolver import SrvResolver  # noqa: E402


async def _no_srv_records(self, service_name):  # type: ignore[no-untyped-def]
    return []


SrvResolver.resolve_service = _no_srv_records  # type: ignore[method-assign]

from synapse.app.homeserver import main  # noqa: E402

main()
