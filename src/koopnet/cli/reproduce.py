"""``koopnet reproduce``: the paper's experiment end to end, and the depth reproductions.

``koopnet reproduce yinyang|yinyang3|mnist|idx:PATH`` runs a protocol of
:mod:`koopnet.lab.protocols` (``--observables delay,learned`` adds learned-observable rows to the
clean protocol's sweep); ``resmlp-mnist`` and ``vit-mnist`` replace a residual MLP's or a ViT's
last blocks along depth (:mod:`koopnet.lab.residual_run`, :mod:`koopnet.lab.vit_run`).
"""

from __future__ import annotations

import argparse
import json
import logging

from koopnet.cli.options import add_common
from koopnet.io.artifacts import check_output_dir, staged_folder

log = logging.getLogger("koopnet")


def add_reproduce_parser(sub) -> argparse.ArgumentParser:
    rep = sub.add_parser("reproduce", help="run the paper's experiment end to end")
    rep.add_argument("dataset", help="yinyang, yinyang3, mnist, idx:PATH, resmlp-mnist or "
                                     "vit-mnist (a residual MLP's or a ViT's blocks replaced "
                                     "along depth)")
    rep.add_argument("--protocol", choices=["clean", "paper"], default="clean")
    rep.add_argument("--quick", action="store_true", help="tiny smoke-test version")
    rep.add_argument("--seeds", help="resmlp-mnist, vit-mnist: comma-separated seeds "
                                     "(default resmlp-mnist 0,1,2, vit-mnist 0; --quick: 0)")
    rep.add_argument("--observables", type=_observables, metavar="NAMES",
                     help="clean protocol: comma-separated observables of the sweep, chosen "
                          "among on validation: delay (default), learned or delay,learned")
    add_common(rep, pdf=True)
    rep.set_defaults(func=cmd_reproduce, seed=None)
    return rep


def _observables(text: str) -> tuple[str, ...]:
    """``--observables delay,learned`` -> ("delay", "learned"); the names are checked by the
    recipe (:func:`koopnet.lab.recipes.check_observables`), one message for API and CLI."""
    return tuple(part.strip() for part in text.split(","))


def cmd_reproduce(args: argparse.Namespace) -> int:
    seed_given = args.seed is not None  # reproduce's --seed defaults to None, meaning 0
    args.seed = 0 if args.seed is None else args.seed
    if args.dataset in ("resmlp-mnist", "vit-mnist") and args.observables is not None:
        raise ValueError(f"--observables applies to yinyang, yinyang3, mnist and idx:PATH; "
                         f"{args.dataset} chooses among its own methods. Leave it out.")
    if args.dataset == "resmlp-mnist":
        return _reproduce_depth(args, seed_given)
    if args.dataset == "vit-mnist":
        return _reproduce_vit(args, seed_given)
    if args.seeds is not None:
        raise ValueError(f"--seeds applies to resmlp-mnist only; for {args.dataset} pass one "
                         "--seed per run.")
    from koopnet.lab.protocols import run_experiment
    from koopnet.lab.recipes import default_config
    from koopnet.lab.run import write_run

    config = default_config(args.dataset, args.protocol, seed=args.seed, quick=args.quick,
                            data_dir=args.data_dir,
                            observables=args.observables or ("delay",))
    out = check_output_dir(args.out, force=args.force)
    log.info("reproducing %s (%s protocol, seed %d) into %s", args.dataset, args.protocol,
             args.seed, out)
    results, figures = run_experiment(config, progress=not args.quiet, device=args.device)
    with staged_folder(out, force=args.force) as stage:
        write_run(stage, results, figures, pdf=args.pdf)
    selected = results["selected"]
    print(json.dumps({"out": str(out), "original_test": results["original"]["test_accuracy"],
                      "selected": {k: selected[k] for k in ("layer", "n_delays", "rank",
                                                            "val_accuracy", "test_accuracy")}}))
    return 0


def _depth_seeds(args: argparse.Namespace, seed_given: bool, name: str, default):
    """The seeds of a depth reproduction: --seeds 0,1,2, else ``default``."""
    if args.protocol != "clean":
        raise ValueError(f"--protocol {args.protocol} does not apply to {name} (it has only "
                         "the clean protocol); leave --protocol out.")
    if seed_given and args.seeds is not None:
        raise ValueError("pass either --seed S (one seed) or --seeds 0,1,2, not both.")
    if args.seeds is None:
        return default
    try:
        return tuple(int(part) for part in args.seeds.split(","))
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r} must be comma-separated integers such "
                         "as 0,1,2.") from None


def _reproduce_depth(args: argparse.Namespace, seed_given: bool) -> int:
    """``koopnet reproduce resmlp-mnist``: residual MLP, its last blocks replaced along depth."""
    from koopnet.lab.residual_run import depth_config, run_depth, write_depth_run

    seeds = _depth_seeds(args, seed_given, "resmlp-mnist", default=None)
    config = depth_config(seed=args.seed if seed_given else None, seeds=seeds,
                          quick=args.quick, data_dir=args.data_dir)
    out = check_output_dir(args.out, force=args.force)
    log.info("reproducing resmlp-mnist (seeds %s) into %s", list(config.seeds), out)
    results = run_depth(config, args.device)
    with staged_folder(out, force=args.force) as stage:
        write_depth_run(stage, results, pdf=args.pdf)
    summary = {f"{r['method']} x{r['span']}": round(r["test_mean"], 2)
               for r in results["summary"]}
    print(json.dumps({"out": str(out), "seeds": list(config.seeds), "test": summary}))
    return 0


def _reproduce_vit(args: argparse.Namespace, seed_given: bool) -> int:
    """``koopnet reproduce vit-mnist``: a small ViT, its last blocks replaced along depth."""
    from koopnet.lab.vit_run import run_vit, vit_config, write_vit_run

    seeds = _depth_seeds(args, seed_given, "vit-mnist",
                         default=(args.seed,) if seed_given else None)
    config = vit_config(seeds=seeds, quick=args.quick, data_dir=args.data_dir)
    out = check_output_dir(args.out, force=args.force)
    log.info("reproducing vit-mnist (seeds %s) into %s", list(config.seeds), out)
    results = run_vit(config, args.device)
    with staged_folder(out, force=args.force) as stage:
        write_vit_run(stage, results, pdf=args.pdf)
    print(json.dumps({"out": str(out), "seeds": list(config.seeds),
                      "original_test": [o["test_accuracy"] for o in results["original"]],
                      "acceptance": results["acceptance"]}))
    return 0
