"""Default scaling recipes follow the data: a step budget, an early stop, one log line."""

import logging
import math

import torch

import koopnet
from koopnet.linearization import describe_recipe, scaling_recipe
from koopnet.models import TrainConfig, fit_minibatch
from koopnet.scaling import DEFAULT_SCALING


def test_small_data_keeps_the_full_batch_recipe():
    assert scaling_recipe(5000) is DEFAULT_SCALING
    assert scaling_recipe(300) is DEFAULT_SCALING


def test_large_data_keeps_the_step_budget_not_the_epochs():
    recipe = scaling_recipe(20000)
    per_epoch = math.ceil(20000 / recipe.batch_size)
    assert per_epoch == 4
    assert recipe.epochs * per_epoch == 1000  # the same number of AdamW steps as on 5k points
    assert recipe.plateau_patience == DEFAULT_SCALING.plateau_patience // per_epoch
    assert recipe.stop_patience == 3 * recipe.plateau_patience
    assert describe_recipe(recipe, 20000) == (
        "scaling on 20000 samples: up to 1000 AdamW steps (250 epochs of batch 5000, lr 0.01), "
        "early stop after 75 epochs without improvement")


def test_early_stop_ends_training_on_a_plateau():
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1)
    X = torch.randn(64, 2)
    target = X @ torch.tensor([[1.0], [-2.0]])  # exactly learnable: the loss plateaus near 0
    config = TrainConfig(epochs=5000, batch_size=64, lr=0.1, weight_decay=0.0,
                         stop_patience=20)
    history = fit_minibatch(module, torch.nn.functional.mse_loss, X, target, config, seed=0)
    assert 20 < len(history) < 5000
    never = fit_minibatch(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss, X, target,
                          TrainConfig(epochs=300, batch_size=64, lr=0.1), seed=0)
    assert len(never) == 300  # without stop_patience every epoch runs


def test_linearize_says_what_it_chose(caplog):
    torch.manual_seed(0)
    model = koopnet.build_mlp([2, 6, 6, 2], "tanh")
    with caplog.at_level(logging.INFO, logger="koopnet.linearization"):
        koopnet.linearize(model, layer=1, data=torch.rand(40, 2), n_inserted=2, n_delays=1,
                          scaling_config=TrainConfig(epochs=2, batch_size=40))
    assert "scaling on 40 samples: up to 2 AdamW steps (2 epochs of batch 40" in caplog.text
