"""Learned observables in ``koopnet reproduce``: ``ExperimentConfig.observables``.

Every run here is the Yin-Yang quick recipe on layer 1 only (seconds): the learned rows join the
delay rows of the clean sweep, ``select`` chooses among both on validation, the chosen learned
hybrid saves and reloads exactly, the default recipe and its rows do not change, and the paper
protocol refuses learned observables.
"""

import dataclasses
import json
import math

import pytest
import torch

from koopnet.cli import main
from koopnet.io.serialize import load_hybrid, save_hybrid
from koopnet.lab import protocols
from koopnet.lab.learned_rows import learned_spec
from koopnet.lab.protocols import load_protocol_data, run_experiment, select, sweep_layer
from koopnet.lab.recipes import ExperimentConfig, default_config
from koopnet.learned import LearnedObservable
from koopnet.observables import TimeDelay

PAPER_REFUSED = ("observables=('delay', 'learned'): the paper protocol fits the paper's delay "
                 "DMD only; use protocol 'clean' for learned observables, or leave observables "
                 "out.")
UNKNOWN = ("observables=('delay', 'koopman') must be distinct names among ('delay', 'learned'), "
           "at least one (for example ('delay', 'learned')).")


def _config(observables: tuple[str, ...]) -> ExperimentConfig:
    """The quick Yin-Yang recipe on layer 1 with h in {1, 3}, where the learned rows lead on
    validation (so a selection that ignored them would pick another row)."""
    config = default_config("yinyang", quick=True, observables=observables)
    return dataclasses.replace(config, layers=(1,), delays=(1, 3))


@pytest.fixture(scope="module")
def both():
    config = _config(("delay", "learned"))
    return config, *run_experiment(config, progress=False)


@pytest.fixture(scope="module")
def delay_only():
    return run_experiment(_config(("delay",)), progress=False)[0]


def _selection_key(row: dict) -> tuple:
    """Best validation accuracy, then more linear steps, then the smaller rank."""
    return row["val_accuracy"], row["linear_steps"], -row["rank_resolved"]


def _grid(rows: list[dict]) -> set[tuple]:
    return {(r["n_delays"], r["constant"], r["rank"], r["tikhonov"]) for r in rows}


def test_learned_rows_cover_the_grid_and_join_the_selection(both):
    config, results, figures = both
    learned = [r for r in results["sweep"] if r["observable"] == "learned"]
    delay = [r for r in results["sweep"] if r["observable"] == "delay"]
    assert delay and learned and len(learned) + len(delay) == len(results["sweep"])
    assert {(r["n_delays"], r["constant"]) for r in learned} == {
        (h, c) for h in config.delays for c in config.constants}
    assert _grid(learned) <= {(h, c, rank, t) for h in config.delays for c in config.constants
                              for rank in config.ranks for t in config.tikhonovs}
    assert all(r["trajectories"] == len(load_protocol_data(config).trajectories) for r in learned)
    # the maximum over both observables, on validation
    assert results["selected"] == max(results["sweep"], key=_selection_key)
    assert max(map(_selection_key, learned)) > max(map(_selection_key, delay)), (
        "at these h the learned rows no longer lead: pick h where they do, or this test "
        "cannot tell a selection among both observables from one among delay rows only")
    assert results["selected_per_layer"] == [results["selected"]]
    # the reported fit is the selected row's, whatever its observable
    hybrid = figures["layers"][1]["fit"][1]
    kind = LearnedObservable if results["selected"]["observable"] == "learned" else TimeDelay
    assert isinstance(hybrid.observable, kind)
    assert hybrid.rank_ == results["selected"]["rank_resolved"]
    assert results["config"]["observables"] == ["delay", "learned"]


def test_learned_rows_count_psi_as_the_blocks_it_costs(both):
    """Issue 11: a learned encoder is nonlinear work; its W^2-multiply-add blocks (rounded up)
    leave the linear steps and join the nonlinear blocks."""
    config, results, _ = both
    width = config.widths[1]
    for row in results["sweep"]:
        if row["observable"] == "delay":
            assert "encoder_blocks" not in row
            assert row["linear_steps"] == config.n_inserted + 1 - row["n_delays"]
            continue
        psi = learned_spec(config, row["n_delays"], row["constant"]).observable()
        assert row["encoder_blocks"] == math.ceil(psi.nonlinear_macs(width) / width ** 2) > 0
        assert row["linear_steps"] == (config.n_inserted + 1 - row["n_delays"]
                                       - row["encoder_blocks"])
        assert row["nonlinear_blocks"] == row["n_delays"] + row["encoder_blocks"]


def test_learned_rows_are_deterministic(both):
    """psi is seeded with the run's seed: the same scaled layer gives the same rows again."""
    config, results, figures = both
    data = load_protocol_data(config)
    rows = sweep_layer(config, figures["layers"][1]["scaled"], data, False)[0]
    assert rows == results["sweep"]


def test_default_recipe_and_its_rows_do_not_change(both, delay_only):
    assert ExperimentConfig().observables == ("delay",)
    for quick in (False, True):  # a delay-only recipe records what it recorded before
        config = default_config("yinyang", quick=quick)
        assert config.learned_steps == ExperimentConfig().learned_steps == 300
        assert config.learned_latent is None and config.observables == ("delay",)
    assert {r["observable"] for r in delay_only["sweep"]} == {"delay"}
    # adding learned rows leaves every delay row as it was
    _, results, _ = both
    assert [r for r in results["sweep"] if r["observable"] == "delay"] == delay_only["sweep"]
    assert delay_only["selected"] == select(delay_only["sweep"])


def test_a_selected_learned_hybrid_saves_and_reloads_exactly(tmp_path):
    config = _config(("learned",))
    results, figures = run_experiment(config, progress=False)
    assert {r["observable"] for r in results["sweep"]} == {"learned"}
    selected = results["selected"]
    hybrid = figures["layers"][selected["layer"]]["fit"][1]
    assert isinstance(hybrid.observable, LearnedObservable)
    assert hybrid.observable.n_delays == selected["n_delays"]
    data = load_protocol_data(config)
    with torch.no_grad():
        logits = hybrid(data.val.X)
    assert (logits.argmax(1) == data.val.y).float().mean().item() == pytest.approx(
        selected["val_accuracy"], abs=1e-6)
    save_hybrid(hybrid, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_hybrid(tmp_path)(data.val.X), logits)


def test_paper_protocol_refuses_learned_observables(tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        default_config("yinyang", "paper", observables=("delay", "learned"))
    assert str(err.value) == PAPER_REFUSED
    with pytest.raises(ValueError, match="the paper protocol fits the paper's delay DMD only"):
        dataclasses.replace(default_config("yinyang", "paper"), observables=("learned",))
    assert main(["reproduce", "yinyang", "--protocol", "paper", "--observables",
                 "delay,learned", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"koopnet: error: {PAPER_REFUSED}"
    assert not (tmp_path / "run").exists()


def test_bad_observables_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        default_config("yinyang", observables=("delay", "koopman"))
    assert str(err.value) == UNKNOWN
    for bad in [(), ("delay", "delay")]:
        with pytest.raises(ValueError, match="must be distinct names among"):
            default_config("yinyang", observables=bad)
    assert main(["reproduce", "yinyang", "--observables", "delay,koopman",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"koopnet: error: {UNKNOWN}"
    assert main(["reproduce", "resmlp-mnist", "--observables", "learned",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--observables applies to yinyang" in capsys.readouterr().err


def test_a_too_wide_latent_is_refused_before_any_training(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the base model was trained before the settings were checked")

    monkeypatch.setattr(protocols, "train_base", never)
    config = dataclasses.replace(_config(("learned",)), learned_latent=33)  # layer 1: W = 8
    with pytest.raises(ValueError, match=r"latent_dims=33 exceeds 4x the layer width"):
        run_experiment(config, progress=False)


def test_cli_records_the_observables_and_the_report_names_them(tmp_path, monkeypatch):
    seen = []

    def layer_one(config, **kwargs):  # the CLI's quick recipe, on layer 1 only
        seen.append(config)
        return _real_run(dataclasses.replace(config, layers=(1,)), **kwargs)

    _real_run = protocols.run_experiment
    monkeypatch.setattr(protocols, "run_experiment", layer_one)
    out = tmp_path / "run"
    assert main(["--quiet", "reproduce", "yinyang", "--quick", "--observables",
                 "delay,learned", "--out", str(out)]) == 0
    assert seen[0].observables == ("delay", "learned") and seen[0].learned_steps == 30
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["observables"] == ["delay", "learned"]
    assert {r["observable"] for r in results["sweep"]} == {"delay", "learned"}
    report = (out / "report.md").read_text()
    assert "| layer | observable | M | h=0 | h=1 | h=5 | h=10 |" in report
    assert "| 1 | learned | 5000 |" in report and "| 1 | delay | 5000 |" in report
    selected = results["selected"]
    assert f"Layer 1, {selected['observable']}, h={selected['n_delays']}," in report
