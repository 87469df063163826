"""Options shared by several ``koopnet`` subcommands, declared once so they are spelled the
same everywhere (``koopnet.cli.main``, ``koopnet.cli.reproduce``, ``koopnet.cli.depth``).

This module imports nothing from :mod:`koopnet.cli`, so any command module can use it without
an import cycle through :mod:`koopnet.cli.main`.
"""

from __future__ import annotations

import argparse


def add_common(parser: argparse.ArgumentParser, *, seed: bool = True, data_dir: bool = True,
               pdf: bool = False) -> None:
    """Options every writing command shares: --out, --force, --quiet, --device and, on request,
    --seed, --data-dir and --pdf."""
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    if data_dir:
        parser.add_argument("--data-dir", help="folder with MNIST (default: $KOOPNET_DATA)")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    if pdf:
        parser.add_argument("--pdf", action="store_true", help="also write PDF figures")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    add_device(parser)


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device, resolved by ``koopnet.cli.main.main`` before the command runs."""
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
