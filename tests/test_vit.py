"""koopnet reproduce vit-mnist: the small ViT, its depth replacements and the quick run.

The model tests run on random inputs; the reproduction tests need the real MNIST (skipped,
with the reason printed, when ../shared/data is absent)."""

import dataclasses
import json

import pytest
import torch

from koopnet.cli.main import main
from koopnet.io.datasets import Split, idx_splits
from koopnet.lab import vit
from koopnet.lab.residual import select
from koopnet.lab.vit_run import run_seed, vit_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = vit.ViT().eval()
    X = torch.randn(48, 784)
    return model, X, torch.randint(0, 10, (48,))


def test_vit_blocks_act_on_the_token_stream(tiny):
    model, X, _ = tiny
    states = vit.vit_states(model, X)
    assert states.shape == (48, 7, 17, 64)
    assert [n for n, _ in model.named_children()][:4] == ["embed", "blocks", "norm", "head"]
    with torch.no_grad():
        logits = model(X)
        assert logits.shape == (48, 10)
        for start in range(7):  # the tail from any state is the rest of the forward pass
            torch.testing.assert_close(model.tail(states[:, start], start), logits)


def test_cached_scores_match_the_rebuilt_modules(tiny):
    """Selection scores replacements from cached states; each rebuilt module must agree."""
    model, X, y = tiny
    states, held = vit.vit_states(model, X[:32]), vit.vit_states(model, X[32:])
    grid = {"delays": (0, 1), "flat_delays": (0,), "ranks": {"pos": (None, 8), "flat": (None,)},
            "tikhonovs": (0.0,), "ridges": (1e-2,), "lifting_spans": (2,), "lifting_latent": 4,
            "lifting_hidden": 3, "lifting_steps": 2, "lifting_seed": 0}
    liftings = {}
    sweep = vit.sweep_spans(model, states, held, y[32:], grid, spans=(1, 2, 6),
                            liftings=liftings)
    assert {r["method"] for r in sweep} == {"identity", "LS/pos", "LS/flat", "ridge/pos",
                                           "ridge/flat", "DMD/pos", "DMD/flat", "lifting/flat"}
    assert max(r["n_delays"] or 0 for r in sweep if r["method"] == "DMD/pos") == 1
    lifting = next(r for r in sweep if r["method"] == "lifting/flat")
    assert lifting["span"] == 2 and list(liftings) == [2]
    # psi reads the 17 x 64 flattened state: 1088 x 3 + 3 x 4 multiply-adds
    assert lifting["nonlinear_macs"] == 1088 * 3 + 3 * 4
    assert lifting["block_macs"] == vit.block_macs(64, 17, 2)
    for row in select(sweep):
        replaced = vit.build_replacement(model, states, row, liftings)
        assert vit.score(replaced, X[32:], y[32:]) == pytest.approx(row["val_accuracy"])
    # without the cache the lifting is trained again, to the same hybrid (seeded)
    again = vit.build_replacement(model, states, lifting)
    with torch.no_grad():
        torch.testing.assert_close(again(X[32:]),
                                   vit.build_replacement(model, states, lifting, liftings)(X[32:]))


def test_block_macs_match_torch_flop_counter():
    """torch counts the block's Linear layers (its CPU attention kernel is not counted): they
    and the attention's scores and weighted sum (2 L^2 W) make up block_macs."""
    from torch.utils.flop_counter import FlopCounterMode

    W, L, m = 8, 3, 2
    with FlopCounterMode(display=False) as counter:
        vit.Block(W, 2, m).eval()(torch.randn(1, L, W))
    assert vit.block_macs(W, L, m) == counter.get_total_flops() // 2 + 2 * L * L * W


def test_profile_covers_every_span(tiny):
    model, X, y = tiny
    states, held = vit.vit_states(model, X[:32]), vit.vit_states(model, X[32:])
    rows = vit.linearity_profile(model, states, held, y[32:], flat=False)
    assert len(rows) == 21 and {r["blocks"] for r in rows} == set(range(1, 7))
    assert all(0.0 <= r["dmd_residual"] and 0.0 <= r["val_accuracy_ls"] <= 1.0 for r in rows)


def _tiny_config(mnist_dir):
    return dataclasses.replace(vit_config(quick=True, data_dir=str(mnist_dir)),
                               train_subset=600, eval_subset=200, fit_subset=100, spans=(2,))


def test_selection_ignores_the_test_labels(mnist_dir):
    config = _tiny_config(mnist_dir)
    splits = idx_splits(str(mnist_dir), name="mnist", n_val=None, seed=0)
    train = splits.train.subset(slice(0, 600))
    val, test = splits.val.subset(slice(0, 200)), splits.test.subset(slice(0, 200))
    scrambled = Split(test.X, test.y[torch.randperm(len(test.y),
                                                    generator=torch.Generator().manual_seed(1))])
    keys = ("span", "method", "n_delays", "rank", "tikhonov", "ridge", "val_accuracy")
    runs = [run_seed(config, 0, (train, val, t)) for t in (test, scrambled)]
    assert [{k: r[k] for k in keys} for r in runs[0]["rows"]] == \
        [{k: r[k] for k in keys} for r in runs[1]["rows"]]
    assert runs[0]["original"]["val_accuracy"] == runs[1]["original"]["val_accuracy"]


def test_quick_reproduction_writes_a_run(mnist_dir, tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["--quiet", "reproduce", "vit-mnist", "--quick", "--data-dir", str(mnist_dir),
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seeds"] == [0] and printed["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "vit_mnist.png"]
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "vit-mnist" and len(results["profile"]) == 21
    for row in results["rows"]:  # the rebuilt module scores what selection scored
        assert row["val_accuracy_module"] == pytest.approx(row["val_accuracy"])
    assert "## Acceptance" in (out / "report.md").read_text()


def test_vit_reproduction_refuses_the_paper_protocol(tmp_path, capsys):
    assert main(["reproduce", "vit-mnist", "--protocol", "paper", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--protocol paper does not apply to vit-mnist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
