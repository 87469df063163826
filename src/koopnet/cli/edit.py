"""``koopnet edit FIT_DIR``: remove Koopman modes or forget a class, writing a new hybrid folder.

The output is a hybrid folder like ``koopnet fit``'s (``hybrid.safetensors/json``, written through
:func:`koopnet.io.artifacts.staged_folder`); it records the edit, the hybrid it came from and
keeps the scale folder and data set of that hybrid, so ``koopnet evaluate OUT`` scores it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from koopnet.forgetting import METHODS

_MODES_HELP = "comma-separated mode indices to remove, e.g. 0,3 (order: koopnet.editing.spectrum)"


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--remove-modes {text!r} must be comma-separated integers such as 0,3.") from None


def add_edit_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("edit", help="remove Koopman modes or forget a class of a fitted "
                                         "hybrid -> a new hybrid folder")
    parser.add_argument("fit_dir", help="a folder holding hybrid.json (koopnet fit or edit)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove-modes", type=_indices, help=_MODES_HELP)
    how.add_argument("--abs-below", type=float, metavar="R",
                     help="remove every mode with |eigenvalue| < R")
    how.add_argument("--forget-class", type=int, metavar="C",
                     help="forget class C in closed form (koopnet.forget_class), "
                          "fitted on the recorded data set's training split")
    parser.add_argument("--forget-method", choices=METHODS, default=None,
                        help="how --forget-class edits the read-out (koopnet.forgetting; "
                             f"default {METHODS[0]})")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    parser.set_defaults(func=edit_command)
    return parser


def edit_command(args: argparse.Namespace) -> int:
    from koopnet.cli.stages import _check_inputs_outside, _stage_folder
    from koopnet.editing import abs_below, edit_modes
    from koopnet.forgetting import forget_class
    from koopnet.io.artifacts import check_output_dir, staged_folder
    from koopnet.io.serialize import load_with_meta, save_hybrid
    from koopnet.io.sources import fit_split, reload_data

    if args.forget_method is not None and args.forget_class is None:
        raise ValueError(f"--forget-method {args.forget_method} applies to --forget-class only; "
                         "drop it or pass --forget-class C.")
    check_output_dir(args.out, force=args.force)
    folder = _stage_folder(args.fit_dir, "hybrid", "edit", "fit")
    _check_inputs_outside(args.out, folder)
    hybrid, meta = load_with_meta(folder, "hybrid")
    config = meta["config"]
    clock = time.perf_counter()
    if args.forget_class is not None:
        splits, _ = reload_data(meta, folder / "hybrid.json", "fit",
                                "forget a class with koopnet.forget_class instead")
        X, y = fit_split(splits)
        if y is None:
            raise ValueError(f"the data set recorded in '{folder}/hybrid.json' has no labels; "
                             "--forget-class needs labelled training data.")
        method = args.forget_method or METHODS[0]
        edited = forget_class(hybrid, args.forget_class, X, y, method=method)
        edit = {"forget_class": args.forget_class, "method": method}
    elif args.remove_modes is not None:
        edited = edit_modes(hybrid, remove=args.remove_modes)
        edit = {"remove_modes": args.remove_modes}
    else:
        edited = edit_modes(hybrid, where=abs_below(args.abs_below))
        edit = {"abs_below": args.abs_below}
    seconds = round(time.perf_counter() - clock, 3)
    reserved = {"architecture", "layer", "width", "out_width", "linear_steps", "pad_value",
                "rank_", "compute_dtype", "observable"}
    kept = {k: v for k, v in config.items() if k not in reserved}
    edits = [*kept.get("edits", []), edit]
    sources = {**kept.get("sources", {}), "hybrid": str(folder.resolve())}
    settings = {**kept, "stage": "edit", "edits": edits, "sources": sources,
                "seconds": seconds}
    parents = {**meta.get("parents", {}), "hybrid": meta["sha256"]}
    with staged_folder(args.out, force=args.force) as stage:
        path = save_hybrid(edited, stage, "hybrid", metadata=settings, parents=parents)
    print(json.dumps({"out": str(Path(args.out)), "edit": edit, "seconds": seconds,
                      "file": path.name}))
    return 0
