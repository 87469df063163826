"""Command-line interface: koopnet reproduce, and the stages train, scale, fit, evaluate, report.

Logs and progress bars go to stderr, results to files and a one-line summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from safetensors import SafetensorError

from koopnet._checks import check_int
from koopnet.cli.options import add_common, add_device
from koopnet.io.artifacts import check_output_dir, staged_folder

log = logging.getLogger("koopnet")


def _widths(text: str) -> list[int]:
    """``--widths 2,8,6,4,3,2`` -> [2, 8, 6, 4, 3, 2]."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--widths {text!r} must be comma-separated integers such as 2,8,6,4,3,2.") from None
    if len(widths) < 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"--widths {text!r} needs an input, at least one hidden and an output width, all >= 1.")
    return widths


def cmd_train(args: argparse.Namespace) -> int:
    from koopnet.cli.stages import stage_train

    path = stage_train(args.out, dataset=args.dataset, widths=args.widths,
                       activation=args.activation, labels=args.labels, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                       data_dir=args.data_dir, n_val=args.n_val, force=args.force,
                       progress=not args.quiet, device=args.device)
    metrics = json.loads(path.read_text())["config"]["metrics"]
    print(json.dumps({"out": str(path.parent), **metrics}))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from koopnet.cli.stages import stage_scale

    path = stage_scale(args.out, run=args.run, model=args.model, config=args.config,
                       data=args.data, labels=args.labels, layer=args.layer,
                       n_inserted=args.n_inserted, init=args.init, epochs=args.epochs,
                       seed=args.seed, data_dir=args.data_dir, force=args.force,
                       progress=not args.quiet, device=args.device)
    report = json.loads(path.read_text())["config"]["report"]
    print(json.dumps({"out": str(path.parent), "scaling_ok": report["ok"],
                      "agreement": report["agreement"], "init": report["init"]}))
    if not report["ok"]:
        print(f"koopnet: error: scaling of layer {args.layer} failed (agreement "
              f"{report['agreement']:.4f} with the original is below its tolerance); "
              f"'{path.parent}' holds the attempt for inspection, but do not fit on it: retry "
              "with another --seed, more --epochs or --init identity.", file=sys.stderr)
        return 1
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """``koopnet fit SCALE_DIR`` (staged) or ``koopnet fit --trajectories PATH`` (streamed)."""
    from koopnet.cli.fit import fit_command, spec_from_args

    if (args.scale_dir is None) == (args.trajectories is None):
        raise ValueError("koopnet fit needs either a scale-stage folder (koopnet fit SCALE_DIR "
                         "...) or --trajectories PATH, not both.")
    if args.trajectories is not None:
        if args.device.type != "cpu":
            raise ValueError(f"--device {args.device}: koopnet fit --trajectories runs on the "
                             "CPU only so far; use --device cpu.")
        return fit_command(args)
    from koopnet.cli.stages import stage_fit
    from koopnet.distributed import is_main, process_group

    with process_group():  # held here so that the rank is still known after the fit
        path = stage_fit(args.out, scale_dir=args.scale_dir, spec=spec_from_args(args),
                         force=args.force, device=args.device)
        rank0 = is_main()
    if not rank0:  # under torchrun rank 0 alone prints the result line
        return 0
    config = json.loads(path.read_text())["config"]
    print(json.dumps({"out": str(path.parent), "n_delays": config["fit"]["n_delays"],
                      "rank_": config["rank_"], "n_pairs": config["n_pairs"]}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from koopnet.cli.stages import stage_evaluate

    path = stage_evaluate(args.out, fit_dir=args.fit_dir, data=args.data, labels=args.labels,
                          data_dir=args.data_dir, force=args.force, device=args.device)
    print(json.dumps({"out": str(path.parent),
                      "metrics": json.loads(path.read_text())["metrics"]}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from koopnet.io.artifacts import atomic_write_text
    from koopnet.lab.report import load_results, render_report

    run = Path(args.run_dir)
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in '{run}'; run `koopnet reproduce` or "
                                "`koopnet evaluate` first.")
    results = load_results(path)
    try:
        if results.get("stage") == "evaluate":
            from koopnet.lab.report import render_evaluation

            text = render_evaluation(results)
        else:
            text = render_report(results, sorted(str(p) for p in run.glob("*.png")))
    except KeyError as err:  # an entry inside a row; the top level was checked by load_results
        raise ValueError(f"'{path}' lacks the key {err} in one of its entries; it is not a "
                         "complete results.json (re-run the command that wrote it).") from err
    atomic_write_text(run / "report.md", text)
    print(run / "report.md")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """``koopnet study``: observables, baselines, ablations and spectra over several seeds."""
    from koopnet.io.artifacts import write_json
    from koopnet.lab.run import write_run
    from koopnet.lab.spectra import make_figures, save_spectra
    from koopnet.lab.study import run_study

    out = check_output_dir(args.out, force=args.force)
    seeds = list(range(args.seed, args.seed + check_int(args.seeds, "--seeds", low=1)))
    results, figures, tensors = run_study(args.dataset, seeds=seeds, quick=args.quick,
                                          progress=not args.quiet, device=args.device)
    with staged_folder(out, force=args.force) as stage:
        save_spectra(stage, tensors)
        write_json(stage / "results.json", results)
        written = make_figures(stage, pdf=args.pdf)
        results["study"]["figures"] = [Path(p).name for p in written if p.endswith(".png")]
        write_run(stage, results, figures, pdf=args.pdf)
    print(json.dumps({"out": str(out), "seeds": seeds, "figures": len(written),
                      "comparison_rows": len(results["comparison"])}))
    return 0


def _add_stage_parsers(sub) -> None:
    """``koopnet train`` and ``koopnet scale``: the first two stages on saved artifacts."""
    train = sub.add_parser("train", help="stage 1: train an MLP -> model.safetensors/json")
    train.add_argument("--dataset", required=True,
                       help="yinyang, yinyang3, mnist, idx:PATH, X.npy (with --labels) or a "
                            ".safetensors file with tensors X and y")
    train.add_argument("--labels", help=".npy class indices for a .npy --dataset")
    train.add_argument("--widths", type=_widths, help="e.g. 2,8,6,4,3,2 (default: the data "
                                                      "set's paper architecture)")
    train.add_argument("--activation", default="relu",
                       help="relu, tanh, gelu, elu, leaky_relu, sigmoid, silu, softplus "
                            "or identity")
    train.add_argument("--epochs", type=int, help="default: the data set's recipe")
    train.add_argument("--lr", type=float, help="default: the data set's recipe")
    train.add_argument("--batch-size", type=int, help="default: the data set's recipe")
    train.add_argument("--n-val", type=int, help="validation images carved from an idx:PATH or "
                                                 "mnist training set (default: min(5000, a "
                                                 "tenth of it))")
    add_common(train)
    train.set_defaults(func=cmd_train)

    scale = sub.add_parser("scale", help="stage 2: insert and train width-preserving blocks "
                                         "after a hidden layer -> scaled.safetensors/json")
    scale.add_argument("run", nargs="?", metavar="TRAIN_DIR",
                       help="output folder of `koopnet train` (or use --model/--config)")
    scale.add_argument("--model", help="your own weights: safetensors of model.state_dict()")
    scale.add_argument("--config", help='JSON for --model, e.g. {"widths": [5, 12, 12, 7, 4], '
                                        '"activation": "tanh"}')
    scale.add_argument("--data", help="inputs: a data set name, X.npy or a .safetensors file "
                                      "with X (and y); default: the train folder's data set")
    scale.add_argument("--labels", help=".npy class indices for --data (optional)")
    scale.add_argument("--layer", type=int, required=True,
                       help="hidden layer k (1-based) that starts the trajectory; layer k+1 is "
                            "replaced")
    scale.add_argument("--n-inserted", type=int, default=10, help="inserted blocks N (T = N+2)")
    scale.add_argument("--init", choices=("he", "identity"), default="he")
    scale.add_argument("--epochs", type=int, help="scaling epochs (default 1000)")
    add_common(scale)
    scale.set_defaults(func=cmd_scale)


class UsageError(Exception):
    """A command line argparse refuses; main prints it as one line instead of usage + error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="koopnet", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    from koopnet.cli.reproduce import add_reproduce_parser

    add_reproduce_parser(sub)

    report = sub.add_parser("report", help="re-render report.md from a run folder")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    study = sub.add_parser("study", help="observables, baselines, ablations, spectra and "
                                         "figures over several seeds (Yin-Yang)")
    study.add_argument("dataset", help="yinyang")
    study.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    study.add_argument("--quick", action="store_true", help="tiny smoke-test version")
    add_common(study, data_dir=False, pdf=True)
    study.set_defaults(func=cmd_study)

    _add_stage_parsers(sub)
    from koopnet.cli.fit import add_fit_arguments

    fit = add_fit_arguments(sub.add_parser(
        "fit", help="stage 3: fit the DMD and build the hybrid from a scale folder; or a "
                    "streamed, sharded DMD fit from a trajectory file (torchrun-ready)"),
        stage=True)
    fit.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    add_device(fit)
    fit.set_defaults(func=cmd_fit)
    evaluate = sub.add_parser("evaluate", help="stage 4: accuracy of original, scaled and "
                                               "hybrid -> results.json")
    evaluate.add_argument("fit_dir", help="output folder of `koopnet fit SCALE_DIR`")
    evaluate.add_argument("--data", help="score on this data instead of the recorded data set's "
                                         "val/test splits (.npy, .safetensors or a name)")
    evaluate.add_argument("--labels", help=".npy class indices for --data")
    add_common(evaluate, seed=False)
    evaluate.set_defaults(func=cmd_evaluate)
    from koopnet.cli.edit import add_edit_parser

    add_edit_parser(sub)
    from koopnet.cli.suggest import add_suggest_parser

    add_suggest_parser(sub)
    from koopnet.cli.depth import add_depth_parsers

    add_depth_parsers(sub)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"koopnet: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.command in ("reproduce", "study"):
        import matplotlib

        matplotlib.use("Agg")  # figures go to files; never open a window
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if "device" in args:
            from koopnet.lab.devices import resolve_device

            args.device = resolve_device(args.device)
        return args.func(args)
    except KeyboardInterrupt:
        print("koopnet: interrupted; files written so far are complete and intact",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as err:  # ArtifactError included
        # json.JSONDecodeError is a ValueError, FileNotFoundError an OSError; KeyError is not
        # caught: every recorded key koopnet reads is checked where it is read, so a KeyError
        # here would be a bug in koopnet and keeps its traceback
        print(f"koopnet: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except SafetensorError as err:  # a reader that did not name the file; say what failed
        print(f"koopnet: error: a .safetensors file could not be read ({_one_line(err)}); "
              "check the paths given to this command.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
