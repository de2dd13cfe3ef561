"""The separate-host test bed (``tests/netns.py``): hosts reach one another only over their link, and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flglm.network_hosts import NetworkHosts, available, namespaces_left

AVAILABLE, WHY = available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no network namespaces here: {WHY}")

_LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(1); print(s.getsockname()[1], flush=True)
s.settimeout(20); c, _ = s.accept(); c.sendall(c.recv(64).upper()); c.close()
"""

_CONNECT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.sendall(b"hello"); print(c.recv(64).decode())
except OSError as exc:
    print("refused:", type(exc).__name__)
"""


def _listen(host, address: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(host.command([sys.executable, "-c", _LISTEN, address]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _connect(host, address: str, port: int) -> str:
    out = subprocess.run(host.command([sys.executable, "-c", _CONNECT, address, str(port)]), capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.strip()


def test_two_hosts_talk_over_their_link() -> None:
    with NetworkHosts(["server", "client"]) as hosts:
        server, client = hosts["server"], hosts["client"]
        assert server.address != client.address
        listener, port = _listen(server, server.address)
        try:
            assert _connect(client, server.address, port) == "HELLO"
        finally:
            listener.kill()
            listener.wait(timeout=10)


def test_a_hosts_loopback_is_out_of_the_other_hosts_reach() -> None:
    """What a server binds to 127.0.0.1 on its host, a client host cannot reach (its 127.0.0.1 is its own)."""
    with NetworkHosts(["server", "client"]) as hosts:
        listener, port = _listen(hosts["server"], "127.0.0.1")
        try:
            assert _connect(hosts["client"], "127.0.0.1", port).startswith("refused")
            assert _connect(hosts["client"], hosts["server"].address, port).startswith("refused")
            assert _connect(hosts["server"], "127.0.0.1", port) == "HELLO"  # the host itself still reaches it
        finally:
            listener.kill()
            listener.wait(timeout=10)


def test_a_rate_limit_is_installed_on_both_ends_of_the_link() -> None:
    with NetworkHosts(["server", "client"], rate_mbit={"client": 100}) as hosts:
        shown = subprocess.run(hosts["client"].command(["tc", "qdisc", "show"]), capture_output=True, text=True, check=True).stdout
        assert "tbf" in shown and "100Mbit" in shown


def test_every_namespace_is_removed_on_exit_even_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), NetworkHosts(["a", "b", "c"]):
        assert len(namespaces_left()) == 4  # three hosts and the switch
        raise RuntimeError("inside")
    assert namespaces_left() == []


def test_bad_arguments_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="distinct"):
        NetworkHosts(["a", "a"])
    with pytest.raises(ValueError, match="not created"):
        NetworkHosts(["a"], rate_mbit={"b": 10})
