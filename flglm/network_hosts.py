"""Separate network hosts for tests and benchmarks: Linux network namespaces joined by veth pairs to one switch.

Each host is a namespace with its own loopback and one address on a private /24 that this
module creates (and removes); a switch namespace holds a bridge that every host's veth pair
plugs into, so hosts reach one another only through that link, and a listener on one host's
127.0.0.1 is out of every other host's reach. Hosts named in ``cluster`` also get a second
interface on a second /24 (a bridge of its own) that only they share: a server's own network.
``rate_mbit`` shapes a host's link with ``tbf`` (this kernel has no ``netem``, so no added delay).

Needs root and ``ip``; :func:`available` says whether namespaces can be made here, so a test
can skip with the reason. Names carry the process id, so parallel runs never collide, and
every namespace is deleted on exit from the context, on any path (deleting a namespace takes
its veth ends with it).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

_SUBNET_POOL = ipaddress.ip_network("10.200.0.0/16")


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def available() -> tuple[bool, str]:
    """(True, "") where this process may create network namespaces, else (False, why)."""
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    probe = f"flglm-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def _free_subnet(taken: Sequence[ipaddress.IPv4Network] = ()) -> ipaddress.IPv4Network:
    """A /24 of 10.200.0.0/16 that no route on this machine (nor ``taken``) already covers."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False).stdout
    used = set(taken)
    for line in routes.splitlines():
        token = line.split()[0] if line.split() else ""
        try:
            used.add(ipaddress.ip_network(token, strict=False))
        except ValueError:
            continue
    start = os.getpid() % 256
    for offset in range(256):
        candidate = list(_SUBNET_POOL.subnets(new_prefix=24))[(start + offset) % 256]
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise RuntimeError("no free /24 left in 10.200.0.0/16 for test hosts")


@dataclass(frozen=True)
class Host:
    """One test host: its namespace, its address on the test subnet and the interface that has it
    (and, for a host on the cluster network, its address there)."""

    name: str
    netns: str
    address: str
    interface: str
    cluster_address: str | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class NetworkHosts:
    """``with NetworkHosts(["server", "client0"]) as hosts: hosts["server"].address``.

    Args:
        names: the hosts to create, each with its own namespace and address.
        rate_mbit: per host name, a ``tbf`` rate limit (Mbit/s) on that host's link, both ways.
        cluster: hosts that also share a network of their own (``Host.cluster_address``).
    """

    def __init__(self, names: Sequence[str], *, rate_mbit: dict[str, float] | None = None, cluster: Sequence[str] = ()) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and at least one, got {list(names)}")
        self._names = list(names)
        self._rates = dict(rate_mbit or {})
        unknown = set(self._rates) - set(self._names)
        if unknown:
            raise ValueError(f"rate_mbit names hosts that are not created: {sorted(unknown)}")
        if set(cluster) - set(self._names):
            raise ValueError(f"cluster names hosts that are not created: {sorted(set(cluster) - set(self._names))}")
        self._cluster = [n for n in self._names if n in set(cluster)]
        tag = f"{os.getpid():x}"
        self._switch = f"flglm-sw-{tag}"
        self._namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._tag = tag

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _create(self) -> None:
        subnet = _free_subnet()
        addresses = list(subnet.hosts())
        _ip("netns", "add", self._switch)
        self._namespaces.append(self._switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self._switch)
        _ip("link", "set", "br0", "up", netns=self._switch)
        for index, name in enumerate(self._names):
            netns = f"flglm-{index}-{self._tag}"
            _ip("netns", "add", netns)
            self._namespaces.append(netns)
            _ip("link", "set", "lo", "up", netns=netns)
            inside, address = f"eth{index}", str(addresses[index + 1])
            self._plug(netns, inside, f"p{index}", "br0", f"{address}/{subnet.prefixlen}")
            self.hosts[name] = Host(name, netns, address, inside)
            if name in self._rates:
                self.set_rate(name, self._rates[name])
        if self._cluster:
            self._create_cluster(_free_subnet([subnet]))

    def _create_cluster(self, subnet: ipaddress.IPv4Network) -> None:
        addresses = list(subnet.hosts())
        _ip("link", "add", "br1", "type", "bridge", netns=self._switch)
        _ip("link", "set", "br1", "up", netns=self._switch)
        for index, name in enumerate(self._cluster):
            host, address = self.hosts[name], str(addresses[index + 1])
            self._plug(host.netns, f"c{index}", f"q{index}", "br1", f"{address}/{subnet.prefixlen}")
            self.hosts[name] = Host(host.name, host.netns, host.address, host.interface, address)

    def _plug(self, netns: str, inside: str, outside: str, bridge: str, cidr: str) -> None:
        """A veth pair from host ``netns`` (``inside``, given ``cidr``) to ``bridge`` on the switch (``outside``)."""
        _ip("link", "add", inside, "netns", netns, "type", "veth", "peer", "name", outside, "netns", self._switch)
        _ip("link", "set", outside, "master", bridge, netns=self._switch)
        _ip("link", "set", outside, "up", netns=self._switch)
        _ip("addr", "add", cidr, "dev", inside, netns=netns)
        _ip("link", "set", inside, "up", netns=netns)

    def set_rate(self, name: str, mbit: float) -> None:
        """Shape host ``name``'s link to ``mbit`` Mbit/s both ways from now on (a running federation too)."""
        index = self._names.index(name)
        for namespace, device in ((self.hosts[name].netns, self.hosts[name].interface), (self._switch, f"p{index}")):
            _tc_rate(namespace, device, mbit)

    def close(self) -> None:
        """Delete every namespace this object made (its veth pairs go with it)."""
        for netns in reversed(self._namespaces):
            _ip("netns", "del", netns, check=False)
        self._namespaces.clear()


def _tc_rate(netns: str, device: str, mbit: float) -> None:
    """Shape ``device``'s egress to ``mbit`` Mbit/s with a token bucket (burst: 1 ms of traffic, at least 32 KiB)."""
    burst = max(32 * 1024, int(mbit * 1e6 / 8 / 1000))
    cmd = ["ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
           "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def namespaces_left(tag_pid: int | None = None) -> list[str]:
    """The namespaces of this module still present (for a cleanup check)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    tag = f"{(tag_pid or os.getpid()):x}"
    return [line.split()[0] for line in listing.splitlines() if line.startswith("flglm-") and line.split()[0].endswith(tag)]
