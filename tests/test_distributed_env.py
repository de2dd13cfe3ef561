"""Reading the distributed environment: torchrun's, a dynamic federation's set by hand, or a sub-server's started on its own."""

from __future__ import annotations

import re

import pytest

from flglm.distributed import init_server_group, read_env, read_server_env

TORCHRUN = {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}


def test_torchrun_needs_all_of_its_variables() -> None:
    # Prepare / Execute / Assert
    env = read_env(TORCHRUN)
    assert (env.rank, env.world_size, env.local_world_size, env.dynamic) == (2, 3, 3, False)
    with pytest.raises(RuntimeError, match="not started by torchrun \\(missing LOCAL_WORLD_SIZE\\)"):
        read_env({k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"})


def test_a_dynamic_process_needs_rank_world_and_the_store_and_guesses_the_rest() -> None:
    # Prepare: only what a user sets by hand
    given = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "0"}

    # Execute
    env = read_env(given, dynamic=True)

    # Assert: every process of the federation is counted as local (the safe guess for threads)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 4, 1, 4)
    assert (env.master_addr, env.master_port, env.dynamic) == ("10.0.0.1", 0, True)
    with pytest.raises(RuntimeError, match="federation.membership=dynamic: set MASTER_PORT"):
        read_env({k: v for k, v in given.items() if k != "MASTER_PORT"}, dynamic=True)


def test_a_variable_that_is_not_a_number_is_named() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}
    with pytest.raises(RuntimeError, match="MASTER_PORT=''"):
        read_env(env, dynamic=True)


def test_a_sub_server_started_on_its_own_takes_its_index_and_the_cluster_address() -> None:
    # Execute
    env = read_server_env({}, sub_server=1, cluster="10.1.0.1:29500", sub_servers=2)

    # Assert: its own rank in the sub-servers' group, sub-server 0's store address; not torchrun's
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.agent_store) == (1, 2, "10.1.0.1", 29500, False)
    assert read_env({**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"}).agent_store


@pytest.mark.parametrize(
    ("environ", "sub_server", "cluster", "expected"),
    [
        ({}, 1, None, "needs both --sub-server I and --cluster HOST:PORT"),
        ({}, 2, "10.1.0.1:29500", "--sub-server 2 is not one of server.sub_servers=2"),
        ({}, 0, "10.1.0.1", "--cluster '10.1.0.1' is not HOST:PORT"),
        ({}, 0, "10.1.0.1:0", "is not HOST:PORT"),
        (TORCHRUN, 0, "10.1.0.1:29500", "not under torchrun"),
    ],
)
def test_a_sub_server_started_on_its_own_names_what_is_wrong(environ: dict, sub_server: int, cluster: str | None, expected: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        read_server_env(environ, sub_server=sub_server, cluster=cluster, sub_servers=2)


def test_sub_server_zero_says_where_it_cannot_host_the_store() -> None:
    # Prepare: an address of no interface of this machine (TEST-NET-1, never routed to)
    env = read_server_env({}, sub_server=0, cluster="192.0.2.1:29500", sub_servers=2)

    # Execute / Assert
    with pytest.raises(RuntimeError, match=re.escape("--cluster 192.0.2.1:29500: sub-server 0 cannot listen there")):
        init_server_group(env, index=0, size=2, startup_timeout_s=1, timeout_s=1)
