"""Run directories (issue 18): a start on a finished run is refused without touching a byte,
``resume``/``overwrite`` do what they say, a federation's first error is reported once, a
failed ``flglm generate`` reports only its own attempt, and missing-key advice works.

Multi-process behaviour uses real torchrun'd federations (``run_federation``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flglm.cli import keygen_main, main
from flglm.crypto.keyring import MissingKeyError, generate_key_set, load_client_keys
from flglm.jobs.subprocesses import FederationFailed, describe_logs, log_sizes, run_federation
from tests.test_federation import write_config

FINISHED_MARK = "holds a finished run"


def hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path -> sha256)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture
def finished_run(finished_one_client_run: tuple[Path, Path]) -> tuple[Path, Path]:
    """A real finished 1-client federation (the session's): its config and its run_dir (copy it before a start on it)."""
    config, run_dir = finished_one_client_run
    for part in ("summary.json", "config.yaml", "client0/logs/metrics.csv", "logs/server.log", "client0/client_blocks.safetensors"):
        assert (run_dir / part).is_file(), part
    return config, run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.multiprocess
def test_a_failed_start_on_a_finished_run_changes_no_byte_of_it(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: a start that would fail anyway (no training file), on the finished run's directory.
    config, original = finished_run
    run_dir = _copy(original, tmp_path)
    before = hashes(run_dir)
    missing = tmp_path / "nowhere" / "train.tsv"

    # Execute
    with pytest.raises(FederationFailed) as failure:
        run_federation(config, [f"data.train_path={missing}"], num_clients=1, run_dir=run_dir, timeout_s=120)

    # Assert: refused, said once, with the ways out, and every file is as it was (and no new one).
    message = str(failure.value)
    assert message.count(FINISHED_MARK) == 1, message
    assert "resume=true" in message and "overwrite=true" in message
    assert hashes(run_dir) == before


@pytest.mark.multiprocess
def test_overwrite_moves_the_finished_run_aside_whole(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    config, original = finished_run
    run_dir = _copy(original, tmp_path)
    before = hashes(run_dir)
    missing = tmp_path / "nowhere" / "train.tsv"

    with pytest.raises(FederationFailed) as failure:
        run_federation(config, ["overwrite=true", f"data.train_path={missing}"], num_clients=1, run_dir=run_dir, timeout_s=120)

    # The new attempt ran (and failed on its own error) in a fresh run_dir; the old run is intact beside it.
    assert str(missing) in str(failure.value) and FINISHED_MARK not in str(failure.value)
    moved = list(tmp_path.glob("run.old-*"))
    assert len(moved) == 1 and hashes(moved[0]) == before
    assert not (run_dir / "summary.json").exists() and not (run_dir / "config.yaml").exists()


@pytest.mark.multiprocess
def test_resume_may_start_on_a_finished_run_and_a_failed_start_keeps_its_results(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    config, original = finished_run
    run_dir = _copy(original, tmp_path)
    before = hashes(run_dir)
    missing = tmp_path / "nowhere" / "train.tsv"

    with pytest.raises(FederationFailed) as failure:
        run_federation(config, ["resume=true", f"data.train_path={missing}"], num_clients=1, run_dir=run_dir, timeout_s=120)

    # Not refused: it failed on its own input. Only logs changed (appended, the old lines kept).
    message = str(failure.value)
    assert FINISHED_MARK not in message and str(missing) in message
    after = hashes(run_dir)
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed <= {"logs/server.log", "logs/client0.log"}, changed
    assert set(after) - set(before) == {"logs/client0.error.json"}
    old_log = (original / "logs" / "client0.log").read_text()
    assert (run_dir / "logs" / "client0.log").read_text().startswith(old_log)


@pytest.mark.multiprocess
def test_a_federation_reports_its_first_error_once_naming_the_process(tmp_path: Path) -> None:
    # Prepare: client 0's private key is missing (its public key is with the server).
    config = write_config(tmp_path)
    (tmp_path / "keys" / "client0.key").unlink()

    with pytest.raises(FederationFailed) as failure:
        run_federation(config, num_clients=1, run_dir=tmp_path / "run", timeout_s=120)

    message = str(failure.value)
    cause = f"client0 (rank 1): MissingKeyError: key file {tmp_path / 'keys' / 'client0.key'} not found"
    assert message.startswith(cause), message
    assert message.count("client0.key not found") == 1 and "Traceback" not in message
    log = (tmp_path / "run" / "logs" / "client0.log").read_text()
    assert "Traceback" in log and "MissingKeyError" in log  # the traceback is in the process's log


@pytest.mark.multiprocess
def test_generate_reports_only_its_own_attempt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the run_dir holds an earlier attempt's logs and error; this attempt has no keys.
    config = write_config(tmp_path)
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    for name in ("generate-client0.log", "generate-server.log", "client0.log"):
        (logs / name).write_text("STALE line of an earlier attempt\n")
    stale = {"process": "generate-server", "rank": 0, "kind": "ValueError", "message": "STALE error", "time": 1.0}
    (logs / "generate-server.error.json").write_text(json.dumps(stale))
    empty_keys = tmp_path / "nokeys"

    code = main([
        "generate", "--config", str(config), "--base", "--prompt", "hi", "--timeout", "120",
        f"run_dir={tmp_path / 'run'}", f"crypto.key_dir={empty_keys}",
    ])  # fmt: skip

    err = capsys.readouterr().err
    report = err[err.index("flglm: error:") :]
    assert code == 1
    assert "MissingKeyError" in report and "STALE" not in report, report
    assert report.count("not found") == 1


def test_describe_logs_since_shows_only_what_the_attempt_appended(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "server.log").write_text("old line\n")
    (logs / "client0.log").write_text("old client line\n")
    since = log_sizes(tmp_path)
    with (logs / "server.log").open("a") as handle:
        handle.write("new line\n")
    (logs / "client1.log").write_text("a new process\n")

    text = describe_logs(tmp_path, "", since=since)

    assert "new line" in text and "a new process" in text
    assert "old" not in text and "client0.log" not in text


def test_missing_key_advice_into_an_empty_key_dir_is_the_whole_set(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with pytest.raises(MissingKeyError) as missing:
        load_client_keys(keys, 0, 2)
    assert f"`flglm keygen --dir {keys} --clients 2`" in str(missing.value)

    assert keygen_main(["--dir", str(keys), "--clients", "2"]) == 0
    load_client_keys(keys, 1, 2)


def test_missing_key_advice_beside_other_keys_is_that_one_key(tmp_path: Path) -> None:
    # Prepare: a set for 2 clients, client 1's identity gone (both files).
    keys = tmp_path / "keys"
    generate_key_set(keys, 2)
    (keys / "client1.key").unlink()
    (keys / "client1.pub").unlink()

    with pytest.raises(MissingKeyError) as missing:
        load_client_keys(keys, 1, 2)

    advice = str(missing.value)
    assert f"`flglm keygen --out {keys / 'client1.key'}`" in advice and "--dir" not in advice
    assert keygen_main(["--out", str(keys / "client1.key")]) == 0  # the advised command works
    load_client_keys(keys, 1, 2)


def test_missing_private_key_beside_its_public_key_advises_a_command_that_works(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_key_set(keys, 2)
    (keys / "client1.key").unlink()

    with pytest.raises(MissingKeyError) as missing:
        load_client_keys(keys, 1, 2)

    advice = str(missing.value)
    assert f"`rm {keys / 'client1.pub'} && flglm keygen --out {keys / 'client1.key'}`" in advice
    assert keygen_main(["--out", str(keys / "client1.key")]) == 2  # without the rm, keygen refuses (never overwrites)
    (keys / "client1.pub").unlink()
    assert keygen_main(["--out", str(keys / "client1.key")]) == 0
    load_client_keys(keys, 1, 2)
