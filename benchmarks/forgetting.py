"""Forgetting one class of 3-class Yin-Yang: koopnet's closed-form edit against honest baselines.

Every seed runs the clean protocol (``run_experiment(default_config("yinyang3", seed=s))``) and
takes the hybrid of the selected layer. On the same splits each method forgets class C:

- ``forget_class: METHOD``: koopnet's closed-form edits of the hybrid's linear read-out
  (:func:`koopnet.forget_class`, every method of :mod:`koopnet.forgetting`, fitted on the
  training split): ``reassign-match`` (the default), ``reassign-erase``, ``erase``, ``leace``,
  ``reassign`` and ``redirect`` (koopnet's first edit, kept as an ablation), and the default with
  ``rounds=1`` (one least-squares fit, no re-weighting); where the training split holds more
  than SUBSET samples (MNIST), also the default fitted on SUBSET of them drawn at random
  (the edit's cost grows with its samples: this is the time lever a user has);
- ``logit mask``: the hybrid with class C's logit set to -inf;
- ``gradient ascent``: the base network fine-tuned by ascent on class C's cross-entropy
  (full batch on the training samples of C, Adam lr 1e-3, stopped once C's training accuracy
  is at most 5% or after 100 steps);
- ``retrain``: the base network retrained from scratch without class C (same widths, recipe
  and seed): the gold standard.

Reported per method: test accuracy on C and on each kept class, each kept class's accuracy
relative to the unedited network it came from (the hybrid for the hybrid methods, the base
network otherwise), the accuracy on C of a linear probe (multinomial logistic regression on
the standardised penultimate features, i.e. the input of the last Linear, trained on the
training split with all labels, scored on C's test samples) and the time the method took.
Criteria (issue 13): C <= 5%, every kept class >= 98% of its accuracy, probe <= 20%, < 1 s.

The same three accuracies are also measured on the validation split (the probe trained on the
training split as before, scored on C's validation samples): the default method of
``forget_class`` is the closed-form method meeting all three accuracy criteria in the most
(seed, class) runs on validation; the test columns only report.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forgetting.py --seeds 0 1 2 3 4

``--cache DIR`` keeps each seed's trained networks (torch.save) so a rerun skips training.
Writes benchmarks/results/forgetting.{json,md}.

``--dataset mnist`` does the same on clean MNIST (10 classes): the networks are the cached clean
runs of benchmarks/mnist_runs.py (the hybrid of the best validation row over layers and h), the
splits are that run's (55k training, 5k validation, 10k test), every method as above; each
(seed, class)'s rows are kept in the cache so a rerun goes on where it stopped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forgetting.py --dataset mnist --seeds 0 1 2 \\
        --classes 0 1 2 --data-dir ../shared/data --out benchmarks/results/forgetting_mnist
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from koopnet.forgetting import METHODS as FORGET_METHODS
from koopnet.forgetting import forget_class
from koopnet.io.artifacts import atomic_write_text, write_json
from koopnet.io.datasets import yinyang_splits
from koopnet.lab.protocols import environment, run_experiment
from koopnet.lab.recipes import default_config
from koopnet.models import build_mlp, train_classifier

try:  # run as a script: benchmarks/ is on the path
    import mnist_runs
except ImportError:  # imported as benchmarks.forgetting
    from benchmarks import mnist_runs

RESULTS = Path(__file__).parent / "results"
# every method of koopnet.forgetting with its defaults, and the default with one least-squares
# fit (no re-weighting), the setting the default's rounds=4 was chosen against on validation
EDITS = {**{f"forget_class: {m}": {"method": m} for m in FORGET_METHODS},
         f"forget_class: {FORGET_METHODS[0]}, rounds=1": {"method": FORGET_METHODS[0],
                                                          "rounds": 1}}
#: training samples of the subset edit (run where the training split is larger): the edit's
#: cost grows with the samples it is fitted on, so a random subset trades fit for time
SUBSET = 10_000
SUBSET_EDIT = f"forget_class: {FORGET_METHODS[0]}, {SUBSET // 1000}k samples"
METHODS = (*EDITS, SUBSET_EDIT, "logit mask", "gradient ascent", "retrain")


class MaskLogit(nn.Module):
    """A network whose class ``c`` logit is -inf: never predicted, features untouched."""

    def __init__(self, net: nn.Module, c: int) -> None:
        super().__init__()
        self.net, self.c = net, c

    def forward(self, x):
        logits = self.net(x).clone()
        logits[:, self.c] = -torch.inf
        return logits


def penultimate(net: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The input of the network's last Linear layer. Shape: [n, features]."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    hook = last.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    try:
        with torch.no_grad():
            net(X)
    finally:
        hook.remove()
    return seen[0].to(torch.float64)


def probe_recovery(net, data, c: int) -> dict[str, float]:
    """Accuracy on class c (validation and test) of a logistic probe fitted on the training
    features."""
    F = penultimate(net, data.train.X)
    mu, sd = F.mean(0), F.std(0) + 1e-8
    ones = torch.ones(len(F), 1, dtype=F.dtype)
    A = torch.cat([(F - mu) / sd, ones], 1)
    W = torch.zeros(A.shape[1], int(data.train.y.max()) + 1, dtype=F.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(A @ W, data.train.y) + 1e-4 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    scores = {}
    for name in ("val", "test"):
        split = getattr(data, name)
        Ft = penultimate(net, split.X)
        At = torch.cat([(Ft - mu) / sd, torch.ones(len(Ft), 1, dtype=F.dtype)], 1)
        mask = split.y == c
        scores[name] = float(((At[mask] @ W).argmax(1) == c).double().mean())
    return scores


def per_class(net, X, y, n_classes: int) -> list[float]:
    with torch.no_grad():
        predicted = net(X).argmax(1)
    return [float((predicted[y == k] == k).double().mean()) for k in range(n_classes)]


def gradient_ascent(model, data, c: int, steps: int = 100, lr: float = 1e-3):
    model = copy.deepcopy(model).train()
    X, y = data.train.X[data.train.y == c], data.train.y[data.train.y == c]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            if float((model(X).argmax(1) == c).double().mean()) <= 0.05:
                break
        opt.zero_grad()
        (-nn.functional.cross_entropy(model(X), y)).backward()
        opt.step()
    return model.eval()


def retrain(config, data, c: int, attempts: int = 3):
    """As the protocol trains its base network (``train_base``): a run stuck below 95%
    training accuracy restarts with a fresh seed, and the best of at most 3 is kept."""
    keep = data.train.y != c
    X, y = data.train.X[keep], data.train.y[keep]
    best, best_acc = None, -1.0
    for attempt in range(attempts):
        torch.manual_seed(config.seed + 7919 * attempt)
        model = build_mlp(config.widths, config.activation)
        train_classifier(model, X, y, config.base, seed=config.seed + attempt)
        with torch.no_grad():
            train_acc = float((model(X).argmax(1) == y).double().mean())
        if train_acc > best_acc:
            best, best_acc = model, train_acc
        if train_acc >= 0.95:
            break
    return best.eval()


def experiment(seed: int, cache: Path | None):
    path = cache / f"yinyang3_seed{seed}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    results, figures = run_experiment(default_config("yinyang3", seed=seed), progress=False)
    layer = results["selected"]["layer"]
    kept = {"model": figures["model"], "hybrid": figures["layers"][layer]["fit"][1],
            "selected": results["selected"], "config": default_config("yinyang3", seed=seed)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(kept, path)
    return kept


def mnist_experiment(seed: int, data_dir: str, cache: Path):
    """The cached clean MNIST run of ``seed`` (benchmarks/mnist_runs.py) as ``experiment``
    returns a Yin-Yang one, and its splits."""
    run = mnist_runs.load(seed, data_dir, cache)
    data = run["data"]
    splits = SimpleNamespace(train=data.base, val=data.val, test=data.test,
                             n_classes=data.n_classes)
    return {"model": run["model"], "hybrid": run["sweep"]["hybrid"],
            "selected": run["sweep"]["selected"], "config": run["config"]}, splits


def subset(split, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SUBSET training samples drawn uniformly without replacement (the seed's own draw)."""
    pick = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(seed))[:SUBSET]
    return split.X[pick], split.y[pick]


def run_seed(seed: int, c: int, data, run: dict) -> list[dict]:
    model, hybrid, config = run["model"], run["hybrid"], run["config"]
    n = data.n_classes
    references = {split: {"hybrid": per_class(hybrid, getattr(data, split).X,
                                              getattr(data, split).y, n),
                          "model": per_class(model, getattr(data, split).X,
                                             getattr(data, split).y, n)}
                  for split in ("val", "test")}
    makers = {
        **{name: ("hybrid", lambda kw=kw: forget_class(hybrid, c, data.train.X, data.train.y,
                                                       **kw)) for name, kw in EDITS.items()},
        **({SUBSET_EDIT: ("hybrid", lambda: forget_class(hybrid, c, *subset(data.train, seed)))}
           if len(data.train.y) > SUBSET else {}),
        "logit mask": ("hybrid", lambda: MaskLogit(hybrid, c)),
        "gradient ascent": ("model", lambda: gradient_ascent(model, data, c)),
        "retrain": ("model", lambda: retrain(config, data, c)),
    }
    rows = []
    for method, (source, make) in makers.items():
        clock = time.perf_counter()
        net = make()
        seconds = time.perf_counter() - clock
        accs = per_class(net, data.test.X, data.test.y, n)
        val_accs = per_class(net, data.val.X, data.val.y, n)
        kept = [k for k in range(n) if k != c]
        probe = probe_recovery(net, data, c)
        rows.append({
            "seed": seed, "class": c, "method": method, "source": source,
            "layer": run["selected"]["layer"], "n_delays": run["selected"]["n_delays"],
            "forgotten_accuracy": accs[c],
            "kept_accuracy": {str(k): accs[k] for k in kept},
            "kept_retention": {str(k): accs[k] / references["test"][source][k] for k in kept},
            "reference_accuracy": references["test"][source],
            "probe_recovery": probe["test"], "seconds": seconds,
            "val": {"forgotten_accuracy": val_accs[c],
                    "kept_retention": {str(k): val_accs[k] / references["val"][source][k]
                                       for k in kept},
                    "probe_recovery": probe["val"]}})
        print(f"seed {seed} class {c} {method:30s} acc {[round(a, 3) for a in accs]} "
              f"probe {rows[-1]['probe_recovery']:.3f} {seconds:.2f} s", flush=True)
    return rows


def _ms(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def criteria(r: dict) -> dict[str, bool]:
    """The three accuracy criteria of issue 13 for one row's numbers (test or validation)."""
    return {"forgotten<=5%": r["forgotten_accuracy"] <= 0.05,
            "kept>=98%": min(r["kept_retention"].values()) >= 0.98,
            "probe<=20%": r["probe_recovery"] <= 0.20}


def ran(rows: list[dict]) -> list[str]:
    """The methods of METHODS that have rows, in METHODS' order."""
    return [m for m in METHODS if any(r["method"] == m for r in rows)]


def meets_all(r: dict) -> bool:
    return all(criteria(r).values())


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for c, method in [(c, m) for c in sorted({r["class"] for r in rows}) for m in METHODS]:
        mine = [r for r in rows if r["method"] == method and r["class"] == c]
        if not mine:  # the subset edit runs only where the training split is larger
            continue
        meets = {k: sum(criteria(r)[k] for r in mine) for k in criteria(mine[0])}
        meets["all three"] = sum(meets_all(r) for r in mine)
        meets["time<1s"] = sum(r["seconds"] < 1.0 for r in mine)
        meets["val: all three"] = sum(meets_all(r["val"]) for r in mine)
        out.append({"method": method, "class": c, "runs": len(mine), "meets": meets,
                    "forgotten": _ms(100 * r["forgotten_accuracy"] for r in mine),
                    "kept_min_retention": _ms(100 * min(r["kept_retention"].values())
                                              for r in mine),
                    "kept": {k: _ms(100 * r["kept_accuracy"][k] for r in mine)
                             for k in mine[0]["kept_accuracy"]},
                    "probe": _ms(100 * r["probe_recovery"] for r in mine),
                    "seconds": _ms(r["seconds"] for r in mine)})
    return out


NOTES = [
    "Methods (`koopnet.forgetting`): every closed-form method replaces the hybrid's read-out "
    "p = linear_map g by an affine map of the lifted state g, fitted on the training split. "
    "`erase` moves the forgotten class's mean of p onto the kept samples' mean with the least "
    "mean squared change of the kept samples' p; `leace` is LEACE of the class indicator at p; "
    "`reassign` fits, by least squares re-weighted 4 times, targets that send each sample of "
    "the class to the mean p of the kept class the network ranks next; `reassign-erase` is "
    "`reassign` followed by `erase`; `reassign-match` shares the class's samples out among the "
    "kept classes in proportion to their sizes, targets each share at its kept class's mean p "
    "and solves the least squares under the constraint that each share's mean of p' equals its "
    "class's mean (so the class's mean is the kept mean, but inside the kept classes rather than "
    "between them, where a three-class probe still isolates it: on the toy of "
    "tests/test_forget.py such a probe recovers 92% of the class after `reassign-erase`, under "
    "50% after `reassign-match`); `redirect` is koopnet's first edit.", "",
    "Where the probe reads: for a hybrid of layer 3 the tail is the last Linear alone, so the "
    "penultimate features are the edited p itself; for layer 2 they are ReLU(Linear(p)), one "
    "nonlinearity after the edit. The only change to a tail is the erasure's constant folded "
    "into its first Linear's bias (the same function as an affine read-out). Erasing at the "
    "penultimate features with a layer inserted before the last Linear was not done: that layer "
    "folds into the last Linear, so the network computes the same function and only the place "
    "the probe reads would move.", "",
    "How `reassign-match` was chosen (validation counts of runs meeting all three criteria, "
    "seeds 0-4 x classes 0-2, from a throwaway prototype that reused this script's probe and "
    "criteria; `reassign-erase` 4/15 there as here): targets at the p of each class sample's "
    "nearest kept sample, with or without `erase`, 0/15 (the nearest kept sample sits on the "
    "class boundary, so the class stays predicted: forgotten <= 5% in at most 3/15); targets "
    "from the Gaussian optimal transport of the class's p onto its runner-up class's or the "
    "kept samples' distribution, then `erase`, at most 2/15; `reassign-erase` with the class's "
    "samples weighted x3, x10 or x30, at most 3/15; the group-mean constraint applied as an "
    "oblique projection after the fit instead of inside it, 3-4/15; `reassign-match` with 2 or "
    "6 rounds, 3/15 and 4/15; with runner-up groups instead of proportional shares, 4/15; ridge "
    "1e-5 to 1e-3, at most 2/15. `reassign-match` as kept: 5/15 (test 4/15). The probe's "
    "recovery of classes 0 and 1 roughly halves against `reassign-erase`, but kept classes lose "
    "more accuracy: where the probe now passes, the kept-accuracy bar often fails. A check on "
    "seeds the choice never saw (the same command with `--seeds 5 6 7 8 9`): `reassign-match` "
    "meets all three in 4/15 runs on test (2/15 on validation), `reassign-erase` in 1/15 "
    "(1/15), retraining without the class in 4/15 (3/15).",
]


MNIST_NOTES = [
    "The forgotten classes, 0, 1 and 2, were fixed before any MNIST result was seen (the first "
    "three, as on Yin-Yang); seeds 3 and 4 were added after the results of seeds 0-2 were "
    "known, with nothing re-chosen ('runs' counts the (seed, class) runs of each row). Every "
    "method runs on "
    "the same splits of its seed. The methods are "
    "those of the Yin-Yang benchmark (benchmarks/results/forgetting.md describes them); the "
    "default of `forget_class` is Yin-Yang's validation choice and was not re-chosen here. "
    "The probe is a 10-class logistic regression on the penultimate features (55k training "
    "images), scored on the forgotten class's test images. Retraining uses the clean MNIST "
    "base recipe (`CLEAN_MNIST_BASE`) with the seed's own seed, without the class.",
]


MNIST_READING = [
    "Reading the table: retraining without the class (the gold standard) fails the probe bar in "
    "every run: a 10-class probe trained with all labels on the penultimate features of a "
    "network that never saw the class still finds it, so on MNIST this bar asks more than "
    "retraining gives. `reassign-match` meets all three criteria where the selected hybrid is "
    "of layer 3 (the probe reads the edited p itself) and fails the probe where it is of layer "
    "2 or 1 (one or two ReLU layers after the edit); per-layer counts below. On all 55k "
    "training images no closed-form method runs in under 1 s here (1 BLAS thread on a shared "
    "machine) except `leace` in some runs; fitted on 10k of them it does where the hybrid is of "
    "layer 3, at a cost in kept accuracy. `seconds` includes lifting the training samples "
    "through the hybrid.",
]


def by_layer(rows: list[dict]) -> list[str]:
    """Runs meeting all three accuracy criteria on test, per method and selected layer."""
    layers = sorted({r["layer"] for r in rows})
    lines = ["Runs meeting all three (test), by the selected hybrid's layer:", ""]
    for m in ran(rows):
        mine = [r for r in rows if r["method"] == m]
        lines.append(f"- {m}: " + ", ".join(
            f"layer {k} {sum(meets_all(r) for r in mine if r['layer'] == k)}/"
            f"{sum(r['layer'] == k for r in mine)}" for k in layers))
    return lines


def verdict(summary: list[dict]) -> list[str]:
    """Issue 13's bars in words: which methods meet each criterion in every run (test)."""
    keys = ("forgotten<=5%", "kept>=98%", "probe<=20%", "time<1s", "all three")
    every = {k: [m for m in ran(summary)
                 if all(x["meets"][k] == x["runs"] for x in summary if x["method"] == m)]
             for k in keys}
    both = [m for m in every["all three"] if m in every["time<1s"]]
    lines = [f"Issue 13's bar (every run: forgotten class <= 5%, every kept class >= 98% of its "
             f"accuracy, probe <= 20%, under 1 s): met by {', '.join(both) or 'no method'}."]
    lines += [f"- {k} in every run: {', '.join(every[k]) or 'no method'}" for k in keys]
    return lines


def markdown(summary: list[dict], args, classes, layers: dict, rows=None) -> str:
    mnist = getattr(args, "dataset", "yinyang3") == "mnist"
    if mnist:
        head = [f"# Forgetting a class of MNIST (seeds {args.seeds}, classes {classes})", "",
                "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forgetting.py "
                f"--dataset mnist --seeds {' '.join(map(str, args.seeds))} --classes "
                f"{' '.join(map(str, classes))} --data-dir {args.data_dir} --out "
                "benchmarks/results/forgetting_mnist` (1 BLAS thread; the networks come from "
                "`python benchmarks/mnist_runs.py` (cached in /tmp/mnist_runs): the clean "
                "MNIST protocol, the hybrid of the best validation row over layers and h; "
                f"selected layer per seed: {layers}).", "", *MNIST_NOTES, ""]
    else:
        head = [f"# Forgetting a class of 3-class Yin-Yang (seeds {args.seeds}, classes "
                f"{classes})",
                "", "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forgetting.py "
                f"--seeds {' '.join(map(str, args.seeds))} --classes "
                f"{' '.join(map(str, classes))}"
                + (f" --cache {args.cache}" if args.cache else "")
                + "` (2 shared CPU cores, 1 BLAS thread; the networks come from "
                "`run_experiment(default_config('yinyang3', seed=s))`, the hybrid of the "
                f"selected layer; selected layer per seed: {layers}).", "", *NOTES, ""]
    lines = [*head,
             "Test-set accuracy in %, mean ± sd over seeds. 'kept retention'"
             " is the worst kept class's accuracy relative to the unedited network it came "
             "from. 'meets' counts the runs meeting each criterion of issue 13.", "",
             "| class | method | forgotten class | kept classes | worst kept retention | probe on "
             "forgotten | seconds | meets (of runs) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        kept = ", ".join(f"{k}: {v}" for k, v in s["kept"].items())
        meets = ", ".join(f"{k} {v}/{s['runs']}" for k, v in s["meets"].items())
        lines.append(f"| {s['class']} | {s['method']} | {s['forgotten']} | {kept} | "
                     f"{s['kept_min_retention']} | {s['probe']} | {s['seconds']} | {meets} |")
    lines += ["", "Runs meeting each criterion, all forgotten classes together:", ""]
    for method in ran(summary):
        mine = [x for x in summary if x["method"] == method]
        runs = sum(x["runs"] for x in mine)
        meets = ", ".join(f"{k} {sum(x['meets'][k] for x in mine)}/{runs}"
                          for k in mine[0]["meets"])
        lines.append(f"- {method}: {meets}")
    if mnist:
        lines += ["", *verdict(summary), "", *MNIST_READING, "", *by_layer(rows)]
    lines += ["", "Validation selection (closed-form methods; runs meeting all three accuracy "
              "criteria on the validation split, the probe scored on C's validation samples):",
              ""]
    scores = {m: sum(x["meets"]["val: all three"] for x in summary if x["method"] == m)
              for m in EDITS}
    default = next(iter(EDITS))
    runs = sum(x["runs"] for x in summary if x["method"] == default)
    lines += [f"- {m}: {v}/{runs}" for m, v in scores.items()]
    lines.append(f"- best on validation: {max(scores, key=scores.get)} "
                 f"(the default of `forget_class` is {default})")
    return "\n".join(lines) + "\n"


def mnist_rows(args) -> list[dict]:
    """Rows of every (seed, class) on MNIST; each (seed, class) kept in the cache once run."""
    cache = args.cache or mnist_runs.CACHE
    rows = []
    for seed in args.seeds:
        run = None
        for c in args.classes:
            path = cache / f"forget_seed{seed}_class{c}.json"
            if not path.exists():
                if run is None:
                    run, data = mnist_experiment(seed, args.data_dir, cache)
                atomic_write_text(path, json.dumps(run_seed(seed, c, data, run)))
            rows += json.loads(path.read_text())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--classes", type=int, nargs="+", default=[2])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "forgetting")
    parser.add_argument("--dataset", choices=("yinyang3", "mnist"), default="yinyang3")
    parser.add_argument("--data-dir", default="../shared/data", help="MNIST's folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dataset == "mnist":
        rows = mnist_rows(args)
    else:
        data = yinyang_splits("yinyang3")
        rows = []
        for seed in args.seeds:
            for c in args.classes:
                rows += run_seed(seed, c, data, experiment(seed, args.cache))
    summary = summarise(rows)
    write_json(args.out.with_suffix(".json"),
               {**({"dataset": "mnist", "sweep_grid": mnist_runs.SWEEP}
                   if args.dataset == "mnist" else {}),
                "seeds": args.seeds, "classes": args.classes, "summary": summary,
                "rows": rows, "environment": environment()})
    layers = {r["seed"]: r["layer"] for r in rows}
    text = markdown(summary, args, args.classes, layers, rows)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
