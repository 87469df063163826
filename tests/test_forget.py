"""Forgetting a class in closed form (koopnet.forgetting): the erasure's algebra on a
linear-Gaussian toy, reassign-match's shares and what a multinomial probe still finds, the input
left alone, save/load, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopnet import KoopmanHybrid, forget_class, load_hybrid, save_hybrid
from koopnet.editing import _lifted
from koopnet.forgetting import METHODS, _Moments, _shares
from koopnet.observables import TimeDelay

WIDTH = 5
# methods that equalise the class means (reassign-match: when the kept classes' sizes share the
# class's samples out evenly, as in _gaussians)
ERASING = ("reassign-match", "reassign-erase", "erase", "leace")


def _gaussians(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian classes in R^3 (float64). Shape: X [n, 3], y [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [-1.0, -2.0, 1.0]],
                           dtype=torch.float64)
    y = torch.arange(n) % 3
    return centres[y] + 0.7 * torch.randn(n, 3, generator=g, dtype=torch.float64), y


def _toy_hybrid(head: nn.Module, width: int, *, constant: bool = False) -> KoopmanHybrid:
    """A float64 hybrid linear up to its tail: ``head`` [3 -> width], identity roll-out, delay-0
    lifting (with the constant feature when asked, then a tail that starts with a ReLU), and a
    tail whose last Linear classifies the toy (least squares on one-hot targets)."""
    observable = TimeDelay(0, constant=constant).fit(torch.zeros(1, 1, width))
    eye = torch.eye(observable.n_output_features_, dtype=torch.float64)
    readout = observable.readout(width).to(torch.float64)
    tail = nn.Sequential(*([nn.ReLU()] if constant else []), nn.Linear(width, 3)).double()
    X, y = _gaussians(600, 1)
    with torch.no_grad():
        features = tail[:-1](head(X))
        features = torch.cat([features, torch.ones(len(X), 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(features, nn.functional.one_hot(y).double()).solution
        tail[-1].weight.copy_(coef[:-1].T)
        tail[-1].bias.copy_(coef[-1])
    return KoopmanHybrid(head, nn.Sequential(), tail, observable, basis=eye, operator=eye.clone(),
                         readout=readout, linear_map=readout.clone(), width=width,
                         linear_steps=1).eval()


def _toy(*, constant: bool = False) -> KoopmanHybrid:
    """The toy with a Linear head (its lifted state spans 3 directions)."""
    torch.manual_seed(0)
    return _toy_hybrid(nn.Linear(3, WIDTH).double(), WIDTH, constant=constant)


def _tanh_toy(width: int = 8) -> KoopmanHybrid:
    """As :func:`_toy` with a Tanh after the head: the lifted state spans ``width`` directions,
    room for an edit that must keep two classes apart."""
    torch.manual_seed(0)
    return _toy_hybrid(nn.Sequential(nn.Linear(3, width), nn.Tanh()).double(), width)


def _probe_recovery(net, X, y, Xt, yt, c: int) -> float:
    """Share of class c's held-out samples that a multinomial logistic probe on the input of the
    last Linear (fitted on X, y) assigns to c."""
    seen = []
    hook = net.tail[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        net(X), net(Xt)
    hook.remove()
    mu, sd = seen[0].mean(0), seen[0].std(0) + 1e-8
    A, At = (torch.cat([(F - mu) / sd, torch.ones(len(F), 1, dtype=F.dtype)], 1) for F in seen)
    W = torch.zeros(A.shape[1], 3, dtype=A.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(A @ W, y) + 1e-4 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((At[yt == c] @ W).argmax(1) == c).double().mean())


def _class_means(values: torch.Tensor, y: torch.Tensor, c: int):
    return values[y == c].mean(0), values[y != c].mean(0)


@pytest.mark.parametrize("method", ERASING)
@pytest.mark.parametrize("c", [0, 2])
def test_erasure_makes_the_class_means_coincide(method, c):
    hybrid = _toy()
    X, y = _gaussians(600, 1)
    edited = forget_class(hybrid, c, X, y, method=method)
    with torch.no_grad():  # the tail is one Linear: its outputs are affine in the edited p'
        before, after = hybrid(X), edited(X)
    inside, outside = _class_means(after, y, c)
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-10)
    gap = _class_means(before, y, c)
    assert float((gap[0] - gap[1]).abs().max()) > 0.5  # there was something to erase
    if method == "erase":  # the kept samples' mean does not move
        torch.testing.assert_close(outside, before[y != c].mean(0), rtol=0, atol=1e-10)
    if method == "leace":  # nor does the mean of all samples
        torch.testing.assert_close(after.mean(0), before.mean(0), rtol=0, atol=1e-10)


def test_the_offset_goes_into_the_constant_feature_when_there_is_one():
    hybrid = _toy(constant=True)
    X, y = _gaussians(600, 1)
    edited = forget_class(hybrid, 1, X, y, method="erase")
    for old, new in zip(hybrid.tail.state_dict().values(), edited.tail.state_dict().values(),
                        strict=True):
        assert torch.equal(old, new)  # the tail is not touched; the map holds the offset
    predicted = _lifted(edited, X) @ edited.linear_map.T  # p' itself, before the ReLU
    inside, outside = _class_means(predicted, y, 1)
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-10)


def test_erase_is_the_least_change_of_the_kept_samples():
    """Every edit p' = p - d (a^T (g - m_kept)) that equalises the means moves p along the same
    d = M dm / a^T dm; any direction a other than the one chosen moves the kept samples further
    (compared after the tail's Linear W, which scales every candidate alike)."""
    hybrid = _toy()
    X, y = _gaussians(600, 1)
    kept = y != 0
    with torch.no_grad():
        change = forget_class(hybrid, 0, X, y, method="erase")(X) - hybrid(X)  # W (p' - p)
        W = hybrid.tail[0].weight.detach()
    best = float((change[kept] ** 2).sum(1).mean())
    lifted = _lifted(hybrid, X)
    gap = lifted[~kept].mean(0) - lifted[kept].mean(0)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = gap + 0.3 * torch.randn(len(gap), generator=g, dtype=torch.float64)
        t = (lifted[kept] - lifted[kept].mean(0)) @ a / float(a @ gap)  # [n_kept]
        moved = (W @ hybrid.linear_map @ gap)[None, :] * t[:, None]
        assert float((moved ** 2).sum(1).mean()) > best


@pytest.mark.parametrize("method", METHODS)
def test_input_untouched_and_saved_edit_loads_equal(method, tmp_path):
    hybrid = _toy()
    X, y = _gaussians(600, 1)
    state = {k: v.clone() for k, v in hybrid.state_dict().items()}
    edited = forget_class(hybrid, 2, X, y, method=method)
    for key, value in hybrid.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert edited.dmd_ is None
    save_hybrid(edited, tmp_path / "edited")
    loaded = load_hybrid(tmp_path / "edited")
    for key, value in edited.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].to(value.dtype), value), key
    Xt, _ = _gaussians(50, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(Xt), edited(Xt), rtol=0, atol=1e-12)


def test_reassign_match_puts_each_share_on_its_kept_class_mean():
    """Class 1 has 300 training samples, class 2 has 100: class 0's 200 are shared 150 / 50, and
    each share's mean of the edited p' (here of the logits, affine in p') is its class's."""
    hybrid = _toy()
    X, y = _gaussians(900, 1)
    keep = (y != 2) | (torch.arange(len(y)) % 9 == 2)  # a third of class 2
    keep &= (y != 0) | (torch.arange(len(y)) < 600)  # 200 of class 0
    X, y = X[keep], y[keep]
    with torch.no_grad():
        shares = _shares(hybrid(X).double(), y, 0)
        after = forget_class(hybrid, 0, X, y, method="reassign-match")(X)
    assert sorted((int(mask.sum()), k) for mask, k in shares) == [(50, 2), (150, 1)]
    for mask, k in shares:
        torch.testing.assert_close(after[mask].mean(0), after[y == k].mean(0), rtol=0,
                                   atol=1e-10)


def test_reassign_match_hides_the_class_from_a_multinomial_probe():
    """Erasing moves class 0 onto the kept mean, between classes 1 and 2, where a three-class
    probe still finds it; shared out onto the kept classes' means it mostly does not."""
    hybrid = _tanh_toy()
    X, y = _gaussians(600, 1)
    Xt, yt = _gaussians(900, 2)
    recovered = {}
    for method in ("reassign-match", "reassign-erase"):
        edited = forget_class(hybrid, 0, X, y, method=method)
        with torch.no_grad():
            predicted = edited(Xt).argmax(1)
        accuracy = [float((predicted[yt == k] == k).double().mean()) for k in range(3)]
        assert accuracy[0] < 0.05 and min(accuracy[1:]) > 0.95, (method, accuracy)
        recovered[method] = _probe_recovery(edited, X, y, Xt, yt, 0)
    assert recovered["reassign-match"] < 0.5 < 0.8 < recovered["reassign-erase"], recovered


def test_reassign_erase_forgets_the_class_on_held_out_data():
    hybrid = _toy()
    X, y = _gaussians(600, 1)
    Xt, yt = _gaussians(900, 2)

    def per_class(net):
        with torch.no_grad():
            predicted = net(Xt).argmax(1)
        return [float((predicted[yt == k] == k).double().mean()) for k in range(3)]

    before = per_class(hybrid)
    assert min(before) > 0.95
    after = per_class(forget_class(hybrid, 2, X, y, method="reassign-erase"))
    assert after[2] < 0.05 and min(after[:2]) > 0.9


def test_refusals_name_the_problem_and_the_fix():
    hybrid = _toy()
    X, y = _gaussians(60, 1)
    with pytest.raises(ValueError,
                       match=r"method='bogus' must be 'reassign-match' or 'reassign-erase'"):
        forget_class(hybrid, 0, X, y, method="bogus")
    with pytest.raises(ValueError, match=r"weight= belongs to method='redirect'"):
        forget_class(hybrid, 0, X, y, method="reassign", weight=2.0)
    with pytest.raises(ValueError, match=r"method='erase' is one closed-form step"):
        forget_class(hybrid, 0, X, y, method="erase", rounds=2)
    relu_first = _toy()
    relu_first.tail = nn.Sequential(nn.ReLU(), relu_first.tail[0])
    with pytest.raises(ValueError, match=r"this tail starts with ReLU\. Use method='redirect'"):
        forget_class(relu_first, 0, X, y)
    forget_class(relu_first, 0, X, y, method="redirect", rounds=1)  # needs no offset
    with pytest.raises(ValueError, match=r"class_index=3 must be <= 2"):
        forget_class(hybrid, 3, X, y)
    with pytest.raises(ValueError, match=r"needs samples of class 2 and of the other classes"):
        forget_class(hybrid, 2, X[y != 2], y[y != 2])
    with pytest.raises(TypeError, match=r"forget_class needs a KoopmanHybrid"):
        forget_class(nn.Linear(3, 3), 0, X, y)


def test_cli_forget_method_needs_forget_class(tmp_path, capsys):
    from koopnet.cli.main import main

    save_hybrid(_toy(), tmp_path / "fit")
    code = main(["edit", str(tmp_path / "fit"), "--remove-modes", "0", "--forget-method",
                 "erase", "--out", str(tmp_path / "edited")])
    assert code != 0
    assert "--forget-method erase applies to --forget-class only" in capsys.readouterr().err
    assert not (tmp_path / "edited").exists()


def test_reweighted_moments_equal_the_weighted_centred_moments():
    """The incremental re-weighting of the least-squares methods equals the direct weighted,
    centred Gram and cross moments (it only skips the samples whose weight did not change)."""
    g = torch.Generator().manual_seed(3)
    lifted = torch.randn(200, 6, generator=g, dtype=torch.float64) + 5.0
    targets = torch.randn(200, 2, generator=g, dtype=torch.float64)
    moments = _Moments(lifted, targets)
    w = torch.ones(200, dtype=torch.float64)
    for _ in range(3):
        change = torch.where(torch.rand(200, generator=g) < 0.1, 2 * w, torch.zeros_like(w))
        moments.reweigh(change)
        w = w + change
        share = (w / w.sum())[:, None]
        g_mean, t_mean = (share * lifted).sum(0), (share * targets).sum(0)
        centred = lifted - g_mean
        gram, cross, g_bar, t_bar = moments.centred()
        torch.testing.assert_close(gram, (centred * w[:, None]).T @ centred, rtol=1e-10,
                                   atol=1e-9)
        torch.testing.assert_close(cross, (centred * w[:, None]).T @ (targets - t_mean),
                                   rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(g_bar, g_mean)
        torch.testing.assert_close(t_bar, t_mean)
