"""Roles from ranks: one server or S sub-servers first, then the clients, each with its sub-server."""

from __future__ import annotations

import pytest

from flglm.roles import clients_of, edge_server_role, role_for_rank


def test_one_server_then_clients() -> None:
    roles = [role_for_rank(r, 3, num_clients=2) for r in range(3)]

    assert [r.worker_name for r in roles] == ["server", "client0", "client1"]
    assert roles[0].is_coordinator and all(r.server_name == "server" for r in roles)


def test_sub_servers_come_first_and_clients_are_dealt_round_robin() -> None:
    roles = [role_for_rank(r, 6, num_clients=4, sub_servers=2) for r in range(6)]

    assert [r.worker_name for r in roles] == ["server", "server1", "client0", "client1", "client2", "client3"]
    assert [r.server_name for r in roles[2:]] == ["server", "server1", "server", "server1"]
    assert [r.is_coordinator for r in roles[:2]] == [True, False]
    assert clients_of(0, num_clients=4, sub_servers=2) == [0, 2]
    assert clients_of(1, num_clients=4, sub_servers=2) == [1, 3]


def test_a_world_of_the_wrong_size_names_what_it_needs() -> None:
    with pytest.raises(ValueError, match="needs 6 processes \\(2 sub-servers \\+ 4 clients\\), torchrun started 5"):
        role_for_rank(0, 5, num_clients=4, sub_servers=2)


def test_a_socket_link_server_world_is_its_sub_servers_only() -> None:
    assert edge_server_role(0, 1).worker_name == "server"
    role = edge_server_role(1, 2, sub_servers=2)
    assert (role.server_index, role.sub_servers, role.is_coordinator) == (1, 2, False)
    with pytest.raises(ValueError, match="server.sub_servers=2 processes under torchrun, got rank 0 of 3"):
        edge_server_role(0, 3, sub_servers=2)
    with pytest.raises(ValueError, match="one process"):
        edge_server_role(0, 2)
