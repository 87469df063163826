import json

import pytest

from koopnet.cli import main

SWEEP_KEYS = {"layer", "n_delays", "rank", "trajectories", "linear_steps", "nonlinear_blocks",
              "val_accuracy", "test_accuracy"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "yy"
    assert main(["--quiet", "reproduce", "yinyang", "--quick", "--out", str(out)]) == 0
    return out


def test_reproduce_quick_writes_results_report_and_figure(quick_run, capsys):
    results = json.loads((quick_run / "results.json").read_text())
    assert results["schema"] == 1 and results["dataset"] == "yinyang"
    assert results["protocol"] == "clean" and results["seed"] == 0
    assert set(results["original"]) >= {"val_accuracy", "test_accuracy"}
    assert [s["layer"] for s in results["scaled"]] == [1, 2, 3]
    assert results["sweep"] and all(SWEEP_KEYS <= set(row) for row in results["sweep"])
    for row in results["sweep"]:
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["linear_steps"] + row["nonlinear_blocks"] == 11
    # best validation score, ties to more linear steps, then the smaller rank; that test scores
    # cannot move it is shown in test_guards.py
    expected = max(results["sweep"], key=lambda r: (r["val_accuracy"], r["linear_steps"],
                                                   -r["rank_resolved"]))
    assert results["selected"] == expected
    assert {(r["pairing"], r["exact_rollout"]) for r in results["sweep"]} == {("trajectory", True)}
    assert set(results["environment"]) >= {"koopnet", "torch", "python", "device"}
    report = (quick_run / "report.md").read_text()
    assert "protocol `clean`" in report and "![eigenvalues](eigenvalues.png)" in report
    assert (quick_run / "eigenvalues.png").stat().st_size > 10_000


def test_existing_output_is_refused_without_force(quick_run, capsys):
    assert main(["--quiet", "reproduce", "yinyang", "--quick", "--out", str(quick_run)]) == 2
    assert "already exists and is not empty; pass --force" in capsys.readouterr().err


def test_report_rerenders_from_results(quick_run):
    before = (quick_run / "report.md").read_text()
    (quick_run / "report.md").unlink()
    assert main(["report", str(quick_run)]) == 0
    assert (quick_run / "report.md").read_text() == before


def test_report_on_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json in" in capsys.readouterr().err


def test_paper_protocol_quick(tmp_path):
    out = tmp_path / "paper"
    assert main(["--quiet", "reproduce", "yinyang", "--protocol", "paper", "--quick",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "paper" and "held_out_accuracy" in results["selected"]
    assert {row["trajectories"] for row in results["sweep"]} == {5000}
    assert {(r["pairing"], r["exact_rollout"]) for r in results["sweep"]} == {
        ("concatenated", False)}
    report = (out / "report.md").read_text()
    assert "Protocol **paper**" in report
    saved = next(r for r in results["sweep"] if (r["layer"], r["n_delays"]) == (1, 10))
    assert (f"| hybrid, layer 1, M=5000, h=10, full rank (the paper's saved run) | "
            f"{100 * saved['test_accuracy']:.2f} | 91.20 |") in report
