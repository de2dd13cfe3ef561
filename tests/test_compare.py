"""``flglm compare``: finished runs' final metrics in one table, the ratio to the reference, the loss curves.

The run directories are written here as the jobs write them (``summary.json`` by the server,
``metrics.json`` by each client and by a centralized run), so no training is needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flglm.cli import main as flglm_main
from flglm.jobs.compare import CompareError, compare_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _federation(run_dir: Path, clients: dict[int, dict[str, float]], *, epochs: int = 2, steps: int = 30) -> None:
    from flglm.jobs.summaries import federation_metrics

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"trainer:\n  max_epochs: {epochs}\n")
    for index, metrics in clients.items():
        (run_dir / f"client{index}").mkdir()
        losses = [3.0 - 2.0 * i / steps + 0.01 * index for i in range(steps)]
        (run_dir / f"client{index}" / "metrics.json").write_text(json.dumps({"metrics": metrics, "losses": losses}))
    per_client = {str(i): m for i, m in clients.items()}
    summary = {"clients": per_client, "federation": federation_metrics(per_client), "server": {"steps": 60}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _centralized(folder: Path, metrics: dict[str, float], *, steps: int = 60) -> None:
    folder.mkdir(parents=True)
    losses = [3.0 - 2.5 * i / steps for i in range(steps)]
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "losses": losses}))


CLIENT0 = {"val_acc": 0.80, "val_loss": 0.50, "samples": 100, "train_time_s": 10.0, "fedavg_rounds": 30}
CLIENT1 = {"val_acc": 0.70, "val_loss": 0.70, "samples": 300, "train_time_s": 12.0, "fedavg_rounds": 30}
CENTRAL = {"val_acc": 0.78, "val_loss": 0.55, "train_time_s": 8.0}


def test_a_federation_and_a_centralized_run_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _federation(tmp_path / "fed", {0: CLIENT0, 1: CLIENT1})
    _centralized(tmp_path / "central" / "centralized", CENTRAL)

    assert flglm_main(["compare", str(tmp_path / "fed"), str(tmp_path / "central"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    federated_acc = (0.80 * 100 + 0.70 * 300) / 400  # sample-weighted over the clients
    ratio = federated_acc / CENTRAL["val_acc"]
    assert f"fed federated / central centralized val_acc: {ratio:.3f}" in printed
    table = printed.split("\n\n")[0].splitlines()
    assert table[0].split() == ["val_acc", "val_loss", "train_time_s", "fedavg_rounds"]
    assert table[1].split()[:4] == ["fed", "federated", f"{federated_acc:.4f}", f"{(0.5 * 100 + 0.7 * 300) / 400:.4f}"]
    assert table[1].split()[-1] == "30"  # rounds: an integer, the federation's maximum
    assert table[2].split() == ["central", "centralized", "0.7800", "0.5500", "8.0000", "-"]

    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert written["reference"] == "central centralized" and written["metric"] == "val_acc"
    assert written["ratios"] == {"fed federated": pytest.approx(ratio)}
    assert [r["kind"] for r in written["runs"]] == ["federated", "centralized"]
    assert (tmp_path / "cmp" / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_one_demo_directory_holds_both_runs_and_gets_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "demo"
    _federation(run, {0: CLIENT0, 1: CLIENT1})
    _centralized(run / "centralized", CENTRAL)
    assert flglm_main(["compare", str(run)]) == 0
    assert "federated / centralized val_acc:" in capsys.readouterr().out
    comparison = compare_runs([run])
    assert [r.label for r in comparison.runs] == ["federated", "centralized"]
    assert set(comparison.runs[0].curves) == {"client 0 (federated)", "client 1 (federated)"}
    assert comparison.runs[0].epochs == 2
    assert (run / "comparison.json").is_file() and (run / "loss_curves.png").is_file()


def test_the_headline_metric_fits_the_task(tmp_path: Path) -> None:
    gen = {"val_loss": 1.2, "val_rouge1": 0.5, "val_rouge2": 0.3, "val_rougeL": 0.45, "val_bleu": 0.2, "samples": 10}
    _federation(tmp_path / "gen", {0: gen})
    _centralized(tmp_path / "gen-central", {**gen, "val_rougeL": 0.5})
    comparison = compare_runs([tmp_path / "gen", tmp_path / "gen-central"])
    assert comparison.metric == "val_rougeL" and comparison.ratios == {"gen federated": pytest.approx(0.9)}
    assert comparison.columns()[0] == "val_rougeL"

    lm = {"val_loss": 2.0, "val_ppl": 7.389, "samples": 10}
    _federation(tmp_path / "lm", {0: lm})
    _centralized(tmp_path / "lm-central", {"val_loss": 1.9, "val_ppl": 6.686})
    comparison = compare_runs([tmp_path / "lm-central", tmp_path / "lm"])
    assert comparison.metric == "val_ppl" and comparison.reference.label == "lm-central centralized"
    assert "(lower is better)" in comparison.ratio_lines()[0]


def test_two_federations_without_a_centralized_run_compare_to_the_first(tmp_path: Path) -> None:
    _federation(tmp_path / "a" / "run", {0: CLIENT0})
    _federation(tmp_path / "b" / "run", {0: CLIENT1})  # same folder name: labels take the parent too
    comparison = compare_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert [r.label for r in comparison.runs] == ["a/run federated", "b/run federated"]
    assert comparison.ratios == {"b/run federated": pytest.approx(0.70 / 0.80)}


def test_a_directory_without_a_finished_run_is_named_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _federation(tmp_path / "fed", {0: CLIENT0})
    unfinished = tmp_path / "unfinished"
    (unfinished / "client0").mkdir(parents=True)  # a federation that died: no summary.json
    assert flglm_main(["compare", str(tmp_path / "fed"), str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and f"{unfinished}: no finished run here" in err
    assert not (tmp_path / "fed" / "comparison.json").exists()

    assert flglm_main(["compare", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such directory" in capsys.readouterr().err


def test_unreadable_run_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text('{"clients": {')
    with pytest.raises(CompareError, match=r"broken/summary.json: cannot be read as JSON"):
        compare_runs([broken])
    (broken / "summary.json").write_text('{"server": {}}')
    with pytest.raises(CompareError, match=r"summary.json: has no 'federation' metrics \(keys: server\)"):
        compare_runs([broken])
    other = tmp_path / "other"
    _centralized(other, {"val_acc": 0.5})
    (other / "metrics.json").write_text("[1, 2]")
    with pytest.raises(CompareError, match=r"other/metrics.json: a JSON list, not the object a run writes"):
        compare_runs([other])
    with pytest.raises(CompareError, match="named twice"):
        compare_runs([tmp_path / "broken", tmp_path / "broken" / "."])
