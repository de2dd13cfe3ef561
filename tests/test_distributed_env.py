"""Reading the distributed environment: torchrun's, or a dynamic federation's set by hand."""

from __future__ import annotations

import pytest

from flglm.distributed import read_env

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
