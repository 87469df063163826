"""Command-line interface: ``koopnet reproduce``, ``koopnet report``, ``koopnet fit``.

Logs and progress bars go to stderr, results to files and a one-line summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("koopnet")


def _write_run(out: Path, results: dict, figures: dict, *, pdf: bool = False) -> list[str]:
    """results.json first, then the figures, then report.md (which links them)."""
    from koopnet.artifacts import write_json
    from koopnet.plots import plot_eigenvalues, save_figure
    from koopnet.report import render_report

    write_json(out / "results.json", results)
    results = json.loads((out / "results.json").read_text())  # render exactly what was saved
    written = []
    layers = figures.get("layers", {})
    if layers:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(layers), figsize=(4.4 * len(layers), 4.6), squeeze=False,
                                 layout="constrained")
        for ax, (layer, info) in zip(axes[0], layers.items(), strict=True):
            best, dmd = info["best"], info["fit"][0]
            plot_eigenvalues(dmd.eigenvalues_, ax, title=(
                f"{results['dataset']} layer {layer}: h={best['n_delays']}, "
                f"rank {best['rank_resolved']}"))
        fig.suptitle(f"DMD eigenvalues of the selected operators ({results['protocol']} "
                     "protocol)")
        written += save_figure(fig, out / "eigenvalues", pdf=pdf)
    from koopnet.artifacts import atomic_write_text

    atomic_write_text(out / "report.md", render_report(results, written))
    return written


def cmd_reproduce(args: argparse.Namespace) -> int:
    from koopnet.artifacts import prepare_output_dir
    from koopnet.experiments import default_config, run_experiment

    out = prepare_output_dir(args.out, force=args.force)
    config = default_config(args.dataset, args.protocol, seed=args.seed, quick=args.quick)
    if args.data_dir:
        config.data_dir = args.data_dir
    log.info("reproducing %s (%s protocol, seed %d) into %s", args.dataset, args.protocol,
             args.seed, out)
    results, figures = run_experiment(config, progress=not args.quiet)
    _write_run(out, results, figures, pdf=args.pdf)
    selected = results["selected"]
    print(json.dumps({"out": str(out), "original_test": results["original"]["test_accuracy"],
                      "selected": {k: selected[k] for k in ("layer", "n_delays", "rank",
                                                            "val_accuracy", "test_accuracy")}}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from koopnet.artifacts import atomic_write_text
    from koopnet.report import render_report

    run = Path(args.run_dir)
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in '{run}'; run `koopnet reproduce` first.")
    results = json.loads(path.read_text())
    if results.get("schema") != 1:
        raise ValueError(f"'{path}' has schema {results.get('schema')!r}; this koopnet reads 1.")
    figures = sorted(str(p) for p in run.glob("*.png"))
    atomic_write_text(run / "report.md", render_report(results, figures))
    print(run / "report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopnet", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run the paper's experiment end to end")
    rep.add_argument("dataset", help="yinyang, yinyang3, mnist or idx:PATH")
    rep.add_argument("--out", required=True, help="output folder (refused if not empty)")
    rep.add_argument("--protocol", choices=["clean", "paper"], default="clean")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--quick", action="store_true", help="tiny smoke-test version")
    rep.add_argument("--data-dir", help="folder with MNIST (default: $KOOPNET_DATA)")
    rep.add_argument("--force", action="store_true", help="write into a non-empty --out")
    rep.add_argument("--pdf", action="store_true", help="also write PDF figures")
    rep.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    rep.set_defaults(func=cmd_reproduce)

    report = sub.add_parser("report", help="re-render report.md from a run folder")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    from koopnet.fitting import add_fit_arguments, fit_command

    fit = add_fit_arguments(sub.add_parser("fit", help="streamed, sharded DMD fit from a "
                                                      "trajectory file (torchrun-ready)"))
    fit.set_defaults(func=fit_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("koopnet: interrupted; files written so far are complete and intact",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"koopnet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
