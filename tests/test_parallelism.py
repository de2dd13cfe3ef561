"""``server.parallelism=auto`` and the hierarchical config rules."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from flglm.config import ConfigError, load_config
from flglm.server.serving.parallelism import choose_parallelism, training_bytes

REQUIRED = ("data.train_path=train.tsv", "model.config={model_type: llama, vocab_size: 128}", "federation.num_clients=4")
MIDDLE = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4)
GIB = 2**30


def _choose(*overrides: str, free: int) -> tuple[str, str]:
    cfg = load_config(None, [*REQUIRED, *overrides])
    choice = choose_parallelism(cfg, MIDDLE, trainable=10**6, layers=2, free_bytes=free, where="cuda:0")
    return choice.mode, choice.reason


def test_auto_picks_client_batching_when_the_gathered_batch_fits() -> None:
    mode, reason = _choose("server.parallelism=auto", free=8 * GIB)

    assert mode == "client_batching"
    assert "8 clients x 16 x 64 tokens" in reason and "MiB" in reason and "free on cuda:0" in reason


def test_auto_falls_back_to_sequential_when_memory_is_short() -> None:
    mode, reason = _choose("server.parallelism=auto", free=20 * 2**20)

    assert mode == "sequential" and "one client at a time" in reason


def test_auto_picks_hierarchical_with_several_server_processes() -> None:
    mode, reason = _choose("server.parallelism=auto", "server.sub_servers=2", "crypto.secure_aggregation=false", free=8 * GIB)

    assert mode == "hierarchical" and "sub_servers=2" in reason


def test_an_explicit_mode_is_kept() -> None:
    assert _choose("server.parallelism=sequential", free=8 * GIB)[0] == "sequential"


def test_memory_estimate_grows_with_the_batch() -> None:
    small = training_bytes(trainable=10, layers=2, hidden=64, intermediate=128, heads=4, tokens=100, seq_len=10)
    large = training_bytes(trainable=10, layers=2, hidden=64, intermediate=128, heads=4, tokens=200, seq_len=10)
    assert large - small == small - 120  # linear in tokens; 120 bytes of gradients and AdamW moments


def test_free_memory_is_read_on_the_servers_device() -> None:
    import torch

    from flglm.server.serving.parallelism import free_memory_bytes

    assert free_memory_bytes(torch.device("cpu")) > 0
    if torch.cuda.is_available():
        assert free_memory_bytes(torch.device("cuda", 0)) == torch.cuda.mem_get_info(0)[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["server.sub_servers=2"], "server.sub_servers=2 needs server.parallelism=hierarchical"),
        (["server.parallelism=hierarchical", "server.sub_servers=5", "crypto.secure_aggregation=false"], "more than federation.num_clients=4"),
        (["server.parallelism=hierarchical", "server.sync_every=0"], "server.sync_every must be >= 1"),
        (["server.sub_servers=0"], "server.sub_servers must be >= 1"),
    ],
)
def test_bad_hierarchical_settings_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(".", "\\.")):
        load_config(None, [*REQUIRED, *overrides])


def test_a_server_refuses_a_client_it_does_not_serve(tiny_model_configs: dict, make_run_config) -> None:
    from flglm.config import fingerprint
    from flglm.server.middle_server import MiddleServer

    cfg = make_run_config(tiny_model_configs["llama"], "federation.num_clients=4")
    server = MiddleServer(cfg, clients=[0, 2])
    try:
        server.hello(2, fingerprint(cfg), "tok")
        with pytest.raises(ValueError, match=r"client 1 is not served by this server \(it serves clients \[0, 2\]\)"):
            server.hello(1, fingerprint(cfg), "tok")
    finally:
        server.close()


def test_a_server_needs_a_resolved_mode(tiny_model_configs: dict, make_run_config) -> None:
    from flglm.server.middle_server import MiddleServer

    with pytest.raises(ValueError, match="resolved parallelism"):
        MiddleServer(make_run_config(tiny_model_configs["llama"], "server.parallelism=auto"))
