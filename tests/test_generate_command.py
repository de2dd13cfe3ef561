"""``flglm generate``: a real two-process job (encryption on) on saved parts: torchrun over torch
RPC, or each side on its own over the socket link (``--serve`` / ``--server HOST:PORT``).

The run directory is made by hand (saved tokenizer, trained-looking LoRA adapters on both
sides, keys), so the test needs no training run; the tokens must equal Hugging Face's
``generate`` on a whole model holding the same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flglm.config import load_config
from flglm.data.loading import build_tokenizer
from flglm.jobs.edge_link import published_address
from flglm.models import ClientBlocks, MiddleStack, build_full_model
from flglm.models.split import plan_for
from flglm.run_layout import client_weights_path, generation_edge_path, middle_weights_path
from flglm.tensor_files import save_tensors
from tests.conftest import TINY_MODEL_CONFIGS
from tests.test_federation import write_config


def _perturb_adapters(model: torch.nn.Module, seed: int) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + len(name))) * 0.3)


def _generate_over_the_socket_link(cmd: list[str], overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess[str]:
    """The server side on its own (``--serve``), then the client on its own at its published address."""
    socket = [*overrides, "link.transport=socket"]
    server = subprocess.Popen([*cmd, "--serve", *socket], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            address = published_address(generation_edge_path(run_dir), timeout_s=120, alive=lambda: server.poll() is None)
        except TimeoutError as err:
            server.kill()
            pytest.fail(f"{err}\n{server.communicate()[0][-4000:]}")
        client = subprocess.run([*cmd, f"--server={address[0]}:{address[1]}", *socket], check=False, capture_output=True, text=True, timeout=300)
        server_out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, server_out[-4000:] + client.stdout[-2000:] + client.stderr[-2000:]
    return client


@pytest.mark.multiprocess
@pytest.mark.parametrize("transport", ["rpc", "socket"])
def test_generate_command_matches_the_whole_model(tmp_path: Path, transport: str) -> None:
    model = {**TINY_MODEL_CONFIGS["llama"], "vocab_size": 256, "initializer_range": 0.2}
    config = write_config(tmp_path, model={"config": model}, peft={"method": "lora", "lora_r": 4})
    cfg = load_config(config, [f"run_dir={tmp_path / 'run'}", "generation.max_new_tokens=12"])
    tokenizer = build_tokenizer(cfg, save=True)
    plan = plan_for(cfg.model, cfg.split)
    blocks, middle = ClientBlocks(cfg.model, plan, cfg.peft), MiddleStack(cfg.model, plan, cfg.peft)
    _perturb_adapters(blocks.hf, 1)
    _perturb_adapters(middle.hf, 2)
    save_tensors(blocks.hf_state_dict(), client_weights_path(cfg.run_dir, 0))
    save_tensors(middle.hf_state_dict(), middle_weights_path(cfg.run_dir))

    prompts = ["this movie was great", "bad"]
    cmd = [sys.executable, "-m", "flglm.cli", "generate", "--config", str(config), "--timeout", "240"]
    cmd += [arg for p in prompts for arg in ("--prompt", p)]
    overrides = [f"run_dir={tmp_path / 'run'}", "generation.max_new_tokens=12"]
    if transport == "rpc":
        done = subprocess.run([*cmd, *overrides], check=False, capture_output=True, text=True, timeout=300)
    else:
        done = _generate_over_the_socket_link(cmd, overrides, tmp_path / "run")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads((tmp_path / "run" / "generate" / "generations.json").read_text())
    assert [r["prompt"] for r in rows] == prompts

    full = build_full_model(cfg.model, cfg.peft)
    full.load_state_dict({**blocks.hf.state_dict(), **middle.hf.state_dict()})
    full.eval()
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        reference = full.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        expected = reference[0, ids.shape[1] :].tolist()
        assert row["token_ids"] == expected[: len(row["token_ids"])] and len(row["token_ids"]) > 3, (row, expected)
        assert row["generated"] == tokenizer.decode(row["token_ids"], skip_special_tokens=True)
    assert f"{prompts[0]}\n  -> {rows[0]['generated']}" in done.stdout
    server_log = (tmp_path / "run" / "logs" / "generate-server.log").read_text()
    assert "'decode_sessions_opened': 1" in server_log and "client 0 left" in server_log
    served = json.loads((tmp_path / "run" / "generate" / "server-summary.json").read_text())
    assert served["server"]["decode_sessions_opened"] == 1
    if transport == "socket":  # the server listened on its edge only, and the client proved its key there
        assert "edge listening on 127.0.0.1" in server_log and "init_rpc" not in server_log
        assert served["edge"]["proven_connections"] >= 1 and served["edge"]["malformed_frames"] == 0
    else:
        assert "edge" not in served


def test_generate_command_names_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flglm.cli import main

    config = write_config(tmp_path)
    code = main(["generate", "--config", str(config), "--prompt", "hello", f"run_dir={tmp_path / 'nothing'}"])
    assert code == 2
    assert f"no trained weights at {tmp_path / 'nothing' / 'server' / 'middle.safetensors'}" in capsys.readouterr().err
    assert main(["generate", "--config", str(config), "--base"]) == 2
    assert "at least one non-empty --prompt" in capsys.readouterr().err
    assert main(["generate", "--config", str(config), "--base", "--serve"]) == 2  # one side alone: the socket link only
    assert "give link.transport=socket" in capsys.readouterr().err
    assert main(["generate", "--config", str(config), "--base", "--prompt", "hi", "--server", "nowhere", "link.transport=socket"]) == 2
    assert "--server must be HOST:PORT" in capsys.readouterr().err
